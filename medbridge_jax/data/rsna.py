"""RSNA Pneumonia Detection Challenge (Kaggle, stage 2), one label per image.

The root is the competition's download folder:

  stage_2_train_labels.csv[.gz]          patientId, x, y, width, height,
                                         Target; one row per box, a single
                                         row with empty box and Target 0 for
                                         images without
  stage_2_detailed_class_info.csv[.gz]   patientId, class (optional)
  stage_2_train_images/PATIENT_ID.dcm    (stage_2_test_images/ is unlabelled)

Decisions:
- One label, "Pneumonia" (the competition's "Lung Opacity" class): 1 if the
  image has a box (Target 1), else 0. Every row of an image must agree, and a
  row has a box exactly when its Target is 1.
- If the detailed class file is there it is checked, not used: "Lung Opacity"
  must go with Target 1 and "Normal" / "No Lung Opacity / Not Normal" with
  Target 0, and it may not name images the label file lacks.
- patientId names one image (the challenge anonymised per image); it serves as
  patient and study, so patient-level splits are image-level.
- Splits: the test labels were never published, so "test", "valid" and
  "train" are a deterministic patient-level split of the labelled images
  (`splits.holdout`, seeded by `split_seed`): `test_fraction` of the patients
  for test, then `valid_fraction` (of all patients) for valid, the rest for
  train; "train_val" is train and valid together, "all" every image.
- Image order: first appearance in the label file.
"""

import numpy as np

from medbridge_jax.data import csvio
from medbridge_jax.data import index as index_lib
from medbridge_jax.data import splits as splits_lib
from medbridge_jax.errors import UserError

LABELS = ("Pneumonia",)
SPLITS = ("train", "valid", "test", "train_val", "all")
VALID_FRACTION = 0.1
TEST_FRACTION = 0.1
_CLASSES = {"Lung Opacity": 1.0, "Normal": 0.0,
            "No Lung Opacity / Not Normal": 0.0}
_IMAGES = "stage_2_train_images"


def read(root: str, split: str = "train", *,
         valid_fraction: float = VALID_FRACTION,
         test_fraction: float = TEST_FRACTION,
         split_seed: int = 0) -> index_lib.Index:
  """The index of one split of the RSNA Pneumonia training images.

  Args:
    root: the folder holding stage_2_train_labels.csv and the image folder.
    split: "train", "valid", "test", "train_val" (derived, see the module
      docstring) or "all".
    valid_fraction: share of all patients in "valid".
    test_fraction: share of all patients in "test".
    split_seed: seed of the derived patient-level split.
  """
  if split not in SPLITS:
    raise UserError(f"RSNA Pneumonia split {split!r} is not one of {SPLITS}")
  if not (valid_fraction > 0 and test_fraction > 0
          and valid_fraction + test_fraction < 1):
    raise UserError(f"RSNA valid_fraction {valid_fraction} and test_fraction "
                    f"{test_fraction} must be positive with a sum below 1")
  table = csvio.read_table(
      csvio.find(root, "stage_2_train_labels.csv"),
      ("patientId", "x", "y", "width", "height", "Target"), only_required=True)
  ids = csvio.names(table, "patientId")
  target = csvio.codes(table, ("Target",), allowed=(0.0, 1.0), blank=False
                       )[:, 0]
  box = np.stack([np.char.str_len(np.char.strip(table[c])) > 0
                  for c in ("x", "y", "width", "height")], axis=1)
  partial = box.any(axis=1) & ~box.all(axis=1)
  if partial.any():
    i = int(np.argmax(partial))
    table.fail_row(i, "box has some of x, y, width, height but not all")
  wrong = box.all(axis=1) != (target == 1.0)
  if wrong.any():
    i = int(np.argmax(wrong))
    table.fail_row(i, f"Target {target[i]:g} "
                   f"{'with' if box[i].all() else 'without'} a box; Target 1 "
                   "rows have a box, Target 0 rows none")
  images, image_of_row = csvio.first_seen(ids)
  # Each image takes its first row's Target; a later row that disagrees is
  # reported at its own line.
  _, first_row = np.unique(image_of_row, return_index=True)
  label = target[first_row]
  conflict = label[image_of_row] != target
  if conflict.any():
    i = int(np.argmax(conflict))
    table.fail_row(i, f"patientId {str(ids[i])!r} has Target {target[i]:g} "
                   f"here and {label[image_of_row[i]]:g} on another row")
  if csvio.exists(root, "stage_2_detailed_class_info.csv"):
    _check_classes(root, images, label)

  names = images.tolist()
  index = index_lib.Index(
      dataset="rsna", split="all", root=root,
      paths=tuple(f"{_IMAGES}/{i}.dcm" for i in names),
      patients=tuple(names), studies=tuple(names), label_names=LABELS,
      labels=label[:, None])
  if split == "all":
    return index
  train_val, test = splits_lib.holdout(index, test_fraction, split_seed,
                                       ("train_val", "test"))
  if split in ("test", "train_val"):
    return test if split == "test" else train_val
  train, valid = splits_lib.holdout(
      train_val, valid_fraction / (1.0 - test_fraction), split_seed)
  return train if split == "train" else valid


def sources(root: str, *, valid_fraction: float = VALID_FRACTION,
            test_fraction: float = TEST_FRACTION,
            split_seed: int = 0) -> dict[str, str]:
  """Where each split's rows come from: all derived from the training labels
  (the test labels were never published)."""
  del root  # One label file holds every labelled image.
  of = "of the patients of stage_2_train_labels.csv"
  return {"test": f"{test_fraction:g} {of} (split_seed {split_seed})",
          "valid": f"{valid_fraction:g} {of} (split_seed {split_seed})",
          "train": f"the rest {of}",
          "train_val": f"all but the test patients {of}",
          "all": "stage_2_train_labels.csv"}


def _check_classes(root: str, images: np.ndarray, label: np.ndarray) -> None:
  """Checks the detailed class file against the labels (module docstring)."""
  table = csvio.read_table(
      csvio.find(root, "stage_2_detailed_class_info.csv"),
      ("patientId", "class"), only_required=True)
  ids = csvio.names(table, "patientId")
  classes = np.char.strip(table["class"])
  for value in np.unique(classes):
    if value not in _CLASSES:
      table.fail(int(np.argmax(classes == value)), "class", str(value),
                 " or ".join(repr(c) for c in _CLASSES))
  at = csvio.positions(images, ids)
  if (at < 0).any():
    i = int(np.argmax(at < 0))
    table.fail_row(i, f"patientId {str(ids[i])!r} is not in "
                   "stage_2_train_labels.csv")
  implied = np.array([_CLASSES[c] for c in classes.tolist()], np.float32)
  wrong = implied != label[at]
  if wrong.any():
    i = int(np.argmax(wrong))
    table.fail_row(i, f"class {str(classes[i])!r} disagrees with Target "
                   f"{label[at[i]]:g} of patientId {str(ids[i])!r} in "
                   "stage_2_train_labels.csv")

