"""Synthetic chest X-rays in the publishers' folder layouts.

The embedded default data set and the tests' data. `synthetic_draw` draws
the radiographs (anatomy, global and focal findings, labels, exposure,
noise); this module writes them as a publisher lays them out, caches them
and reads them back.

Layouts (`variant`):

  "chexpert": root/CheXpert-v1.0-small/{train,valid}.csv with CheXpert's
    exact header, and test_labels.csv as CheXpert's test labels are released
    (Path from test/, labels only); patients 75% / 15% / 10%. Simulated
    findings under their CheXpert names, the other observations blank.
    Training labels are written as a report labeler would
    (`synthetic_draw.reported_labels`); validation and test labels are the
    truth. Images are JPEG (quality 95, as CheXpert ships JPEG): the focal
    findings survive it (tested on JPEG-compressed images).
  "nih": a domain-shifted look (collimation border, washed-out contrast,
    other gamma, stronger noise, slight blur) in NIH ChestX-ray14's layout:
    Data_Entry_2017_v2020.csv ("Finding Labels" joined by '|', or "No
    Finding"), train_val_list.txt, test_list.txt (20% of the patients), PNGs
    in images_001/images/.

Both variants also write where each drawn finding is (`BOX_FILE`, in NIH's
BBox_List_2017.csv layout; `synthetic_draw.finding_boxes` says what each box
covers), for every image of every split, under the variant's label names:
root/BBox_List_2017.csv with file names as Image Index (nih), or
root/CheXpert-v1.0-small/BBox_List_2017.csv with the paths train.csv uses
(chexpert). `boxes.py` reads them. The boxes are the truth even where a
training label, written as a labeler would, misses or doubts the finding.

`ensure()` generates once into a cache folder named by every parameter and
`GENERATOR_VERSION` (the dose knobs only when not 1.0, so the default data
keeps its folder), writes a completion marker last and reuses thereafter.
"""

import csv
import dataclasses
import math
import os
import shutil
import time
import uuid

import numpy as np
from PIL import Image

from medbridge_jax.data import chexpert
from medbridge_jax.data import index as index_lib
from medbridge_jax.data import labels as labels_lib
from medbridge_jax.data import nih
from medbridge_jax.data import synthetic_draw as draw
from medbridge_jax.errors import UserError


# Bump when the drawing or a layout changes: it names the cache folder.
GENERATOR_VERSION = 2
NIH_NAMES = {"Cardiomegaly": "Cardiomegaly", "Edema": "Edema",
             "Pleural Effusion": "Effusion", "Lung Lesion": "Nodule",
             "Pneumothorax": "Pneumothorax"}
# Either variant's name -> "global" | "focal".
LABEL_GROUPS = {
    **{n: "global" for n in draw.GLOBAL_LABELS},
    **{n: "focal" for n in draw.FOCAL_LABELS},
    **{NIH_NAMES[n]: "global" for n in draw.GLOBAL_LABELS},
    **{NIH_NAMES[n]: "focal" for n in draw.FOCAL_LABELS},
}
CHEXPERT_FOLDER = "CheXpert-v1.0-small"
NIH_ENTRY_FILE = "Data_Entry_2017_v2020.csv"
BOX_FILE = "BBox_List_2017.csv"
# NIH's header as published: "Bbox [x,y,w,h]" unquoted, so four columns, and
# three empty ones after them; the rows end in three empty fields too.
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
VALID_FRACTION = 0.15  # chexpert variant: patients in valid.csv
TEST_FRACTION = 0.1  # chexpert variant: patients in test_labels.csv
NIH_TEST_FRACTION = 0.2  # nih variant: patients in test_list.txt
# The smallest data set generated: two patients (one can be held out), and
# 64 px, below which the anatomy's features vanish.
MIN_PATIENTS = 2
MIN_IMAGE_SIZE = 64
# CheXpert's test labels (as released with CheXlocalize): no demographics, no
# view columns, paths relative to the data set folder.
CHEXPERT_TEST_HEADER = ("Path",) + tuple(
    n for n in (
        "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
        "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
        "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
        "Support Devices", "No Finding"))
_MARKER = ".complete"


def label_names(variant: str) -> tuple[str, ...]:
  """The simulated labels under the variant's native names."""
  _check_variant(variant)
  if variant == "chexpert":
    return draw.LABELS
  return tuple(NIH_NAMES[n] for n in draw.LABELS)


def _check_variant(variant: str) -> None:
  if variant not in draw.VARIANTS:
    raise UserError(
        f"synthetic variant {variant!r} is not one of {draw.VARIANTS}")


