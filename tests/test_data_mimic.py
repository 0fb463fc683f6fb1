"""MIMIC-CXR-JPG reader on fixtures in PhysioNet's layout."""

import os

import numpy as np
import pytest

from medbridge_jax.data import mimic
from medbridge_jax.data import resolve
from medbridge_jax.errors import UserError
from tests import text_files
from tests.test_data_splits import data_config

SPLIT_HEADER = "dicom_id,study_id,subject_id,split"
META_HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,"
    "ViewPosition,Rows,Columns,StudyDate,StudyTime,"
    "ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning")
LABEL_HEADER = "subject_id,study_id," + ",".join(mimic.LABELS)


def _write(root, name, lines, gz=True):
  return text_files.write_lines(
      os.path.join(root, "mimic-cxr-2.0.0-" + name), lines, gz)


def _meta(dicom, subject, study, view):
  return (f"{dicom},{subject},{study},CHEST (PA AND LAT),{view},3056,2544,"
          f"21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect")


def _labels(subject, study, values):
  return f"{subject},{study}," + ",".join(values)


# Studies: s50000001 (p10000032, train), s50000002 (p10000032, validate),
# s53000003 (p11000045, test), s50000004 (p11000045, train, no label row).
DICOMS = [
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", 50000001, 10000032,
     "train", "PA"),
    ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", 50000001, 10000032,
     "train", "LATERAL"),
    ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", 50000002, 10000032,
     "validate", "AP"),
    ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", 53000003, 11000045,
     "test", "PA"),
    ("fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818", 53000003, 11000045,
     "test", ""),
    ("ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c", 50000004, 11000045,
     "train", "AP"),
]
LABEL_ROWS = {
    # study: (subject, 14 values as published)
    50000001: (10000032, ["", "1.0", "", "-1.0", "", "", "", "1.0", "", "0.0",
                          "", "", "0.0", ""]),
    50000002: (10000032, [""] * 8 + ["1.0"] + [""] * 5),
    53000003: (11000045, ["1.0", "", "0.0", "", "", "", "", "", "", "-1.0",
                          "", "1.0", "", "1.0"]),
}


def _fixture(root, gz=True, label_file="chexpert.csv", dicoms=DICOMS,
             label_rows=LABEL_ROWS):
  _write(root, "split.csv",
         [SPLIT_HEADER]
         + [f"{d},{st},{su},{sp}" for d, st, su, sp, _ in dicoms],
         gz)
  _write(root, "metadata.csv",
         [META_HEADER] + [_meta(d, su, st, v) for d, st, su, _, v in dicoms],
         gz)
  _write(root, label_file,
         [LABEL_HEADER] + [_labels(su, st, v)
                           for st, (su, v) in label_rows.items()], gz)


def _codes(values):
  return np.array([float(v) if v else np.nan for v in values], np.float32)


def test_train_split_frontal_only_with_study_labels(tmp_path):
  _fixture(tmp_path)
  idx = mimic.read(str(tmp_path), "train")
  # The lateral image is dropped; s50000004 has no label row, so is dropped.
  assert idx.dataset == "mimic" and idx.split == "train"
  assert idx.paths == (
      "files/p10/p10000032/s50000001/"
      "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg",)
  assert idx.patients == ("10000032",) and idx.studies == ("50000001",)
  assert idx.label_names == mimic.LABELS
  np.testing.assert_array_equal(idx.labels[0], _codes(LABEL_ROWS[50000001][1]))
  assert idx.labels[0, mimic.LABELS.index("Edema")] == -1.0


def test_validate_is_valid_and_test_drops_blank_view(tmp_path):
  _fixture(tmp_path, gz=False)
  for name in ("valid", "validate"):
    idx = mimic.read(str(tmp_path), name)
    assert idx.split == "valid" and idx.studies == ("50000002",)
    np.testing.assert_array_equal(idx.labels[0],
                                  _codes(LABEL_ROWS[50000002][1]))
  idx = mimic.read(str(tmp_path), "test")
  assert idx.paths == ("files/p11/p11000045/s53000003/"
                       "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714.jpg",)


def test_all_views_and_all_splits(tmp_path):
  _fixture(tmp_path)
  idx = mimic.read(str(tmp_path), "all", views=None)
  assert len(idx) == 5  # every image with a labelled study
  assert idx.studies == ("50000001",) * 2 + ("50000002",) + ("53000003",) * 2
  np.testing.assert_array_equal(idx.labels[0], idx.labels[1])
  assert len(mimic.read(str(tmp_path), "all")) == 3


def test_negbio_labeler(tmp_path):
  _fixture(tmp_path, label_file="negbio.csv")
  assert len(mimic.read(str(tmp_path), "train", labeler="negbio")) == 1
  with pytest.raises(UserError, match="mimic-cxr-2.0.0-chexpert.csv"):
    mimic.read(str(tmp_path), "train")


@pytest.mark.parametrize("edit,message", [
    (lambda d, l: (d, {**l, 50000001: (10000032,
                                        ["2.0"] + l[50000001][1][1:])}),
     r"chexpert.csv.gz: line 2: Atelectasis is '2.0'; expected 1, 0, -1 or"),
    (lambda d, l: ([d[0][:3] + ("validation", "PA")] + d[1:], l),
     r"split.csv.gz: line 2: split is 'validation'; expected train, validate"),
    (lambda d, l: ([("../../etc/passwd",) + d[0][1:]] + d[1:], l),
     r"split.csv.gz: line 2: dicom_id is '../../etc/passwd'; expected a plain"),
    (lambda d, l: (d + [d[0]], l), r"split.csv.gz: line 8: dicom_id .* twice"),
    (lambda d, l: (d, {**l, 50000002: (11000045, l[50000002][1])}),
     r"chexpert.csv.gz: line 3: study_id 50000002 has subject_id 11000045"),
])
def test_bad_input_names_file_line_value(tmp_path, edit, message):
  dicoms, label_rows = edit(list(DICOMS), dict(LABEL_ROWS))
  _fixture(tmp_path, dicoms=dicoms, label_rows=label_rows)
  with pytest.raises(UserError, match=message):
    mimic.read(str(tmp_path), "all")


