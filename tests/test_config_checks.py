"""Config values that cannot make a sensible run are refused before anything runs, each in
one line naming the config key and what is allowed."""

import json
import os

import pytest

from moejax.config import load_config
from moejax.training.run_plan import validate_train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke():
  return load_config("configs/tiny.py:smoke")


@pytest.mark.parametrize(
  "key,value,allowed",
  [
    ("warmup_steps", -10, "an integer in [0, train.num_steps=6)"),
    ("warmup_steps", 6, "an integer in [0, train.num_steps=6)"),
    ("learning_rate", float("inf"), "a finite number > 0"),
    ("learning_rate", float("nan"), "a finite number > 0"),
    ("learning_rate", 0.0, "a finite number > 0"),
    ("min_learning_rate_ratio", -1.0, "a number in [0, 1]"),
    ("min_learning_rate_ratio", 1.5, "a number in [0, 1]"),
    ("weight_decay", -0.1, "a finite number >= 0"),
    ("weight_decay", float("inf"), "a finite number >= 0"),
    ("adam_b1", 1.0, "a number in [0, 1)"),
    ("adam_b2", -0.5, "a number in [0, 1)"),
    ("grad_clip_norm", 0.0, "a finite number > 0"),
    ("grad_clip_norm", -1.0, "a finite number > 0"),
  ],
)
def test_train_values_that_cannot_train_are_refused_in_one_line(key, value, allowed):
  config = smoke()
  config.train[key] = value
  with pytest.raises(ValueError) as error:
    validate_train_config(config.train)
  message = str(error.value)
  assert message.startswith(f"config.train.{key}={value!r} must be {allowed}"), message
  assert "\n" not in message


def test_the_packaged_train_settings_pass():
  for spec in ("configs/tiny.py:smoke", "configs/tiny.py", "configs/mixtral.py:pod"):
    validate_train_config(load_config(spec).train)
  config = smoke()
  config.train.warmup_steps, config.train.min_learning_rate_ratio = 0, 0.0
  config.train.weight_decay, config.train.adam_b1 = 0.0, 0.0
  validate_train_config(config.train)


def test_a_vocabulary_smaller_than_the_bytes_is_refused_on_byte_data():
  from moejax.data import token_data

  config = smoke()
  config.model.vocab_size = 200
  with pytest.raises(ValueError) as error:
    token_data.resolve_vocab_size(config)
  assert str(error.value).startswith(
    "config.model.vocab_size=200 is smaller than the byte tokenizer's vocabulary of 260"
  )
  assert "config.model.vocab_size >= 260" in str(error.value)
  config.model.vocab_size = 512  # a padded embedding is allowed
  assert token_data.resolve_vocab_size(config) is None


# ----------------------------------------------------------------------------- init_from's vocabulary

BUILT_IN_BPE = "hf:" + os.path.join(REPO, "moejax", "data", "assets", "bpe_2048")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  """{'bytes': DIR, 'bpe': DIR}: one small corpus prepared with each tokenizer."""
  from moejax.data.store_writer import prepare

  root = tmp_path_factory.mktemp("stores")
  corpus = root / "corpus.jsonl"
  corpus.write_text(
    "".join(json.dumps({"text": f"line {i} of the play"}) + "\n" for i in range(50))
  )
  out = {"bytes": str(root / "bytes"), "bpe": str(root / "bpe")}
  prepare([f"jsonl:{corpus}"], "bytes", out["bytes"])
  prepare([f"jsonl:{corpus}"], BUILT_IN_BPE, out["bpe"])
  return out


def _model_dir(path, vocab, *, imported=False, tokenizer=None):
  """A directory as init_from reads it for the vocabulary check: its config.json (and an
  import's import.json)."""
  config = smoke()
  config.model.vocab_size, config.data.tokenizer = vocab, tokenizer
  path.mkdir()
  (path / "config.json").write_text(config.to_json())
  if imported:
    (path / "import.json").write_text("{}\n")
  return str(path)


def test_an_import_without_its_tokenizer_is_not_fine_tuned_on_bytes(tmp_path, stores):
  from moejax.data.token_data import check_init_from_tokenizer

  imported = _model_dir(tmp_path / "import", 1000, imported=True)
  padded = _model_dir(tmp_path / "padded", 2304, imported=True)
  data = smoke().data
  with pytest.raises(ValueError) as error:
    check_init_from_tokenizer(data, imported)
  message = str(error.value)
  assert message.startswith(f"config.train.init_from={imported} has a vocabulary of 1000 tokens")
  assert "byte ids mean nothing to it" in message and "data.tokens_dir" in message
  # On a token store it is taken on trust, when the store's vocabulary fits the model's.
  data.tokens_dir = stores["bpe"]
  check_init_from_tokenizer(data, padded)
  small = _model_dir(tmp_path / "small", 1024, imported=True)
  with pytest.raises(ValueError, match=r"has a vocabulary of 1024 tokens, fewer than the 2048"):
    check_init_from_tokenizer(data, small)


def test_a_byte_run_is_fine_tuned_on_bytes_padded_or_not(tmp_path, stores):
  from moejax.data.token_data import check_init_from_tokenizer

  for vocab in (260, 512):  # a padded byte vocabulary is allowed
    run = _model_dir(tmp_path / f"run{vocab}", vocab)
    data = smoke().data
    check_init_from_tokenizer(data, run)
    data.tokens_dir = stores["bytes"]
    check_init_from_tokenizer(data, run)
    data.tokens_dir = stores["bpe"]
    with pytest.raises(ValueError, match=r"is a byte model .* prepared with hf:"):
      check_init_from_tokenizer(data, run)
  check_init_from_tokenizer(smoke().data, _model_dir(tmp_path / "import260", 260, imported=True))
