"""VinDr-CXR readers on fixtures in PhysioNet's and Kaggle's layouts."""

import gzip
import os

import numpy as np
import pytest

from medbridge_jax.data import resolve
from medbridge_jax.data import splits
from medbridge_jax.data import vindr
from medbridge_jax.errors import UserError
from tests import text_files
from tests.test_data_splits import data_config
from tests.test_data_splits import first_by_hash

HEADER = ("image_id,rad_id,Aortic enlargement,Atelectasis,Calcification,"
          "Cardiomegaly,Clavicle fracture,Consolidation,Edema,Emphysema,"
          "Enlarged PA,ILD,Infiltration,Lung Opacity,Lung cavity,Lung cyst,"
          "Mediastinal shift,Nodule/Mass,Pleural effusion,Pleural thickening,"
          "Pneumothorax,Pulmonary fibrosis,Rib fracture,Other lesion,COPD,"
          "Lung tumor,Pneumonia,Tuberculosis,Other diseases,No finding")
KAGGLE_HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"
A = "000434271f63a053c4128a0ba6352c7f"
B = "00053190460d56c53cc3e57321387478"
C = "0005e8e3701dfb1dd93d53e2ff537b6e"
CARDIO = vindr.LABELS.index("Cardiomegaly")
EFFUSION = vindr.LABELS.index("Pleural effusion")
NO_FINDING = vindr.LABELS.index("No finding")


def _row(image, rad, positive=()):
  values = ["0"] * len(vindr.LABELS)
  for j in positive:
    values[j] = "1"
  return ",".join([image] + ([rad] if rad is not None else []) + values)


def _write(root, rel, lines):
  text_files.write_lines(os.path.join(root, rel), lines)


TRAIN = [
    HEADER,
    # A: cardiomegaly 3/3, effusion 1/3.
    _row(A, "R8", [CARDIO, EFFUSION]), _row(A, "R9", [CARDIO]),
    _row(A, "R10", [CARDIO]),
    # B: effusion 2/3, no finding 1/3.
    _row(B, "R2", [EFFUSION]), _row(B, "R3", [NO_FINDING]),
    _row(B, "R8", [EFFUSION]),
]
TEST_HEADER = HEADER.replace("rad_id,", "").replace("Other diseases",
                                                    "Other disease")
TEST = [TEST_HEADER, _row(C, None, [CARDIO])]


@pytest.fixture(name="physionet")
def _physionet(tmp_path):
  _write(tmp_path, "annotations/image_labels_train.csv", TRAIN)
  _write(tmp_path, "annotations/image_labels_test.csv", TEST)
  return str(tmp_path)


@pytest.mark.parametrize("rule,cardio,effusion,no_finding", [
    ("majority", (1, 0), (0, 1), (0, 0)),
    ("any", (1, 0), (1, 1), (0, 1)),
    ("all", (1, 0), (0, 0), (0, 0)),
    ("disagreement", (1, 0), (-1, -1), (0, -1)),
])
def test_aggregation_rules(physionet, rule, cardio, effusion, no_finding):
  idx = vindr.read(physionet, "train_val", rule=rule)
  assert idx.paths == (f"train/{A}.dicom", f"train/{B}.dicom")
  assert idx.patients == (A, B) and idx.studies == (A, B)
  np.testing.assert_array_equal(idx.labels[:, CARDIO], cardio)
  np.testing.assert_array_equal(idx.labels[:, EFFUSION], effusion)
  np.testing.assert_array_equal(idx.labels[:, NO_FINDING], no_finding)
  others = np.delete(idx.labels, [CARDIO, EFFUSION, NO_FINDING], axis=1)
  assert (others == 0).all()


def test_test_split_consensus_and_all(physionet):
  idx = vindr.read(physionet, "test", rule="all")
  assert idx.paths == (f"test/{C}.dicom",) and idx.label_names == vindr.LABELS
  np.testing.assert_array_equal(np.flatnonzero(idx.labels[0]), [CARDIO])
  both = vindr.read(physionet, "all")
  assert both.paths == (f"train/{A}.dicom", f"train/{B}.dicom",
                        f"test/{C}.dicom")


