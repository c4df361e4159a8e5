"""Where every tensor of an HF-format checkpoint lives in moejax's parameters.

moejax stacks each run of identical layers (`moejax.models.transformer.layer_stacks`): a parameter
such as `stacks/1/period/blocks/0/moe/experts/w_in` is `[repeats, experts, d_model,
d_ff]`, and layer N is one `repeats` row of it. On disk every layer and expert is a tensor
of its own, stored as torch's `nn.Linear` keeps it, `[out_features, in_features]`, so
moejax's `[in, out]` kernels are their transposes.

A `Piece` says: the rows `rows` of the on-disk tensor `key`, reordered by `perm`, then
transposed if `transpose`, are `leaf[index]`. Import applies it; export inverts it. Most
pieces are a whole tensor; two need more:

* DeepSeek's `kv_a_proj_with_mqa` `[kv_lora + rope, d_model]` fuses moejax's `kv_down`
  and `k_rope` (its first `kv_lora` rows, then the rest).
* DeepSeek's released RoPE channels are interleaved pairs (2j, 2j + 1); moejax's RoPE
  rotates halves (j, j + D/2). The rope rows of `q_b_proj` (per head) and of
  `kv_a_proj_with_mqa` are reordered evens-then-odds (`moejax.layers.mla`, RoPE layout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import ml_collections
import numpy as np

from moejax.convert.families import Family
from moejax.layers.attention_kinds import kind_of
from moejax.models.transformer import layer_stacks


@dataclasses.dataclass(frozen=True)
class Piece:
  """`leaf[index] = transpose?(hf[key][rows][perm])`.

  Attributes:
    key: the on-disk tensor's name.
    leaf: the moejax parameter's `/`-joined path in the model state.
    index: the leading indices into the leaf (layer row, then expert), () for a whole leaf.
    rows: the slice of the tensor's first axis this piece is, or None for all of it.
    perm: a reordering of those rows, or None.
    transpose: whether moejax keeps the (2-D) tensor transposed.
  """

  key: str
  leaf: str
  index: tuple[int, ...] = ()
  rows: tuple[int, int] | None = None
  perm: tuple[int, ...] | None = None
  transpose: bool = True

  def to_moejax(self, tensor: np.ndarray) -> np.ndarray:
    if self.rows is not None:
      tensor = tensor[self.rows[0] : self.rows[1]]
    if self.perm is not None:
      tensor = tensor[list(self.perm)]
    return tensor.T if self.transpose else tensor

  def to_hf(self, value: np.ndarray, out: np.ndarray) -> None:
    """Writes `value` (`leaf[index]`) into its rows of the on-disk tensor `out`."""
    value = value.T if self.transpose else value
    if self.perm is not None:
      restored = np.empty_like(value)
      restored[list(self.perm)] = value
      value = restored
    if self.rows is None:
      out[...] = value
    else:
      out[self.rows[0] : self.rows[1]] = value


def layer_locations(model: ml_collections.ConfigDict) -> list[tuple[str, int, str]]:
  """For each layer in order: (its block's path prefix, its row in the stack, its kind)."""
  out = []
  for s, (kinds, repeats) in enumerate(layer_stacks(model)):
    for repeat in range(repeats):
      for slot, kind in enumerate(kinds):
        out.append((f"stacks/{s}/period/blocks/{slot}", repeat, kind))
  return out


def _ffn(hf_prefix: str, leaf: str, names: tuple[str, str, str], index) -> Iterator[Piece]:
  for hf_name, moejax_name in zip(names, ("w_gate", "w_in", "w_out"), strict=True):
    yield Piece(f"{hf_prefix}.{hf_name}.weight", f"{leaf}/{moejax_name}", index)


def _attention(model, hf: str, leaf: str, row: int) -> Iterator[Piece]:
  """The attention kind's tensors (`AttentionKind.hf_tensors`) at layer `row`."""
  for t in kind_of(model).hf_tensors(model):
    yield Piece(
      f"{hf}.{t.name}", f"{leaf}/{t.param}", (row,), transpose=t.transpose, rows=t.rows, perm=t.perm
    )


def pieces(model: ml_collections.ConfigDict, family: Family) -> list[Piece]:
  """Every piece of a checkpoint of `family` holding moejax model config `model`, in the
  order of the on-disk layers (embedding, layer 0, ..., final norm, output head)."""
  out = [Piece("model.embed_tokens.weight", "embed/embedding", transpose=False)]
  for i, (block, row, kind) in enumerate(layer_locations(model)):
    hf = f"model.layers.{i}"
    out.append(
      Piece(f"{hf}.input_layernorm.weight", f"{block}/attn_norm/scale", (row,), transpose=False)
    )
    out.append(
      Piece(
        f"{hf}.post_attention_layernorm.weight", f"{block}/ffn_norm/scale", (row,), transpose=False
      )
    )
    out.extend(_attention(model, f"{hf}.self_attn", f"{block}/attention", row))
    if kind == "dense":
      out.extend(
        _ffn(f"{hf}.mlp", f"{block}/dense_ffn", ("gate_proj", "up_proj", "down_proj"), (row,))
      )
      continue
    moe, leaf = f"{hf}.{family.moe_block}", f"{block}/moe"
    out.append(Piece(f"{moe}.gate.weight", f"{leaf}/router_kernel", (row,)))
    if model.bias_update_rate > 0:
      out.append(
        Piece(
          f"{moe}.gate.e_score_correction_bias", f"{leaf}/selection_bias", (row,), transpose=False
        )
      )
    for e in range(model.num_experts):
      out.extend(_ffn(f"{moe}.experts.{e}", f"{leaf}/experts", family.expert_names, (row, e)))
    if model.num_shared_experts:
      names = ("gate_proj", "up_proj", "down_proj")
      out.extend(_ffn(f"{moe}.{family.shared_name}", f"{leaf}/shared", names, (row,)))
    if model.shared_expert_gate:
      out.append(Piece(f"{moe}.shared_expert_gate.weight", f"{leaf}/shared_gate", (row,)))
  out.append(Piece("model.norm.weight", "final_norm/scale", transpose=False))
  if not model.tie_embeddings:
    out.append(Piece("lm_head.weight", "lm_head/kernel"))
  return out


def hf_shape(group: list[Piece], leaf_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
  """The on-disk shape of the tensor the pieces `group` (all of one key) make up."""
  rows = 0
  for piece in group:
    shape = leaf_shapes[piece.leaf][len(piece.index) :]
    shape = shape[::-1] if piece.transpose else shape
    rows += shape[0]
    rest = shape[1:]
  return (rows, *rest)
