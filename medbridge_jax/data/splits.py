"""Deterministic patient-level splits and training fractions.

Images of one patient are never on both sides of a split: a model that saw a
patient's other radiographs would be tested on a familiar anatomy. Patients
are ordered by a keyed hash of (purpose, seed, patient id); a split takes a
prefix of that order. So the result depends only on the seed and the set of
patients, not on row order or Python's hash seed, and the training fractions
are nested: the 1% patients are among the 10%, which are among the 100%.
"""

import hashlib
from typing import Sequence

import numpy as np

from medbridge_jax.data import index as index_lib
from medbridge_jax.errors import UserError


def patient_order(patients, seed: int, purpose: str) -> list[str]:
  """The distinct patients, in the seeded hash order for `purpose`."""
  def key(p):
    h = hashlib.blake2b(f"{purpose}\0{seed}\0{p}".encode(), digest_size=8)
    return h.digest(), p
  return sorted(set(patients), key=key)


def _rows_of(index: index_lib.Index, chosen: set) -> np.ndarray:
  return np.array([i for i, p in enumerate(index.patients) if p in chosen],
                  np.int64)


def holdout(index: index_lib.Index, fraction: float, seed: int,
            names: tuple[str, str] = ("train", "valid")
            ) -> tuple[index_lib.Index, index_lib.Index]:
  """Splits off `fraction` of the patients: (rest, held out), renamed `names`.

  The held-out share is round(fraction * patients), at least one patient and
  at most all but one when there are two or more.
  """
  if not 0.0 < fraction < 1.0:
    raise UserError(f"held-out fraction must be in (0, 1), got {fraction}")
  order = patient_order(index.patients, seed, "holdout")
  k = int(round(fraction * len(order)))
  if len(order) >= 2:
    k = min(max(k, 1), len(order) - 1)
  held = set(order[:k])
  rest = [i for i, p in enumerate(index.patients) if p not in held]
  return (index.select(rest, split=names[0]),
          index.select(_rows_of(index, held), split=names[1]))


def fraction(index: index_lib.Index, share: float,
             seed: int) -> index_lib.Index:
  """The rows of ceil(share * patients) patients (at least one).

  share 1 returns the index unchanged; smaller shares of the same seed are
  nested.
  """
  if not 0.0 < share <= 1.0:
    raise UserError(f"training fraction must be in (0, 1], got {share}")
  if share == 1.0:
    return index
  order = patient_order(index.patients, seed, "fraction")
  k = max(1, int(np.ceil(share * len(order) - 1e-9)))
  return index.select(_rows_of(index, set(order[:k])))


def check_disjoint(*indexes: index_lib.Index,
                   names: Sequence[str] | None = None) -> None:
  """UserError naming the data set, two splits and a patient they share.

  Args:
    *indexes: splits of one data set.
    names: what the message calls each index (default "the 'SPLIT' split"),
      for splits whose names alone do not tell them apart.

  The patient named is the first shared one in the later index's row order,
  so the message is the same on every run.
  """
  if names is None:
    names = [f"the {idx.split!r} split" for idx in indexes]
  if len(names) != len(indexes):
    raise ValueError(f"{len(names)} names for {len(indexes)} indexes")
  seen = {}
  for name, idx in zip(names, indexes):
    own = dict.fromkeys(idx.patients)  # Distinct, in row order.
    for p in own:
      if p in seen:
        raise UserError(f"{idx.dataset}: patient {p} is in both {seen[p]} "
                        f"and {name}")
    seen.update(dict.fromkeys(own, name))