def test_gz_and_explicit_variant(tmp_path):
  os.makedirs(os.path.join(tmp_path, "annotations"))
  with open(os.path.join(tmp_path, "annotations/image_labels_train.csv.gz"),
            "wb") as f:
    f.write(gzip.compress(("\n".join(TRAIN) + "\n").encode()))
  assert len(vindr.read(str(tmp_path), "train_val", variant="physionet")) == 2
  with pytest.raises(UserError, match=r"no train.csv\[.gz\]"):
    vindr.read(str(tmp_path), "train", variant="kaggle")


@pytest.mark.parametrize("lines,message", [
    ([HEADER, _row(A, "R1").replace(",0,", ",2,", 1)],
     r"image_labels_train.csv: line 2: Aortic enlargement is '2'; expected "
     r"0, 1$"),
    ([HEADER, _row(A, "R1").replace(",0,", ",,", 1)],
     r"line 2: Aortic enlargement is ''; expected 0, 1$"),
    ([HEADER.replace(",COPD", ""), _row(A, "R1")[:-2]],
     r"image_labels_train.csv: missing column 'COPD'"),
    ([HEADER, _row("../" + A, "R1")], r"line 2: image_id is '../0004"),
    ([HEADER, _row(A, "R1"), _row(A, "R1")],
     r"line 3: image '0004.*' has a second row from rad_id 'R1'"),
])
def test_bad_physionet_input(tmp_path, lines, message):
  _write(tmp_path, "annotations/image_labels_train.csv", lines)
  with pytest.raises(UserError, match=message):
    vindr.read(str(tmp_path), "train")


def test_unknown_rule_split_and_missing_files(physionet, tmp_path):
  with pytest.raises(UserError, match="rule 'vote'"):
    vindr.read(physionet, "train", rule="vote")
  with pytest.raises(UserError, match="split 'validation'"):
    vindr.read(physionet, "validation")
  empty = os.path.join(tmp_path, "empty")
  os.makedirs(empty)
  with pytest.raises(UserError, match="neither annotations/image_labels"):
    vindr.read(empty, "train")


KAGGLE = [
    KAGGLE_HEADER,
    # A: R8 drew two cardiomegaly boxes and one effusion; R9 cardiomegaly;
    # R10 no finding.
    f"{A},Cardiomegaly,3,R8,691,1375,1653,1831",
    f"{A},Cardiomegaly,3,R8,700,1380,1650,1830",
    f"{A},Pleural effusion,10,R8,1,2,3,4",
    f"{A},Cardiomegaly,3,R9,690,1370,1650,1830",
    f"{A},No finding,14,R10,,,,",
    # B: all three say no finding.
    f"{B},No finding,14,R2,,,,", f"{B},No finding,14,R3,,,,",
    f"{B},No finding,14,R8,,,,",
]


@pytest.mark.parametrize("rule,want_a", [
    ("majority", {3: 1.0}),
    ("any", {3: 1.0, 10: 1.0, 14: 1.0}),
    ("disagreement", {3: -1.0, 10: -1.0, 14: -1.0}),
])
def test_kaggle_votes_per_radiologist(tmp_path, rule, want_a):
  _write(tmp_path, "train.csv", KAGGLE)
  idx = vindr.read(str(tmp_path), "train_val", rule=rule)
  assert idx.label_names == vindr.KAGGLE_LABELS
  assert idx.paths == (f"train/{A}.dicom", f"train/{B}.dicom")
  a = np.zeros(15, np.float32)
  for j, v in want_a.items():
    a[j] = v
  np.testing.assert_array_equal(idx.labels[0], a)
  np.testing.assert_array_equal(idx.labels[1], np.eye(15)[14])


