"""Tokenizers, token stores and their window batches, against hand-built references."""

import collections
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from moejax.data import documents, load_tokenizer, packed, token_data, windows
from moejax.data.store import TokenStore
from moejax.data.store_writer import prepare
from moejax.data.tokenizer.__main__ import train_bpe

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILT_IN_BPE = "hf:" + os.path.join(REPO_ROOT, "moejax", "data", "assets", "bpe_2048")


def _texts(n=300, seed=0):
  """Documents of 0 to ~400 characters, some non-ASCII, some a single character."""
  rng = np.random.default_rng(seed)
  words = ["the", "king", "é", "lord", "ſhall", "—", "and", "thou", "日本", "x", "\n"]
  return [" ".join(rng.choice(words, rng.integers(1, 80))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Two JSONL files of short documents, and the documents in corpus order."""
  root = tmp_path_factory.mktemp("corpus")
  texts = _texts()
  for i, part in enumerate((texts[:170], texts[170:])):
    with open(root / f"part{i}.jsonl", "w", encoding="utf-8") as f:
      for text in part:
        f.write(json.dumps({"body": text}) + "\n")
  return str(root), texts


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("bpe"))
  train_bpe([f"jsonl:{corpus[0]}/*.jsonl:body"], 300, out)
  return f"hf:{out}"


@pytest.fixture(scope="module")
def store(corpus, bpe, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("stores") / "bpe")
  prepare([f"jsonl:{corpus[0]}/*.jsonl:body"], bpe, out)
  return TokenStore(out)


def test_tokenizers_round_trip(bpe):
  text = "ROMEO. But soft! what light — ſhall 日本 é\n\tend"
  for kind in ("bytes", bpe, BUILT_IN_BPE):
    tok = load_tokenizer(kind)
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    # token_bytes counts each token's UTF-8 bytes: they add up to the text's.
    assert tok.token_bytes()[ids].sum() == len(text.encode("utf-8"))
    assert tok.token_bytes()[tok.eos_id] == 0
    assert len(tok.fingerprint()) == 64
  built_in = load_tokenizer(BUILT_IN_BPE)
  assert (built_in.vocab_size, built_in.pad_id, built_in.bos_id, built_in.eos_id) == (2048, 0, 1, 2)
  assert len(built_in.encode(text)) < len(text.encode("utf-8"))  # it merges


def test_metaspace_tokenizer_json_counts_the_spaces_it_stands_for(corpus, tmp_path):
  """A tokenizer.json converted from SentencePiece (Mistral's, Llama 2's) writes spaces as
  `▁`; decoding a piece alone drops it, so the bytes come from the piece itself."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(byte_fallback=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
  tok.decoder = decoders.Metaspace(prepend_scheme="never")
  special = ["<unk>", "<s>", "</s>"]
  bytes_ = [f"<0x{b:02X}>" for b in range(256)]
  trainer = trainers.BpeTrainer(
    vocab_size=400, special_tokens=special + bytes_, show_progress=False
  )
  tok.train_from_iterator(corpus[1], trainer=trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = load_tokenizer(f"hf:{tmp_path}")
  text = "the king ſhall thou 日本 lord"
  ids = loaded.encode(text)
  assert loaded.decode(ids) == text
  assert loaded.token_bytes()[ids].sum() == len(text.encode("utf-8"))


def test_sentencepiece_kind(corpus, tmp_path):
  spm = pytest.importorskip("sentencepiece")
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus[1]),
    model_prefix=str(tmp_path / "m"),
    vocab_size=285,
    byte_fallback=True,
    normalization_rule_name="identity",  # keep ſ (NFKC would make it s)
    add_dummy_prefix=False,  # else the text gains a leading space, one byte
    minloglevel=2,
  )
  tok = load_tokenizer(f"spm:{tmp_path}/m.model")
  text = "the king ſhall 日本"
  assert tok.decode(tok.encode(text)) == text
  assert tok.token_bytes()[tok.encode(text)].sum() == len(text.encode("utf-8"))


def test_store_holds_each_documents_encoding(corpus, bpe, store):
  tok = load_tokenizer(bpe)
  texts = corpus[1]
  assert len(store) == len(texts) and store.tokenizer.fingerprint() == tok.fingerprint()
  for i, text in enumerate(texts):
    np.testing.assert_array_equal(store[i], tok.encode(text))
  assert store.num_tokens == sum(len(tok.encode(t)) + 1 for t in texts)
  assert store.num_bytes == sum(len(t.encode("utf-8")) for t in texts)
  assert np.all(store.tokens[np.asarray(store.document_ends) - 1] == tok.eos_id)
  assert store.tokens.dtype == np.uint16


def test_workers_and_shards_write_the_same_store(corpus, store, bpe, tmp_path, monkeypatch):
  """Byte-range shards of 1 KiB cut lines anywhere: 2 workers still write the same bytes."""
  monkeypatch.setattr(documents, "SHARD_BYTES", 1024)
  out = str(tmp_path / "sharded")
  source = f"jsonl:{corpus[0]}/*.jsonl:body"
  assert len(documents.shards(source)) > 10
  # Spawned workers read the module's SHARD_BYTES afresh, but shards are cut here.
  meta = prepare([source], bpe, out, workers=2)
  assert not meta["already_prepared"]
  for name in ("tokens.bin", "document_ends.bin"):
    with (
      open(os.path.join(out, name), "rb") as a,
      open(os.path.join(store.directory, name), "rb") as b,
    ):
      assert a.read() == b.read()


def test_rerun_is_idempotent_and_other_stores_are_refused(corpus, store, bpe, tmp_path):
  source = f"jsonl:{corpus[0]}/*.jsonl:body"
  before = os.stat(os.path.join(store.directory, "tokens.bin")).st_mtime_ns
  assert prepare([source], bpe, store.directory)["already_prepared"]
  assert os.stat(os.path.join(store.directory, "tokens.bin")).st_mtime_ns == before
  with pytest.raises(ValueError, match="holds another token store"):
    prepare([source], "bytes", store.directory)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "keep.txt").write_text("mine")
  with pytest.raises(ValueError, match="not a token store; nothing was overwritten"):
    prepare([source], "bytes", str(tmp_path / "other"))
  assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def _rows_reference(store, begin, seq_len, window):
  """Segment ids and positions of one window by a loop over its tokens."""
  ends = np.asarray(store.document_ends)
  start = begin + window * seq_len
  segments, positions, first = [], [], None
  for g in range(start, start + seq_len):
    doc = int(np.searchsorted(ends, g, side="right"))
    first = doc if first is None else first
    doc_start = 0 if doc == 0 else int(ends[doc - 1])
    segments.append(doc - first + 1)
    positions.append(g - max(doc_start, start))
  return segments, positions


