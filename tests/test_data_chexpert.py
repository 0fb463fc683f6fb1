"""CheXpert reader on fixtures in the published layout and value conventions."""

import os

import numpy as np
import pytest

from medbridge_jax.data import chexpert
from medbridge_jax.data import registry
from medbridge_jax.errors import UserError
from tests import text_files

N = np.nan
HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged "
          "Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,"
          "Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,"
          "Pleural Other,Fracture,Support Devices")
TRAIN = [
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,"
    "68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
    "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,"
    "87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
    "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Female,"
    "83,Frontal,AP,,,,1.0,,,-1.0,,,,,,1.0,",
    "CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg,Female,"
    "83,Lateral,,,,,1.0,,,-1.0,,,,,,1.0,",
]
VALID = [
    "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,Male,73,"
    "Frontal,AP,0.0,1.0,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0",
    "CheXpert-v1.0-small/valid/patient64542/study1/view1_frontal.jpg,Male,70,"
    "Frontal,PA,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0,0.0,1.0",
]
# As released with CheXlocalize: paths start at test/, no view columns.
TEST_HEADER = ("Path,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
               "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,"
               "Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
               "Support Devices,No Finding")
TEST = ["test/patient64741/study1/view1_frontal.jpg,1,0,0,0,0,0,0,0,0,0,0,0,"
        "1,0"]


def _write(path, header, rows, gz=False):
  text_files.write_lines(path, [header] + rows, gz)


@pytest.fixture
def root(tmp_path):
  base = os.path.join(tmp_path, "CheXpert-v1.0-small")
  _write(os.path.join(base, "train.csv"), HEADER, TRAIN)
  _write(os.path.join(base, "valid.csv"), HEADER, VALID)
  return str(tmp_path)


def test_train_frontal(root):
  idx = chexpert.read(root, "train")
  assert idx.dataset == "chexpert" and idx.split == "train"
  assert idx.root == os.path.abspath(root)
  assert idx.label_names == chexpert.LABELS and len(chexpert.LABELS) == 14
  assert idx.paths == (
      "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
      "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg",
      "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg")
  assert idx.patients == ("patient00001", "patient00002", "patient00002")
  assert idx.studies == ("patient00001/study1", "patient00002/study2",
                         "patient00002/study1")
  np.testing.assert_array_equal(
      idx.labels[0], [1, N, N, N, N, N, N, N, N, 0, N, N, N, 1])
  np.testing.assert_array_equal(
      idx.labels[1], [N, N, -1, 1, N, -1, -1, N, -1, N, -1, N, 1, N])
  assert idx.labels.dtype == np.float32


def test_all_views_and_valid(root):
  idx = chexpert.read(root, "train", views="all")
  assert len(idx) == 4 and idx.paths[3].endswith("view2_lateral.jpg")
  assert len(chexpert.read(root, "train", views="lateral")) == 1
  valid = chexpert.read(root, "valid")
  assert valid.patients == ("patient64541", "patient64542")
  np.testing.assert_array_equal(valid.labels[1, [10, 13]], [1, 1])
  assert np.nansum(valid.labels) == 5


def test_test_labels_paths_are_prefixed(root):
  _write(os.path.join(root, "CheXpert-v1.0-small", "test_labels.csv"),
         TEST_HEADER, TEST)
  idx = chexpert.read(root, "test")
  assert idx.paths == (
      "CheXpert-v1.0-small/test/patient64741/study1/view1_frontal.jpg",)
  # Columns are read by name: the test file orders them differently.
  want = np.zeros(14)
  want[[1, 13]] = 1  # Enlarged Cardiomediastinum, Support Devices
  np.testing.assert_array_equal(idx.labels[0], want)
  everything = chexpert.read(root, "all", views="all")
  assert len(everything) == 4 + 2 + 1 and everything.split == "all"


