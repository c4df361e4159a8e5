"""What the embedded corpora's TFDS builders share: records of `title` and `text`, built
offline from an installed package's files."""

from __future__ import annotations

import sys

import tensorflow_datasets as tfds


class TextBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder whose records are `{'title': Text, 'text': Text}`, described by its module's
  docstring; a subclass sets `HOMEPAGE` and `code_path` (TFDS 4.9.10 derives `code_path`
  through `importlib_resources`, which it does not install on Python >= 3.9,
  tensorflow/datasets#11212) and writes the splits. Abstract: TFDS registers only the
  subclasses."""

  HOMEPAGE = ""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=sys.modules[type(self).__module__].__doc__,
      features=tfds.features.FeaturesDict(
        {"title": tfds.features.Text(), "text": tfds.features.Text()}
      ),
      homepage=self.HOMEPAGE,
    )