def test_window_rows_against_a_loop(store):
  region = windows.Region(store, 5, store.num_tokens, 32)
  picked = np.arange(region.num_windows)
  rows = region.rows(picked, document_masking=True)
  assert rows["segment_ids"].max() > 3  # windows cross several documents here
  for i in picked:
    segments, positions = _rows_reference(store, 5, 32, i)
    np.testing.assert_array_equal(rows["segment_ids"][i], segments)
    np.testing.assert_array_equal(rows["positions"][i], positions)
    start = 5 + i * 32
    np.testing.assert_array_equal(rows["inputs"][i], store.tokens[start : start + 32])
    np.testing.assert_array_equal(rows["targets"][i], store.tokens[start + 1 : start + 33])
  flat = region.rows(picked[:3], document_masking=False)
  assert "segment_ids" not in flat and "positions" not in flat
  np.testing.assert_array_equal(flat["inputs"], rows["inputs"][:3])


def _global_batches(batches, num, processes):
  return [
    np.concatenate(
      [
        batches.rows(b, windows.process_rows(batches.global_batch_size, p, processes))["inputs"]
        for p in range(processes)
      ]
    )
    for b in range(num)
  ]


def test_global_batches_do_not_depend_on_process_count_and_cover_an_epoch(store):
  region = windows.whole_region(store, 16)
  batches = windows.MixtureBatches([region], [1.0], global_batch_size=8, seed=3)
  epoch = region.num_windows // 8
  one = _global_batches(batches, epoch, 1)
  for processes in (2, 4):
    for a, b in zip(one, _global_batches(batches, epoch, processes), strict=True):
      np.testing.assert_array_equal(a, b)
  # Disjoint and complete: the epoch's first windows are distinct, one per window index.
  order = [batches.orders[0][i] for i in range(region.num_windows)]
  assert sorted(order) == list(range(region.num_windows))
  starts = {tuple(row[:16]) for batch in one for row in batch}
  assert len(starts) == epoch * 8
  # A pure function of (seed, b): a new object gives the same batch 5; another seed does not.
  again = windows.MixtureBatches([region], [1.0], global_batch_size=8, seed=3)
  np.testing.assert_array_equal(again.rows(5, slice(0, 8))["inputs"], one[5])
  other = windows.MixtureBatches([region], [1.0], global_batch_size=8, seed=4)
  assert not np.array_equal(other.rows(5, slice(0, 8))["inputs"], one[5])


