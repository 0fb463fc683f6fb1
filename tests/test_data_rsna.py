"""RSNA Pneumonia reader on fixtures in the Kaggle competition's layout."""

import os

import numpy as np
import pytest

from medbridge_jax.data import resolve
from medbridge_jax.data import rsna
from medbridge_jax.data import splits
from medbridge_jax.errors import UserError
from tests import text_files
from tests.test_data_splits import data_config
from tests.test_data_splits import first_by_hash

HEADER = "patientId,x,y,width,height,Target"
CLASS_HEADER = "patientId,class"
P1 = "0004cfab-14fd-4e49-80ba-63a80b6bddd6"  # normal
P2 = "00436515-870c-4b36-a041-de91049b9ab4"  # two boxes
P3 = "00322d4d-1c29-4943-afc9-b6754be640eb"  # no opacity, not normal
LABELS = [
    HEADER,
    f"{P1},,,,,0",
    f"{P2},264.0,152.0,213.0,379.0,1",
    f"{P2},562.0,152.0,256.0,453.0,1",
    f"{P3},,,,,0",
]
CLASSES = [
    CLASS_HEADER,
    f"{P1},Normal",
    f"{P2},Lung Opacity",
    f"{P2},Lung Opacity",
    f"{P3},No Lung Opacity / Not Normal",
]


def _write(root, name, lines):
  text_files.write_lines(os.path.join(root, name), lines)


def _fixture(root, labels=LABELS, classes=CLASSES):
  _write(root, "stage_2_train_labels.csv", labels)
  if classes is not None:
    _write(root, "stage_2_detailed_class_info.csv", classes)
  return str(root)


def test_one_label_per_image_in_first_seen_order(tmp_path):
  idx = rsna.read(_fixture(tmp_path), "all")
  assert idx.dataset == "rsna" and idx.label_names == ("Pneumonia",)
  assert idx.paths == tuple(f"stage_2_train_images/{p}.dcm"
                            for p in (P1, P2, P3))
  assert idx.patients == (P1, P2, P3) and idx.studies == (P1, P2, P3)
  np.testing.assert_array_equal(idx.labels[:, 0], [0.0, 1.0, 0.0])


def test_class_file_is_optional(tmp_path):
  idx = rsna.read(_fixture(tmp_path, classes=None), "all")
  np.testing.assert_array_equal(idx.labels[:, 0], [0.0, 1.0, 0.0])


@pytest.mark.parametrize("labels,message", [
    (LABELS[:1] + [f"{P1},,,,,2"],
     r"stage_2_train_labels.csv: line 2: Target is '2'; expected 0, 1$"),
    (LABELS[:1] + [f"{P1},1,2,3,4,0"],
     r"line 2: Target 0 with a box; Target 1 rows have a box"),
    (LABELS[:1] + [f"{P1},,,,,1"], r"line 2: Target 1 without a box"),
    (LABELS[:1] + [f"{P1},1,2,,4,1"], r"line 2: box has some of x"),
    (LABELS + [f"{P2},,,,,0"],
     r"line 6: patientId '00436515.*' has Target 0 here and 1 on another"),
    (LABELS[:1] + [f"../{P1},,,,,0"], r"line 2: patientId is '../0004"),
    (["patientId,x,y,width,height", f"{P1},,,,"],
     r"stage_2_train_labels.csv: missing column 'Target'"),
])
def test_bad_label_file(tmp_path, labels, message):
  _fixture(tmp_path, labels=labels, classes=None)
  with pytest.raises(UserError, match=message):
    rsna.read(str(tmp_path), "all")


@pytest.mark.parametrize("classes,message", [
    (CLASSES[:1] + [f"{P1},Lung Opacity"],
     r"detailed_class_info.csv: line 2: class 'Lung Opacity' disagrees with "
     r"Target 0"),
    (CLASSES[:1] + [f"{P1},Opacity"],
     r"detailed_class_info.csv: line 2: class is 'Opacity'; expected"),
    (CLASSES + ["ffffffff-0000-0000-0000-000000000000,Normal"],
     r"detailed_class_info.csv: line 6: patientId 'ffffffff-.*' is not in "
     r"stage_2_train_labels.csv"),
])
def test_bad_class_file(tmp_path, classes, message):
  _fixture(tmp_path, classes=classes)
  with pytest.raises(UserError, match=message):
    rsna.read(str(tmp_path), "all")


