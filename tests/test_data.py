"""Tests for moejax.data: tokenizer, shakespeare_plays dataset, packing, grain pipeline."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given
from hypothesis import strategies as st

from moejax import data
from moejax.data import BOS_ID, EOS_ID

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A data_dir with shakespeare_plays built once for the whole session."""
  path = str(tmp_path_factory.mktemp("tfds"))
  data.load_split("shakespeare_plays", "train", path)
  return path


@pytest.fixture(scope="session")
def splits(data_dir):
  """{split: {title: text}} for every split."""
  out = {}
  for split in ("train", "validation", "plays", "sonnets_and_short_poems", "lucrece"):
    titles = data.load_split("shakespeare_plays", split, data_dir, text_key="title")
    texts = data.load_split("shakespeare_plays", split, data_dir)
    out[split] = dict(zip(titles, texts, strict=True))
  return out


@pytest.fixture(scope="session")
def train_windows(splits):
  return data.pack_documents(list(splits["train"].values()), seq_len=64)


def _unique_windows(num_windows, seq_len=3):
  """Windows whose every token is the window's index: `[num_windows, seq_len + 1]`."""
  return np.repeat(np.arange(num_windows, dtype=np.int32)[:, None], seq_len + 1, axis=1)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["targets"], y["targets"])


# --- tokenizer ---------------------------------------------------------------


@given(st.text())
def test_tokenizer_round_trip(text):
  ids = data.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert data.decode(ids) == text


def test_tokenizer_ids_and_specials():
  assert (data.PAD_ID, data.BOS_ID, data.EOS_ID, data.VOCAB_SIZE) == (256, 257, 258, 260)
  np.testing.assert_array_equal(data.encode("aé"), [97, 0xC3, 0xA9])
  assert data.decode([BOS_ID, 104, 105, EOS_ID, data.PAD_ID]) == "hi"
  assert data.decode([0xC3]) == "\ufffd"  # a cut multi-byte character


# --- packing -----------------------------------------------------------------


def test_pack_documents_matches_hand_computation():
  # Stream: BOS a b EOS | BOS EOS | BOS x y z EOS  (11 tokens).
  windows = data.pack_documents(["ab", "", "xyz"], seq_len=3)
  expected = np.array(
    [[BOS_ID, 97, 98, EOS_ID], [BOS_ID, EOS_ID, BOS_ID, 120]], dtype=np.int32
  )  # the 3-token tail (121 122 EOS) does not fill a window and is dropped
  assert windows.dtype == np.int32
  np.testing.assert_array_equal(windows, expected)

  batch = data.split_inputs_targets(windows)
  np.testing.assert_array_equal(batch["inputs"], expected[:, :3])
  np.testing.assert_array_equal(batch["targets"], expected[:, 1:])

  assert data.pack_documents(["ab"], seq_len=8).shape == (0, 9)
  with pytest.raises(ValueError, match="seq_len"):
    data.pack_documents(["ab"], seq_len=0)


def test_eval_batches_are_ordered_shifted_windows():
  windows = data.pack_documents(["hello world", "to be or not to be"], seq_len=4)
  batches = data.make_eval_batches(windows, global_batch_size=2)
  assert len(batches) == len(windows) // 2
  for i, batch in enumerate(batches):
    assert batch["inputs"].shape == (2, 4) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"], windows[2 * i : 2 * i + 2, :-1])
    np.testing.assert_array_equal(batch["targets"], windows[2 * i : 2 * i + 2, 1:])
  assert len(data.make_eval_batches(windows, global_batch_size=2, max_batches=1)) == 1


# --- the shakespeare_plays dataset --------------------------------------------


def test_splits_are_disjoint_by_play(splits):
  train, validation = splits["train"], splits["validation"]
  assert set(validation) == {"Macbeth", "King Richard II", "The Tempest", "Twelfth Night"}
  assert len(train) == 38 and not set(train) & set(validation)
  poems = {
    "Sonnets",
    "A Lover's Complaint",
    "The Passionate Pilgrim",
    "The Phoenix and the Turtle",
    "The Rape of Lucrece",
  }
  assert poems <= set(train)  # poems are train-only

  val_bytes = sum(len(t.encode()) for t in validation.values())
  train_bytes = sum(len(t.encode()) for t in train.values())
  assert 0.08 <= val_bytes / (val_bytes + train_bytes) <= 0.10

  # No validation passage (nor any whole play) appears in the train text.
  train_text = "\n\x00".join(train.values())
  for text in validation.values():
    for start in range(0, len(text) - 200, 4000):
      assert text[start : start + 200] not in train_text
  assert all(t not in "\x00".join(validation.values()) for t in train.values())