def test_iterator_resumes_exactly(store):
  region = windows.whole_region(store, 16)
  batches = windows.MixtureBatches([region], [1.0], global_batch_size=4, seed=0)
  it = windows.train_iterator(batches, slice(0, 4))
  first = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))
  following = [next(it) for _ in range(3)]
  resumed = windows.train_iterator(batches, slice(0, 4))
  resumed.set_state(state)
  for a, b in zip(following, [next(resumed) for _ in range(3)], strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  np.testing.assert_array_equal(first[0]["inputs"], batches.rows(0, slice(0, 4))["inputs"])


def test_mixture_rows_follow_the_weights_exactly(store):
  region = windows.whole_region(store, 16)
  marked = windows.Region(store, 1, store.num_tokens, 16)  # windows one token later
  batches = windows.MixtureBatches([region, marked], [3.0, 1.0], global_batch_size=8, seed=1)
  per_source = np.zeros(2, np.int64)
  for b in range(10):
    before = batches._rows_before(b * 8)
    assert np.all(np.abs(before - b * 8 * np.array([0.75, 0.25])) < 1)
    per_source += batches._rows_before((b + 1) * 8) - before
  np.testing.assert_array_equal(per_source, [60, 20])
  with pytest.raises(ValueError, match="sum to a positive number"):
    windows.MixtureBatches([region], [0.0], global_batch_size=8, seed=1)
  with pytest.raises(ValueError, match="DIR=WEIGHT"):
    token_data.parse_mixture("a=1,b")


def test_held_out_fraction_starts_at_a_document(store):
  train, held_out = windows.split_regions(store, 16, 0.2)
  assert train.end == held_out.begin and held_out.begin in set(np.asarray(store.document_ends))
  assert abs(held_out.begin - 0.8 * store.num_tokens) < max(np.diff(store.document_ends))


# ----------------------------------------------------------------------------- bad input


def _prepare_command(*args, timeout=120):
  return subprocess.run(
    [sys.executable, "-m", "moejax.data.prepare", *args],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    timeout=timeout,
  )


def test_bad_inputs_are_one_line_with_exit_2_and_write_nothing(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n')
  cases = {
    "no document with text": [f"--source=jsonl:{empty}"],
    "is not UTF-8": [f"--source=jsonl:{bad}"],
    "no such tokenizer.json": [f"--source=jsonl:{bad}", "--tokenizer=hf:/nonexistent/x"],
    "no file matches": [f"--source=jsonl:{tmp_path}/missing*.jsonl"],
    "is not a corpus": ["--source=csv:x.csv"],
  }
  for i, (message, args) in enumerate(cases.items()):
    out = tmp_path / f"out{i}"
    result = _prepare_command(*args, f"--out={out}")
    assert result.returncode == 2, (message, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], (message, result.stderr)
    assert not out.exists() and not list(tmp_path.glob(f"out{i}.partial-*"))
  # A lone surrogate is no UTF-8 either; two workers finish without a word on stderr.
  with open(bad, "a") as f:
    f.write(json.dumps({"text": "half \ud800 a pair"}) + "\n")
  skipped = _prepare_command(
    f"--source=jsonl:{bad}", "--not_utf8=skip", f"--out={tmp_path}/s", "--workers=2"
  )
  assert skipped.returncode == 0 and "skipped 2 documents that are not UTF-8" in skipped.stdout
  assert skipped.stderr == ""
  assert len(TokenStore(str(tmp_path / "s"))) == 2


def test_a_tfds_split_with_a_colon_prepares(tmp_path):
  """`validation[:50%]` holds a colon: the shards keep name, split and directory apart."""
  data_dir = str(tmp_path / "tfds")
  source = "tfds:shakespeare_plays:validation[:50%]"
  prepare([source], "bytes", str(tmp_path / "half"), data_dir=data_dir)
  texts = list(documents.iter_documents(source, data_dir))
  assert len(texts) == 2 and len(TokenStore(str(tmp_path / "half"))) == 2


def test_killed_prepare_leaves_no_store_and_the_rerun_completes(tmp_path):
  big = tmp_path / "big.jsonl"
  line = json.dumps({"text": "word " * 2000}) + "\n"
  with open(big, "w") as f:
    f.write(line * 20000)  # 200 MB of text: several seconds of work
  out = tmp_path / "store"
  process = subprocess.Popen(
    [sys.executable, "-m", "moejax.data.prepare", f"--source=jsonl:{big}", f"--out={out}"],
    cwd=REPO_ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 60
  while not list(tmp_path.glob("store.partial-*")) and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(0.5)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not out.exists() and list(tmp_path.glob("store.partial-*"))
  big.write_text(line * 10)
  assert _prepare_command(f"--source=jsonl:{big}", f"--out={out}").returncode == 0
  assert len(TokenStore(str(out))) == 10 and not list(tmp_path.glob("store.partial-*"))


def test_vocab_size_comes_from_the_store_and_mismatches_are_one_line(store, bpe):
  from moejax.config import load_config

  config = load_config("configs/tiny.py:smoke")
  config.data.tokens_dir, config.data.eval_fraction = store.directory, 0.1
  vocab = store.vocab_size  # the trainer stops short of 300 when merges run out
  assert f"model.vocab_size={vocab}" in token_data.resolve_vocab_size(config)
  assert config.model.vocab_size == vocab
  config.model.vocab_size = vocab + 20  # a padded embedding is allowed
  assert token_data.resolve_vocab_size(config) is None
  config.model.vocab_size = 200
  with pytest.raises(ValueError, match=f"model.vocab_size=200 is smaller than .* {vocab}"):
    token_data.resolve_vocab_size(config)
  config.model.vocab_size = vocab
  config.data.tokenizer = BUILT_IN_BPE
  with pytest.raises(ValueError, match="is not the tokenizer token store"):
    token_data.resolve_vocab_size(config)
  config.data.tokenizer = bpe
  token_data.resolve_vocab_size(config)
  byte_config = load_config("configs/tiny.py:smoke")
  byte_config.data.tokenizer = "hf:/nonexistent/tokenizer"
  with pytest.raises(ValueError, match="no such tokenizer.json"):
    token_data.resolve_vocab_size(byte_config)
  byte_config.data.tokenizer = BUILT_IN_BPE
  with pytest.raises(ValueError, match="read from token stores"):
    token_data.resolve_vocab_size(byte_config)


# ----------------------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def short_store(bpe, tmp_path_factory):
  """300 documents of 1 to 6 words: short enough to pack whole into rows of 33 tokens."""
  root = tmp_path_factory.mktemp("short")
  rng = np.random.default_rng(1)
  words = ["the", "king", "é", "lord", "thou", "日本", "and"]
  with open(root / "short.jsonl", "w", encoding="utf-8") as f:
    for _ in range(300):
      f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(1, 7)))}) + "\n")
  prepare([f"jsonl:{root}/short.jsonl"], bpe, str(root / "store"))
  return TokenStore(str(root / "store"))


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_packing_keeps_every_document_whole_once_an_epoch(short_store, packing):
  """Every document ends with EOS and holds no other: a segment's inputs, plus the last
  column when its EOS sits there, are one whole document; a target counts in the loss iff
  its input is a real token other than EOS."""
  store, seq, eos = short_store, 32, short_store.eos_id
  documents = packed.Documents(store, 0, len(store))
  it = packed.train_iterator(
    documents, packing=packing, seq_len=seq, batch_size=4, seed=0, pad_id=store.tokenizer.pad_id
  )
  seen = []
  while len(seen) < 2 * len(store):  # the packer's bins may hold a document over an epoch end
    batch = next(it)
    full = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)  # [4, seq + 1]
    for row in range(4):
      ids, inputs = batch["segment_ids"][row], batch["inputs"][row]
      expected_mask = ((ids > 0) & (inputs != eos)).astype(np.int32)
      np.testing.assert_array_equal(batch["loss_mask"][row], expected_mask)
      for segment in range(1, ids.max() + 1):
        where = np.flatnonzero(ids == segment)
        assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
        np.testing.assert_array_equal(batch["positions"][row, where], np.arange(len(where)))
        tokens = full[row, where[0] : where[-1] + 1]
        if tokens[-1] != eos:
          assert where[-1] == seq - 1 and full[row, seq] == eos
          tokens = full[row, where[0] :]
        seen.append(tuple(tokens))
  whole = collections.Counter(
    tuple(int(t) for t in np.append(store[i], eos)) for i in range(len(store))
  )
  seen = collections.Counter(tuple(int(t) for t in doc) for doc in seen)
  assert set(seen) <= set(whole)  # nothing cut, nothing merged
  # Two epochs' worth of documents hold every document (texts repeat: counted as such).
  assert all(seen[text] >= count for text, count in whole.items())


