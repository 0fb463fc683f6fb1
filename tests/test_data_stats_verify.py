"""The stats and verify command-line tools on small fixtures."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import test_data_mimic as mimic_fixture
import test_data_vindr as vindr_fixture
from medbridge_jax.data import dicom
from medbridge_jax.data import stats
from medbridge_jax.data import verify


def _run(tool, capsys, *argv):
  """(exit status, stdout, stderr) of a tool's main."""
  try:
    status = tool.main(list(argv))
  except SystemExit as e:
    status = e.code
  out, err = capsys.readouterr()
  return status, out, err


def _vindr(tmp_path):
  root = str(tmp_path / "vindr")
  vindr_fixture._write(root, "annotations/image_labels_train.csv",
                       vindr_fixture.TRAIN)
  vindr_fixture._write(root, "annotations/image_labels_test.csv",
                       vindr_fixture.TEST)
  return root


def test_stats_vindr_all_and_rule(tmp_path, capsys):
  root = _vindr(tmp_path)
  status, out, _ = _run(stats, capsys, "--dataset=vindr", f"--root={root}",
                        "--split=all")
  assert status == 0
  got = json.loads(out)
  assert (got["images"], got["patients"], got["studies"]) == (3, 3, 3)
  # Majority: A and C cardiomegaly, B effusion; nothing uncertain or blank.
  assert got["labels"]["Cardiomegaly"] == {
      "positive": 2, "negative": 1, "uncertain": 0, "blank": 0}
  assert got["labels"]["Pleural effusion"]["positive"] == 1
  assert len(got["labels"]) == 28
  status, out, _ = _run(stats, capsys, "--dataset=vindr", f"--root={root}",
                        "--split=train_val", "--option", "rule=disagreement")
  got = json.loads(out)
  assert got["images"] == 2 and got["split"] == "train_val"
  assert got["labels"]["Pleural effusion"] == {
      "positive": 0, "negative": 0, "uncertain": 2, "blank": 0}


def test_stats_mimic_all_counts_every_view(tmp_path, capsys):
  mimic_fixture._fixture(tmp_path)
  status, out, _ = _run(stats, capsys, "--dataset=mimic", f"--root={tmp_path}")
  got = json.loads(out)
  assert status == 0 and got["split"] == "all"
  assert (got["images"], got["patients"], got["studies"]) == (5, 2, 3)
  # Edema: -1 in s50000001 (2 images), blank in s50000002 and s53000003.
  assert got["labels"]["Edema"] == {
      "positive": 0, "negative": 0, "uncertain": 2, "blank": 3}
  status, out, _ = _run(stats, capsys, "--dataset=mimic", f"--root={tmp_path}",
                        "--split=test")
  assert json.loads(out)["images"] == 1


@pytest.mark.parametrize("argv,message", [
    (["--dataset=padchest", "--root=."], "invalid choice: 'padchest'"),
    (["--dataset=vindr", "--root=/no/such/dir"], "/no/such/dir does not exist"),
    (["--dataset=vindr", "--root=ROOT", "--option", "rules=any"],
     "--option rules: the vindr reader takes rule, variant, valid_fraction, "
     "split_seed"),
    (["--dataset=vindr", "--root=ROOT", "--option", "rule"], "not KEY=VALUE"),
    (["--dataset=vindr", "--root=ROOT", "--split=validation"],
     "split 'validation'"),
])
def test_stats_bad_input_is_one_line(tmp_path, capsys, argv, message):
  root = _vindr(tmp_path)
  argv = [a.replace("ROOT", root) for a in argv]
  status, out, err = _run(stats, capsys, *argv)
  assert status == 2 and not out
  assert err.count("\n") == 1 and err.startswith(
      "medbridge_jax.data.stats: error: ")
  assert message in err


def test_verify_lists_missing_and_corrupt_images(tmp_path, capsys):
  mimic_fixture._fixture(tmp_path)
  index_paths = [
      "files/p10/p10000032/s50000001/"
      "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg",
      "files/p10/p10000032/s50000002/"
      "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab.jpg",
      "files/p11/p11000045/s53000003/"
      "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714.jpg",
  ]
  for rel in index_paths[:2]:
    os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
    Image.fromarray(np.full((40, 30), 128, np.uint8)).save(tmp_path / rel)
  with open(tmp_path / index_paths[1], "r+b") as f:  # truncate the JPEG
    f.truncate(100)
  status, out, _ = _run(verify, capsys, "--dataset=mimic",
                        f"--root={tmp_path}", "--workers=2")
  assert status == 1
  lines = out.splitlines()
  assert lines[0].startswith(f"BAD {index_paths[1]}: ")
  assert lines[1].startswith(f"BAD {index_paths[2]}: ")
  assert "image file not found" in lines[1]
  assert lines[2].endswith("3 images checked, 2 bad (mimic all in "
                           f"{tmp_path})")


def test_verify_passes_good_dicoms(tmp_path, capsys):
  root = _vindr(tmp_path)
  for rel in (f"train/{vindr_fixture.A}.dicom",
              f"train/{vindr_fixture.B}.dicom",
              f"test/{vindr_fixture.C}.dicom"):
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    dicom.write_dicom(os.path.join(root, rel),
                      np.arange(48, dtype=np.uint16).reshape(6, 8),
                      bits_stored=12, photometric="MONOCHROME1")
  status, out, _ = _run(verify, capsys, "--dataset=vindr", f"--root={root}")
  assert status == 0 and out.strip().endswith("3 images checked, 0 bad "
                                               f"(vindr all in {root})")
