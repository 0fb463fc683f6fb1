"""Bounding boxes: the publishers' box files, scaling into the letterbox,
bad rows, the command, and the boxes the synthetic generator writes."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from medbridge_jax.data import boxes
from medbridge_jax.data import images
from medbridge_jax.data import registry
from medbridge_jax.data import synthetic
from medbridge_jax.data import synthetic_draw as draw
from medbridge_jax.errors import UserError
from tests import test_data_nih as nih_fixture
from tests import test_data_rsna as rsna_fixture
from tests import test_data_synthetic as synthetic_fixture
from tests import test_data_vindr as vindr_fixture
from tests import text_files

# ---------------------------------------------------------------------------
# NIH ChestX-ray14.

# The published header: "Bbox [x,y,w,h]" unquoted, three empty columns.
NIH_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
NIH_ROWS = [
    "00000001_000.png,Cardiomegaly,225.084745762712,547.019216763771,"
    "86.7796610169491,79.1864406779661,,,",
    "00000001_000.png,Infiltrate,10,20,30,40,,,",
    "00000004_000.png,Mass,5.5,6,20,10,,,",
    "00000004_000.png,Nodule,0,0,100,80",  # no trailing fields: accepted
]


def _nih(tmp_path, rows=NIH_ROWS):
  """The NIH reader's fixture (empty image files) with a box list, and
  00000004_000.png a real 100 x 80 (w x h) PNG."""
  root = str(tmp_path)
  nih_fixture._write(os.path.join(root, "Data_Entry_2017.csv"),
                     [nih_fixture.HEADER_2017] + nih_fixture.ROWS_2017)
  nih_fixture._write(os.path.join(root, "train_val_list.txt"),
                     nih_fixture.TRAIN_VAL)
  nih_fixture._write(os.path.join(root, "test_list.txt"), nih_fixture.TEST)
  for folder, names in (("images_001", nih_fixture.TRAIN_VAL[:4]),
                        ("images_002", nih_fixture.TRAIN_VAL[4:]
                         + nih_fixture.TEST)):
    os.makedirs(os.path.join(root, folder, "images"), exist_ok=True)
    for n in names:
      open(os.path.join(root, folder, "images", n), "wb").close()
  text_files.write_lines(os.path.join(root, "BBox_List_2017.csv"),
                         [NIH_HEADER] + rows)
  png = os.path.join(root, "images_002", "images", "00000004_000.png")
  Image.fromarray(np.zeros((80, 100), np.uint8)).save(png)
  return root


def test_nih_boxes_join_the_index_under_its_label_names(tmp_path):
  root = _nih(tmp_path)
  got = boxes.read("nih", root)
  index = registry.read_index("nih", root, "all")
  assert got.label_names == index.label_names
  assert [(b.image, b.label, b.line) for b in got.boxes] == [
      ("images_001/images/00000001_000.png", "Cardiomegaly", 2),
      ("images_001/images/00000001_000.png", "Infiltration", 3),
      ("images_002/images/00000004_000.png", "Mass", 4),
      ("images_002/images/00000004_000.png", "Nodule", 5)]
  assert all(b.image in index.paths for b in got.boxes)
  first = got.boxes[0]
  assert (first.x, first.y, first.width, first.height) == (
      225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661)
  assert got.boxes[2].corners == (5.5, 6.0, 25.5, 16.0)
  assert got.boxes[0].source.endswith("BBox_List_2017.csv")
  # 00000001_000.png is an empty file: its size is unknown.
  assert (got.skipped, got.not_counted, got.unchecked) == (0, 0, 2)
  test = boxes.read("nih", root, "test")
  assert {b.image for b in test.boxes} == {
      "images_002/images/00000004_000.png"}
  assert len(test.boxes) == 2


@pytest.mark.parametrize("row,message", [
    ("00000004_000.png,Mass,a,6,20,10,,,", "x is 'a'; expected a number"),
    ("00000004_000.png,Mass,1,6,nan,10,,,", "w.* is 'nan'"),
    ("00000004_000.png,Mass,5,6,0,10,,,", "width 0 and height 10"),
    ("00000004_000.png,Mass,5,6,20,-1,,,", "width 20 and height -1"),
    ("00000004_000.png,Mass,90,6,20,10,,,", "outside the 100 x 80 image"),
    ("00000004_000.png,Mass,0,0,100,80.5,,,", "outside the 100 x 80 image"),
    ("00000004_000.png,Mass,-1,6,20,10,,,", "outside the 100 x 80 image"),
    ("00000004_000.png,Tumour,5,6,20,10,,,", "label 'Tumour' is not one"),
    ("00000004_000.png,No Finding,5,6,20,10,,,", "label 'No Finding'"),
    ("00000009_000.png,Mass,5,6,20,10,,,", "image '00000009_000.png' is not"),
    ("00000004_000.png,Mass,5,6,20", "5 fields"),
    ("00000004_000.png,Mass,5,6,20,10,7,,", "9 fields"),
])
def test_nih_bad_rows_raise_or_are_counted(tmp_path, row, message):
  root = _nih(tmp_path, NIH_ROWS[:3] + [row] + NIH_ROWS[3:])
  with pytest.raises(UserError, match=r"BBox_List_2017.csv: line 5: .*"
                     + message):
    boxes.read("nih", root)
  got = boxes.read("nih", root, on_bad_box="skip")
  assert got.skipped == 1
  assert [b.line for b in got.boxes] == [2, 3, 4, 6]


def test_nih_header_must_be_the_published_one(tmp_path):
  root = _nih(tmp_path)
  text_files.write_lines(os.path.join(root, "BBox_List_2017.csv"),
                         ["Image Index,Finding Label,x,y,w,h"] + NIH_ROWS)
  with pytest.raises(UserError, match="BBox_List_2017.csv: header"):
    boxes.read("nih", root)
  with pytest.raises(UserError, match="on_bad_box"):
    boxes.read("nih", root, on_bad_box="ignore")
  with pytest.raises(UserError, match="no boxes for data set 'chexpert'"):
    boxes.read("chexpert", root)


# ---------------------------------------------------------------------------
# VinDr-CXR.

A, B, C = vindr_fixture.A, vindr_fixture.B, vindr_fixture.C
ANNOTATIONS_HEADER = "image_id,rad_id,class_name,x_min,y_min,x_max,y_max"
ANNOTATIONS_TRAIN = [
    ANNOTATIONS_HEADER,
    # A: Cardiomegaly 3/3 readers, Pleural effusion 1/3 (image labels).
    f"{A},R8,Cardiomegaly,100,200,300,260",
    f"{A},R9,Cardiomegaly,110,190,310,250",
    f"{A},R10,Cardiomegaly,105,195,305,255",
    f"{A},R8,Pleural effusion,10,400,60,480",
    # B: Pleural effusion 2/3, No finding 1/3.
    f"{B},R2,Pleural effusion,500,600,700,650.5",
    f"{B},R3,No finding,,,,",
    f"{B},R8,Pleural effusion,510,610,690,640",
]
ANNOTATIONS_TEST = [  # one consensus reading
    "image_id,class_name,x_min,y_min,x_max,y_max",
    f"{C},Cardiomegaly,1,2,3,4",
]


def _vindr(tmp_path, train=ANNOTATIONS_TRAIN):
  root = str(tmp_path)
  vindr_fixture._write(root, "annotations/image_labels_train.csv",
                       vindr_fixture.TRAIN)
  vindr_fixture._write(root, "annotations/image_labels_test.csv",
                       vindr_fixture.TEST)
  vindr_fixture._write(root, "annotations/annotations_train.csv", train)
  vindr_fixture._write(root, "annotations/annotations_test.csv",
                       ANNOTATIONS_TEST)
  return root


# Which rows of ANNOTATIONS_TRAIN count under each rule (see the labels).
@pytest.mark.parametrize("rule,lines", [
    ("majority", [2, 3, 4, 6, 8]),
    ("any", [2, 3, 4, 5, 6, 8]),
    ("all", [2, 3, 4]),
    ("disagreement", [2, 3, 4]),
])
def test_vindr_boxes_count_where_the_rule_counts_the_label(tmp_path, rule,
                                                           lines):
  got = boxes.read("vindr", _vindr(tmp_path), rule=rule)
  train = [b for b in got.boxes if "annotations_train" in b.source]
  assert [b.line for b in train] == lines
  assert got.not_counted == 6 - len(lines)
  test = [b for b in got.boxes if "annotations_test" in b.source]
  assert [(b.image, b.label, b.corners) for b in test] == [
      (f"test/{C}.dicom", "Cardiomegaly", (1.0, 2.0, 3.0, 4.0))]
  b = train[0]
  assert (b.image, b.label) == (f"train/{A}.dicom", "Cardiomegaly")
  assert (b.x, b.y, b.width, b.height) == (100, 200, 200, 60)


def test_vindr_split_and_bad_rows(tmp_path):
  root = _vindr(tmp_path)
  got = boxes.read("vindr", root, "test")
  assert [b.image for b in got.boxes] == [f"test/{C}.dicom"]
  bad = ANNOTATIONS_TRAIN + [f"{A},R9,Aortic enlargement,,,,"]
  root = _vindr(tmp_path, bad)
  with pytest.raises(UserError, match="annotations_train.csv: line 9: "
                     "class_name 'Aortic enlargement' has no box"):
    boxes.read("vindr", root)
  bad = ANNOTATIONS_TRAIN + [f"{A},R9,Cardiomegaly,300,200,100,260"]
  root = _vindr(tmp_path, bad)
  with pytest.raises(UserError, match="line 9: box width -200"):
    boxes.read("vindr", root)
  got = boxes.read("vindr", root, on_bad_box="skip")
  assert got.skipped == 1 and len(got.boxes) == 6


def test_vindr_kaggle_train_csv(tmp_path):
  header = vindr_fixture.KAGGLE_HEADER
  rows = [header,
          f"{A},Cardiomegaly,3,R8,100,200,300,260",
          f"{A},Cardiomegaly,3,R9,100,200,300,260",
          f"{A},Aortic enlargement,0,R10,1,2,3,4",
          f"{B},No finding,14,R2,,,,",
          f"{B},Nodule/Mass,8,R3,10,10,20,20",
          f"{B},No finding,14,R8,,,,"]
  text_files.write_lines(os.path.join(tmp_path, "train.csv"), rows)
  got = boxes.read("vindr", str(tmp_path))  # majority of the 3 readers
  assert [(b.image, b.label, b.line) for b in got.boxes] == [
      (f"train/{A}.dicom", "Cardiomegaly", 2),
      (f"train/{A}.dicom", "Cardiomegaly", 3)]
  assert got.not_counted == 2
  assert len(boxes.read("vindr", str(tmp_path), rule="any").boxes) == 4


# ---------------------------------------------------------------------------
# RSNA Pneumonia.


def test_rsna_target_one_rows_are_pneumonia_boxes(tmp_path):
  p4 = "00704310-78a8-4b38-8475-49f4573b2dbb"
  root = rsna_fixture._fixture(
      tmp_path, rsna_fixture.LABELS + [f"{p4},316,318,170,478,1"],
      classes=None)
  got = boxes.read("rsna", root)
  assert [(b.image, b.label, b.x, b.y, b.width, b.height, b.line)
          for b in got.boxes] == [
              (f"stage_2_train_images/{rsna_fixture.P2}.dcm", "Pneumonia",
               264, 152, 213, 379, 3),
              (f"stage_2_train_images/{rsna_fixture.P2}.dcm", "Pneumonia",
               562, 152, 256, 453, 4),
              (f"stage_2_train_images/{p4}.dcm", "Pneumonia", 316, 318, 170,
               478, 6)]
  index = registry.read_index("rsna", root, "all")
  assert {b.image for b in got.boxes} <= set(index.paths)
  for split in ("train", "valid", "test"):
    keep = set(registry.read_index("rsna", root, split).paths)
    assert [b for b in got.boxes if b.image in keep] == list(
        boxes.read("rsna", root, split).boxes)
  root = rsna_fixture._fixture(
      tmp_path, rsna_fixture.LABELS + [f"{p4},316,318,x,478,1"],
      classes=None)
  with pytest.raises(UserError, match="line 6: width is 'x'"):
    boxes.read("rsna", root)


# ---------------------------------------------------------------------------
# Scaling into the letterbox.


def _box(x, y, w, h):
  return boxes.Box(image="i.png", label="Mass", x=x, y=y, width=w, height=h,
                   source="f.csv", line=7)


def test_scale_to_by_hand():
  # 100 x 200 (h x w) into 50: scale 1/4, 25 x 50 centred, 12 rows on top.
  got = boxes.scale_to(_box(40, 20, 80, 40), (100, 200), 50)
  assert (got.x, got.y, got.width, got.height) == (10, 17, 20, 10)
  assert (got.image, got.label, got.line) == ("i.png", "Mass", 7)
  # 30 x 20 into 64: 64 / 30 = 2.1333..., width round(42.67) = 43 pixels,
  # 10 columns on the left; horizontally the scale is 43 / 20.
  got = boxes.scale_to(_box(2, 3, 4, 6), (30, 20), 64)
  np.testing.assert_allclose(
      (got.x, got.y, got.width, got.height),
      (10 + 2 * 43 / 20, 3 * 64 / 30, 4 * 43 / 20, 6 * 64 / 30))
  with pytest.raises(UserError, match="f.csv: line 7: .*outside the 20 x 30"):
    boxes.scale_to(_box(18, 3, 4, 6), (30, 20), 64)


@pytest.mark.parametrize("hw,rect,size", [
    ((100, 200), (37, 21, 53, 30), 50),  # shrink, wide
    ((90, 60), (5, 40, 22, 31), 32),  # shrink, tall, odd scale
    ((30, 20), (3, 7, 9, 12), 64),  # enlarge (bilinear)
])
def test_scale_to_covers_the_rectangle_letterbox_draws(hw, rect, size):
  """A bright rectangle letterboxed: every pixel it brightens lies in the
  scaled box, and every pixel well inside the box is bright."""
  x, y, w, h = rect
  img = np.zeros(hw, np.uint8)
  img[y:y + h, x:x + w] = 255
  out = images.letterbox(img, size).astype(float)
  got = boxes.scale_to(_box(x, y, w, h), hw, size)
  x0, y0, x1, y1 = got.corners
  rows = np.arange(size)[:, None] + 0.5  # pixel centres
  cols = np.arange(size)[None, :] + 0.5
  # Bilinear enlarging bleeds half a source pixel; area averaging none.
  bleed = max(0.5, 0.5 * size / max(hw)) if size > max(hw) else 0.5
  near = ((cols > x0 - bleed) & (cols < x1 + bleed)
          & (rows > y0 - bleed) & (rows < y1 + bleed))
  assert (out[~near] == 0).all()
  inner = ((cols - 0.5 >= x0 + bleed) & (cols + 0.5 <= x1 - bleed)
           & (rows - 0.5 >= y0 + bleed) & (rows + 0.5 <= y1 - bleed))
  assert inner.sum() > 4 and (out[inner] >= 254).all()


# ---------------------------------------------------------------------------
# The command.


def _run(capsys, *argv):
  try:
    status = boxes.main(list(argv))
  except SystemExit as e:
    status = e.code
  out, err = capsys.readouterr()
  return status, out, err


def test_command_prints_counts(tmp_path, capsys):
  root = _nih(tmp_path)
  status, out, _ = _run(capsys, "--dataset=nih", f"--root={root}")
  assert status == 0
  assert json.loads(out) == {
      "dataset": "nih", "root": root, "split": None, "images": 2,
      "boxes": 4, "labels": {"Cardiomegaly": 1, "Infiltration": 1,
                             "Mass": 1, "Nodule": 1},
      "skipped": 0, "not_counted": 0, "unchecked": 2}
  status, out, _ = _run(capsys, "--dataset=nih", f"--root={root}",
                        "--split=train_val")
  got = json.loads(out)
  assert (got["split"], got["images"], got["boxes"]) == ("train_val", 1, 2)
  root = _nih(tmp_path, NIH_ROWS + ["00000004_000.png,Mass,a,6,20,10,,,"])
  status, _, err = _run(capsys, "--dataset=nih", f"--root={root}")
  assert status == 2 and "line 6: x is 'a'" in err
  status, out, _ = _run(capsys, "--dataset=nih", f"--root={root}",
                        "--on_bad_box=skip")
  assert json.loads(out)["skipped"] == 1 and json.loads(out)["boxes"] == 4
  status, _, err = _run(capsys, "--dataset=nih", f"--root={root}",
                        "--option", "rule=any")
  assert status == 2 and "--option rule: the nih reader takes" in err


def test_command_vindr_rule_option(tmp_path, capsys):
  root = _vindr(tmp_path)
  _, out, _ = _run(capsys, "--dataset=vindr", f"--root={root}", "--option",
                   "rule=all")
  got = json.loads(out)
  assert got["labels"] == {"Cardiomegaly": 4}
  assert (got["images"], got["not_counted"]) == (2, 3)


# ---------------------------------------------------------------------------
# The synthetic generator's boxes.

SIZE = 128


def _inside(mask, found, pad=0):
  """mask restricted to outside the boxes (padded by `pad` pixels)."""
  covered = np.zeros_like(mask)
  for x, y, w, h in found:
    covered[max(0, y - pad):y + h + pad, max(0, x - pad):x + w + pad] = True
  return mask & ~covered


@pytest.mark.parametrize("variant", draw.VARIANTS)
def test_nodule_boxes_are_exactly_the_pixels_the_nodules_change(variant):
  seen = 0
  for pid in range(1, 60):
    patient = draw.draw_patient(0, pid, variant)
    if not patient.nodules:
      continue
    study = draw.draw_study(patient, 0, 0, variant)
    img, _ = draw.render(patient, study, SIZE, variant)
    img0, _ = draw.render(patient, dataclasses.replace(
        study, show_nodules=False), SIZE, variant)
    changed = img != img0
    found = [b[1:] for b in draw.finding_boxes(patient, study, SIZE, variant)
             if b[0] == "Lung Lesion"]
    assert len(found) == len(patient.nodules)
    assert not _inside(changed, found).any()
    for x, y, w, h in found:  # tight: every edge row and column changes
      part = changed[y:y + h, x:x + w]
      assert part.any(axis=0)[[0, -1]].all() and part.any(
          axis=1)[[0, -1]].all()
    seen += 1
  assert seen >= 3


@pytest.mark.parametrize("variant", draw.VARIANTS)
def test_global_and_pneumothorax_boxes_cover_what_they_change(variant):
  patient = next(p for p in (draw.draw_patient(0, i, variant)
                             for i in range(1, 99)) if not p.cardiomegaly)
  study = dataclasses.replace(
      draw.draw_study(patient, 0, 0, variant), effusion=(), edema=0.0,
      pneumothorax=(), show_nodules=False)
  base, _ = draw.render(patient, study, SIZE, variant)
  big = dataclasses.replace(patient, ctr=0.6, cardiomegaly=True)
  cases = {
      # The enlarged heart against a normal one of the same patient.
      "Cardiomegaly": (big, study, draw.render(dataclasses.replace(
          patient, ctr=0.44), study, SIZE, variant)[0]),
      "Pleural Effusion": (patient, dataclasses.replace(
          study, effusion=((-1, 0.08), (1, 0.05))), base),
      "Pneumothorax": (patient, dataclasses.replace(
          study, pneumothorax=(1, 0.04, 0.5, 0.27, 1.3)), base),
  }
  for label, (p, s, img0) in cases.items():
    img, _ = draw.render(p, s, SIZE, variant)
    diff = np.abs(img - img0)
    found = [b[1:] for b in draw.finding_boxes(p, s, SIZE, variant)]
    assert {b[0] for b in draw.finding_boxes(p, s, SIZE, variant)} == {label}
    assert len(found) == (2 if label == "Pleural Effusion" else 1)
    strong = diff > 0.25 * diff.max()
    # Soft edges (sigmoids on the half-resolution grid) spill a few pixels.
    assert _inside(strong, found, pad=3).sum() <= 0.02 * strong.sum(), label
    covered = ~_inside(np.ones_like(strong), found, pad=3)
    assert diff[covered].sum() >= 0.9 * diff.sum(), label
    # Not loose: the strong change reaches the boxes' sides within 4 pixels
    # (the heart's bottom excepted: both hearts rest on the diaphragm).
    rows, cols = np.flatnonzero(strong.any(1)), np.flatnonzero(strong.any(0))
    x0 = min(b[0] for b in found)
    y0 = min(b[1] for b in found)
    x1 = max(b[0] + b[2] for b in found)
    y1 = max(b[1] + b[3] for b in found)
    assert abs(cols[0] - x0) <= 4 and abs(cols[-1] + 1 - x1) <= 4, label
    assert abs(rows[0] - y0) <= 4, label
    if label != "Cardiomegaly":
      assert abs(rows[-1] + 1 - y1) <= 4, label


@pytest.mark.parametrize("variant", draw.VARIANTS)
def test_generated_box_file_matches_the_truth(tmp_path, variant):
  root = synthetic.ensure(str(tmp_path), 14, 6, variant, 64)
  got = boxes.read("synthetic", root)
  index = registry.read_index("synthetic", root, "all")
  assert got.label_names == index.label_names == synthetic.label_names(
      variant)
  assert (got.skipped, got.unchecked) == (0, 0)
  seed, names = 6, dict(zip(draw.LABELS, synthetic.label_names(variant)))
  want = {}
  for patient, study, _ in draw.studies(14, seed, variant):
    for name in ("Cardiomegaly", "Pleural Effusion", "Pneumothorax"):
      want[(patient.pid, study.index, names[name])] = int(
          study.truth[name] is not None) * (
              len(study.effusion) if name == "Pleural Effusion" else 1)
    want[(patient.pid, study.index, names["Lung Lesion"])] = len(
        patient.nodules)
  have = dict.fromkeys(want, 0)
  for b in got.boxes:
    assert b.image in index.paths
    if variant == "nih":
      pid, k = (int(v) for v in b.image.split("/")[-1][:-4].split("_"))
    else:
      pid = int(b.image.split("/patient")[1].split("/")[0])
      k = int(b.image.split("/study")[1].split("/")[0]) - 1
    have[(pid, k, b.label)] += 1
    assert b.x >= 0 and b.y >= 0 and b.x + b.width <= 64 and (
        b.y + b.height <= 64)
  assert have == want
  assert sum(want.values()) >= 5
  # Read back from the file, the nodules' boxes hold every pixel they
  # change in the image as rendered (x, y, w, h written in NIH's order).
  lesion = names["Lung Lesion"]
  checked = 0
  for image in sorted({b.image for b in got.boxes if b.label == lesion}):
    if variant == "nih":
      pid, k = (int(v) for v in image.split("/")[-1][:-4].split("_"))
    else:
      pid = int(image.split("/patient")[1].split("/")[0])
      k = int(image.split("/study")[1].split("/")[0]) - 1
    patient = draw.draw_patient(seed, pid, variant)
    study = draw.draw_study(patient, seed, k, variant)
    img, _ = draw.render(patient, study, 64, variant)
    img0, _ = draw.render(patient, dataclasses.replace(
        study, show_nodules=False), 64, variant)
    found = [(int(b.x), int(b.y), int(b.width), int(b.height))
             for b in got.boxes if b.image == image and b.label == lesion]
    assert (img != img0).any() and not _inside(img != img0, found).any()
    checked += 1
  assert checked >= 1
  # The nih variant's file is NIH's: the NIH reader reads it too.
  if variant == "nih":
    assert boxes.read("nih", root).boxes == got.boxes


def _files_hash_without_boxes(root):
  """tests/test_data_synthetic.py's files hash, over the files it hashed
  before the generator wrote boxes."""
  h = hashlib.sha256()
  for folder, _, names in sorted(os.walk(root)):
    for name in sorted(names):
      if name in (".complete", synthetic.BOX_FILE):
        continue
      path = os.path.join(folder, name)
      h.update(os.path.relpath(path, root).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


@pytest.mark.parametrize("variant", draw.VARIANTS)
def test_writing_boxes_leaves_images_and_csvs_byte_identical(variant,
                                                             tmp_path):
  root = synthetic.ensure(str(tmp_path), 6, 3, variant, 96)
  assert _files_hash_without_boxes(root) == synthetic_fixture._OLD_FILES[
      variant]
  box_dir = (os.path.join(root, synthetic.CHEXPERT_FOLDER)
             if variant == "chexpert" else root)
  with open(os.path.join(box_dir, synthetic.BOX_FILE)) as f:
    assert f.readline() == NIH_HEADER + "\n"
