"""NIH ChestX-ray14 reader on fixtures in the published layout."""

import os

import numpy as np
import pytest

from medbridge_jax.data import nih
from medbridge_jax.data import registry
from medbridge_jax.data import resolve
from medbridge_jax.data import splits
from medbridge_jax.errors import UserError
from tests import text_files
from tests.test_data_splits import data_config
from tests.test_data_splits import first_by_hash

# The original file: header and lines end in a comma, and the bracketed
# column names contain unquoted commas.
HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
               "Patient Gender,View Position,OriginalImage[Width,Height],"
               "OriginalImagePixelSpacing[x,y],")
ROWS_2017 = [
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,"
    "0.143,",
    "00000001_002.png,Cardiomegaly|Effusion,2,1,58,M,PA,2500,2048,0.168,0.168,",
    "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,",
    "00000003_000.png,Hernia,0,3,81,F,PA,2582,2991,0.143,0.143,",
    "00000004_000.png,Mass|Nodule,0,4,82,M,AP,2500,2048,0.168,0.168,",
    "00000005_000.png,No Finding,0,5,69,F,PA,2048,2500,0.168,0.168,",
    "00000006_000.png,Pleural_Thickening,0,6,60,M,PA,2048,2500,0.168,0.168,",
]
TRAIN_VAL = ["00000001_000.png", "00000001_001.png", "00000001_002.png",
             "00000002_000.png", "00000003_000.png", "00000005_000.png",
             "00000006_000.png"]
TEST = ["00000004_000.png"]


def _write(path, lines, gz=False):
  text_files.write_lines(path, lines, gz)


@pytest.fixture
def root(tmp_path):
  _write(os.path.join(tmp_path, "Data_Entry_2017.csv"),
         [HEADER_2017] + ROWS_2017)
  _write(os.path.join(tmp_path, "train_val_list.txt"), TRAIN_VAL)
  _write(os.path.join(tmp_path, "test_list.txt"), TEST)
  # Two image folders, Kaggle style; the names are listed, never opened.
  for folder, names in (("images_001", TRAIN_VAL[:4]),
                        ("images_002", TRAIN_VAL[4:] + TEST)):
    os.makedirs(os.path.join(tmp_path, folder, "images"))
    for n in names:
      open(os.path.join(tmp_path, folder, "images", n), "wb").close()
  return str(tmp_path)


def test_all_entries_and_labels(root):
  idx = nih.read(root, "all")
  assert idx.dataset == "nih" and len(idx) == 8
  assert idx.label_names == nih.LABELS and len(nih.LABELS) == 15
  col = {n: i for i, n in enumerate(nih.LABELS)}
  want = np.zeros((8, 15))
  for r, names in enumerate([["Cardiomegaly"], ["Cardiomegaly", "Emphysema"],
                             ["Cardiomegaly", "Effusion"], ["No Finding"],
                             ["Hernia"], ["Mass", "Nodule"], ["No Finding"],
                             ["Pleural_Thickening"]]):
    want[r, [col[n] for n in names]] = 1
  np.testing.assert_array_equal(idx.labels, want)
  assert idx.patients[:4] == ("1", "1", "1", "2")
  assert idx.studies[:2] == ("1/0", "1/1")
  assert idx.paths[0] == "images_001/images/00000001_000.png"
  assert idx.paths[4] == "images_002/images/00000003_000.png"


def test_test_split_and_list_order(root):
  idx = nih.read(root, "test")
  assert idx.paths == ("images_002/images/00000004_000.png",)
  tv = nih.read(root, "train_val")
  assert [p.split("/")[-1] for p in tv.paths] == TRAIN_VAL


def test_train_valid_are_patient_disjoint_and_deterministic(root):
  train, valid = nih.read(root, "train"), nih.read(root, "valid")
  assert train.split == "train" and valid.split == "valid"
  splits.check_disjoint(train, valid)
  assert len(train) + len(valid) == len(TRAIN_VAL)
  assert len(set(valid.patients)) == 1  # 10% of 5 patients, at least one
  assert nih.read(root, "valid").paths == valid.paths
  other = {nih.read(root, "valid", split_seed=s).patients[0] for s in range(8)}
  assert len(other) > 1  # the seed matters
  # The official lists keep test patients apart too.
  splits.check_disjoint(nih.read(root, "train_val"), nih.read(root, "test"))


