"""Indexing speed of the label-file readers on publisher-sized fixtures.

  python -m medbridge_jax.bench.index_speed [--images=377110]

Writes MIMIC-CXR-JPG (split, metadata, chexpert labels; gzip as PhysioNet
ships them), VinDr-CXR (3 radiologist rows per image) and RSNA Pneumonia
label files of the given size into a temporary folder, then times each
reader. No image is written or read: indexing touches label files only.
"""

import argparse
import gzip
import os
import tempfile
import time

import numpy as np

from medbridge_jax.data import mimic
from medbridge_jax.data import rsna
from medbridge_jax.data import vindr


def _write(path, lines, gz=False):
  data = ("\n".join(lines) + "\n").encode()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + (".gz" if gz else ""), "wb") as f:
    f.write(gzip.compress(data, 1) if gz else data)


def _mimic(root, n):
  i = np.arange(n)
  subjects, studies = 10_000_000 + i // 6, 50_000_000 + i // 2
  dicoms = [f"{k:08x}-bde0afdd-112c0b34-7bc16630-4e384014" for k in range(n)]
  splits = np.array(["train"] * 18 + ["validate", "test"])[(i // 6) % 20]
  views = np.array(["PA", "LATERAL", "AP", "LL"])[i % 4]
  p = "mimic-cxr-2.0.0-"
  _write(os.path.join(root, p + "split.csv"), ["dicom_id,study_id,subject_id,"
         "split"] + [f"{d},{st},{su},{sp}" for d, st, su, sp in zip(
             dicoms, studies.tolist(), subjects.tolist(), splits.tolist())],
         gz=True)
  _write(os.path.join(root, p + "metadata.csv"), [
      "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,"
      "ViewPosition,Rows,Columns,StudyDate,StudyTime,"
      "ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
      "PatientOrientationCodeSequence_CodeMeaning"] + [
          f"{d},{su},{st},CHEST (PA AND LAT),{v},3056,2544,21800506,"
          "213014.531,CHEST (PA AND LAT),postero-anterior,Erect"
          for d, su, st, v in zip(dicoms, subjects.tolist(), studies.tolist(),
                                  views.tolist())], gz=True)
  values = np.array(["1.0", "0.0", "-1.0", "", "", ""])
  study_ids = np.unique(studies)
  grid = values[(study_ids[:, None] * 7 + np.arange(14)) % 6]
  _write(os.path.join(root, p + "chexpert.csv"),
         ["subject_id,study_id," + ",".join(mimic.LABELS)] + [
             f"{10_000_000 + (st - 50_000_000) // 3},{st}," + ",".join(row)
             for st, row in zip(study_ids.tolist(), grid.tolist())], gz=True)


def _vindr(root, n):
  header = "image_id,rad_id," + ",".join(vindr.LABELS)
  rows = [header]
  rng = np.random.default_rng(0)
  votes = (rng.random((n * 3, len(vindr.LABELS))) < 0.05).astype(int)
  for k in range(n * 3):
    rows.append(f"{k // 3:032x},R{k % 3 + 1}," + ",".join(map(str, votes[k])))
  _write(os.path.join(root, "annotations/image_labels_train.csv"), rows)


def _rsna(root, n):
  rows = ["patientId,x,y,width,height,Target"]
  for k in range(n):
    pid = f"{k:08x}-14fd-4e49-80ba-63a80b6bddd6"
    rows += ([f"{pid},264.0,152.0,213.0,379.0,1"] * 2 if k % 4 == 0
             else [f"{pid},,,,,0"])
  _write(os.path.join(root, "stage_2_train_labels.csv"), rows)


def _time(name, fn):
  start = time.perf_counter()
  index = fn()
  print(f"{name:40s} {len(index):8d} images  "
        f"{time.perf_counter() - start:6.2f} s")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=377_110,
                 help="MIMIC images (VinDr and RSNA get a tenth each)")
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    _mimic(os.path.join(tmp, "mimic"), args.images)
    _vindr(os.path.join(tmp, "vindr"), args.images // 10)
    _rsna(os.path.join(tmp, "rsna"), args.images // 10)
    _time("mimic all splits, frontal", lambda: mimic.read(
        os.path.join(tmp, "mimic"), "all"))
    _time("vindr train (3 rows per image)", lambda: vindr.read(
        os.path.join(tmp, "vindr"), "train"))
    _time("rsna all", lambda: rsna.read(os.path.join(tmp, "rsna"), "all"))


if __name__ == "__main__":
  main()