def _held_out(num_patients: int, seed: int, variant: str,
              fractions: dict) -> dict:
  """Patient id (1-based) -> held-out split name, exact seeded shares."""
  perm = np.random.default_rng(
      [seed, draw.VARIANT_CODES[variant], 0, 99]).permutation(
          num_patients) + 1
  out, start = {}, 0
  for split, fraction in fractions.items():
    n = max(1, round(fraction * num_patients)) if num_patients > 1 else 0
    n = min(n, num_patients - 1 - start)  # keep training patients
    out.update({int(p): split for p in perm[start:start + max(0, n)]})
    start += max(0, n)
  return out


def generate(out_dir: str, num_patients: int, seed: int = 0,
             variant: str = "chexpert", image_size: int = 256,
             focal_scale: float = 1.0, focal_contrast: float = 1.0) -> None:
  """Writes the data set into `out_dir` (no caching; see `ensure`)."""
  _check_variant(variant)
  draw.check_dose(focal_scale, focal_contrast)
  dose = dict(focal_scale=float(focal_scale),
              focal_contrast=float(focal_contrast))
  if variant == "chexpert":
    _write_chexpert(out_dir, num_patients, seed, image_size, dose)
  else:
    _write_nih(out_dir, num_patients, seed, image_size, dose)


def _write_chexpert(out_dir, num_patients, seed, size, dose):
  base = os.path.join(out_dir, CHEXPERT_FOLDER)
  held = _held_out(num_patients, seed, "chexpert",
                   {"valid": VALID_FRACTION, "test": TEST_FRACTION})
  rows = {"train": [], "valid": [], "test": []}
  boxes = []
  for patient, study, rng in draw.studies(num_patients, seed, "chexpert"):
    split = held.get(patient.pid, "train")
    rel = (f"{split}/patient{patient.pid:05d}/study{study.index + 1}/"
           "view1_frontal.jpg")
    image, _ = draw.render(patient, study, size, "chexpert", **dose)
    path = os.path.join(base, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(draw.to_uint8(image), "L").save(path, quality=95)
    boxes += _box_rows(f"{CHEXPERT_FOLDER}/{rel}", patient, study, size,
                       "chexpert", dose)
    codes = (draw.reported_labels(study, rng) if split == "train"
             else draw.true_labels(study))
    rows[split].append(_chexpert_row(split, rel, patient, study, codes))
  files = {"train": ("train.csv", chexpert.HEADER),
           "valid": ("valid.csv", chexpert.HEADER),
           "test": ("test_labels.csv", CHEXPERT_TEST_HEADER)}
  for split, (name, header) in files.items():
    with open(os.path.join(base, name), "w", newline="") as f:
      w = csv.writer(f, lineterminator="\n")
      w.writerow(header)
      w.writerows(rows[split])
  _write_boxes(os.path.join(base, BOX_FILE), boxes)


def _chexpert_row(split: str, rel: str, patient: draw.Patient,
                  study: draw.Study,
                  codes: dict) -> list:
  """A study's CSV row in `split`'s file, "No Finding" added to `codes`."""
  positive = any(codes[n] in (1.0, -1.0) for n in draw.LABELS)
  if split == "train":  # CheXpert's labeler: 1 or blank
    codes["No Finding"] = math.nan if positive else 1.0
  else:
    codes["No Finding"] = 0.0 if positive else 1.0
  if split == "test":
    return [rel] + [_fmt(codes.get(n, math.nan))
                    for n in CHEXPERT_TEST_HEADER[1:]]
  row = [f"{CHEXPERT_FOLDER}/{rel}", patient.sex, str(study.age),
         "Frontal", study.view]
  return row + [_fmt(codes.get(n, math.nan)) for n in chexpert.LABELS]


def _fmt(code: float) -> str:
  return "" if math.isnan(code) else f"{code:.1f}"


def _write_nih(out_dir, num_patients, seed, size, dose):
  held = _held_out(num_patients, seed, "nih", {"test": NIH_TEST_FRACTION})
  entries, lists, boxes = [], {"train_val": [], "test": []}, []
  spacing = f"{0.143 * 1024 / size:.3f}"
  count = 0
  for patient, study, _ in draw.studies(num_patients, seed, "nih"):
    name = f"{patient.pid:08d}_{study.index:03d}.png"
    folder = f"images_{count // 10000 + 1:03d}/images"
    count += 1
    os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    image, _ = draw.render(patient, study, size, "nih", **dose)
    Image.fromarray(draw.to_uint8(image), "L").save(
        os.path.join(out_dir, folder, name), compress_level=1)
    boxes += _box_rows(name, patient, study, size, "nih", dose)
    found = sorted(NIH_NAMES[n] for n in draw.LABELS
                   if study.truth[n] is not None)
    entries.append([name, "|".join(found) or "No Finding", str(study.index),
                    str(patient.pid), str(study.age), patient.sex[0],
                    study.view, str(size), str(size), spacing, spacing])
    lists[held.get(patient.pid, "train_val")].append(name)
  with open(os.path.join(out_dir, NIH_ENTRY_FILE), "w") as f:
    # The header as published: the bracketed names contain unquoted commas.
    f.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
            "Patient Gender,View Position,OriginalImage[Width,Height],"
            "OriginalImagePixelSpacing[x,y]\n")
    for e in entries:
      f.write(",".join(e) + "\n")
  for split, names in lists.items():
    with open(os.path.join(out_dir, f"{split}_list.txt"), "w") as f:
      f.write("".join(n + "\n" for n in names))
  _write_boxes(os.path.join(out_dir, BOX_FILE), boxes)