@pytest.mark.parametrize("row,message", [
    (f"{A},Cardiomegaly,15,R8,1,2,3,4", r"line 2: class_id is '15'; expected "
     r"0..14"),
    (f"{A},Atelectasis,3,R8,1,2,3,4",
     r"line 2: class_name is 'Atelectasis'; expected 'Cardiomegaly' for "
     r"class_id 3"),
    (f"{A},No finding,14,,,,,", r"line 2: rad_id is ''"),
])
def test_bad_kaggle_input(tmp_path, row, message):
  _write(tmp_path, "train.csv", [KAGGLE_HEADER, row])
  with pytest.raises(UserError, match=r"train.csv: " + message):
    vindr.read(str(tmp_path), "train")
  with pytest.raises(UserError, match=r"\(kaggle\) split 'test' is not one"):
    vindr.read(str(tmp_path), "test")


def test_train_valid_hold_out_by_image(tmp_path):
  ids = [f"{k:032x}" for k in range(40)]
  _write(tmp_path, "annotations/image_labels_train.csv",
         [HEADER] + [_row(i, f"R{r}", [CARDIO] if k % 2 else [])
                     for k, i in enumerate(ids) for r in (1, 2, 3)])
  _write(tmp_path, "annotations/image_labels_test.csv", TEST)
  root = str(tmp_path)
  train, valid = vindr.read(root, "train"), vindr.read(root, "valid")
  assert (len(train), len(valid)) == (36, 4)
  assert (train.split, valid.split) == ("train", "valid")
  splits.check_disjoint(train, valid, vindr.read(root, "test"))
  assert sorted(train.patients + valid.patients) == ids
  for part in (train, valid):
    want = [float(int(p, 16) % 2) for p in part.patients]
    np.testing.assert_array_equal(part.labels[:, CARDIO], want)
  assert vindr.read(root, "valid", split_seed=1).patients != valid.patients


# -- As a run resolves it: train / valid / test, patient-disjoint. ----------


def test_resolve_reads_the_physionet_test_set(physionet):
  data = resolve.resolve(data_config("vindr", physionet))
  assert data.test.index.paths == (f"test/{C}.dicom",)
  assert data.test.index.patients == (C,)
  assert sorted(data.train.index.patients + data.valid.index.patients) == [
      A, B]
  assert data.sources["test"] == "annotations/image_labels_test.csv"


def test_resolve_refuses_a_test_image_also_in_training(physionet):
  _write(physionet, "annotations/image_labels_test.csv",
         TEST + [_row(A, None, [CARDIO])])
  role = "valid" if vindr.read(physionet, "valid").patients == (A,) else (
      "train")
  with pytest.raises(UserError, match=f"^vindr: patient {A} is in both the "
                     f"{role} split '{role}' and the test split 'test'$"):
    resolve.resolve(data_config("vindr", physionet))


def test_resolve_kaggle_carves_test_from_the_training_images(tmp_path):
  ids = [f"{k:032x}" for k in range(40)]
  _write(tmp_path, "train.csv",
         [KAGGLE_HEADER] + [f"{i},No finding,14,R{r},,,," for i in ids
                            for r in (1, 2, 3)])
  root = str(tmp_path)
  data = resolve.resolve(data_config("vindr", root))
  train = vindr.read(root, "train")  # The reader's: less its valid images.
  want = first_by_hash(train.patients, resolve.TEST_FRACTION)
  assert len(want) == 4  # 10% of 36
  assert data.test.index.paths == tuple(f"train/{i}.dicom" for i in ids
                                        if i in want)
  assert sorted(data.train.index.patients) == sorted(set(train.patients)
                                                     - want)
  assert data.valid.index.paths == vindr.read(root, "valid").paths
  splits.check_disjoint(data.train.index, data.valid.index, data.test.index)
  assert "carved" in data.sources["test"]
  again = resolve.resolve(data_config("vindr", root))
  assert again.test.index.paths == data.test.index.paths
  # Two images: one for valid, one for train, none left for a test split.
  _write(tmp_path, "train.csv", KAGGLE)
  with pytest.raises(UserError, match="^data set vindr: the test split "
                     "'test' has no images"):
    resolve.resolve(data_config("vindr", root))
