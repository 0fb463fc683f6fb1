"""VinDr-CXR, from PhysioNet's layout or from Kaggle's VinBigData variant.

PhysioNet (`vindr-cxr/1.0.0/`), the root holding:

  annotations/image_labels_train.csv[.gz]  image_id, rad_id, 28 labels (0/1);
                                           one row per radiologist (3 each)
  annotations/image_labels_test.csv[.gz]   image_id, [rad_id,] 28 labels;
                                           one consensus row per image
  train/IMAGE_ID.dicom, test/IMAGE_ID.dicom

Kaggle VinBigData Chest X-ray Abnormalities Detection, the root holding:

  train.csv   image_id, class_name, class_id, rad_id, x_min, y_min, x_max,
              y_max; one row per box per radiologist; class 14 "No finding"
              rows have no box
  train/IMAGE_ID.dicom   (test/ has no labels)

Decisions:
- Aggregation: several radiologists' 0/1 votes become one code per image and
  label by `rule` (default "majority"): with n readers and k positive votes
    majority      1 if 2k > n, else 0 (a tie is negative)
    any           1 if k >= 1, else 0
    all           1 if k == n, else 0
    disagreement  1 if k == n, 0 if k == 0, else -1 (uncertain), so that
                  `labels.targets`' uncertainty policy decides
  A consensus file (one row per image) passes through unchanged, whatever
  the rule. In the Kaggle file a radiologist votes for a class if they drew
  at least one box of it (or a "No finding" row); n counts the distinct
  rad_ids on the image.
- VinDr has no patient ids (DICOM tags were anonymised per image): each image
  is its own patient and study, so any patient-level split is image-level.
- Splits, as for NIH: "train_val" is the published training set, divided
  by image (= patient) into "train" and "valid" (`valid_fraction` of the
  images, deterministic by `split_seed`, see splits.py); PhysioNet "test" is
  the published test set; "all" is everything labelled. Kaggle's test images
  have no labels, so it has no "test".
- Labels: PhysioNet's 28 names as in its header (train and test headers
  spell some names differently across releases; "Other disease" is read as
  "Other diseases"); Kaggle's 15 classes in class_id order.
- Image order: first appearance in the label file.
"""

import numpy as np

from medbridge_jax.data import csvio
from medbridge_jax.data import index as index_lib
from medbridge_jax.data import splits as splits_lib
from medbridge_jax.errors import UserError

LABELS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly",
    "Clavicle fracture", "Consolidation", "Edema", "Emphysema", "Enlarged PA",
    "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture",
    "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other diseases", "No finding")
KAGGLE_LABELS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly",
    "Consolidation", "ILD", "Infiltration", "Lung Opacity", "Nodule/Mass",
    "Other lesion", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "No finding")  # class_id 0..14
RULES = ("majority", "any", "all", "disagreement")
VARIANTS = ("auto", "physionet", "kaggle")
VALID_FRACTION = 0.1
_ALIASES = {"Other disease": "Other diseases"}
_PHYSIONET_FILES = {"train": "annotations/image_labels_train.csv",
                    "test": "annotations/image_labels_test.csv"}


def read(root: str, split: str = "train", *, rule: str = "majority",
         variant: str = "auto", valid_fraction: float = VALID_FRACTION,
         split_seed: int = 0) -> index_lib.Index:
  """The index of one split of VinDr-CXR.

  Args:
    root: the data set folder (see the module docstring for both layouts).
    split: "train", "valid", "train_val", "test" (PhysioNet only) or "all"
      (see the module docstring).
    rule: how radiologists' votes combine: majority | any | all |
      disagreement (see the module docstring).
    variant: "physionet", "kaggle", or "auto" (PhysioNet if its annotations
      folder is there, else Kaggle if train.csv is).
    valid_fraction: share of the training images held out as "valid".
    split_seed: seed of that hold-out.
  """
  if rule not in RULES:
    raise UserError(f"VinDr-CXR aggregation rule {rule!r} is not one of "
                    f"{RULES}")
  variant = _variant(root, variant)
  official = {"train_val": ("train",), "all": ("train", "test")}
  if variant == "physionet":
    official["test"] = ("test",)
  choices = ("train", "valid") + tuple(official)
  if split not in choices:
    raise UserError(f"VinDr-CXR ({variant}) split {split!r} is not one of "
                    f"{choices}")
  if split in ("train", "valid"):
    train_val = read(root, "train_val", rule=rule, variant=variant)
    train, valid = splits_lib.holdout(train_val, valid_fraction, split_seed)
    return train if split == "train" else valid
  if variant == "physionet":
    parts = [_physionet(root, s, rule) for s in official[split]]
    label_names = LABELS
  else:
    parts = [_kaggle(root, rule)]
    label_names = KAGGLE_LABELS
  images = [i for part in parts for i in part[0]]
  paths = tuple(i[0] for i in images)
  ids = tuple(i[1] for i in images)
  return index_lib.Index(
      dataset="vindr", split=split, root=root, paths=paths, patients=ids,
      studies=ids, label_names=label_names,
      labels=np.concatenate([part[1] for part in parts]))


def sources(root: str, *, variant: str = "auto",
            valid_fraction: float = VALID_FRACTION, split_seed: int = 0,
            **unused_options) -> dict[str, str | None]:
  """Where each split's rows come from in this folder; None: not here.

  Kaggle's VinBigData, and a PhysioNet folder without the test annotations,
  have no "test".
  """
  del unused_options  # rule: how labels combine, not where rows come from.
  variant = _variant(root, variant)
  if variant == "physionet":
    train = _PHYSIONET_FILES["train"]
    test = (_PHYSIONET_FILES["test"]
            if csvio.exists(root, _PHYSIONET_FILES["test"]) else None)
  else:
    train, test = "train.csv", None
  valid = (f"{valid_fraction:g} of the images of {train} "
           f"(split_seed {split_seed})")
  return {"train": f"{train} less the valid images", "valid": valid,
          "train_val": train, "test": test, "all": "every labelled image"}


