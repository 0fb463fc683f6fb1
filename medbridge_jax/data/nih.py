"""NIH ChestX-ray14, read from the files the NIH Clinical Center publishes.

Layout (root = the folder with the label files):

  root/Data_Entry_2017_v2020.csv   (or the original Data_Entry_2017.csv,
                                     whose lines end in a comma; .gz accepted)
  root/train_val_list.txt          (one image name per line)
  root/test_list.txt
  root/images_001/images/00000001_000.png ...   (Kaggle's layout), or
  root/images/00000001_000.png ...              (the NIH tarballs' layout)

`Finding Labels` holds the 14 findings joined by '|', or "No Finding"; each
image gets 1 for the findings named and 0 for the others (the labels are
mined from reports and carry no uncertainty), plus a 15th column "No
Finding". An unknown finding name is an error naming the file, line and
value; so is an image in a split list that the entry file does not have.

Splits: "test" is test_list.txt; "train_val" is train_val_list.txt; "train"
and "valid" divide train_val by patient (`valid_fraction` of the patients,
deterministic by `split_seed`, see splits.py); "all" is every entry.

Building the index opens no image. Image paths are found by listing the
image folders' names when there are several (images_001 ... images_012);
with one folder, no listing is needed. A name not found on disk keeps the
path it would have in the first folder, for the pipeline to report.
"""

import glob
import os

import numpy as np

from medbridge_jax.data import csvio
from medbridge_jax.data import index as index_lib
from medbridge_jax.data import splits as splits_lib
from medbridge_jax.errors import UserError

NAME = "nih"
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass",
    "Nodule", "Pneumonia", "Pneumothorax", "Consolidation", "Edema",
    "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"
LABELS = FINDINGS + (NO_FINDING,)
ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
LIST_FILES = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
SPLITS = ("train", "valid", "test", "train_val", "all")
VALID_FRACTION = 0.1


def read(root: str, split: str = "train", *,
         valid_fraction: float = VALID_FRACTION,
         split_seed: int = 0) -> index_lib.Index:
  """Index of one split (see module doc)."""
  if split not in SPLITS:
    raise UserError(f"NIH ChestX-ray14 split {split!r} is not one of {SPLITS}")
  root = os.path.abspath(root)
  if not os.path.isdir(root):
    raise UserError(f"NIH ChestX-ray14 root {root} is not a directory")
  table = csvio.read_table(
      csvio.find(root, *ENTRY_FILES),
      required=("Image Index", "Finding Labels", "Patient ID"))
  names = csvio.names(table, "Image Index")
  dup = csvio.first_duplicate(names)
  if dup is not None:
    table.fail(dup, "Image Index", str(names[dup]), "each image once")
  labels = _labels(table)
  patients = csvio.integers(table, "Patient ID").astype(str)
  if "Follow-up #" in table.header:
    follow = csvio.integers(table, "Follow-up #").astype(str)
    studies = np.char.add(np.char.add(patients, "/"), follow)
  else:
    studies = np.char.add(np.char.add(patients, "/"), names)

  if split == "all":
    rows = np.arange(len(names))
  else:
    list_split = "test" if split == "test" else "train_val"
    rows = _list_rows(root, LIST_FILES[list_split], names)
  paths = _image_paths(root, names[rows])
  index = index_lib.Index(
      dataset=NAME, split=split if split != "train" else "train_val",
      root=root, paths=tuple(paths), patients=tuple(patients[rows].tolist()),
      studies=tuple(studies[rows].tolist()), label_names=LABELS,
      labels=labels[rows])
  if split in ("train", "valid"):
    train, valid = splits_lib.holdout(index, valid_fraction, split_seed)
    return train if split == "train" else valid
  return index


def sources(root: str, *, valid_fraction: float = VALID_FRACTION,
            split_seed: int = 0) -> dict[str, str | None]:
  """Where each split's rows come from in this folder; None: not here."""
  lists = {k: v if csvio.exists(root, v) else None
           for k, v in LIST_FILES.items()}
  held = (f"{valid_fraction:g} of the patients of {lists['train_val']} "
          f"(split_seed {split_seed})") if lists["train_val"] else None
  return {"train": held and f"{lists['train_val']} less the valid patients",
          "valid": held, "test": lists["test"],
          "train_val": lists["train_val"], "all": "the Data_Entry file"}


def _labels(table: csvio.Table) -> np.ndarray:
  """(rows, 15) float32 0/1 from "Finding Labels"."""
  values, inverse = np.unique(table["Finding Labels"], return_inverse=True)
  coded = np.zeros((len(values), len(LABELS)), np.float32)
  for k, value in enumerate(values.tolist()):
    parts = [p.strip() for p in value.split("|")]
    for part in parts:
      if part not in LABELS or (part == NO_FINDING and len(parts) > 1):
        row = int(np.argmax(inverse.reshape(-1) == k))
        table.fail(row, "Finding Labels", value,
                   f"findings from {', '.join(FINDINGS)} joined by '|', or "
                   f"'{NO_FINDING}'")
      coded[k, LABELS.index(part)] = 1.0
  return coded[inverse.reshape(-1)]


def _list_rows(root: str, list_name: str, names: np.ndarray) -> np.ndarray:
  """Rows of the entry table named by a split list, in the list's order."""
  path = csvio.find(root, list_name)
  text = csvio.read_text(path)
  where = {n: i for i, n in enumerate(names.tolist())}
  rows = []
  for line_no, line in enumerate(text.splitlines(), start=1):
    name = line.strip()
    if not name:
      continue
    if name not in where:
      raise UserError(f"{path}: line {line_no}: image {name!r} is not in the "
                      "Data_Entry file")
    rows.append(where[name])
  return np.asarray(rows, np.int64)


def _image_folders(root: str) -> list[str]:
  """Folders holding the PNGs, relative to root, in name order."""
  folders = []
  for d in sorted(glob.glob(os.path.join(root, "images*"))):
    if not os.path.isdir(d):
      continue
    inner = os.path.join(d, "images")
    folders.append(os.path.relpath(inner if os.path.isdir(inner) else d, root))
  return folders


def _image_paths(root: str, names: np.ndarray) -> list[str]:
  folders = _image_folders(root)
  if len(folders) <= 1:
    folder = folders[0] if folders else "images"
    return [f"{folder}/{n}".replace(os.sep, "/") for n in names.tolist()]
  found = {}
  for folder in folders:
    with os.scandir(os.path.join(root, folder)) as entries:
      for entry in entries:
        found.setdefault(entry.name, folder)
  return [f"{found.get(n, folders[0])}/{n}".replace(os.sep, "/")
          for n in names.tolist()]
