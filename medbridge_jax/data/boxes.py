"""Bounding boxes of findings, the ground truth for localisation.

  python -m medbridge_jax.data.boxes --dataset=NAME --root=DIR [--split=S]

prints one JSON object: {"dataset", "root", "split" (null: every box the
files describe), "images" (with boxes), "boxes", "labels" {NAME: boxes},
"skipped" (bad rows skipped), "not_counted" (VinDr boxes of a label its
rule does not count), "unchecked" (boxes of images whose size is unknown)};
the last three count over the whole files, whatever the split.

A `Box` names its image as the data set's `Index` does (`Index.paths`: the
path relative to the root), its label by the data set's own image-label name
(`Index.label_names`), and its place in pixels of the image file as
published, (x, y) its top-left corner, (0, 0) the image's top-left corner.
`scale_to` moves it into the `images.letterbox` square a model sees.

Files, as the publishers lay them out:
  nih        BBox_List_2017.csv: "Image Index,Finding Label,Bbox [x,y,w,h],,,"
             (the unquoted bracket splits into "Bbox [x", "y", "w", "h]",
             then three empty columns); x, y, w, h in the 1024 x 1024 PNGs
             as distributed, not Data_Entry's OriginalImage[Width,Height]
             (the scans' size before NIH resized them). "Infiltrate" is the
             image label "Infiltration".
  vindr      PhysioNet: annotations/annotations_{train,test}.csv (image_id,
             [rad_id,] class_name, x_min, y_min, x_max, y_max); Kaggle:
             train.csv (same columns and class_id). One row per box per
             radiologist; "No finding" rows have no coordinates. A box
             counts where the reader's `rule` makes its label positive (1)
             on that image: all radiologists' boxes of that label then count;
             the others are `not_counted`.
  rsna       stage_2_train_labels.csv: Target 1 rows (x, y, width, height)
             are boxes of "Pneumonia".
  synthetic  BBox_List_2017.csv in NIH's layout, written by the generator
             (`synthetic.BOX_FILE`): in the root (nih variant, file names) or
             in CheXpert-v1.0-small/ (chexpert variant, paths as train.csv).

Bad rows: a non-number, zero or negative size, a box outside its image, an
unknown label, an image the labels do not have. With on_bad_box="raise" each
is a UserError naming the file and line; with "skip" the row is dropped and
counted. The image size comes from the image file's header (PNG, JPEG, DICOM)
where the file is there; without it a box is checked when scaled.
"""

import csv
import dataclasses
import io
import json
import math
import os
import sys
from typing import Sequence

from medbridge_jax import errors
from medbridge_jax.data import cli
from medbridge_jax.data import csvio
from medbridge_jax.data import images
from medbridge_jax.data import index as index_lib
from medbridge_jax.data import registry
from medbridge_jax.data import synthetic
from medbridge_jax.data import vindr
from medbridge_jax.errors import UserError

ON_BAD_BOX = ("raise", "skip")
NIH_FILE = "BBox_List_2017.csv"
NIH_COLUMNS = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
NIH_ALIASES = {"Infiltrate": "Infiltration"}
VINDR_FILES = {"train_val": "annotations/annotations_train.csv",
               "test": "annotations/annotations_test.csv"}
VINDR_COLUMNS = ("image_id", "class_name", "x_min", "y_min", "x_max",
                 "y_max")
RSNA_FILE = "stage_2_train_labels.csv"
_NO_FINDING = ("no finding",)