def _variant(root: str, variant: str) -> str:
  """"physionet" or "kaggle": `variant`, or for "auto" the files present."""
  if variant not in VARIANTS:
    raise UserError(f"VinDr-CXR variant {variant!r} is not one of {VARIANTS}")
  if variant != "auto":
    return variant
  if csvio.exists(root, _PHYSIONET_FILES["train"]):
    return "physionet"
  if csvio.exists(root, "train.csv"):
    return "kaggle"
  raise UserError(
      f"{root}: neither {_PHYSIONET_FILES['train']}[.gz] (PhysioNet "
      "VinDr-CXR) nor train.csv[.gz] (Kaggle VinBigData) is here")


def _physionet(root: str, split: str, rule: str):
  """[(path, image_id)] and codes (images, 28) of one PhysioNet split."""
  path = csvio.find(root, _PHYSIONET_FILES[split])
  table = csvio.read_table(path, ("image_id",))
  table = _rename(table)
  missing = [n for n in LABELS if n not in table.columns]
  if missing:
    raise UserError(f"{path}: missing column {missing[0]!r} (header: "
                    f"{','.join(table.header)})")
  ids = csvio.names(table, "image_id")
  votes = csvio.codes(table, LABELS, allowed=(0.0, 1.0), blank=False)
  if "rad_id" in table.columns:
    rads = np.char.strip(table["rad_id"])
    pairs = np.char.add(np.char.add(ids, "\n"), rads)
    dup = csvio.first_duplicate(pairs)
    if dup is not None:
      table.fail_row(dup, f"image {str(ids[dup])!r} has a second row from "
                     f"rad_id {str(rads[dup])!r}")
  else:
    dup = csvio.first_duplicate(ids)
    if dup is not None:
      table.fail_row(dup, f"image {str(ids[dup])!r} has a second row and no "
                     "rad_id column tells the readers apart")
  images, image_of_row = csvio.first_seen(ids)
  positives = np.zeros((len(images), len(LABELS)), np.int64)
  np.add.at(positives, image_of_row, votes.astype(np.int64))
  readers = np.bincount(image_of_row, minlength=len(images))
  codes = _aggregate(positives, readers, rule)
  return [(f"{split}/{i}.dicom", i) for i in images.tolist()], codes


def _rename(table: csvio.Table) -> csvio.Table:
  """The table with alias label names replaced by ours."""
  if not any(a in table.columns for a in _ALIASES):
    return table
  columns = {_ALIASES.get(k, k): v for k, v in table.columns.items()}
  header = tuple(_ALIASES.get(h, h) for h in table.header)
  return csvio.Table(path=table.path, header=header, columns=columns,
                     lines=table.lines)


def _kaggle(root: str, rule: str):
  """[(path, image_id)] and codes (images, 15) from VinBigData's train.csv."""
  table = csvio.read_table(csvio.find(root, "train.csv"),
                           ("image_id", "class_name", "class_id", "rad_id"),
                           only_required=True)
  ids = csvio.names(table, "image_id")
  class_ids = csvio.integers(table, "class_id")
  bad = class_ids >= len(KAGGLE_LABELS)
  if bad.any():
    i = int(np.argmax(bad))
    table.fail(i, "class_id", str(table["class_id"][i]),
               f"0..{len(KAGGLE_LABELS) - 1}")
  names = np.char.strip(table["class_name"])
  wrong = names != np.array(KAGGLE_LABELS)[class_ids]
  if wrong.any():
    i = int(np.argmax(wrong))
    table.fail(i, "class_name", str(names[i]),
               f"{KAGGLE_LABELS[class_ids[i]]!r} for class_id {class_ids[i]}")
  rads = np.char.strip(table["rad_id"])
  empty = np.char.str_len(rads) == 0
  if empty.any():
    table.fail(int(np.argmax(empty)), "rad_id", "", "a radiologist id")
  images, image_of_row = csvio.first_seen(ids)
  _, rad_of_row = np.unique(rads, return_inverse=True)
  rad_of_row = rad_of_row.reshape(-1)
  num_rads = int(rad_of_row.max()) + 1 if len(rad_of_row) else 1
  reader_key = image_of_row * num_rads + rad_of_row
  readers = np.bincount(np.unique(reader_key) // num_rads,
                        minlength=len(images))
  # A radiologist's several boxes of one class on one image are one vote.
  vote_key = np.unique(reader_key * len(KAGGLE_LABELS) + class_ids)
  image_class = (vote_key // len(KAGGLE_LABELS) // num_rads * len(
      KAGGLE_LABELS) + vote_key % len(KAGGLE_LABELS))
  positives = np.bincount(image_class, minlength=len(images) * len(
      KAGGLE_LABELS)).reshape(len(images), len(KAGGLE_LABELS))
  codes = _aggregate(positives, readers, rule)
  return [(f"train/{i}.dicom", i) for i in images.tolist()], codes


def _aggregate(positives: np.ndarray, readers: np.ndarray,
               rule: str) -> np.ndarray:
  """Codes (images, labels) from positive votes k and reader counts n."""
  k, n = positives, readers[:, None]
  if rule == "majority":
    out = (2 * k > n).astype(np.float32)
  elif rule == "any":
    out = (k >= 1).astype(np.float32)
  elif rule == "all":
    out = (k == n).astype(np.float32)
  else:
    out = np.where(k == n, 1.0, np.where(k == 0, 0.0, -1.0)).astype(
        np.float32)
  return out