def test_split_file_naming_unknown_image(tmp_path):
  _fixture(tmp_path)
  _write(tmp_path, "split.csv",
         [SPLIT_HEADER, "deadbeef,50000001,10000032,train"])
  with pytest.raises(UserError, match=r"split.csv.gz: line 2: dicom_id "
                     r"'deadbeef' is not in .*metadata.csv.gz"):
    mimic.read(str(tmp_path), "train")


def test_missing_column(tmp_path):
  _fixture(tmp_path)
  _write(tmp_path, "metadata.csv", ["dicom_id,subject_id,study_id"])
  with pytest.raises(UserError, match="metadata.csv.gz: missing column "
                     "'ViewPosition'"):
    mimic.read(str(tmp_path), "train")


def test_100k_rows(tmp_path):
  """Indexing a 100k-image fixture is vectorised and exact."""
  n = 100_000
  i = np.arange(n)
  subjects = 10_000_000 + i // 4
  studies = 50_000_000 + i // 2  # two images per study
  dicom_ids = [f"{k:08x}-0000" for k in range(n)]
  split_names = np.array(["train", "validate", "test"])[(i // 4) % 3]
  views = np.array(["PA", "AP", "LATERAL", "LL"])[i % 4]
  _write(tmp_path, "split.csv", [SPLIT_HEADER] + [
      f"{d},{st},{su},{sp}" for d, st, su, sp in zip(
          dicom_ids, studies.tolist(), subjects.tolist(),
          split_names.tolist())])
  _write(tmp_path, "metadata.csv", [META_HEADER] + [
      _meta(d, su, st, v) for d, su, st, v in zip(
          dicom_ids, subjects.tolist(), studies.tolist(), views.tolist())])
  study_ids = np.unique(studies)
  values = np.array(["1.0", "0.0", "-1.0", ""])
  grid = values[(study_ids[:, None] + np.arange(14)[None]) % 4]
  _write(tmp_path, "chexpert.csv", [LABEL_HEADER] + [
      f"{10_000_000 + (st - 50_000_000) // 2},{st},"
      + ",".join(row) for st, row in zip(study_ids.tolist(), grid.tolist())])
  idx = mimic.read(str(tmp_path), "train")
  # Frontal images are the even rows; train is every third group of four.
  want = i[(i % 4 < 2) & ((i // 4) % 3 == 0)]
  assert len(idx) == len(want)
  assert idx.paths[-1] == (
      f"files/p{str(subjects[want[-1]])[:2]}/p{subjects[want[-1]]}/"
      f"s{studies[want[-1]]}/{dicom_ids[want[-1]]}.jpg")
  code = np.array([1.0, 0.0, -1.0, np.nan], np.float32)
  expect = code[(studies[want][:, None] + np.arange(14)[None]) % 4]
  np.testing.assert_array_equal(idx.labels, expect)
  assert idx.patients == tuple(subjects[want].astype(str).tolist())


# -- As a run resolves it: train / valid / test, patient-disjoint. ----------


def _disjoint_fixture(root, label_s50000004=False):
  """DICOMS with the validate study moved to a patient of its own (the
  official split is patient-disjoint; the plain fixture is not)."""
  dicoms = [(d, st, 10000099 if st == 50000002 else su, sp, v)
            for d, st, su, sp, v in DICOMS]
  rows = dict(LABEL_ROWS)
  rows[50000002] = (10000099, LABEL_ROWS[50000002][1])
  if label_s50000004:  # A labelled training study of the test patient.
    rows[50000004] = (11000045, LABEL_ROWS[50000002][1])
  _fixture(root, dicoms=dicoms, label_rows=rows)
  return str(root)


def test_resolve_reads_the_official_test_split(tmp_path):
  data = resolve.resolve(data_config("mimic", _disjoint_fixture(tmp_path)))
  # The PA image of s53000003; its blank-view image is left out.
  assert data.test.index.paths == (
      "files/p11/p11000045/s53000003/"
      "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714.jpg",)
  assert data.test.index.patients == ("11000045",)
  assert data.valid.index.patients == ("10000099",)
  assert data.train.index.patients == ("10000032",)
  assert data.sources["test"] == ("mimic-cxr-2.0.0-split.csv rows of split "
                                  "'test'")


@pytest.mark.parametrize("make,message", [
    # The plain fixture: s50000001 (train) and s50000002 (validate) are both
    # subject 10000032's.
    (lambda root: _fixture(root) or str(root),
     "patient 10000032 is in both the train split 'train' and the valid "
     "split 'valid'"),
    (lambda root: _disjoint_fixture(root, label_s50000004=True),
     "patient 11000045 is in both the train split 'train' and the test split "
     "'test'"),
], ids=["train-valid", "train-test"])
def test_resolve_refuses_a_patient_in_two_splits(tmp_path, make, message):
  with pytest.raises(UserError, match="^mimic: " + message + "$"):
    resolve.resolve(data_config("mimic", make(tmp_path)))