def _box_rows(key: str, patient: draw.Patient, study: draw.Study, size: int,
              variant: str, dose: dict) -> list[str]:
  """BOX_FILE lines of one image's drawn findings, under the variant's
  label names."""
  rename = (lambda n: n) if variant == "chexpert" else NIH_NAMES.get
  return [f"{key},{rename(label)},{x},{y},{w},{h},,,"
          for label, x, y, w, h in draw.finding_boxes(
              patient, study, size, variant, dose["focal_scale"])]


def _write_boxes(path: str, lines: list[str]) -> None:
  with open(path, "w") as f:
    f.write("".join(l + "\n" for l in [BOX_HEADER] + lines))


def cache_name(num_patients: int, seed: int, variant: str, image_size: int,
               focal_scale: float = 1.0, focal_contrast: float = 1.0) -> str:
  """The cache folder name: every parameter and the generator version.

  The dose knobs appear only when not 1.0 (the default images are the same
  with or without them, so they keep their folder), each as the shortest
  text that reads back as the same float: two values never share a name.
  """
  dose = "".join(f"-{tag}{float(v)!r}" for tag, v in (("fs", focal_scale),
                                                      ("fc", focal_contrast))
                 if float(v) != 1.0)
  return (f"synthetic-{variant}-p{num_patients}-s{seed}-{image_size}px"
          f"{dose}-g{GENERATOR_VERSION}")


def ensure(cache_dir: str, num_patients: int, seed: int = 0,
           variant: str = "chexpert", image_size: int = 256,
           focal_scale: float = 1.0, focal_contrast: float = 1.0) -> str:
  """The root of the generated data set, generating it on first use.

  Generation goes to a private temporary folder that is renamed into place
  after the completion marker is written, so an interrupted or concurrent
  run never leaves a half-written data set that looks complete.
  """
  _check_variant(variant)
  draw.check_dose(focal_scale, focal_contrast)
  if int(num_patients) < MIN_PATIENTS:
    raise UserError(f"synthetic num_patients must be at least {MIN_PATIENTS}, "
                    f"got {num_patients}")
  if int(image_size) < MIN_IMAGE_SIZE:
    raise UserError(f"synthetic image_size must be at least "
                    f"{MIN_IMAGE_SIZE}, got {image_size}")
  root = os.path.join(os.path.abspath(cache_dir),
                      cache_name(num_patients, seed, variant, image_size,
                                 focal_scale, focal_contrast))
  if os.path.isfile(os.path.join(root, _MARKER)):
    return root
  try:
    os.makedirs(os.path.dirname(root), exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create the data cache {cache_dir} ({e})") from e
  tmp = f"{root}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    start = time.time()
    generate(tmp, int(num_patients), int(seed), variant, int(image_size),
             float(focal_scale), float(focal_contrast))
    with open(os.path.join(tmp, _MARKER), "w") as f:
      f.write(f"generator {GENERATOR_VERSION}, {time.time() - start:.1f} s\n")
    if os.path.isdir(root):  # an old incomplete one
      shutil.rmtree(root, ignore_errors=True)
    try:
      os.rename(tmp, root)
    except OSError:
      if not os.path.isfile(os.path.join(root, _MARKER)):
        raise  # a concurrent run that finished first is fine; else not
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root


def read(root: str, split: str = "train", **options) -> index_lib.Index:
  """Index of a generated data set, with only the simulated labels."""
  if os.path.isdir(os.path.join(root, CHEXPERT_FOLDER)):
    index = chexpert.read(root, split, **options)
    names = draw.LABELS
  elif os.path.isfile(os.path.join(root, NIH_ENTRY_FILE)):
    index = nih.read(root, split, **options)
    names = label_names("nih")
  else:
    raise UserError(f"{root} is not a generated synthetic data set (no "
                    f"{CHEXPERT_FOLDER}/ or {NIH_ENTRY_FILE})")
  return dataclasses.replace(labels_lib.select(index, names),
                             dataset="synthetic")
