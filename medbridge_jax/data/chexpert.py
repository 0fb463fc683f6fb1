"""CheXpert v1.0 and v1.0-small, read from the files Stanford publishes.

Layout (the root is the folder that *holds* the data set folder, because the
CSVs' `Path` values start with the data set folder's name):

  root/CheXpert-v1.0-small/train.csv      (or CheXpert-v1.0/, full resolution)
  root/CheXpert-v1.0-small/valid.csv
  root/CheXpert-v1.0-small/test_labels.csv  (optional: the test set labels as
      released with CheXlocalize; `test.csv` is accepted too; their `Path`
      values start at `test/`, so the test images are expected in
      CheXpert-v1.0[-small]/test/)
  root/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg ...

Any label file may be gzip-compressed (`train.csv.gz`). Columns are found by
name: `Path`, the 14 observations below, and `Frontal/Lateral` when present
(else the view is read from the file name, `view1_frontal.jpg`). Label values
are CheXpert's codes: 1.0 positive, 0.0 negative, -1.0 uncertain, blank no
mention; anything else is an error naming the file, line and value.

By default only frontal views are indexed (the model is trained on frontal
radiographs, as for MIMIC-CXR); `views="all"` keeps lateral ones too.
If both CheXpert-v1.0 and CheXpert-v1.0-small are present, the full-resolution
one is read unless `folder` says otherwise. A root that is itself the data set
folder is accepted and replaced by its parent.
"""

import os
import posixpath
import re

import numpy as np

from medbridge_jax.data import csvio
from medbridge_jax.data import index as index_lib
from medbridge_jax.errors import UserError

NAME = "chexpert"
FOLDERS = ("CheXpert-v1.0", "CheXpert-v1.0-small")
LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
    "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices")
# train.csv / valid.csv header, as published.
HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + LABELS
SPLIT_FILES = {
    "train": ("train.csv",),
    "valid": ("valid.csv",),
    "test": ("test_labels.csv", "test.csv"),
}
SPLITS = tuple(SPLIT_FILES) + ("all",)
VIEWS = ("frontal", "lateral", "all")

_PATIENT = re.compile(r"^patient\d+$")
_STUDY = re.compile(r"^study\d+$")


def read(root: str, split: str = "train", *, views: str = "frontal",
         folder: str | None = None) -> index_lib.Index:
  """Index of one split ("train", "valid", "test" or "all").

  Args:
    root: the folder holding CheXpert-v1.0[-small]/.
    split: which label file; "all" concatenates every one present.
    views: "frontal" | "lateral" | "all".
    folder: "CheXpert-v1.0" or "CheXpert-v1.0-small" to choose between both.
  """
  if split not in SPLITS:
    raise UserError(f"CheXpert split {split!r} is not one of {SPLITS}")
  if views not in VIEWS:
    raise UserError(f"CheXpert views {views!r} is not one of {VIEWS}")
  root, folder = _locate(root, folder)
  base = os.path.join(root, folder)
  if split == "all":
    parts = [s for s in SPLIT_FILES
             if any(csvio.exists(base, f) for f in SPLIT_FILES[s])]
    indexes = [_read_file(root, folder, s, views) for s in parts]
    return index_lib.Index(
        dataset=NAME, split="all", root=root,
        paths=sum((i.paths for i in indexes), ()),
        patients=sum((i.patients for i in indexes), ()),
        studies=sum((i.studies for i in indexes), ()),
        label_names=LABELS,
        labels=np.concatenate([i.labels for i in indexes]))
  return _read_file(root, folder, split, views)


def sources(root: str, *, folder: str | None = None,
            **unused_options) -> dict[str, str | None]:
  """Where each split's rows come from in this folder; None: not here.

  The test labels are optional (they were released later): a folder
  without them has no "test".
  """
  del unused_options  # views: which rows of a file, not which file.
  root, folder = _locate(root, folder)
  base = os.path.join(root, folder)
  out = {}
  for split, files in SPLIT_FILES.items():
    found = [f for f in files if csvio.exists(base, f)]
    out[split] = f"{folder}/{found[0]}" if found else None
  out["all"] = "every label file present"
  return out