def test_v2020_file_gzip_and_one_flat_image_folder(tmp_path):
  header = HEADER_2017.rstrip(",")
  rows = [r.rstrip(",") for r in ROWS_2017]
  _write(os.path.join(tmp_path, "Data_Entry_2017_v2020.csv"), [header] + rows,
         gz=True)
  _write(os.path.join(tmp_path, "train_val_list.txt"), TRAIN_VAL)
  _write(os.path.join(tmp_path, "test_list.txt"), TEST)
  os.makedirs(os.path.join(tmp_path, "images"))
  idx = nih.read(str(tmp_path), "test")
  assert idx.paths == ("images/00000004_000.png",)
  assert idx.labels[0, nih.LABELS.index("Mass")] == 1


def test_unknown_finding_names_file_line_and_value(root):
  rows = list(ROWS_2017)
  rows[2] = rows[2].replace("Cardiomegaly|Effusion", "Cardiomegaly|Efusion")
  _write(os.path.join(root, "Data_Entry_2017.csv"), [HEADER_2017] + rows)
  with pytest.raises(UserError, match=r"Data_Entry_2017.csv: line 4: Finding "
                     r"Labels is 'Cardiomegaly\|Efusion'"):
    nih.read(root, "all")


def test_split_list_naming_an_unknown_image(root):
  _write(os.path.join(root, "test_list.txt"), TEST + ["00009999_000.png"])
  with pytest.raises(UserError, match=r"test_list.txt: line 2: image "
                     r"'00009999_000.png' is not in the Data_Entry file"):
    nih.read(root, "test")


def test_missing_files_and_columns(root, tmp_path_factory):
  empty = str(tmp_path_factory.mktemp("empty"))
  with pytest.raises(UserError, match="Data_Entry_2017_v2020.csv"):
    nih.read(empty, "all")
  header = HEADER_2017.replace("Patient ID", "PatientID")
  _write(os.path.join(root, "Data_Entry_2017.csv"), [header] + ROWS_2017)
  with pytest.raises(UserError, match="missing column 'Patient ID'"):
    nih.read(root, "all")
  with pytest.raises(UserError, match="'validation'"):
    nih.read(root, "validation")


def test_registry(root):
  assert len(registry.read_index("nih", root, "test")) == 1


# -- As a run resolves it: train / valid / test, patient-disjoint. ----------


def test_resolve_reads_test_list(root):
  data = resolve.resolve(data_config("nih", root))
  assert data.test.index.paths == ("images_002/images/00000004_000.png",)
  assert data.test.index.patients == ("4",)
  assert data.sources["test"] == "test_list.txt"
  # valid: the reader's own 10% of the train_val patients (one of five).
  assert len(set(data.valid.index.patients)) == 1
  assert sorted(data.train.index.patients + data.valid.index.patients) == [
      "1", "1", "1", "2", "3", "5", "6"]
  assert "train_val_list.txt" in data.sources["valid"]


def test_resolve_refuses_a_test_image_of_a_training_patient(root):
  # Patient 1's third image moves to the test list.
  _write(os.path.join(root, "train_val_list.txt"),
         [n for n in TRAIN_VAL if n != "00000001_002.png"])
  _write(os.path.join(root, "test_list.txt"), TEST + ["00000001_002.png"])
  role = "valid" if nih.read(root, "valid").patients[0] == "1" else "train"
  with pytest.raises(UserError, match=f"^nih: patient 1 is in both the "
                     f"{role} split '{role}' and the test split 'test'$"):
    resolve.resolve(data_config("nih", root))


def test_resolve_without_test_list_carves_test_from_train(root):
  os.remove(os.path.join(root, "test_list.txt"))
  data = resolve.resolve(data_config("nih", root))
  train = nih.read(root, "train")  # The reader's train: less its valid.
  want = first_by_hash(train.patients, resolve.TEST_FRACTION)
  assert set(data.test.index.patients) == want
  assert data.test.index.paths == tuple(
      p for p, q in zip(train.paths, train.patients) if q in want)
  assert set(data.train.index.patients) == set(train.patients) - want
  splits.check_disjoint(data.train.index, data.valid.index, data.test.index)
  assert data.valid.index.paths == nih.read(root, "valid").paths
  assert "carved" in data.sources["test"]