def test_genre_splits_cut_train_into_plays_short_poems_and_lucrece(splits):
  plays, short, long = (splits[s] for s in ("plays", "sonnets_and_short_poems", "lucrece"))
  assert set(long) == {"The Rape of Lucrece"}
  assert set(short) == {
    "Sonnets",
    "A Lover's Complaint",
    "The Passionate Pilgrim",
    "The Phoenix and the Turtle",
  }
  assert len(plays) == 33 and not set(plays) & (set(short) | set(long))
  assert plays | short | long == splits["train"]  # same titles, same texts
  assert sum(len(t.encode()) for t in short.values()) == 120_717
  assert sum(len(t.encode()) for t in long.values()) == 86_173


def test_texts_are_plays_without_gutenberg_boilerplate(splits):
  for text in splits["validation"].values():
    assert "Gutenberg" not in text and "by William Shakespeare" in text[:200]


def test_builds_and_reads_without_tensorflow(tmp_path):
  # A fresh interpreter builds and reads the dataset; TensorFlow must never be
  # imported, whether or not it is installed.
  script = textwrap.dedent(
    """
        import sys
        from moejax.data import load_split

        texts = load_split("shakespeare_plays", "validation", sys.argv[1])
        assert len(texts) == 4, len(texts)
        loaded = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
        assert not loaded, loaded
        print("ok")
        """
  )
  result = subprocess.run(
    [sys.executable, "-c", script, str(tmp_path)],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


def test_rebuild_is_a_no_op(data_dir):
  before = data.load_split("shakespeare_plays", "validation", data_dir)
  assert data.load_split("shakespeare_plays", "validation", data_dir) == before


def test_missing_dataset_error_is_one_clear_line(tmp_path):
  for name in ("lm1b", "c4/en"):
    with pytest.raises(FileNotFoundError) as info:
      data.load_split(name, "train", str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert f"'{name}'" in message and str(tmp_path) in message
    assert f"tfds build {name} --file_format=array_record" in message


class ToyCorpus(tfds.core.GeneratorBasedBuilder):
  """Stands in for a prepared external dataset (lm1b, c4) with a `body` feature."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = tfds.features.FeaturesDict({"body": tfds.features.Text()})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(["first doc", "second doc"])}

  def _generate_examples(self, texts):
    for i, text in enumerate(texts):
      yield i, {"body": text}


def test_reads_a_prepared_external_dataset(tmp_path):
  with pytest.raises(FileNotFoundError, match="toy_corpus"):
    data.load_split("toy_corpus", "train", str(tmp_path), text_key="body")
  ToyCorpus(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )
  texts = data.load_split("toy_corpus", "train", str(tmp_path), text_key="body")
  assert sorted(texts) == ["first doc", "second doc"]
  with pytest.raises(ValueError, match="text_key 'text' is not a feature of toy_corpus"):
    data.load_split("toy_corpus", "train", str(tmp_path))


def test_data_dir_defaults_to_tfds_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert data.resolve_data_dir(None) == str(tmp_path)
  assert data.resolve_data_dir("/elsewhere") == "/elsewhere"
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert data.resolve_data_dir(None) == os.path.expanduser("~/tensorflow_datasets")


def test_unigram_bits_per_byte(splits):
  # Train counts a:1, b:1 -> p(a) = (1 + 1) / (2 + 256) = 1/129.
  assert data.unigram_bits_per_byte(["ab"], ["aa"]) == pytest.approx(np.log2(129))
  bpb = data.unigram_bits_per_byte(splits["train"].values(), splits["validation"].values())
  assert 4.0 < bpb < 5.5


# --- training iterator -----------------------------------------------------------


def test_train_batches_have_the_documented_shape(train_windows):
  batch = next(data.make_train_iterator(train_windows, global_batch_size=8, seed=0))
  assert set(batch) == {"inputs", "targets"}
  for value in batch.values():
    assert isinstance(value, np.ndarray)
    assert value.shape == (8, 64) and value.dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_train_iterator_is_deterministic(train_windows):
  def first_batches(seed):
    it = data.make_train_iterator(train_windows, global_batch_size=8, seed=seed)
    return _take(it, 3)

  _assert_same_batches(first_batches(0), first_batches(0))
  with pytest.raises(AssertionError):
    _assert_same_batches(first_batches(0), first_batches(1))


def test_train_iterator_reshuffles_every_epoch():
  it = data.make_train_iterator(_unique_windows(10), global_batch_size=5, seed=0)
  ids = np.concatenate([b["inputs"][:, 0] for b in _take(it, 6)])
  epochs = ids.reshape(3, 10)
  for epoch in epochs:
    assert sorted(epoch) == list(range(10))
  assert len({tuple(e) for e in epochs}) == 3


def test_shards_are_disjoint_and_cover_the_global_batch():
  windows = _unique_windows(64)
  steps = 64 // 16  # one epoch
  whole = _take(data.make_train_iterator(windows, global_batch_size=16, seed=3), steps)
  shards = [
    _take(
      data.make_train_iterator(windows, global_batch_size=16, seed=3, shard_index=i, shard_count=4),
      steps,
    )
    for i in range(4)
  ]
  for step in range(steps):
    assert all(s[step]["inputs"].shape == (4, 3) for s in shards)
    joined = np.concatenate([s[step]["inputs"] for s in shards])
    np.testing.assert_array_equal(joined, whole[step]["inputs"])
  seen = [{int(i) for b in s for i in b["inputs"][:, 0]} for s in shards]
  assert sum(len(s) for s in seen) == 64 and set().union(*seen) == set(range(64))


def test_eval_shards_are_disjoint_and_cover_the_global_batch():
  windows = _unique_windows(50)
  whole = data.make_eval_batches(windows, global_batch_size=8)
  shards = [
    data.make_eval_batches(windows, global_batch_size=8, shard_index=i, shard_count=2)
    for i in range(2)
  ]
  assert len(whole) == len(shards[0]) == len(shards[1]) == 6
  for step, batch in enumerate(whole):
    joined = np.concatenate([s[step]["inputs"] for s in shards])
    np.testing.assert_array_equal(joined, batch["inputs"])
  np.testing.assert_array_equal(np.concatenate([b["inputs"][:, 0] for b in whole]), np.arange(48))


def test_iterator_state_round_trip(train_windows):
  def make():
    return data.make_train_iterator(
      train_windows, global_batch_size=8, seed=7, shard_index=1, shard_count=2
    )

  it = make()
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # survives serialization
  expected = _take(it, 4)

  restored = make()
  _take(restored, 2)  # a different position, overwritten by set_state
  restored.set_state(state)
  _assert_same_batches(_take(restored, 4), expected)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(global_batch_size=10, shard_count=4), "global_batch_size"),
    (dict(global_batch_size=8, shard_index=2, shard_count=2), "shard_index"),
    (dict(global_batch_size=8, shard_count=0), "shard_count"),
  ],
)
def test_sharding_arguments_are_validated(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.make_train_iterator(_unique_windows(16), seed=0, **kwargs)
  with pytest.raises(ValueError, match=match):
    data.make_eval_batches(_unique_windows(16), **kwargs)


# --- config entry point ----------------------------------------------------------


def test_build_datasets(data_dir):
  config = data.default_data_config()
  config.data_dir = data_dir
  config.eval_batches = 3
  train, eval_batches = data.build_datasets(
    config, global_batch_size=8, seq_len=32, seed=0, shard_index=1, shard_count=2
  )
  assert next(train)["inputs"].shape == (4, 32)
  assert len(eval_batches) == 3
  assert eval_batches[0]["targets"].shape == (4, 32)
  assert data.decode(eval_batches[0]["inputs"][0])  # real text

  config.eval_batches = 0
  with pytest.raises(ValueError, match="eval_batches"):
    data.build_datasets(config, global_batch_size=8, seq_len=32, seed=0)


def test_a_train_split_slice_trains_on_those_plays_only(data_dir, splits):
  """`data.train_split='validation[:50%]'` (a TFDS slice): two whole held-out plays, none
  of the other two."""
  config = data.default_data_config()
  config.data_dir, config.train_split, config.eval_split = (
    data_dir,
    "validation[:50%]",
    "validation[50%:]",
  )
  train, eval_batches = data.build_datasets(config, global_batch_size=4, seq_len=64, seed=0)
  first, second = (
    set(data.load_split("shakespeare_plays", "validation[:50%]", data_dir)),
    set(data.load_split("shakespeare_plays", "validation[50%:]", data_dir)),
  )
  assert len(first) == len(second) == 2 and not first & second
  assert first | second == set(splits["validation"].values())
  held_in, held_out = "\n".join(first), "\n".join(second)
  for batch in [next(train) for _ in range(5)]:
    for row in batch["inputs"]:
      text = data.decode(row).strip("\x00")
      piece = max(text.split("\n"), key=len)[:30]
      assert piece in held_in and piece not in held_out, piece
  eval_text = data.decode(eval_batches[0]["inputs"][1])
  assert max(eval_text.split("\n"), key=len)[:30] in held_out


def test_an_eval_split_too_small_names_the_keys_and_what_fits(data_dir):
  with pytest.raises(ValueError) as info:
    data.make_eval_batches(_unique_windows(96), global_batch_size=256)
  message = str(info.value)
  assert "fewer than one global batch of train.batch_size=256" in message, message
  assert "train.batch_size <= 96" in message and "a larger data.eval_split" in message
  config = data.default_data_config()
  config.data_dir = data_dir
  for split, needle in [
    ("validation[:1%]", "split 'validation[:1%]' of shakespeare_plays selects no record"),
    ("valdation", "Unknown split 'valdation'"),
  ]:
    config.eval_split = split
    with pytest.raises(ValueError) as info:
      data.build_datasets(config, global_batch_size=8, seq_len=32, seed=0)
    assert str(info.value).startswith(f"config.data.eval_split={split!r}: {needle}"), info.value
  config.eval_split = "validation[:25%]"  # one play: too few windows for 512 rows
  with pytest.raises(ValueError, match=r"^config.data.eval_split='validation\[:25%\]': .* "):
    data.build_datasets(config, global_batch_size=512, seq_len=256, seed=0)


def test_the_dataset_check_reads_and_prepares_nothing(data_dir, tmp_path):
  from moejax.data.sources import check_dataset

  good = {"config.data.train_split": "train", "config.data.eval_split": "validation[:50%]"}
  check_dataset("shakespeare_plays", data_dir, good)
  check_dataset("shakespeare_plays", str(tmp_path), good)  # embedded: builds offline later
  assert not list(tmp_path.iterdir()), "the check prepares nothing"
  with pytest.raises(ValueError) as info:
    check_dataset("shakespeare_plyas", data_dir, good)
  assert str(info.value).count("'shakespeare_plays'") == 1, info.value
  assert str(info.value).startswith("config.data.name='shakespeare_plyas' is not a TFDS dataset")
  for directory in (data_dir, str(tmp_path)):
    for key, split, needle in [
      ("config.data.train_split", "trian", "has no split 'trian'; did you mean 'train'?"),
      (
        "config.data.eval_split",
        "valdation",
        "has no split 'valdation'; did you mean 'validation'?",
      ),
      ("config.data.eval_split", "validation[:1%", "is not a TFDS split spec"),
    ]:
      with pytest.raises(ValueError) as info:
        check_dataset("shakespeare_plays", directory, {**good, key: split})
      assert str(info.value).startswith(f"{key}={split!r}") and needle in str(info.value)
  with pytest.raises(ValueError, match="selects no record of shakespeare_plays"):
    check_dataset("shakespeare_plays", data_dir, {"config.data.eval_split": "validation[:1%]"})
  with pytest.raises(FileNotFoundError, match="tfds build lm1b"):
    check_dataset("lm1b", str(tmp_path), good)
  # A name this TFDS does not know says so, and names what needs no build.
  with pytest.raises(FileNotFoundError, match=r"\(this TFDS release does not know it\).*built-in"):
    check_dataset("no_such_ds", str(tmp_path), good)
