"""Import and export of HF-format checkpoints (`moejax.convert`), against checkpoints
written by `hf_reference` with numpy and safetensors, and its NumPy forward pass."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import moejax
from helpers import hf_reference
from moejax.convert import transfer

FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3", "llama", "qwen2"]
TOKENS = [3, 17, 5, 39, 0, 22]


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_the_numpy_forward_and_export_gives_every_tensor_back(tmp_path, family):
  hf = hf_reference.tiny_config(family)
  source = tmp_path / "hf"
  source.mkdir()
  shards = 2 if family in ("mixtral", "deepseek_v3") else 1
  written = hf_reference.write_checkpoint(source, hf, shards=shards)

  summary = transfer.import_checkpoint(source, tmp_path / "run")
  assert summary["family"] == family and summary["tensors"] == len(written)
  model, config = moejax.load(tmp_path / "run")
  logits, _ = model(jnp.asarray([TOKENS], jnp.int32))
  expected = hf_reference.forward(hf, written, TOKENS)
  error = np.max(np.abs(np.asarray(logits[0], np.float64) - expected)) / np.max(np.abs(expected))
  assert error < 1e-5, error
  assert config.model.norm_eps == hf["rms_norm_eps"]

  transfer.export_checkpoint(tmp_path / "run", tmp_path / "out", max_shard_bytes=4096)
  back = hf_reference.read_all(tmp_path / "out")
  assert sorted(back) == sorted(written)
  for key, value in written.items():
    assert back[key].dtype == value.dtype, key
    assert back[key].tobytes() == value.tobytes(), key
  # An unchanged model writes back the original config.json, field for field.
  original = json.loads((source / "config.json").read_text())
  assert json.loads((tmp_path / "out" / "config.json").read_text()) == original
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"]) == set(written)


def test_a_model_trained_here_exports_in_float32_as_the_same_function(tmp_path):
  """A model that never came from a checkpoint: written as Mixtral from its config."""
  from flax import nnx

  from moejax.config import load_config
  from moejax.convert import model_state

  config = load_config("configs/mixtral.py:smoke", {"model.dispatch": "dropless"})
  model = moejax.models.transformer.TransformerLM(config.model, rngs=nnx.Rngs(0))
  tree = nnx.to_pure_dict(nnx.state(model))
  model_state.save_model_run(tmp_path / "run", tree, config, "origin.json", "{}\n")
  transfer.export_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="float32")
  hf = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf["model_type"] == "mixtral" and hf["num_local_experts"] == config.model.num_experts
  tensors = hf_reference.read_all(tmp_path / "hf")
  assert all(v.dtype == np.float32 for v in tensors.values())
  tokens = [1, 2, 3, 4]
  ours, _ = model(jnp.asarray([tokens], jnp.int32))
  expected = hf_reference.forward(hf, tensors, tokens)
  assert np.allclose(np.asarray(ours[0]), expected, rtol=1e-4, atol=1e-5)


def test_a_fine_tuned_import_exports_the_original_config_with_what_training_changed(tmp_path):
  """Fields moejax does not model (token ids, context length, init range) survive an
  import, a fine-tuning run started from it and the export; a changed setting is written."""
  from moejax.convert import model_state

  hf = hf_reference.tiny_config(
    "qwen3_moe",
    bos_token_id=7,
    eos_token_id=8,
    max_position_embeddings=4096,
    router_aux_loss_coef=0.001,
  )
  hf["initializer_range"] = 0.02
  source = tmp_path / "hf"
  source.mkdir()
  hf_reference.write_checkpoint(source, hf)
  transfer.import_checkpoint(source, tmp_path / "import")
  model, config = moejax.load(tmp_path / "import")
  from flax import nnx

  config.train.init_from = str(tmp_path / "import")  # a run fine-tuned from the import
  config.model.lb_loss_weight *= 2  # what that run changed
  tree = nnx.to_pure_dict(nnx.state(model))
  model_state.save_model_run(tmp_path / "tuned", tree, config, "origin.json", "{}\n")
  transfer.export_checkpoint(tmp_path / "tuned", tmp_path / "out")
  out = json.loads((tmp_path / "out" / "config.json").read_text())
  assert out["router_aux_loss_coef"] == pytest.approx(2 * hf["router_aux_loss_coef"])
  assert out["initializer_range"] == 0.02 and out["max_position_embeddings"] == 4096
  assert (out["bos_token_id"], out["eos_token_id"]) == (7, 8)
  original = json.loads((source / "config.json").read_text())
  assert {k: v for k, v in out.items() if k != "router_aux_loss_coef"} == {
    k: v for k, v in original.items() if k != "router_aux_loss_coef"
  }


def test_an_import_is_fine_tuned_with_its_directory_as_the_config(tmp_path):
  """`--config=DIR` (or `DIR/config.json`) takes the saved config of a run, import or
  upcycle directory: no config file is written to fine-tune an import."""
  import subprocess
  import sys

  from moejax.config import load_config
  from moejax.data.store_writer import prepare

  source = tmp_path / "hf"
  source.mkdir()
  hf = hf_reference.tiny_config("qwen3_moe")
  hf_reference.write_checkpoint(source, hf)
  _word_tokenizer(source, hf["vocab_size"])  # its ids mean text only through its tokenizer
  transfer.import_checkpoint(source, tmp_path / "import")
  _, saved = moejax.load(tmp_path / "import")
  for spec in (tmp_path / "import", tmp_path / "import" / "config.json"):
    config = load_config(str(spec), {"train.init_from": str(tmp_path / "import")})
    assert config.model == saved.model and config.train.init_from == str(tmp_path / "import")
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"text": f"w{i} w{i + 1} w7"}) + "\n" for i in range(1, 30)))
  prepare([f"jsonl:{corpus}"], f"hf:{tmp_path / 'import'}", str(tmp_path / "store"))
  result = subprocess.run(
    [
      sys.executable, "-m", "moejax.main", f"--config={tmp_path / 'import'}",
      f"--workdir={tmp_path / 'ft'}", f"--config.train.init_from={tmp_path / 'import'}",
      "--config.train.num_steps=7", "--config.train.warmup_steps=2", "--dry_run",
      f"--config.data.tokens_dir={tmp_path / 'store'}", "--config.data.eval_fraction=0.1",
    ],
    capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"the model of {tmp_path / 'import'} at step 0" in result.stdout
  assert "7 steps" in result.stdout and not (tmp_path / "ft").exists()
  with pytest.raises(FileNotFoundError, match="directory without config.json"):
    load_config(str(tmp_path))


def test_the_rope_base_of_transformers_5s_config_layout(tmp_path):
  """transformers 5 saves RoPE's base as `rope_parameters.rope_theta`, with no top-level
  `rope_theta`: read as 1e6 (not the 10000 default), the logits match the forward pass."""
  hf = hf_reference.tiny_config("qwen3_moe")
  (tmp_path / "hf").mkdir()
  written = hf_reference.write_checkpoint(tmp_path / "hf", hf)
  layout_5 = {k: v for k, v in hf.items() if k != "rope_theta"}
  layout_5["rope_parameters"] = {"rope_type": "default", "rope_theta": hf["rope_theta"]}
  (tmp_path / "hf" / "config.json").write_text(json.dumps(layout_5))
  transfer.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  model, config = moejax.load(tmp_path / "run")
  assert config.model.rope_base == 1e6
  logits, _ = model(jnp.asarray([TOKENS], jnp.int32))
  expected = hf_reference.forward(hf, written, TOKENS)
  assert np.max(np.abs(np.asarray(logits[0]) - expected)) / np.max(np.abs(expected)) < 1e-5
  layout_5["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
  (tmp_path / "hf" / "config.json").write_text(json.dumps(layout_5))
  with pytest.raises(ValueError, match=r"rope_parameters\.rope_type='linear' is not supported"):
    transfer.import_checkpoint(tmp_path / "hf", tmp_path / "run2")
  assert not (tmp_path / "run2").exists()
  layout_5["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}
  (tmp_path / "hf" / "config.json").write_text(json.dumps(layout_5))
  with pytest.raises(ValueError, match="rope_parameters=.*one RoPE for every layer"):
    transfer.import_checkpoint(tmp_path / "hf", tmp_path / "run2")


def test_what_moejax_cannot_compute_is_refused_in_one_line(tmp_path):
  hf = hf_reference.tiny_config("mixtral", rope_scaling={"type": "dynamic", "factor": 4.0})
  (tmp_path / "hf").mkdir()
  hf_reference.write_checkpoint(tmp_path / "hf", hf)
  with pytest.raises(ValueError, match=r"rope_scaling\.rope_type='dynamic' is not supported"):
    transfer.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  assert not (tmp_path / "run").exists()
  hf = hf_reference.tiny_config("gpt2")
  (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match="model_type='gpt2'.*supported"):
    transfer.import_checkpoint(tmp_path / "hf", tmp_path / "run")


def test_a_missing_or_unknown_tensor_writes_nothing(tmp_path):
  from safetensors.numpy import save_file

  hf = hf_reference.tiny_config("olmoe")
  source = tmp_path / "hf"
  source.mkdir()
  tensors = hf_reference.write_checkpoint(source, hf)
  tensors.pop("model.layers.1.mlp.experts.3.up_proj.weight")
  save_file(tensors, str(source / "model.safetensors"))
  with pytest.raises(ValueError, match=r"missing: model\.layers\.1\.mlp\.experts\.3\.up_proj"):
    transfer.import_checkpoint(source, tmp_path / "run")
  tensors["model.layers.1.mlp.experts.3.up_proj.weight"] = np.zeros((8, 16), ml_dtypes.bfloat16)
  tensors["model.layers.0.extra.weight"] = np.zeros((2,), ml_dtypes.bfloat16)
  save_file(tensors, str(source / "model.safetensors"))
  with pytest.raises(
    ValueError, match=r"1 tensors .* no place for \(e\.g\. model\.layers\.0\.extra"
  ):
    transfer.import_checkpoint(source, tmp_path / "run")
  del tensors["model.layers.0.extra.weight"]
  tensors["model.layers.1.mlp.experts.3.up_proj.weight"] = np.zeros((8, 15), ml_dtypes.bfloat16)
  save_file(tensors, str(source / "model.safetensors"))
  with pytest.raises(ValueError, match=r"experts\.3\.up_proj\.weight has shape \(8, 15\)"):
    transfer.import_checkpoint(source, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_an_import_that_fails_while_writing_removes_what_it_wrote(tmp_path, monkeypatch):
  from moejax.convert.safetensors_dir import CheckpointDir

  source = tmp_path / "hf"
  source.mkdir()
  hf_reference.write_checkpoint(source, hf_reference.tiny_config("mixtral"))
  read = CheckpointDir.get
  calls = []

  def fails_on_the_fifth_read(self, key):
    calls.append(key)
    if len(calls) == 5:
      raise OSError("the disk went away")
    return read(self, key)

  monkeypatch.setattr(CheckpointDir, "get", fails_on_the_fifth_read)
  (tmp_path / "empty").mkdir()
  for workdir in (tmp_path / "new", tmp_path / "empty"):
    calls.clear()
    with pytest.raises(OSError, match="the disk went away"):
      transfer.import_checkpoint(source, workdir)
    assert len(calls) == 5
  assert not (tmp_path / "new").exists()
  assert list((tmp_path / "empty").iterdir()) == []
  monkeypatch.undo()
  transfer.import_checkpoint(source, tmp_path / "empty")  # the same command again works
  assert moejax.load(tmp_path / "empty")[1].model.num_experts == 4


def _trained_run(path, **leaves):
  """A Mixtral smoke model with random weights, some leaves set (`{path}: (index, value)`),
  written as a run directory."""
  from flax import nnx

  from moejax.config import load_config
  from moejax.convert import model_state
  from moejax.training.tree_paths import flat

  config = load_config("configs/mixtral.py:smoke", {"model.dispatch": "dropless"})
  tree = nnx.to_pure_dict(
    nnx.state(moejax.models.transformer.TransformerLM(config.model, rngs=nnx.Rngs(0)))
  )
  values = flat(tree)
  for name, (index, value) in leaves.items():
    values[name] = np.array(values[name])
    values[name][index] = value
  model_state.save_model_run(
    path, model_state.with_leaves(tree, values), config, "origin.json", "{}\n"
  )


def test_export_refuses_weights_its_dtype_cannot_hold_and_removes_what_it_wrote(tmp_path):
  """float16 holds at most 65504: a larger weight would be written as inf. The export
  fails naming the tensor (the earlier shards, written already, are removed); bfloat16
  holds it. A non-finite weight fails in any dtype."""
  _trained_run(tmp_path / "run", **{"lm_head/kernel": ((0, 0), 1e6)})
  (tmp_path / "empty").mkdir()
  refused = (
    r"^lm_head\.weight holds a weight of magnitude 1e\+06, beyond what --dtype=float16 holds "
    r"\(largest 6\.55e\+04\); export with --dtype=bfloat16"
  )
  for out in (tmp_path / "hf", tmp_path / "empty"):
    with pytest.raises(ValueError, match=refused):
      transfer.export_checkpoint(tmp_path / "run", out, dtype="float16", max_shard_bytes=4096)
  assert not (tmp_path / "hf").exists() and list((tmp_path / "empty").iterdir()) == []
  transfer.export_checkpoint(tmp_path / "run", tmp_path / "hf", dtype="bfloat16")
  back = hf_reference.read_all(tmp_path / "hf")["lm_head.weight"].astype(np.float32)
  assert float(np.max(np.abs(back))) == 999424  # 1e6 in bfloat16
  # (A checkpoint holding nan is refused when read; a weight made non-finite after that is not.)
  with pytest.raises(ValueError, match=r"^model\.norm\.weight holds non-finite weights"):
    transfer._cast("model.norm.weight", np.array([1.0, np.nan], np.float32), np.dtype("f4"), None)


def test_the_command_line_refuses_an_existing_destination_and_a_hub_id_offline(tmp_path):
  hf = hf_reference.tiny_config("qwen3_moe")
  (tmp_path / "hf").mkdir()
  hf_reference.write_checkpoint(tmp_path / "hf", hf)
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "keep.txt").write_text("mine")
  command = [sys.executable, "-m", "moejax.convert", "import", f"--from={tmp_path / 'hf'}"]
  done = subprocess.run(command + [f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True)
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip().splitlines() == [
    f"error: --workdir={tmp_path / 'run'} already exists and is not empty; choose a new directory."
  ]
  assert (tmp_path / "run" / "keep.txt").read_text() == "mine"
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "moejax.convert",
      "import",
      "--from=someorg/somemodel",
      f"--workdir={tmp_path / 'x'}",
    ],
    capture_output=True,
    text=True,
  )
  assert done.returncode in (1, 2) and len(done.stderr.strip().splitlines()) == 1, done.stderr
  assert "someorg/somemodel" in done.stderr and "hub" in done.stderr.lower()


def test_generate_samples_an_imported_model_from_token_ids(tmp_path):
  """An imported vocabulary takes --prompt_ids (text is refused in one line): greedy
  sampling's every token is the argmax of the model run from scratch on the sequence so
  far, and it stops at the imported config's eos_token_id."""
  hf = hf_reference.tiny_config("olmoe")
  (tmp_path / "hf").mkdir()
  hf_reference.write_checkpoint(tmp_path / "hf", hf)
  transfer.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  model, _ = moejax.load(tmp_path / "run")
  command = [sys.executable, "-m", "moejax.generate", f"--workdir={tmp_path / 'run'}"]

  done = subprocess.run(command + ["--prompt=ROMEO."], capture_output=True, text=True)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
    "error: this model has a vocabulary of 40 tokens, not moejax's 260 bytes (an imported "
    "checkpoint with its own tokenizer): tokenise with the checkpoint's tokenizer and pass "
    "--prompt_ids=ID,ID,... instead of --prompt."
  ]
  done = subprocess.run(command + ["--prompt_ids=3,40"], capture_output=True, text=True)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
    "error: --prompt_ids: 40 is not a token id of this model's [0, 40)."
  ]

  greedy = ["--prompt_ids=3,17,5", "--temperature=0", "--max_new_tokens=6"]
  done = subprocess.run(command + greedy, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  ids = [int(i) for i in done.stdout.strip().splitlines()[-1].split(",")]
  assert ids[:3] == [3, 17, 5] and len(ids) == 3 + 6
  for n in range(3, len(ids)):
    logits = np.asarray(model(jnp.asarray([ids[:n]], jnp.int32))[0][0, -1])
    assert logits[ids[n]] >= logits.max() - 1e-4, (n, ids)

  # With the fourth generated token as the imported EOS, sampling stops before it.
  record = json.loads((tmp_path / "run" / "import.json").read_text())
  record["config"]["eos_token_id"] = [99, ids[6]]
  (tmp_path / "run" / "import.json").write_text(json.dumps(record))
  done = subprocess.run(command + greedy, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  first = next(n for n in range(3, len(ids)) if ids[n] == ids[6])  # generated, not prompt
  assert done.stdout.strip().splitlines()[-1] == ",".join(map(str, ids[:first]))


def _word_tokenizer(directory, vocab_size: int) -> None:
  """A word-level `tokenizer.json` of `vocab_size` ids: `</s>`, then w1, w2, ..."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  vocab = {"</s>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
  tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  tokenizer.save(str(directory / "tokenizer.json"))


def test_an_import_keeps_its_tokenizer_for_text_in_and_out(tmp_path):
  """The source's tokenizer.json travels with the import: generate takes --prompt text,
  and fine-tuning accepts only token stores prepared with that file."""
  from moejax.config import load_config
  from moejax.data import check_init_from_tokenizer, load_tokenizer
  from moejax.data.store_writer import prepare

  hf = hf_reference.tiny_config("olmoe")
  (tmp_path / "hf").mkdir()
  hf_reference.write_checkpoint(tmp_path / "hf", hf)
  _word_tokenizer(tmp_path / "hf", hf["vocab_size"])
  transfer.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  run = tmp_path / "run"
  assert (run / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
  assert json.loads((run / "import.json").read_text())["tokenizer_files"] == ["tokenizer.json"]
  _, config = moejax.load(run)
  assert config.data.tokenizer == f"hf:{run}"

  command = [sys.executable, "-m", "moejax.generate", f"--workdir={run}", "--temperature=0"]
  done = subprocess.run(
    command + ["--prompt=w3 w17", "--max_new_tokens=4"], capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr[-2000:]
  sample = done.stdout.strip().splitlines()[-1]
  assert sample.startswith("w3 w17") and all(w.startswith("w") for w in sample.split()[2:])

  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"text": f"w{i} w{i + 1} w7"}) + "\n" for i in range(1, 30)))
  own, other = str(tmp_path / "own"), str(tmp_path / "other")
  prepare([f"jsonl:{corpus}"], f"hf:{run}", own)
  prepare([f"jsonl:{corpus}"], "bytes", other)
  fine_tune = load_config("configs/tiny.py:smoke")
  with pytest.raises(ValueError, match="holds its own tokenizer.json: fine-tune it on a token"):
    check_init_from_tokenizer(fine_tune.data, str(run))
  fine_tune.data.tokens_dir = other
  with pytest.raises(ValueError, match="was prepared with bytes, not with the tokenizer.json"):
    check_init_from_tokenizer(fine_tune.data, str(run))
  fine_tune.data.tokens_dir = own
  check_init_from_tokenizer(fine_tune.data, str(run))
  assert load_tokenizer(f"hf:{run}").vocab_size == hf["vocab_size"]
