"""The optimizer and the pure train and eval steps over the `(model, optimizer)` state.

The model and its optimizer live as one NNX state pytree (`nnx.split`), so the jitted
steps are pure functions of (state, batch) and a checkpoint holds everything a resumed
run needs: parameters, optimizer state, the router/dropout RNG streams and the step
(inside the optimizer).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from moejax.models.transformer import TransformerLM, moe_layer_indices
from moejax.parallel import sharding
from moejax.training import checkpoint as checkpoint_lib
from moejax.training.trainable import trainable_filter


def decays(path, param) -> bool:
  """Whether AdamW decays the parameter at `path` (a pytree key path): matrices do (kernels,
  embeddings, expert stacks); vectors do not (norm scales, biases). A scanned stack of
  layers (`stacks/...`) adds a leading layers axis, which does not make a vector a matrix."""
  stacked = any(getattr(key, "key", None) == "stacks" for key in path)
  return param.ndim - int(stacked) >= 2


OPTIMIZERS = ("adamw", "muon")
# Matrices Muon leaves to AdamW: the token embedding and output head (Jordan et al. 2024,
# Liu et al. 2025 keep them on AdamW) and the router's weights.
ADAM_MATRICES = ("embed", "lm_head", "router_kernel", "noise_kernel", "shared_gate")


def muon_dimensions(path, param) -> MuonDimensionNumbers | None:
  """Muon's axes for the parameter at `path`, or None for AdamW. Muon (Jordan et al. 2024,
  "Muon: An optimizer for hidden layers"; Liu et al. 2025, "Muon is Scalable for LLM
  Training", arXiv:2502.16982) orthogonalises each hidden matrix's momentum: kernels
  `[in, out]` and expert stacks `[experts, in, out]`, each expert (and each layer of a
  scanned stack) separately, its leading axes being batch axes. Vectors (norm scales,
  biases), the embedding, the output head and the router train with AdamW."""
  names = {getattr(key, "key", None) for key in path}
  if not decays(path, param) or names & set(ADAM_MATRICES):
    return None
  return MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)


def _scale_to_rms(rms: float) -> optax.GradientTransformation:
  """Scales each orthogonalised update `[..., A, B]` by `rms · sqrt(max(A, B))`, giving it
  RMS `rms` as AdamW's typically has (Liu et al. 2025, arXiv:2502.16982, §2.2, with 0.2)."""

  def update(updates, state, params=None):
    del params
    scale = lambda u: u * (rms * math.sqrt(max(u.shape[-2], u.shape[-1])))
    return jax.tree.map(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train_config: ml_collections.ConfigDict):
  """`train.optimizer` with linear warmup and cosine decay, global-norm clipping; no decay
  on vectors (nor on frozen parameters, which the optimizer does not hold: `build`).

  'adamw': AdamW on every parameter. 'muon': Muon on the hidden matrices
  (`muon_dimensions`; optax's `scale_by_muon`: Nesterov momentum `train.muon_momentum`,
  five Newton-Schulz steps), its updates rescaled to RMS `train.muon_update_rms` so that
  one learning rate and weight decay serve both (`_scale_to_rms`), and the same AdamW as
  'adamw' on the rest.

  Returns (optax transformation, learning-rate schedule).
  """
  tc = train_config
  if tc.warmup_steps >= tc.num_steps:
    raise ValueError(
      f"train.warmup_steps={tc.warmup_steps} must be < train.num_steps={tc.num_steps}."
    )
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=tc.learning_rate,
    warmup_steps=tc.warmup_steps,
    decay_steps=tc.num_steps,
    end_value=tc.learning_rate * tc.min_learning_rate_ratio,
  )
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(decays, params)
  adamw = optax.adamw(
    schedule, b1=tc.adam_b1, b2=tc.adam_b2, weight_decay=tc.weight_decay, mask=decay_mask
  )
  update = adamw
  if tc.optimizer == "muon":
    dimensions = lambda tree: jax.tree_util.tree_map_with_path(muon_dimensions, tree)
    muon = optax.chain(
      scale_by_muon(beta=tc.muon_momentum, weight_dimension_numbers=dimensions),
      _scale_to_rms(tc.muon_update_rms),
      optax.add_decayed_weights(tc.weight_decay),
      optax.scale_by_learning_rate(schedule),
    )
    label = lambda path, param: "adamw" if muon_dimensions(path, param) is None else "muon"
    labels = lambda params: jax.tree_util.tree_map_with_path(label, params)
    update = optax.partition({"muon": muon, "adamw": adamw}, labels)
  return optax.chain(optax.clip_by_global_norm(tc.grad_clip_norm), update), schedule