def test_packing_resumes_exactly_and_splits_documents_across_processes(short_store):
  store = short_store
  documents = packed.Documents(store, 0, len(store))
  make = lambda index=0, count=1: packed.train_iterator(
    documents, packing="first_fit", seq_len=32, batch_size=4, seed=5, pad_id=0,
    shard_index=index, shard_count=count,
  )  # fmt: skip
  it = make()
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  following = [next(it) for _ in range(4)]
  resumed = make()
  resumed.set_state(state)
  for a in following:
    b = next(resumed)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Two processes pack disjoint halves of the documents: together, each once an epoch.
  n = len(store)
  halves = [packed.process_documents(n, 5, index, 2) for index in range(2)]
  first_epoch = [[int(d[i]) for i in range(n // 2)] for d in halves]
  assert not set(first_epoch[0]) & set(first_epoch[1])
  assert sorted(first_epoch[0] + first_epoch[1]) == list(range(n))
  with pytest.raises(ValueError, match="does not fit train.seq_len=4"):
    packed.train_iterator(documents, packing="first_fit", seq_len=4, batch_size=4, seed=0, pad_id=0)


def test_data_position_is_per_process():
  from moejax.training import data_position

  for per_process in (True, False):
    gathered = data_position.gather({"next_index": 3}, per_process=per_process)
    assert gathered == {"processes": [{"next_index": 3}]}
  assert data_position.own({"processes": [{"a": 1}]}) == {"a": 1}
  assert data_position.own({"next_index": 4}) == {"next_index": 4}  # older checkpoints
  assert data_position.own({"processes": [{"a": 1}, {"a": 1}]}) == {"a": 1}
  with pytest.raises(ValueError, match="resume with 2 processes, not 1"):
    data_position.own({"processes": [{"a": 1}, {"a": 2}]})


@pytest.mark.parametrize("packing", ["window", "first_fit"])
def test_training_on_a_store_resumes_exactly(short_store, packing, tmp_path):
  import shutil

  from moejax.config import load_config
  from moejax.training import train
  from moejax.training.metrics import read_metrics

  config = load_config("configs/tiny.py:smoke")
  config.data.tokens_dir, config.data.eval_fraction = short_store.directory, 0.2
  config.data.packing = packing
  t = config.train
  t.num_steps, t.checkpoint_every, t.eval_every, t.log_every = 6, 3, 6, 1
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir, show_progress=False)
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints", "6"))
  train.train_and_evaluate(config, copy, show_progress=False)
  keys = lambda r: {k: v for k, v in r.items() if k.startswith(("train/", "eval/"))}
  original = {r["step"]: keys(r) for r in read_metrics(workdir)}
  resumed = {r["step"]: keys(r) for r in read_metrics(copy)}
  assert original.keys() == resumed.keys()
  for step, record in original.items():
    for key, value in record.items():
      if key != "train/tokens_per_sec":
        np.testing.assert_allclose(resumed[step][key], value, rtol=1e-6, err_msg=f"{step} {key}")
