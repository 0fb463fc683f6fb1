"""CheXpert reader on fixtures in the published layout and value conventions."""

import os

import numpy as np
import pytest

from medbridge_jax.data import chexpert
from medbridge_jax.data import registry
from medbridge_jax.data import resolve
from medbridge_jax.errors import UserError
from tests import text_files
from tests.test_data_splits import data_config
from tests.test_data_splits import first_by_hash

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


# -- As a run resolves it: train / valid / test, patient-disjoint. ----------


def test_resolve_reads_the_official_test_labels(root):
  _write(os.path.join(root, "CheXpert-v1.0-small", "test_labels.csv"),
         TEST_HEADER, TEST)
  data = resolve.resolve(data_config("chexpert", root))
  assert data.test.index.paths == (
      "CheXpert-v1.0-small/test/patient64741/study1/view1_frontal.jpg",)
  assert data.test.index.patients == ("patient64741",)
  assert data.valid.index.patients == ("patient64541", "patient64542")
  assert data.train.index.patients == ("patient00001", "patient00002",
                                       "patient00002")
  assert (data.valid.name, data.test.name) == ("chexpert/valid",
                                                "chexpert/test")
  assert data.sources["test"] == "CheXpert-v1.0-small/test_labels.csv"


TEST_LABELS = TEST[0][TEST[0].index(","):]


@pytest.mark.parametrize("name,row,message", [
    ("test_labels.csv", "test/patient64541/study2/view1_frontal.jpg"
     + TEST_LABELS,
     "patient patient64541 is in both the valid split 'valid' and the test "
     "split 'test'"),
    ("test_labels.csv", "test/patient00002/study9/view1_frontal.jpg"
     + TEST_LABELS,
     "patient patient00002 is in both the train split 'train' and the test "
     "split 'test'"),
    ("valid.csv",
     "CheXpert-v1.0-small/valid/patient00001/study7/view1_frontal.jpg"
     + VALID[0][VALID[0].index(","):],
     "patient patient00001 is in both the train split 'train' and the valid "
     "split 'valid'"),
], ids=["valid-test", "train-test", "train-valid"])
def test_resolve_refuses_a_patient_in_two_splits(root, name, row, message):
  base = os.path.join(root, "CheXpert-v1.0-small")
  rows = {"valid.csv": list(VALID), "test_labels.csv": list(TEST)}
  rows[name].append(row)
  _write(os.path.join(base, "valid.csv"), HEADER, rows["valid.csv"])
  _write(os.path.join(base, "test_labels.csv"), TEST_HEADER,
         rows["test_labels.csv"])
  with pytest.raises(UserError, match="^chexpert: " + message + "$"):
    resolve.resolve(data_config("chexpert", root))


def test_resolve_refuses_extra_test_sets_sharing_patients(root):
  _write(os.path.join(root, "CheXpert-v1.0-small", "test_labels.csv"),
         TEST_HEADER, TEST)
  config = data_config("chexpert", root, test_split="valid")
  with pytest.raises(UserError, match="patient patient64541 is in both the "
                     "valid split 'valid' and the test split 'valid'"):
    resolve.resolve(config)
  # The same folder, even named by the data set folder itself.
  folder = os.path.join(root, "CheXpert-v1.0-small")
  for item, message in (
      (("chexpert", root, "valid"), "patient patient64541 is in both the "
       "valid split 'valid' and the extra test set chexpert/valid"),
      (("chexpert", folder, "all"), "patient patient00001 is in both the "
       "train split 'train' and the extra test set chexpert/all")):
    config = data_config("chexpert", root, test_datasets=(item,))
    with pytest.raises(UserError, match=message):
      resolve.resolve(config)


