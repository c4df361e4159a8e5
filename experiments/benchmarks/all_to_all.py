"""All-to-all bytes of one compiled training step, read off the HLO, against the minimum.

    python -m experiments.benchmarks.all_to_all [--config=configs/tiny.py] [--data=2 --expert=4]
        [--group_size=512] [--capacity_factor=1.0] [--dispatch=sort]

Runs on 8 simulated CPU devices unless XLA_FLAGS already sets devices. The minimum is
GShard's: every MoE layer exchanges each device's `[E, C, d]` buffer twice (dispatch and
combine), C = cf·group·k/E per group, so 2·k·cf·tokens·d_model·bytes per device and
layer; the backward pass exchanges the same again.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402  (after the device count is set)

from moejax.config import load_config  # noqa: E402
from moejax.models.transformer import moe_layer_indices  # noqa: E402
from moejax.parallel import hlo, sharding
from moejax.training import run_plan, steps  # noqa: E402


def measure(config) -> dict[str, float]:
  """Compiles the train step of `config` on its mesh; returns measured and minimum bytes."""
  mesh = run_plan.check_mesh(sharding.make_mesh(config.mesh), config)
  m, tc = config.model, config.train
  graphdef, state, shardings = steps.init_state(config, mesh)
  train_step, _ = steps.make_steps(graphdef, m)
  batch_sharding = sharding.batch_sharding(mesh)
  step = jax.jit(
    train_step,
    in_shardings=(shardings, batch_sharding),
    out_shardings=(shardings, sharding.replicated(mesh)),
  )
  batch = jax.ShapeDtypeStruct(
    (tc.batch_size, tc.seq_len), jax.numpy.int32, sharding=batch_sharding
  )
  hlo_text = step.lower(state, {"inputs": batch, "targets": batch}).compile().as_text()
  measured = hlo.all_to_all_bytes(hlo_text)
  device_tokens = tc.batch_size * tc.seq_len // sharding.num_batch_shards(mesh)
  layers = len(moe_layer_indices(m))
  bytes_per_element = 2 if m.dtype == "bfloat16" else 4
  minimum = (
    2 * 2 * m.top_k * m.capacity_factor * device_tokens * m.d_model * bytes_per_element * layers
  )
  return {
    "measured_bytes": measured,
    "minimum_bytes": minimum,
    "moe_layers": layers,
    "device_tokens": device_tokens,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--data", type=int, default=2)
  parser.add_argument("--expert", type=int, default=4)
  parser.add_argument("--group_size", type=int, default=512)
  parser.add_argument("--capacity_factor", type=float, default=1.0)
  parser.add_argument("--dispatch", default="sort", choices=("sort", "einsum", "dropless"))
  args = parser.parse_args()
  config = load_config(args.config)
  config.mesh.data, config.mesh.expert = args.data, args.expert
  config.model.capacity_factor, config.model.dispatch = args.capacity_factor, args.dispatch
  config.model.group_size = None if args.dispatch == "dropless" else args.group_size
  result = measure(config)
  print(
    f"mesh (data={args.data}, expert={args.expert}), {result['moe_layers']} MoE layers, "
    f"{result['device_tokens']} tokens per device, dispatch={args.dispatch}, "
    f"cf={args.capacity_factor}"
  )
  print(
    f"all-to-all bytes per device per step: {result['measured_bytes']:,} measured, "
    f"{result['minimum_bytes']:,.0f} minimum (2·2·k·cf·tokens·d_model·bytes·layers), "
    f"ratio {result['measured_bytes'] / result['minimum_bytes']:.3f}"
  )


if __name__ == "__main__":
  main()
