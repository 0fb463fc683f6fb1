"""MIMIC-CXR-JPG 2.0.0, read from PhysioNet's own files.

The root is the folder PhysioNet's `mimic-cxr-jpg/2.0.0/` download creates:

  mimic-cxr-2.0.0-chexpert.csv[.gz]   subject_id, study_id, 14 labels
  mimic-cxr-2.0.0-negbio.csv[.gz]     the same columns, NegBio labeler
  mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split
  mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, ..., ViewPosition, ...
  files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg   XX = first two digits of SUBJECT

Decisions:
- Rows are images (one per dicom_id of the split file, in its order); the
  labels are per study and joined to every image of the study.
- Official splits; PhysioNet's "validate" is called "valid" here ("validate"
  is accepted as an argument too). "all" = every split.
- Views: only frontal images by default, ViewPosition PA or AP (`views`);
  images whose ViewPosition is blank or anything else are left out.
- Images of a study that has no row in the label file are left out: the
  labelers did not process them, and "no row" must not read as "no mention".
- Label codes as published: 1.0, 0.0, -1.0, blank.
- Patients are subject ids, studies are study ids (as decimal strings).

Errors: a split file naming a dicom_id the metadata lacks, ids that do not
agree between files, repeated ids, unknown split or label values.
"""

from typing import Sequence

import numpy as np

from medbridge_jax.data import csvio
from medbridge_jax.data import index as index_lib
from medbridge_jax.errors import UserError

LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
          "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
          "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
          "Pneumonia", "Pneumothorax", "Support Devices")
LABELERS = ("chexpert", "negbio")
FRONTAL = ("PA", "AP")
SPLITS = ("train", "valid", "test", "all")
# PhysioNet's split names -> ours.
_SPLIT_NAMES = {"train": "train", "validate": "valid", "test": "test"}
_PREFIX = "mimic-cxr-2.0.0-"


def read(root: str, split: str = "train", *, labeler: str = "chexpert",
         views: Sequence[str] | None = FRONTAL) -> index_lib.Index:
  """The index of one split of MIMIC-CXR-JPG.

  Args:
    root: the folder holding the mimic-cxr-2.0.0-*.csv[.gz] files and files/.
    split: "train", "valid" (or "validate"), "test" or "all".
    labeler: "chexpert" or "negbio": which label file to read.
    views: ViewPosition values kept (None: every image, metadata not read).
  """
  split = "valid" if split == "validate" else split
  if split not in SPLITS:
    raise UserError(f"MIMIC-CXR split {split!r} is not one of {SPLITS}")
  if labeler not in LABELERS:
    raise UserError(f"MIMIC-CXR labeler {labeler!r} is not one of {LABELERS}")

  table = csvio.read_table(
      csvio.find(root, _PREFIX + "split.csv"),
      ("dicom_id", "study_id", "subject_id", "split"), only_required=True)
  dicoms = csvio.names(table, "dicom_id")
  studies = csvio.integers(table, "study_id")
  subjects = csvio.integers(table, "subject_id")
  dup = csvio.first_duplicate(dicoms)
  if dup is not None:
    table.fail_row(dup, f"dicom_id {str(dicoms[dup])!r} appears twice")
  names = np.char.strip(table["split"])
  for value in np.unique(names):
    if value not in _SPLIT_NAMES:
      row = int(np.argmax(names == value))
      table.fail(row, "split", str(value), "train, validate or test")
  keep = np.ones(len(table), bool)
  if split != "all":
    keep &= names == {v: k for k, v in _SPLIT_NAMES.items()}[split]

  if views is not None:
    keep &= _view_mask(root, table, dicoms, studies, subjects, views)

  labels_table = csvio.read_table(
      csvio.find(root, _PREFIX + labeler + ".csv"),
      ("subject_id", "study_id") + LABELS, only_required=True)
  label_studies = csvio.integers(labels_table, "study_id")
  label_subjects = csvio.integers(labels_table, "subject_id")
  dup = csvio.first_duplicate(label_studies)
  if dup is not None:
    labels_table.fail_row(dup, f"study_id {label_studies[dup]} appears twice")
  codes = csvio.codes(labels_table, LABELS)
  at = _find(label_studies, studies)
  keep &= at >= 0  # studies the labeler did not process (see docstring)
  rows = np.flatnonzero(keep)
  at = at[rows]
  wrong = label_subjects[at] != subjects[rows]
  if wrong.any():
    i = int(np.argmax(wrong))
    labels_table.fail_row(
        int(at[i]), f"study_id {label_studies[at[i]]} has subject_id "
        f"{label_subjects[at[i]]}, but {table.path} line "
        f"{table.lines[rows[i]]} gives subject_id {subjects[rows[i]]}")

  subject_text = subjects[rows].astype(str)
  study_text = studies[rows].astype(str)
  paths = tuple(
      f"files/p{p[:2]}/p{p}/s{s}/{d}.jpg"
      for p, s, d in zip(subject_text.tolist(), study_text.tolist(),
                         dicoms[rows].tolist()))
  return index_lib.Index(
      dataset="mimic", split=split, root=root, paths=paths,
      patients=tuple(subject_text.tolist()), studies=tuple(study_text.tolist()),
      label_names=LABELS, labels=codes[at])


def sources(root: str, **unused_options) -> dict[str, str]:
  """Where each split's rows come from: all three are official."""
  del root, unused_options  # The split file names every split.
  out = {ours: f"{_PREFIX}split.csv rows of split {theirs!r}"
         for theirs, ours in _SPLIT_NAMES.items()}
  out["all"] = f"every row of {_PREFIX}split.csv"
  return out


def _view_mask(root: str, table: csvio.Table, dicoms: np.ndarray,
               studies: np.ndarray, subjects: np.ndarray,
               views: Sequence[str]) -> np.ndarray:
  """bool per split-file row: its image's ViewPosition is one of `views`."""
  meta = csvio.read_table(
      csvio.find(root, _PREFIX + "metadata.csv"),
      ("dicom_id", "subject_id", "study_id", "ViewPosition"),
      only_required=True)
  meta_dicoms = np.char.strip(meta["dicom_id"])
  dup = csvio.first_duplicate(meta_dicoms)
  if dup is not None:
    meta.fail_row(dup, f"dicom_id {str(meta_dicoms[dup])!r} appears twice")
  at = csvio.positions(meta_dicoms, dicoms)
  if (at < 0).any():
    i = int(np.argmax(at < 0))
    table.fail_row(i, f"dicom_id {str(dicoms[i])!r} is not in {meta.path}")
  for column, ids in (("subject_id", subjects), ("study_id", studies)):
    theirs = csvio.integers(meta, column)[at]
    wrong = theirs != ids
    if wrong.any():
      i = int(np.argmax(wrong))
      meta.fail_row(
          int(at[i]), f"dicom_id {str(dicoms[i])!r} has {column} "
          f"{theirs[i]}, but "
          f"{table.path} line {table.lines[i]} gives {ids[i]}")
  return np.isin(np.char.strip(meta["ViewPosition"])[at], list(views))


def _find(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
  """Row of each query in the unique int64 `keys`, -1 where absent."""
  order = np.argsort(keys, kind="stable")
  sorted_keys = keys[order]
  pos = np.clip(np.searchsorted(sorted_keys, queries), 0,
                max(len(keys) - 1, 0))
  if not len(keys):
    return np.full(len(queries), -1, np.int64)
  found = sorted_keys[pos] == queries
  return np.where(found, order[pos], -1).astype(np.int64)
