"""The data set index: what every reader produces and every pipeline consumes.

A reader turns a publisher's label and metadata files into an `Index`, without
touching any image. Raw label values are kept as published, coded as floats:

  1.0  positive        0.0  negative
  -1.0 uncertain       nan  blank (no mention)

Policies that turn uncertain and blank values into training targets live in
`labels.py`; an index never decides them.
"""

import dataclasses
from typing import Sequence

import numpy as np

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0


@dataclasses.dataclass(frozen=True)
class Index:
  """Images of one split of one data set, with their raw labels.

  Attributes:
    dataset: short name of the data set, e.g. "chexpert".
    split: split name, e.g. "train", "valid", "test".
    root: the data set root the paths are relative to.
    paths: image paths relative to `root`, one per row.
    patients: patient identifier per row (for patient-level splits).
    studies: study identifier per row.
    label_names: the data set's native label names, in column order.
    labels: float32 array (rows, labels) with the raw codes above.
  """

  dataset: str
  split: str
  root: str
  paths: tuple[str, ...]
  patients: tuple[str, ...]
  studies: tuple[str, ...]
  label_names: tuple[str, ...]
  labels: np.ndarray

  def __post_init__(self):
    n = len(self.paths)
    if len(self.patients) != n or len(self.studies) != n:
      raise ValueError("paths, patients and studies must have one entry per row")
    if self.labels.shape != (n, len(self.label_names)):
      raise ValueError(
          f"labels has shape {self.labels.shape}, expected "
          f"({n}, {len(self.label_names)})")
    ok = np.isnan(self.labels) | np.isin(self.labels, (1.0, 0.0, -1.0))
    if not ok.all():
      row, col = np.argwhere(~ok)[0]
      raise ValueError(
          f"label {self.label_names[col]!r} of {self.paths[row]!r} has value "
          f"{self.labels[row, col]!r}; expected 1, 0, -1 or blank")

  def __len__(self) -> int:
    return len(self.paths)

  def select(self, rows: Sequence[int] | np.ndarray, split: str | None = None
             ) -> "Index":
    """The sub-index of the given rows (in that order)."""
    rows = np.asarray(rows, dtype=np.int64)
    return dataclasses.replace(
        self,
        split=self.split if split is None else split,
        paths=tuple(self.paths[i] for i in rows),
        patients=tuple(self.patients[i] for i in rows),
        studies=tuple(self.studies[i] for i in rows),
        labels=self.labels[rows])