def build(config: ml_collections.ConfigDict, mesh=None):
  """(model, optimizer, learning-rate schedule), initialised from `config.train.seed`; the
  model runs on `mesh` (None: one device's program). The optimizer holds state for the
  parameters that train (`train.trainable`, `train.frozen`: `moejax.training.trainable`) only; its
  `wrt` is their filter, which the train step differentiates with respect to."""
  model = TransformerLM(config.model, mesh=mesh, rngs=nnx.Rngs(config.train.seed))
  tx, schedule = make_optimizer(config.train)
  optimizer = nnx.Optimizer(model, tx, wrt=trainable_filter(config.train, model))
  return model, optimizer, schedule


def init_state(config: ml_collections.ConfigDict, mesh):
  """The `(model, optimizer)` NNX state, created directly in its shardings on `mesh`.

  Initialising inside `jit` with `out_shardings` lets every process create just its own
  shards (no host holds the whole model), as multi-host runs need.

  Returns (graphdef, state, state shardings).
  """
  pair = lambda: build(config, mesh)[:2]
  graphdef, abstract = nnx.split(nnx.eval_shape(pair))
  shardings = sharding.param_shardings(abstract, mesh)
  state = jax.jit(lambda: nnx.state(pair()), out_shardings=shardings)()
  return graphdef, state, shardings