def test_gzip_and_full_resolution_folder(tmp_path):
  full = os.path.join(tmp_path, "CheXpert-v1.0")
  rows = [r.replace("CheXpert-v1.0-small", "CheXpert-v1.0") for r in TRAIN]
  _write(os.path.join(full, "train.csv"), HEADER, rows, gz=True)
  idx = chexpert.read(str(tmp_path), "train")
  assert idx.paths[0].startswith("CheXpert-v1.0/train/patient00001")
  # The data set folder itself is accepted as root.
  idx2 = chexpert.read(full, "train")
  assert idx2.root == str(tmp_path) and idx2.paths == idx.paths


def test_both_folders_prefer_full_unless_told(root):
  full = os.path.join(root, "CheXpert-v1.0")
  _write(os.path.join(full, "valid.csv"), HEADER, VALID[:1])
  assert len(chexpert.read(root, "valid")) == 1
  assert len(chexpert.read(root, "valid", folder="CheXpert-v1.0-small")) == 2


@pytest.mark.parametrize("value", ["2.0", "yes", "0.5"])
def test_bad_label_value_names_file_line_and_value(root, value):
  rows = list(TRAIN)
  rows[1] = rows[1].replace(",-1.0,1.0,", f",-1.0,{value},", 1)
  _write(os.path.join(root, "CheXpert-v1.0-small", "train.csv"), HEADER, rows)
  with pytest.raises(UserError) as e:
    chexpert.read(root, "train")
  msg = str(e.value)
  assert f"train.csv: line 3: Lung Opacity is {value!r}" in msg


def test_missing_column_is_named(root):
  header = HEADER.replace(",Edema", ",Oedema")
  _write(os.path.join(root, "CheXpert-v1.0-small", "train.csv"), header, TRAIN)
  with pytest.raises(UserError, match="train.csv: missing column 'Edema'"):
    chexpert.read(root, "train")


@pytest.mark.parametrize("bad", [
    "../outside/patient00001/study1/view1_frontal.jpg",
    "CheXpert-v1.0-small/../../patient00001/study1/view1_frontal.jpg",
    "/etc/patient00001/study1/view1_frontal.jpg"])
def test_path_escaping_the_root_is_refused(root, bad):
  rows = [bad + TRAIN[0][TRAIN[0].index(","):]]
  _write(os.path.join(root, "CheXpert-v1.0-small", "train.csv"), HEADER, rows)
  with pytest.raises(UserError, match=r"train.csv: line 2: Path is "):
    chexpert.read(root, "train")


def test_path_without_patient_is_refused(root):
  rows = ["CheXpert-v1.0-small/train/x/view1_frontal.jpg"
          + TRAIN[0][TRAIN[0].index(","):]]
  _write(os.path.join(root, "CheXpert-v1.0-small", "train.csv"), HEADER, rows)
  with pytest.raises(UserError, match="patient"):
    chexpert.read(root, "train")


def test_root_and_split_errors(tmp_path, root):
  with pytest.raises(UserError, match="missing_dir is not a directory"):
    chexpert.read(str(tmp_path / "missing_dir"), "train")
  os.makedirs(tmp_path / "other")
  with pytest.raises(UserError, match="holds neither"):
    chexpert.read(str(tmp_path / "other"), "train")
  with pytest.raises(UserError, match="'validation'"):
    chexpert.read(root, "validation")
  with pytest.raises(UserError, match=r"no test_labels.csv\[.gz\] or"):
    chexpert.read(root, "test")


def test_registry(root, tmp_path):
  idx = registry.read_index("chexpert", root, "valid")
  assert len(idx) == 2
  with pytest.raises(UserError, match="unknown data set 'chexpurt'.*chexpert"):
    registry.read_index("chexpurt", root, "valid")
  with pytest.raises(UserError, match="nowhere"):
    registry.read_index("chexpert", str(tmp_path / "nowhere"), "valid")
  assert {"chexpert", "nih", "synthetic", "mimic", "vindr", "rsna"} <= set(
      registry.known())


def test_registry_accepts_a_registered_callable(root):
  registry.register("mine", lambda root, split: chexpert.read(root, split))
  try:
    assert len(registry.read_index("mine", root, "valid")) == 2
  finally:
    registry._READERS.pop("mine")  # pylint: disable=protected-access
