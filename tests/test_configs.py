"""Every experiment config loads, validates, and trains one smoke step; pod shapes match the papers."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from moejax import flops, steps
from moejax.config import load_config
from moejax.model import validate_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NAMES = sorted(f[:-3] for f in os.listdir(CONFIGS) if f.endswith(".py") and f != "__init__.py")


def load(name, arg):
  return load_config(f"configs/{name}.py:{arg}")


def test_the_documented_configs_exist():
  assert {"tiny", "switch_base", "st_moe", "glam", "mixtral", "olmoe", "arctic", "dense"} <= set(
    NAMES
  )


@pytest.mark.parametrize("name", [n for n in NAMES if n != "tiny"])
def test_pod_and_cpu_variants_validate(name):
  for arg in ("pod", "cpu"):
    validate_config(load(name, arg).model)
  with pytest.raises(ValueError, match="ARG"):
    load(name, "huge")


@pytest.mark.parametrize("name", NAMES)
def test_smoke_variant_takes_a_training_step(name):
  config = load(name, "smoke")
  model, optimizer, _ = steps.build(config)
  graphdef, state = nnx.split((model, optimizer))
  train_step, _ = steps.make_steps(graphdef, config.model)
  tokens = np.random.default_rng(0).integers(
    0, 256, (config.train.batch_size, config.train.seq_len + 1)
  )
  batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}
  _, metrics = jax.jit(train_step)(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert flops.count_model_params(model) == flops.count_params(config.model)["total"]


# Published totals and active parameters, with their vocabularies' embeddings (untied,
# input and output) taken out: moejax's configs are byte-level (vocab 260).
@pytest.mark.parametrize(
  "name,total,active,vocab",
  [
    ("mixtral", 46.7e9, 12.9e9, 32000),  # Jiang et al. 2024
    ("olmoe", 6.92e9, 1.28e9, 50304),  # Muennighoff et al. 2024
  ],
)
def test_pod_shapes_match_published_parameter_counts(name, total, active, vocab):
  config = load(name, "pod")
  counts = flops.count_params(config.model)
  vocab_delta = 2 * (vocab - config.model.vocab_size) * config.model.d_model
  assert counts["total"] + vocab_delta == pytest.approx(total, rel=0.01)
  assert counts["active"] + vocab_delta == pytest.approx(active, rel=0.01)
