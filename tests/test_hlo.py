"""Reading compiled programs (`moejax.parallel.hlo`): collectives and their bytes."""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from moejax.parallel import hlo


def test_all_to_all_bytes_of_a_known_program():
  mesh = jax.make_mesh((4,), ("expert",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])

  def body(a, b):
    return (
      jax.lax.all_to_all(a, "expert", 0, 0, tiled=True),
      jax.lax.all_to_all(b, "expert", 1, 0, tiled=True),
    )

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))
  a = jnp.ones((4 * 8, 6), jnp.float32)  # per device f32[8, 6]: 192 bytes
  b = jnp.ones((4 * 4, 12), jnp.int32)  # per device s32[4, 12]: 192 bytes
  compiled = fn.lower(a, b).compile().as_text()  # (XLA:CPU sends bf16 as f32: not used here)
  assert hlo.all_to_all_bytes(compiled) == 8 * 6 * 4 + 4 * 12 * 4
  text = module(
    "  %x = f32[2,3]{1,0} all-to-all(f32[2,3]{1,0} %p), dimensions={0}\n"
    "  %t = (bf16[4]{0}, s32[5]{0}) all-to-all(bf16[4]{0} %a, s32[5]{0} %b)\n"
    "  %g = f32[8]{0} all-gather(f32[2]{0} %p), dimensions={0}, metadata={op_name=\"all-to-all\"}\n"
  )
  assert hlo.all_to_all_bytes(text) == 24 + 8 + 20
  assert hlo.collective_shapes(text, "all-gather") == [("f32", (8,))]


def module(entry_body: str, *computations: str) -> str:
  """A hand-written HLO module: `computations`, then an entry computation."""
  entry = "ENTRY %main.1 (p: f32[2,3]) -> f32[2,3] {\n" + entry_body + "}\n"
  return "HloModule test\n\n" + "".join(computations) + entry


def test_collectives_counts_ops_and_bytes_of_a_hand_written_module():
  text = module(
    "  %a = f32[2,3]{1,0} all-to-all(f32[2,3]{1,0} %p), dimensions={0}\n"
    "  %b = f32[4]{0} all-reduce(f32[4]{0} %q), to_apply=%add\n"
    "  %c = (f32[2]{0}, f32[8]{0}) all-gather-start(f32[2]{0} %r), dimensions={0}\n"
    "  %d = f32[8]{0} all-gather-done((f32[2]{0}, f32[8]{0}) %c)\n"
    "  %e = bf16[6]{0} reduce-scatter(bf16[24]{0} %s), dimensions={0}\n"
    "  %f = f32[5,2]{1,0} ragged-all-to-all(f32[3,2]{1,0} %t, f32[5,2]{1,0} %o, s32[2] %i)\n"
  )
  assert hlo.collectives(text) == {
    "all-to-all": {"count": 1, "bytes": 24},
    "ragged-all-to-all": {"count": 1, "bytes": 40},
    "all-reduce": {"count": 1, "bytes": 16},
    "all-gather": {"count": 1, "bytes": 32},  # the gathered result, not the operand
    "reduce-scatter": {"count": 1, "bytes": 12},
  }


def test_an_instruction_whose_text_spans_lines_does_not_end_its_computation():
  """A Pallas kernel's custom call (splash attention on TPU) prints its backend config
  over several lines, the next starting with `}}`: the collectives after it still count."""
  text = module(
    '  %k = f32[4]{0} custom-call(f32[4]{0} %p), custom_call_target="tpu_custom_call", '
    'backend_config={"custom_call_config": {"body": "kernel\n'
    '}}, metadata={op_name="splash_mha_fwd"}\n'
    + "  %a = f32[2,3]{1,0} all-to-all(f32[2,3]{1,0} %p), dimensions={0}\n"
  )
  assert "\n}}, metadata" in text
  assert hlo.collectives(text) == {"all-to-all": {"count": 1, "bytes": 24}}


def test_a_transfer_between_slices_counts_the_array_it_sends():
  """Multi-slice TPU programs reach other slices through host-transfer `send`s to the
  runtime (the line as XLA:TPU writes it, layouts and tiling included); other sends are
  not collectives."""
  attributes = (
    'frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",'
    '_xla_megascale_transfer_type="ALL_REDUCE"}'
  )
  text = module(
    "  %send = (f32[13,8,128]{2,1,0:T(8,128)}, u32[]{:S(2)}, token[]) "
    f"send(f32[13,8,128]{{2,1,0:T(8,128)}} %x, token[] %t), channel_id=3, {attributes}\n"
    "  %send.1 = (f32[4]{0}, u32[], token[]) send(f32[4]{0} %y, token[] %t), channel_id=4\n"
  )
  assert hlo.collectives(text) == {"dcn-all-reduce": {"count": 1, "bytes": 13 * 8 * 128 * 4}}


def test_collectives_in_a_loop_body_count_once_per_trip():
  body = (
    "%body.2 (t: (s32[], f32[4])) -> (s32[], f32[4]) {\n"
    "  %a = f32[4]{0} all-to-all(f32[4]{0} %x), dimensions={0}\n"
    "  %c = f32[4]{0} call(f32[4]{0} %a), to_apply=%inner.3\n"
    "}\n"
  )
  inner = "%inner.3 (y: f32[4]) -> f32[4] {\n  %g = f32[8]{0} all-gather(f32[4]{0} %y)\n}\n"
  text = module(
    '  %w = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%cond.4, body=%body.2, '
    'backend_config={"known_trip_count":{"n":"3"}}\n'
    "  %z = f32[2]{0} all-to-all(f32[2]{0} %q)\n",
    body,
    inner,
  )
  assert hlo.collectives(text) == {
    "all-to-all": {"count": 4, "bytes": 3 * 16 + 8},
    "all-gather": {"count": 3, "bytes": 3 * 32},
  }


def test_a_loop_counted_only_at_run_time_counts_as_asked():
  """A `while` with no known trip count, and a condition on a run-time value (dropless's
  later exchange rounds): counted `unknown_trips` times."""
  body = "%rounds.1 (t: (s32[], f32[4])) -> (s32[], f32[4]) {\n"
  body += "  %a = f32[4]{0} all-to-all(f32[4]{0} %x), dimensions={0}\n}\n"
  condition = "%more.2 (t: (s32[], f32[4])) -> pred[] {\n"
  condition += "  ROOT %lt = pred[] compare(%i, %n), direction=LT\n}\n"
  text = module(
    "  %w = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%more.2, body=%rounds.1\n"
    "  %z = f32[2]{0} all-to-all(f32[2]{0} %q)\n",
    body,
    condition,
  )
  assert hlo.collectives(text) == {"all-to-all": {"count": 2, "bytes": 16 + 8}}
  assert hlo.collectives(text, unknown_trips=0) == {"all-to-all": {"count": 1, "bytes": 8}}
  assert hlo.collectives(text, unknown_trips=3)["all-to-all"] == {"count": 4, "bytes": 56}


def test_find_array_matches_dimensions_in_any_order():
  text = (
    "%w = f32[16,512,1024]{2,1,0} parameter(0)\n"
    "%m = f32[1,4096,16,512]{3,2,1,0} fusion(%a), kind=kLoop\n"
  )
  assert hlo.find_array(text, 4096, 16, 512) == "f32[1,4096,16,512]"
  assert hlo.find_array(text, 4096, 64, 128) == ""
  # Repeated dims must be present as many times as asked for.
  assert hlo.find_array("s32[8,8]", 8, 8, 8) == ""
  assert hlo.find_array("pred[8,8,8]", 8, 8, 8) == "pred[8,8,8]"
