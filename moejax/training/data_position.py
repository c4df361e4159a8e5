"""Where each process's data iterator stands, as one JSON value in a checkpoint.

Window batches (`data.packing='window'`) are a pure function of the batch index, so every
process's iterator is at the same place; packed batches (`first_fit`, `best_fit`) are not:
each process packs its own documents, and its grain iterator state is its own. A
checkpoint keeps `{"processes": [state of process 0, state of process 1, ...]}`.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def gather(state: dict[str, Any], *, per_process: bool) -> dict[str, Any]:
  """Every process's iterator `state`, in process order: with `per_process` (packed
  batches) a collective, called by all processes at once, with no other cross-process
  work in flight (an Orbax save finishing in the background); else this process's
  state, the same on every process, once."""
  if jax.process_count() == 1 or not per_process:
    return {"processes": [state]}
  text = np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([len(text)], np.int64)).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[: len(text)] = text
  every = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
  return {"processes": [json.loads(bytes(row[:n])) for row, n in zip(every, lengths, strict=True)]}


def own(saved: dict[str, Any]) -> dict[str, Any]:
  """This process's iterator state from a checkpoint's data position. A checkpoint from
  before per-process states holds the state itself. Resuming per-process states with
  another number of processes is refused in one line, unless they are all the same."""
  if "processes" not in saved:
    return saved
  states = saved["processes"]
  if len(states) == jax.process_count():
    return states[jax.process_index()]
  if all(s == states[0] for s in states):
    return states[0]
  raise ValueError(
    f"the checkpoint's data position is {len(states)} processes' own (packed batches): "
    f"resume with {len(states)} processes, not {jax.process_count()}."
  )