def _many_patients(root, num_patients=20, valid=True):
  """train.csv of `num_patients` patients (odd ones with a second, lateral
  study too); valid.csv as VALID unless `valid` is False. No test labels."""
  tail = TRAIN[0][TRAIN[0].index(",Female"):]
  rows = []
  for p in range(1, num_patients + 1):
    rows.append(f"CheXpert-v1.0-small/train/patient{p:05d}/study1/"
                f"view1_frontal.jpg{tail}")
    if p % 2:
      rows.append(f"CheXpert-v1.0-small/train/patient{p:05d}/study2/"
                  f"view1_frontal.jpg{tail}")
      rows.append(f"CheXpert-v1.0-small/train/patient{p:05d}/study2/"
                  f"view2_lateral.jpg{tail.replace('Frontal', 'Lateral')}")
  base = os.path.join(root, "CheXpert-v1.0-small")
  _write(os.path.join(base, "train.csv"), HEADER, rows)
  if valid:
    _write(os.path.join(base, "valid.csv"), HEADER, VALID)
  frontal = [r.split(",")[0] for r in rows if ",Frontal," in r]
  return str(root), frontal


def test_resolve_without_test_labels_carves_test_from_train(tmp_path):
  root, frontal = _many_patients(tmp_path)
  patient = lambda path: path.split("/")[2]
  everyone = {patient(p) for p in frontal}
  data = resolve.resolve(data_config("chexpert", root))
  want = first_by_hash(everyone, resolve.TEST_FRACTION)
  assert len(want) == 2  # 10% of 20 patients
  # Every frontal image of the chosen patients, in file order.
  assert data.test.index.paths == tuple(p for p in frontal
                                        if patient(p) in want)
  assert data.train.index.paths == tuple(p for p in frontal
                                         if patient(p) not in want)
  assert data.valid.index.patients == ("patient64541", "patient64542")
  assert data.test.index.split == "test" and data.test.name == "chexpert/test"
  assert "carved" in data.sources["test"] and "0.1 of" in data.sources["test"]
  # The same patients for another run seed: the held-out part is fixed.
  again = resolve.resolve(data_config("chexpert", root))
  other_seed = data_config("chexpert", root)
  other_seed.seed = 7
  for d in (again, resolve.resolve(other_seed)):
    assert d.test.index.paths == data.test.index.paths
  # Training fractions come from the remaining training patients only.
  half = data_config("chexpert", root, train_fraction=0.5)
  half_train = set(resolve.resolve(half).train.index.patients)
  assert len(half_train) == 9 and half_train < everyone - want


def test_resolve_without_valid_or_test_carves_both(tmp_path):
  root, frontal = _many_patients(tmp_path, num_patients=40, valid=False)
  everyone = {p.split("/")[2] for p in frontal}
  data = resolve.resolve(data_config("chexpert", root))
  test = set(data.test.index.patients)
  valid = set(data.valid.index.patients)
  train = set(data.train.index.patients)
  # Test first: 10% of all training patients; then valid: 10% of the rest.
  assert test == first_by_hash(everyone, resolve.TEST_FRACTION)
  assert valid == first_by_hash(everyone - test, resolve.VALID_FRACTION)
  assert (len(test), len(valid), len(train)) == (4, 4, 32)
  assert train | valid | test == everyone
  assert not (train & valid or train & test or valid & test)
  assert sorted(data.train.index.paths + data.valid.index.paths
                + data.test.index.paths) == sorted(frontal)
  assert data.valid.index.split == "valid"
  assert "carved" in data.sources["valid"]


def test_resolve_carves_only_where_a_reader_says_a_split_is_missing(root):
  read = lambda root, split: chexpert.read(root, split)
  try:
    # Without `sources`, every split is read: the missing test labels are
    # the reader's error, not silently carved.
    registry.register("mine", read)
    with pytest.raises(UserError, match=r"no test_labels.csv\[.gz\]"):
      resolve.resolve(data_config("mine", root))
    registry.register("mine", read, sources=chexpert.sources)
    data = resolve.resolve(data_config("mine", root))
    want = first_by_hash(("patient00001", "patient00002"), 0.1)
    assert set(data.test.index.patients) == want
    assert set(data.train.index.patients) == {"patient00001",
                                              "patient00002"} - want
    # A split name the reader does not know is never carved.
    with pytest.raises(UserError, match="'tset' is not one of"):
      resolve.resolve(data_config("mine", root, test_split="tset"))
  finally:
    registry._READERS.pop("mine")  # pylint: disable=protected-access
    registry._SOURCES.pop("mine", None)  # pylint: disable=protected-access