def _locate(root: str, folder: str | None) -> tuple[str, str]:
  """(root, data set folder name), checking that the folder exists."""
  root = os.path.abspath(root)
  if not os.path.isdir(root):
    raise UserError(f"CheXpert root {root} is not a directory")
  if os.path.basename(root) in FOLDERS and not any(
      os.path.isdir(os.path.join(root, f)) for f in FOLDERS):
    root, folder = os.path.dirname(root), folder or os.path.basename(root)
  if folder is not None:
    if folder not in FOLDERS:
      raise UserError(f"CheXpert folder {folder!r} is not one of {FOLDERS}")
    if not os.path.isdir(os.path.join(root, folder)):
      raise UserError(f"{os.path.join(root, folder)}: no such directory")
    return root, folder
  for f in FOLDERS:
    if os.path.isdir(os.path.join(root, f)):
      return root, f
  raise UserError(f"{root} holds neither {FOLDERS[0]}/ nor {FOLDERS[1]}/ "
                  "(give the folder that contains the CheXpert folder)")


def _read_file(root: str, folder: str, split: str,
               views: str) -> index_lib.Index:
  base = os.path.join(root, folder)
  table = csvio.read_table(csvio.find(base, *SPLIT_FILES[split]),
                           required=("Path",) + LABELS)
  labels = csvio.codes(table, LABELS)
  has_view = "Frontal/Lateral" in table.header
  paths, patients, studies, keep = [], [], [], []
  for i, value in enumerate(table["Path"].tolist()):
    parts = _relative(table, i, value).split("/")
    if parts[0] not in FOLDERS:
      parts.insert(0, folder)  # test_labels.csv: "test/patient.../..."
    patient = next((p for p in parts if _PATIENT.match(p)), None)
    study = next((p for p in parts if _STUDY.match(p)), None)
    if patient is None or study is None:
      table.fail(i, "Path", value, "a path with patientNNNNN/studyN/ in it")
    if has_view:
      view = str(table["Frontal/Lateral"][i]).strip().lower()
      if view not in ("frontal", "lateral"):
        table.fail(i, "Frontal/Lateral", str(table["Frontal/Lateral"][i]),
                   "Frontal or Lateral")
    else:
      view = _view_from_name(parts[-1])
      if view is None:
        table.fail(i, "Path", value, "a file name ending in _frontal or "
                   "_lateral (there is no Frontal/Lateral column)")
    if views != "all" and view != views:
      continue
    keep.append(i)
    paths.append("/".join(parts))
    patients.append(patient)
    studies.append(f"{patient}/{study}")
  return index_lib.Index(
      dataset=NAME, split=split, root=root, paths=tuple(paths),
      patients=tuple(patients), studies=tuple(studies), label_names=LABELS,
      labels=labels[np.asarray(keep, np.int64)])


def _relative(table: csvio.Table, i: int, value: str) -> str:
  """A '/'-separated path relative to the root; refused if it escapes it."""
  p = value.strip().replace("\\", "/")
  if not p or p.startswith("/") or (len(p) > 1 and p[1] == ":"):
    table.fail(i, "Path", value, "a path relative to the data set root")
  if "/." in p or p.startswith(".") or "//" in p:
    p = posixpath.normpath(p)
    if p in (".", "..") or p.startswith("../"):
      table.fail(i, "Path", value, "a path inside the data set root (it "
                 "escapes it)")
  return p


def _view_from_name(filename: str) -> str | None:
  stem = filename.rsplit(".", 1)[0].lower()
  if stem.endswith("_frontal"):
    return "frontal"
  if stem.endswith("_lateral"):
    return "lateral"
  return None