def optimizer_state_bytes(state) -> int:
  """Bytes of the optimizer state (Adam's moments and counts; not the step) in a `(model,
  optimizer)` state of arrays or abstract `jax.ShapeDtypeStruct`s, over all devices: frozen
  parameters (`train.frozen`) add nothing."""
  leaves = jax.tree.leaves(state[1]["opt_state"])
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy in nats: logits `[batch, seq, vocab]`, targets `[batch, seq]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


# What the train step checks for NaN/Inf: the loss terms, the gradients, and the
# parameters after the update (Adam can overflow with finite gradients).
_LOSS_TERMS = ("ce_loss", "lb_loss", "seq_aux_loss", "z_loss", "grad_norm", "updated_params")


def make_steps(graphdef, model_config: ml_collections.ConfigDict):
  """The pure train and eval step functions over the `(model, optimizer)` state.

  The loss is CE + Σ over MoE layers of (lb_loss_weight · LB + seq_aux_loss_weight ·
  L_seq + z_loss_weight · Z): each MoE layer gets the same balancing pressure however many
  there are (Switch, ST-MoE and Megatron-Core add each layer's auxiliary loss); the
  `lb_loss`, `seq_aux_loss` and `z_loss` metrics are the per-layer means. A term whose
  weight is 0 is left out. After the update, layers with aux-loss-free balancing move
  their selection bias (`TransformerLM.update_selection_biases`).

  Gradients are taken with respect to the parameters that train (the optimizer's `wrt`,
  `train.trainable` / `train.frozen`); the others are constants, and `grad_norm` and the
  clipping see only the trained ones.

  The train step applies an update only when every loss term and the gradient norm are
  finite; otherwise parameters and optimizer state stay as they were (the RNG streams
  still advance) and `metrics['nonfinite']` names the bad terms as a bit mask over
  `_LOSS_TERMS`.
  """
  m = model_config
  num_moe_layers = len(moe_layer_indices(m))
  weights = {  # per-layer weights, summed over the MoE layers
    "lb_loss": num_moe_layers * m.lb_loss_weight,
    "seq_aux_loss": num_moe_layers * m.seq_aux_loss_weight,
    "z_loss": num_moe_layers * m.z_loss_weight,
  }
  weights = {name: w for name, w in weights.items() if w}
  bias_balancing = bool(m.num_experts and m.bias_update_rate)

  def train_step(state, batch):
    old_leaves = jax.tree.leaves(state)  # merge may share Variables with `state`
    model, optimizer = nnx.merge(graphdef, state)
    model.train()

    def loss_fn(model):
      logits, aux = model(batch["inputs"], **document_layout(batch))
      ce = masked_mean(cross_entropy(logits, batch["targets"]), batch.get("loss_mask"))
      loss = ce + sum(w * aux[name] for name, w in weights.items())
      return loss, (ce, aux)

    # Gradients of the trainable parameters only (`optimizer.wrt`); the rest are constants.
    trainable = nnx.DiffState(0, optimizer.wrt)
    (loss, (ce, aux)), grads = nnx.value_and_grad(loss_fn, argnums=trainable, has_aux=True)(model)
    optimizer.update(model, grads)
    if bias_balancing:
      model.update_selection_biases(aux["expert_load"])
    metrics = {
      "loss": loss,
      "ce_loss": ce,
      "lb_loss": aux["lb_loss"],
      "seq_aux_loss": aux["seq_aux_loss"],
      "z_loss": aux["z_loss"],
      "dropped_fraction": aux["dropped_fraction"],
      "expert_load": aux["expert_load"],
      "grad_norm": optax.tree.norm(grads),
    }
    params_finite = jnp.all(
      jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(nnx.state(model, nnx.Param))])
    )
    bad = [~jnp.isfinite(metrics[name]) for name in _LOSS_TERMS[:-1]] + [~params_finite]
    metrics["nonfinite"] = sum(b.astype(jnp.int32) << i for i, b in enumerate(bad))
    new_leaves, treedef = jax.tree.flatten(nnx.state((model, optimizer)))
    keep_old = metrics["nonfinite"] > 0
    leaves = [
      new if checkpoint_lib.is_prng_key(new) else jnp.where(keep_old, old, new)
      for new, old in zip(new_leaves, old_leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves), metrics

  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    logits, aux = model(batch["inputs"], **document_layout(batch))
    return eval_sums(logits, aux, batch)

  return train_step, eval_step


def document_layout(batch) -> dict[str, jax.Array]:
  """The model's `segment_ids` and `positions` `[batch, seq]` where the batch has them
  (batches from token stores), for attention within each packed document only."""
  return {key: batch[key] for key in ("segment_ids", "positions") if key in batch}


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """The mean of `values` `[batch, seq]` over the positions where `mask` is nonzero (all
  positions without a mask)."""
  if mask is None:
    return jnp.mean(values)
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def eval_sums(logits: jax.Array, aux, batch) -> dict[str, jax.Array]:
  """One evaluation batch's sums, to be added over batches: cross-entropy over the targets
  the loss counts (`ce_sum`, `tokens`), and over the targets that carry text with the bytes
  they carry (`text_ce_sum`, `bytes`: bits per byte for any tokenizer, from the batch's
  `target_bytes`), and the batch's `dropped_fraction`. `logits` `[batch, seq, vocab]`;
  `targets`, `target_bytes` and the optional `loss_mask` `[batch, seq]`."""
  ce = cross_entropy(logits, batch["targets"])
  counted = jnp.ones_like(ce) if "loss_mask" not in batch else batch["loss_mask"].astype(ce.dtype)
  carries_text = (batch["target_bytes"] > 0) & (counted > 0)
  return {
    "ce_sum": jnp.sum(ce * counted),
    "tokens": jnp.sum(counted),
    "text_ce_sum": jnp.sum(jnp.where(carries_text, ce, 0.0)),
    "bytes": jnp.sum(jnp.where(carries_text, batch["target_bytes"], 0)).astype(jnp.float32),
    "dropped_fraction": aux["dropped_fraction"],
  }


def nonfinite_terms(mask: int) -> list[str]:
  """The names of the loss terms flagged in a train step's `nonfinite` bit mask."""
  return [name for i, name in enumerate(_LOSS_TERMS) if mask >> i & 1]


def evaluate(eval_step, state, batches) -> dict[str, float]:
  """Mean eval loss (nats/token) and bits per byte (the cross-entropy of the targets that
  carry text over the bytes they carry) over `batches`."""
  totals: dict[str, float] = {}
  for batch in batches:
    for name, value in jax.device_get(eval_step(state, batch)).items():
      totals[name] = totals.get(name, 0.0) + float(value)
  return {
    "eval/loss": totals["ce_sum"] / totals["tokens"],
    "eval/bits_per_byte": totals["text_ce_sum"] / totals["bytes"] / math.log(2),
    "eval/dropped_fraction": totals["dropped_fraction"] / len(batches),
  }