@dataclasses.dataclass(frozen=True)
class Box:
  """One box of one finding on one image.

  Attributes:
    image: the image's path relative to the data set root, as in
      `Index.paths` (so a box joins its index row).
    label: the data set's image-label name (`Index.label_names`).
    x, y: the top-left corner, in pixels of the image (or, after
      `scale_to`, of the letterboxed square).
    width, height: its size in the same pixels, both positive.
    source: the file the box was read from.
    line: its line there (1 = the header).
  """

  image: str
  label: str
  x: float
  y: float
  width: float
  height: float
  source: str
  line: int

  @property
  def corners(self) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1)."""
    return self.x, self.y, self.x + self.width, self.y + self.height

  def where(self) -> str:
    """"FILE: line N", for messages."""
    return f"{self.source}: line {self.line}"


@dataclasses.dataclass(frozen=True)
class Boxes:
  """The boxes of a data set folder, and what was left out.

  Attributes:
    dataset, root: as given.
    label_names: the data set's image-label names (index order).
    boxes: in file order (VinDr: train file, then test file).
    skipped: bad rows dropped (on_bad_box="skip").
    not_counted: VinDr boxes of a label the rule does not make positive.
    unchecked: boxes whose image size was unknown (no image file), checked
      only by `scale_to`.
  """

  dataset: str
  root: str
  label_names: tuple[str, ...]
  boxes: tuple[Box, ...]
  skipped: int = 0
  not_counted: int = 0
  unchecked: int = 0


def scale_to(box: Box, original_hw: tuple[int, int], size: int) -> Box:
  """The box in the (size, size) square `images.letterbox` makes of an
  image of `original_hw` = (height, width) pixels.

  letterbox resizes the image to (new_h, new_w) = its sides times
  size / max(h, w), rounded, and centres that on the square; the resize
  maps the edges 0..w onto 0..new_w, so each axis scales by new / old.

  Raises:
    UserError: naming the box's file and line, if it lies outside the
      image.
  """
  h, w = (int(v) for v in original_hw)
  if h < 1 or w < 1:
    raise ValueError(f"image size {original_hw} is not positive")
  _check_inside(box, h, w)
  top, left, new_h, new_w = images.letterbox_geometry((h, w), size)
  sx, sy = new_w / w, new_h / h
  return dataclasses.replace(box, x=left + box.x * sx, y=top + box.y * sy,
                             width=box.width * sx, height=box.height * sy)


def _check_inside(box: Box, h: int, w: int) -> None:
  message = _outside(box.x, box.y, box.width, box.height, h, w)
  if message:
    raise UserError(f"{box.where()}: {message}")


def _outside(x, y, width, height, h, w) -> str | None:
  if x < 0 or y < 0 or x + width > w or y + height > h:
    return (f"box x={x:g} y={y:g} width={width:g} height={height:g} is "
            f"outside the {w} x {h} image")
  return None


def read(dataset: str, root: str, split: str | None = None, *,
         on_bad_box: str = "raise", **options) -> Boxes:
  """The boxes of a data set folder (see the module docstring).

  Args:
    dataset: "nih", "vindr", "rsna" or "synthetic".
    root: the data set folder, as for `registry.read_index`.
    split: None for every box the files describe; else only the boxes of
      images in that split's index (`registry.read_index`).
    on_bad_box: "raise" or "skip" (see the module docstring).
    **options: the reader's options (e.g. VinDr's rule), used for the
      indexes the boxes join and, for VinDr, for which boxes count.
  """
  if on_bad_box not in ON_BAD_BOX:
    raise UserError(f"on_bad_box {on_bad_box!r} is not one of {ON_BAD_BOX}")
  if dataset not in _FILES:
    raise UserError(f"no boxes for data set {dataset!r}; boxes are read for "
                    f"{', '.join(sorted(_FILES))}")
  bad = _Bad(on_bad_box)
  boxes, label_names, not_counted, unchecked = [], None, 0, 0
  for index_split, path, parse, key in _FILES[dataset](root, options):
    # The index first: its reader checks the label files the boxes share.
    index = registry.read_index(dataset, root, index_split, **options)
    label_names = index.label_names
    found, dropped, blind = _join(parse(path, bad), index, key, bad)
    boxes += found
    not_counted += dropped
    unchecked += blind
  if split is not None:
    keep = set(registry.read_index(dataset, root, split, **options).paths)
    boxes = [b for b in boxes if b.image in keep]
  return Boxes(dataset=dataset, root=root, label_names=label_names,
               boxes=tuple(boxes), skipped=bad.count,
               not_counted=not_counted, unchecked=unchecked)


class _Bad:
  """Raises or counts bad rows."""

  def __init__(self, mode: str):
    self.mode, self.count = mode, 0

  def __call__(self, path: str, line: int, message: str) -> None:
    if self.mode == "raise":
      raise UserError(f"{path}: line {line}: {message}")
    self.count += 1


@dataclasses.dataclass(frozen=True)
class _Row:
  """A box row as written, before it is joined to the index."""
  key: str  # the image as the file names it
  label: str
  numbers: tuple[str, str, str, str]  # as written
  corners: bool  # numbers are x0, y0, x1, y1 (else x, y, w, h)
  source: str
  line: int


# ---------------------------------------------------------------------------
# Files.


def _nih_files(root, options):
  del options
  return [("all", csvio.find(root, NIH_FILE), _nih_rows, "name")]


def _synthetic_files(root, options):
  del options
  for folder, key in ((synthetic.CHEXPERT_FOLDER, "path"), ("", "name")):
    if csvio.exists(os.path.join(root, folder), synthetic.BOX_FILE):
      return [("all", csvio.find(os.path.join(root, folder),
                                 synthetic.BOX_FILE), _nih_rows, key)]
  raise UserError(f"{root}: no {synthetic.BOX_FILE} (nor "
                  f"{synthetic.CHEXPERT_FOLDER}/{synthetic.BOX_FILE}); a "
                  "synthetic data set generated before boxes were written "
                  "has none: delete its folder to generate it again")


def _vindr_files(root, options):
  # The reader's own choice of layout (its `variant` option, "auto" by
  # default).
  variant = vindr._variant(  # pylint: disable=protected-access
      root, options.get("variant", "auto"))
  if variant == "kaggle":
    return [("train_val", csvio.find(root, "train.csv"), _vindr_rows, "id")]
  out = [("train_val", csvio.find(root, VINDR_FILES["train_val"]),
          _vindr_rows, "id")]
  if csvio.exists(root, VINDR_FILES["test"]):
    out.append(("test", csvio.find(root, VINDR_FILES["test"]), _vindr_rows,
                "id"))
  return out


def _rsna_files(root, options):
  del options
  return [("all", csvio.find(root, RSNA_FILE), _rsna_rows, "id")]


_FILES = {"nih": _nih_files, "vindr": _vindr_files, "rsna": _rsna_files,
          "synthetic": _synthetic_files}


def _nih_rows(path: str, bad: _Bad) -> list[_Row]:
  """Rows of a BBox_List_2017.csv, read by position (its header repeats
  the empty name, which csvio refuses)."""
  text = csvio.read_text(path)
  reader = csv.reader(io.StringIO(text, newline=""))
  try:
    header = [h.strip() for h in next(reader, [])]
    rows, lines, start = [], [], reader.line_num + 1
    for row in reader:
      rows.append(row)
      lines.append(start)
      start = reader.line_num + 1
  except csv.Error as e:
    raise UserError(f"{path}: line {reader.line_num}: bad CSV ({e})") from e
  if tuple(header[:6]) != NIH_COLUMNS or any(header[6:]):
    raise UserError(f"{path}: header {','.join(header)!r}; expected "
                    "'Image Index,Finding Label,Bbox [x,y,w,h]' (and empty "
                    "columns), as NIH publishes it")
  out = []
  for row, line in zip(rows, lines):
    if not row:
      continue
    if len(row) < 6 or len(row) > max(6, len(header)) or any(
        f.strip() for f in row[6:]):
      bad(path, line, f"{len(row)} fields; expected Image Index, Finding "
          "Label, x, y, w, h (and empty fields)")
      continue
    out.append(_Row(key=row[0].strip(), label=row[1].strip(),
                    numbers=tuple(row[2:6]), corners=False, source=path,
                    line=line))
  return out


def _vindr_rows(path: str, bad: _Bad) -> list[_Row]:
  """Box rows of a VinDr annotations file or Kaggle's train.csv; rows
  without coordinates ("No finding") are no boxes."""
  table = csvio.read_table(path, VINDR_COLUMNS, only_required=True)
  out = []
  for i in range(len(table)):
    numbers = tuple(str(table[c][i]) for c in VINDR_COLUMNS[2:])
    label = str(table["class_name"][i]).strip()
    line = int(table.lines[i])
    if not any(n.strip() for n in numbers):
      if label.lower() not in _NO_FINDING:
        bad(path, line, f"class_name {label!r} has no box (x_min, y_min, "
            "x_max, y_max are empty)")
      continue
    out.append(_Row(key=str(table["image_id"][i]).strip(), label=label,
                    numbers=numbers, corners=True, source=path, line=line))
  return out


def _rsna_rows(path: str, bad: _Bad) -> list[_Row]:
  """The rows of stage_2_train_labels.csv with a box, boxes of "Pneumonia"
  (`rsna.read`, run first, has checked that these are the Target 1 rows)."""
  del bad
  columns = ("x", "y", "width", "height")
  table = csvio.read_table(path, ("patientId",) + columns,
                           only_required=True)
  out = []
  for i in range(len(table)):
    numbers = tuple(str(table[c][i]) for c in columns)
    if not any(n.strip() for n in numbers):
      continue  # Target 0: no box
    out.append(_Row(key=str(table["patientId"][i]).strip(), label="Pneumonia",
                    numbers=numbers, corners=False, source=path,
                    line=int(table.lines[i])))
  return out


# ---------------------------------------------------------------------------
# Joining rows to the index.


def _keys(index: index_lib.Index, key: str) -> dict[str, int]:
  """The image names the box file uses -> index rows. `key`: "id" (VinDr's
  and RSNA's image ids, which their indexes keep as patients), "name" (the
  file name) or "path" (the index path)."""
  if key == "id":
    names = index.patients
  elif key == "path":
    names = index.paths
  else:
    names = tuple(p.rsplit("/", 1)[-1] for p in index.paths)
  return {n: i for i, n in enumerate(names)}


def _join(rows: list[_Row], index: index_lib.Index, key: str, bad: _Bad):
  """(boxes, not counted by the rule, of unknown image size)."""
  keys = _keys(index, key)
  columns = {n: j for j, n in enumerate(index.label_names)}
  findings = ", ".join(n for n in index.label_names
                       if n.lower() not in _NO_FINDING)
  aliases = NIH_ALIASES if index.dataset == "nih" else {}
  boxes, not_counted, unchecked, sizes = [], 0, 0, {}
  for r in rows:
    numbers = []
    for name, text in zip(("x_min", "y_min", "x_max", "y_max") if r.corners
                          else ("x", "y", "width", "height"), r.numbers):
      try:
        value = float(text)
      except ValueError:
        value = math.nan
      if not math.isfinite(value):
        bad(r.source, r.line, f"{name} is {text!r}; expected a number")
        break
      numbers.append(value)
    else:
      x, y, w, h = numbers
      if r.corners:
        w, h = w - x, h - y
      row = keys.get(r.key)
      label = aliases.get(r.label, r.label)
      if w <= 0 or h <= 0:
        bad(r.source, r.line, f"box width {w:g} and height {h:g}; both "
            "must be positive")
      elif row is None:
        bad(r.source, r.line, f"image {r.key!r} is not in the "
            f"{index.dataset} labels ({index.split}) of {index.root}")
      elif label not in columns or label.lower() in _NO_FINDING:
        bad(r.source, r.line, f"label {r.label!r} is not one of the "
            f"{index.dataset} findings: {findings}")
      else:
        path = index.paths[row]
        if path not in sizes:
          sizes[path] = image_hw(os.path.join(index.root, path))
        outside = sizes[path] and _outside(x, y, w, h, *sizes[path])
        if outside:
          bad(r.source, r.line, outside)
        elif index.dataset == "vindr" and index.labels[
            row, columns[label]] != 1:
          not_counted += 1
        else:
          unchecked += sizes[path] is None
          boxes.append(Box(image=path, label=label, x=x, y=y, width=w,
                           height=h, source=r.source, line=r.line))
  return boxes, not_counted, unchecked


def image_hw(path: str) -> tuple[int, int] | None:
  """(height, width) from an image file's header; None if it is not there
  or its header cannot be read (`verify` reports such images)."""
  if not os.path.isfile(path):
    return None
  try:
    if path.lower().endswith((".dcm", ".dicom")):
      import pydicom  # pylint: disable=g-import-not-at-top
      ds = pydicom.dcmread(path, stop_before_pixels=True)
      return int(ds.Rows), int(ds.Columns)
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(path) as img:  # reads the header only
      return img.size[1], img.size[0]
  except Exception:  # pylint: disable=broad-except
    return None


# ---------------------------------------------------------------------------
# The command.


def counts(boxes: Boxes, split: str | None) -> dict:
  """The command's JSON object (see the module docstring)."""
  per_label = {n: 0 for n in boxes.label_names}
  for b in boxes.boxes:
    per_label[b.label] += 1
  return {
      "dataset": boxes.dataset, "root": boxes.root, "split": split,
      "images": len({b.image for b in boxes.boxes}),
      "boxes": len(boxes.boxes),
      "labels": {n: c for n, c in per_label.items() if c},
      "skipped": boxes.skipped, "not_counted": boxes.not_counted,
      "unchecked": boxes.unchecked,
  }


def main(argv: Sequence[str] | None = None) -> int:
  with errors.exit_on_user_error("medbridge_jax.data.boxes"):
    p = cli.parser(__doc__.splitlines()[0])
    p.set_defaults(split=None)
    p.add_argument("--on_bad_box", default="raise", choices=ON_BAD_BOX,
                   help="a bad row is an error (raise) or dropped and "
                   "counted (skip)")
    args = p.parse_args(argv)
    options = cli.reader_options(args.option)
    cli.check_options(args.dataset, options)
    boxes = read(args.dataset, args.root, args.split,
                 on_bad_box=args.on_bad_box, **options)
    print(json.dumps(counts(boxes, args.split), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