def test_unknown_split(tmp_path):
  with pytest.raises(UserError, match="split 'stage_2_test'"):
    rsna.read(_fixture(tmp_path), "stage_2_test")


def _many(root, n=200, order=None):
  ids = [f"{k:08x}-14fd-4e49-80ba-63a80b6bddd6" for k in range(n)]
  rows = [f"{p},1,2,3,4,1" if k % 3 == 0 else f"{p},,,,,0"
          for k, p in enumerate(ids)]
  if order is not None:
    rows = [rows[k] for k in order]
  return _fixture(root, labels=[HEADER] + rows, classes=None)


def test_derived_patient_level_splits(tmp_path):
  root = _many(tmp_path)
  parts = {s: rsna.read(root, s) for s in ("train", "valid", "test")}
  assert {s: len(i) for s, i in parts.items()} == {
      "train": 160, "valid": 20, "test": 20}
  assert {i.split for i in parts.values()} == {"train", "valid", "test"}
  splits.check_disjoint(*parts.values())
  everything = rsna.read(root, "all")
  assert sorted(sum((i.paths for i in parts.values()), ())) == sorted(
      everything.paths)
  train_val = rsna.read(root, "train_val")
  assert sorted(train_val.patients) == sorted(
      parts["train"].patients + parts["valid"].patients)
  # Labels follow their image into the split.
  label_of = dict(zip(everything.paths, everything.labels[:, 0]))
  for part in parts.values():
    assert [label_of[p] for p in part.paths] == list(part.labels[:, 0])
  # The same patients whatever the row order; another seed, other patients.
  shuffled = tmp_path / "shuffled"
  shuffled.mkdir()
  order = np.random.default_rng(3).permutation(200)
  again = rsna.read(_many(shuffled, order=order), "test")
  assert sorted(again.patients) == sorted(parts["test"].patients)
  other = rsna.read(root, "test", split_seed=1)
  assert sorted(other.patients) != sorted(parts["test"].patients)
  with pytest.raises(UserError, match="valid_fraction 0.5 and test_fraction"):
    rsna.read(root, "train", valid_fraction=0.5, test_fraction=0.5)


# -- As a run resolves it: train / valid / test, patient-disjoint. ----------


def test_resolve_holds_out_a_test_split_of_the_labelled_patients(tmp_path):
  # No test labels were published: test, then valid, are held out by patient.
  root = _many(tmp_path)
  everyone = set(rsna.read(root, "all").patients)
  data = resolve.resolve(data_config("rsna", root))
  test = set(data.test.index.patients)
  valid = set(data.valid.index.patients)
  train = set(data.train.index.patients)
  assert test == first_by_hash(everyone, rsna.TEST_FRACTION)
  assert valid == first_by_hash(everyone - test, rsna.VALID_FRACTION
                                / (1 - rsna.TEST_FRACTION))
  assert (len(train), len(valid), len(test)) == (160, 20, 20)
  assert train | valid | test == everyone
  assert not (train & valid or train & test or valid & test)
  assert "stage_2_train_labels.csv" in data.sources["test"]
  shuffled = tmp_path / "shuffled"
  shuffled.mkdir()
  again = resolve.resolve(data_config(
      "rsna", _many(shuffled, order=np.random.default_rng(0).permutation(200))))
  assert set(again.test.index.patients) == test


def test_resolve_refuses_an_extra_test_set_of_training_patients(tmp_path):
  root = _many(tmp_path, n=40)
  train_val = rsna.read(root, "train_val")
  role = ("valid" if train_val.patients[0] in rsna.read(root, "valid").patients
          else "train")
  config = data_config("rsna", root,
                       test_datasets=(("rsna", root, "train_val"),))
  with pytest.raises(UserError, match=f"^rsna: patient "
                     f"{train_val.patients[0]} is in both the {role} split "
                     f"'{role}' and the extra test set rsna/train_val$"):
    resolve.resolve(config)
  # The test split itself as an extra test set is refused too (it would be
  # reported twice under one name); a set from another folder is not checked.
  config.data.test_datasets = (("rsna", root, "test"),)
  with pytest.raises(UserError, match="the test split 'test' and the extra "
                     "test set rsna/test"):
    resolve.resolve(config)
  copy = tmp_path / "copy"
  copy.mkdir()
  config.data.test_datasets = (("rsna", _many(copy, n=40), "all"),)
  (extra,) = resolve.resolve(config).extra_tests
  assert len(extra.index) == 40
