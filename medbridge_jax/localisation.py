"""Localisation metrics: do per-label evidence maps point at the findings
radiologists boxed?

Numpy on the host. Maps are (B, L, H, W): one per image and label, in pixels
of the stored (letterboxed) image; `boxes_for` puts a data set's boxes into
the same pixels. `Accumulator` scores one evaluation batch at a time and
keeps only per-pair results, so no evaluation holds every map.

Pixels: pixel (r, c) is row r, column c, (0, 0) the top-left one; it covers
[c, c + 1) x [r, r + 1) of the continuous coordinates of `boxes.Box`. A box
becomes the inclusive pixel bounds (y0, x0, y1, x1) of every pixel it
overlaps with positive area (x0 = floor(x), x1 = ceil(x + width) - 1), so a
box is never empty however small it scales; pixel (r, c) is in it when
y0 <= r <= y1 and x0 <= c <= x1.

Pairs: an (image, label) is scored where the label is positive on the image
(raw code 1) and the image has at least one box of that label; a negative
label has nothing to point at. Pairs are kept in (row, label) order.

Pointing game: a hit where the map's maximum lies in any box of the label.
The maximum is the first in row-major order (`np.argmax` of the flattened
map), so a flat map points at the top-left pixel. Chance: the hit rate of a
point drawn uniformly over the map, i.e. the share of its pixels covered by
the union of the label's boxes (letterbox padding counts: the map covers it),
averaged over the pairs.

IoU hit: the map is binarised at `fraction` of its range (pixels >= min +
fraction * (max - min): the min-max rescaled map thresholded at
`fraction`, so an offset or negative map binarises like a non-negative one);
the predicted box is the bounding box of all those pixels (no
connected-component step, so no choice of component: a map split between two
places gets one box spanning both). A hit where the IoU (in pixels, inclusive
bounds) with any box of the label is >= `iou`. The default 0.1 is the lowest
of the T(IoU) thresholds 0.1 to 0.7 that ChestX-ray8 (Wang et al. 2017)
reports, suited to coarse maps learnt from image labels; pass stricter ones
to compare at those.
Chance: the hit rate of a box of the predicted box's size at a position drawn
uniformly over every placement inside the map (integer top-left corners), so
large boxes do not score by size alone.

Intervals resample patients with `metrics.resample_weights`: the groups are
the patients of the pairs (every label's), numbered by first appearance in
pair order, and one resample serves every label, as in
`metrics.bootstrap_auroc_ci`. A label's rate in a resample is its weighted
hits over its weighted pairs, skipped where it has none; the mean is over
the labels with pairs.
"""

import dataclasses
import math
import os
from typing import Mapping, Sequence

import numpy as np

from medbridge_jax import metrics
from medbridge_jax import report
from medbridge_jax.data import boxes as boxes_lib
from medbridge_jax.data import index as index_lib
from medbridge_jax.data import labels as labels_lib
from medbridge_jax.errors import UserError

PixelBox = tuple[int, int, int, int]  # (y0, x0, y1, x1), inclusive.
FRACTION, IOU, LEVEL = 0.5, 0.1, 0.95
# Scaled corners a hair past an integer are float noise, not a new pixel.
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """Boxes per index row and label, in pixels of the maps.

  Attributes:
    label_names: the maps' labels (their axis 1), in order.
    size: (H, W) of the maps.
    boxes: per row, per label, a tuple of `PixelBox`; () where the image has
      no box of that label.
    positive: bool (rows, labels): the label is positive on the image.
    left_out: boxes not used: their image is not in the index or their
      label is none of `label_names`.
  """

  label_names: tuple[str, ...]
  size: tuple[int, int]
  boxes: tuple[tuple[tuple[PixelBox, ...], ...], ...]
  positive: np.ndarray
  left_out: int = 0

  def __post_init__(self):
    h, w = self.size
    shape = (len(self.boxes), len(self.label_names))
    if np.shape(self.positive) != shape:
      raise ValueError(f"positive has shape {np.shape(self.positive)}, "
                       f"expected {shape}")
    for i, row in enumerate(self.boxes):
      if len(row) != shape[1]:
        raise ValueError(f"row {i} has boxes for {len(row)} labels, "
                         f"expected {shape[1]}")
      for cell in row:
        for y0, x0, y1, x1 in cell:
          if not 0 <= y0 <= y1 < h or not 0 <= x0 <= x1 < w:
            raise ValueError(f"row {i}: box {(y0, x0, y1, x1)} is not "
                             f"inside the {h} x {w} map")

  def __len__(self) -> int:
    return len(self.boxes)

  def select(self, rows: Sequence[int]) -> "GroundTruth":
    """The ground truth of these rows, in that order (as `Index.select`)."""
    rows = [int(r) for r in rows]
    return dataclasses.replace(self, boxes=tuple(self.boxes[r] for r in rows),
                               positive=self.positive[rows])

  def scored_rows(self) -> list[int]:
    """Rows with a box of a positive label: the images there is to score."""
    return [i for i, row in enumerate(self.boxes)
            if any(self.positive[i, j] and cell for j, cell in enumerate(row))]


def pixel_box(box: boxes_lib.Box, size: tuple[int, int]) -> PixelBox:
  """The inclusive pixel bounds of every pixel a (scaled) box overlaps, in
  a map of `size` = (H, W) (see the module docstring)."""
  h, w = size
  x0, y0, x1, y1 = box.corners
  r0, c0 = math.floor(y0 + _EPS), math.floor(x0 + _EPS)
  r1 = max(r0, math.ceil(y1 - _EPS) - 1)
  c1 = max(c0, math.ceil(x1 - _EPS) - 1)
  return (min(max(r0, 0), h - 1), min(max(c0, 0), w - 1),
          min(max(r1, 0), h - 1), min(max(c1, 0), w - 1))


def boxes_for(index: index_lib.Index, boxes: boxes_lib.Boxes,
              label_names: Sequence[str], image_size: int, *,
              sizes: Mapping[str, tuple[int, int]] | None = None
              ) -> GroundTruth:
  """The boxes of every index row and label, in the stored image's pixels.

  Args:
    index: the evaluated split (raw or harmonised to `label_names`); its
      rows are the maps' rows.
    boxes: `boxes.read(...)` of the same data set folder; a box joins the
      row whose `Index.paths` entry is its `image`.
    label_names: the maps' labels. A box counts for every label its own
      label gives by meaning, as `labels.harmonise` matches columns
      (Effusion boxes are Pleural Effusion's; Nodule and Mass boxes are Lung
      Lesion's where the data set has no Lung Lesion).
    image_size: the side of the stored square (`images.letterbox`), which
      is the maps' H and W.
    sizes: optional index path -> (height, width) of the image as published;
      images not in it are sized from their file's header
      (`boxes.image_hw`).

  Raises:
    UserError: a box's image size is unknown, or the box lies outside it.
  """
  label_names = tuple(label_names)
  size = (int(image_size), int(image_size))
  positive = labels_lib.harmonise(index, label_names).labels == (
      index_lib.POSITIVE)
  columns = {}
  for j, name in enumerate(label_names):
    for k in labels_lib.sources(boxes.label_names, name):
      columns.setdefault(boxes.label_names[k], []).append(j)
  rows_of = {}
  for i, path in enumerate(index.paths):
    rows_of.setdefault(path, []).append(i)
  cells = [[[] for _ in label_names] for _ in index.paths]
  hw_of, left_out = dict(sizes or {}), 0
  for box in boxes.boxes:
    rows, cols = rows_of.get(box.image), columns.get(box.label)
    if not rows or not cols:
      left_out += 1
      continue
    if box.image not in hw_of:
      hw_of[box.image] = boxes_lib.image_hw(
          os.path.join(index.root, box.image))
    if hw_of[box.image] is None:
      raise UserError(f"{box.where()}: the size of {box.image} is unknown: "
                      f"no readable image file under {index.root}")
    pixels = pixel_box(boxes_lib.scale_to(box, hw_of[box.image], size[0]),
                       size)
    for i in rows:
      for j in cols:
        cells[i][j].append(pixels)
  return GroundTruth(
      label_names=label_names, size=size,
      boxes=tuple(tuple(tuple(c) for c in row) for row in cells),
      positive=positive, left_out=left_out)


# ---------------------------------------------------------------------------
# One map against the boxes of its label.


def peak(heat: np.ndarray) -> tuple[int, int]:
  """(row, column) of the map's first maximum in row-major order."""
  r, c = divmod(int(np.argmax(heat)), heat.shape[1])
  return r, c


def predicted_box(heat: np.ndarray, fraction: float = FRACTION) -> PixelBox:
  """The bounding box of the pixels >= min + fraction * (max - min)."""
  heat = np.asarray(heat, np.float64)
  lo, hi = heat.min(), heat.max()
  # Rounding must not leave the maximum below its own threshold.
  on = heat >= min(lo + fraction * (hi - lo), hi)
  rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
  return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def _area(b: PixelBox) -> int:
  return (b[2] - b[0] + 1) * (b[3] - b[1] + 1)


def box_iou(a: PixelBox, b: PixelBox) -> float:
  """Intersection over union of two inclusive pixel boxes, in pixels."""
  ih = min(a[2], b[2]) - max(a[0], b[0]) + 1
  iw = min(a[3], b[3]) - max(a[1], b[1]) + 1
  inter = max(ih, 0) * max(iw, 0)
  return inter / (_area(a) + _area(b) - inter)


def covered(gt_boxes: Sequence[PixelBox], size: tuple[int, int]) -> float:
  """The share of a (H, W) map's pixels in the union of `gt_boxes`."""
  union = np.zeros(size, bool)
  for y0, x0, y1, x1 in gt_boxes:
    union[y0:y1 + 1, x0:x1 + 1] = True
  return float(union.mean())


def placement_chance(hw: tuple[int, int], gt_boxes: Sequence[PixelBox],
                     size: tuple[int, int], iou: float = IOU) -> float:
  """The share of placements of an (h, w) box inside a (H, W) map (all
  integer top-left corners) whose IoU with any of `gt_boxes` is >= iou."""
  (h, w), (big_h, big_w) = hw, size
  tops, lefts = np.arange(big_h - h + 1), np.arange(big_w - w + 1)
  hit = np.zeros((tops.size, lefts.size), bool)
  for b in gt_boxes:
    y0, x0, y1, x1 = b
    iy = np.clip(np.minimum(tops + h - 1, y1) - np.maximum(tops, y0) + 1, 0,
                 None)
    ix = np.clip(np.minimum(lefts + w - 1, x1) - np.maximum(lefts, x0) + 1, 0,
                 None)
    inter = iy[:, None] * ix[None, :]
    hit |= inter / (h * w + _area(b) - inter) >= iou
  return float(hit.mean())


# ---------------------------------------------------------------------------
# Batches of maps.


@dataclasses.dataclass(frozen=True)
class Scores:
  """One metric's result per pair, pairs in (row, label) order."""
  rows: np.ndarray  # (P,) int64 index rows.
  labels: np.ndarray  # (P,) int64 label columns.
  hit: np.ndarray  # (P,) bool.
  chance: np.ndarray  # (P,) float64: the pair's hit probability by chance.

  @staticmethod
  def concat(parts: Sequence["Scores"]) -> "Scores":
    """The pairs of every part, sorted into (row, label) order."""
    fields = [np.concatenate([getattr(p, f.name) for p in parts])
              if parts else np.zeros(0, t)
              for f, t in zip(dataclasses.fields(Scores),
                              (np.int64, np.int64, bool, np.float64))]
    order = np.lexsort((fields[1], fields[0]))
    return Scores(*(f[order] for f in fields))


def _check(fraction: float, iou: float) -> None:
  if not 0 <= fraction <= 1:
    raise UserError(f"localisation fraction {fraction} is not in [0, 1]")
  if not 0 < iou <= 1:
    raise UserError(f"localisation iou threshold {iou} is not in (0, 1]")


def _pairs(maps, gt: GroundTruth, rows):
  """(maps as numpy, [(batch position, row, label)] of the scored pairs)."""
  maps = np.asarray(maps)
  rows = (np.arange(len(gt)) if rows is None
          else np.asarray(rows, np.int64).reshape(-1))
  want = (rows.size, len(gt.label_names)) + gt.size
  if maps.shape != want:
    raise ValueError(f"maps have shape {maps.shape}, expected {want} (rows, "
                     "labels, H, W)")
  if rows.size and rows.max() >= len(gt):
    raise ValueError(f"row {rows.max()} is not one of the {len(gt)} rows")
  out = []
  for b, row in enumerate(rows):
    if row < 0:  # Padding of the last evaluation batch.
      continue
    for j, cell in enumerate(gt.boxes[row]):
      if cell and gt.positive[row, j]:
        out.append((b, int(row), j))
  return maps, out


def _heat(maps, b, row, j, gt):
  heat = np.asarray(maps[b, j], np.float64)
  if not np.isfinite(heat).all():
    raise ValueError(f"the {gt.label_names[j]} map of row {row} is not "
                     "finite")
  return heat


def _scores(found, hit, chance) -> Scores:
  return Scores(rows=np.array([r for _, r, _ in found], np.int64),
                labels=np.array([j for _, _, j in found], np.int64),
                hit=np.array(hit, bool), chance=np.array(chance, np.float64))


def pointing_game(maps, gt: GroundTruth, rows=None) -> Scores:
  """Pointing-game hits and chance of every pair in `maps`.

  Args:
    maps: (B, L, H, W) evidence maps (numpy or jax, any float dtype).
    gt: from `boxes_for`, with L labels and (H, W) maps.
    rows: (B,) the index row of each map; -1 marks padding. None: all of
      gt's rows, in order.
  """
  maps, found = _pairs(maps, gt, rows)
  hit, chance = [], []
  for b, row, j in found:
    r, c = peak(_heat(maps, b, row, j, gt))
    cell = gt.boxes[row][j]
    hit.append(any(y0 <= r <= y1 and x0 <= c <= x1
                   for y0, x0, y1, x1 in cell))
    chance.append(covered(cell, gt.size))
  return _scores(found, hit, chance)


def iou_hit(maps, gt: GroundTruth, rows=None, *, fraction: float = FRACTION,
            iou: float = IOU) -> Scores:
  """IoU hits (predicted box vs any box of the label, IoU >= `iou`) and
  chance (the predicted box at random positions); arguments as for
  `pointing_game`."""
  _check(fraction, iou)
  maps, found = _pairs(maps, gt, rows)
  hit, chance = [], []
  for b, row, j in found:
    box = predicted_box(_heat(maps, b, row, j, gt), fraction)
    cell = gt.boxes[row][j]
    hit.append(max(box_iou(box, g) for g in cell) >= iou)
    chance.append(placement_chance((box[2] - box[0] + 1, box[3] - box[1] + 1),
                                   cell, gt.size, iou))
  return _scores(found, hit, chance)


class Accumulator:
  """Scores evaluation batches as they come; keeps per-pair results only."""

  def __init__(self, gt: GroundTruth, *, fraction: float = FRACTION,
               iou: float = IOU):
    _check(fraction, iou)
    self.gt, self.fraction, self.iou = gt, fraction, iou
    self._seen = np.zeros(len(gt), bool)
    self._pointing, self._iou = [], []

  def add(self, rows, maps) -> None:
    """Scores one batch: `maps` (B, L, H, W) of index `rows` (B,), -1 for
    padding. A row added twice is an error (it would count twice)."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    pointing = pointing_game(maps, self.gt, rows)  # Checks rows and maps.
    hits = iou_hit(maps, self.gt, rows, fraction=self.fraction, iou=self.iou)
    real = rows[rows >= 0]
    unique, counts = np.unique(real, return_counts=True)
    again = unique[(counts > 1) | self._seen[unique]]
    if again.size:
      raise ValueError(f"row {again[0]} added twice")
    self._seen[real] = True
    self._pointing.append(pointing)
    self._iou.append(hits)

  def scores(self) -> tuple[Scores, Scores]:
    """(pointing game, IoU hit) of every pair added, in (row, label)
    order."""
    return Scores.concat(self._pointing), Scores.concat(self._iou)

  def summary(self, patients: Sequence, *, bootstrap: int = 0,
              seed: int = 0, level: float = LEVEL) -> dict:
    """As `summarize`, over the batches added."""
    pointing, hits = self.scores()
    return _summary(pointing, hits, self.gt, patients, bootstrap, seed,
                    level, self.fraction, self.iou)


def summarize(maps, gt: GroundTruth, patients: Sequence, *,
              bootstrap: int = 0, seed: int = 0, level: float = LEVEL,
              fraction: float = FRACTION, iou: float = IOU) -> dict:
  """Pointing game and IoU hit per label and over labels, for metrics.jsonl.

  Args:
    maps: (N, L, H, W), one per row of `gt`.
    gt: from `boxes_for`.
    patients: (N,) each row's patient (`Index.patients`).
    bootstrap: patient-level resamples of the intervals (0: none).
    seed, level: the bootstrap's seed and the intervals' coverage.
    fraction, iou: the IoU hit's binarisation and threshold.

  Returns:
    {"fraction", "iou", "level", "num_resamples", "seed", "ci_unit"
    ("patients"), "num_patients" (patients with pairs), "labels": {name:
    entry}, "mean": entry + "labels" (those with pairs)}; an entry is
    {"pairs", "not_positive" (boxed pairs left out: label not positive),
    "pointing_game", "pointing_game_ci", "pointing_chance", "iou_hit",
    "iou_hit_ci", "iou_chance"}: plain floats, None where there are no
    pairs (or intervals).
  """
  acc = Accumulator(gt, fraction=fraction, iou=iou)
  acc.add(np.arange(len(gt)), maps)
  return acc.summary(patients, bootstrap=bootstrap, seed=seed, level=level)


def _rates(scores: Scores, num_labels: int, weights: np.ndarray
           ) -> np.ndarray:
  """(B, L) weighted hit rate per label under (B, P) pair weights."""
  onehot = scores.labels[:, None] == np.arange(num_labels)
  pairs = weights @ onehot
  hits = weights @ (onehot & scores.hit[:, None])
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(pairs > 0, hits / pairs, np.nan)


def _f(x):
  x = float(x)
  return x if np.isfinite(x) else None


def _summary(pointing: Scores, hits: Scores, gt: GroundTruth, patients,
             bootstrap: int, seed: int, level: float, fraction: float,
             iou: float) -> dict:
  patients = list(patients.tolist() if isinstance(patients, np.ndarray)
                  else patients)
  if len(patients) != len(gt):
    raise ValueError(f"patients has {len(patients)} entries for {len(gt)} "
                     "rows")
  names, n_labels = gt.label_names, len(gt.label_names)
  n_pairs = pointing.rows.size
  groups = [patients[r] for r in pointing.rows]
  point = {k: _rates(s, n_labels, np.ones((1, n_pairs)))[0]
           for k, s in (("pointing_game", pointing), ("iou_hit", hits))}
  ci = {k: np.full((n_labels, 2), np.nan) for k in point}
  mean_ci = {k: np.full(2, np.nan) for k in point}
  if bootstrap > 0 and n_pairs:
    weights, _ = metrics.resample_weights(groups, n_pairs, bootstrap, seed)
    for k, s in (("pointing_game", pointing), ("iou_hit", hits)):
      samples = _rates(s, n_labels, weights)
      ci[k] = np.stack([metrics.interval(samples[:, j], level)
                        for j in range(n_labels)])
      mean_ci[k] = metrics.interval(
          metrics.sample_means(samples, np.arange(n_labels)), level)
  count = np.bincount(pointing.labels, minlength=n_labels)
  chance = {k: np.bincount(s.labels, s.chance, n_labels)
            / np.maximum(count, 1) for k, s in (("pointing_chance", pointing),
                                                ("iou_chance", hits))}
  boxed = np.array([[bool(c) for c in row] for row in gt.boxes],
                   bool).reshape(len(gt), n_labels)
  not_positive = (boxed & ~gt.positive).sum(0)
  has = count > 0

  def entry(values, intervals, chances, pairs, left_out):
    return dict(
        pairs=int(pairs), not_positive=int(left_out),
        pointing_game=_f(values["pointing_game"]),
        pointing_game_ci=[_f(v) for v in intervals["pointing_game"]],
        pointing_chance=_f(chances["pointing_chance"]),
        iou_hit=_f(values["iou_hit"]),
        iou_hit_ci=[_f(v) for v in intervals["iou_hit"]],
        iou_chance=_f(chances["iou_chance"]))

  def over_labels(table):
    return {k: v[has].mean() if has.any() else np.nan
            for k, v in table.items()}

  labels = {}
  for j, name in enumerate(names):
    labels[name] = entry(
        {k: v[j] for k, v in point.items()}, {k: v[j] for k, v in ci.items()},
        {k: v[j] if has[j] else np.nan for k, v in chance.items()}, count[j],
        not_positive[j])
  mean = entry(over_labels(point), mean_ci, over_labels(chance), n_pairs,
               not_positive.sum())
  mean["labels"] = [n for n, h in zip(names, has) if h]
  return dict(fraction=float(fraction), iou=float(iou), level=float(level),
              num_resamples=max(int(bootstrap), 0), seed=int(seed),
              ci_unit="patients", num_patients=len(set(groups)),
              labels=labels, mean=mean)


def markdown(summary: dict) -> str:
  """A report.md section: per label pairs, pointing game and IoU hit with
  their intervals and chance levels, and the mean over labels."""
  pct = f"{round(100 * summary['level'])}% CI"
  head = ["Label", "Pairs", f"Pointing game [{pct}]", "Chance",
          f"IoU ≥ {summary['iou']:g} hit [{pct}]", "Chance"]
  out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * 5]

  def ci(bounds):
    if any(b is None for b in bounds):
      return ""
    return f" [{report.num(bounds[0])}, {report.num(bounds[1])}]"

  mean = summary["mean"]
  rows = list(summary["labels"].items()) + [
      (f"Mean ({len(mean['labels'])} label"
       f"{'' if len(mean['labels']) == 1 else 's'})", mean)]
  for name, e in rows:
    out.append("| " + " | ".join([
        name, str(e["pairs"]),
        report.num(e["pointing_game"]) + ci(e["pointing_game_ci"]),
        report.num(e["pointing_chance"]),
        report.num(e["iou_hit"]) + ci(e["iou_hit_ci"]),
        report.num(e["iou_chance"])]) + " |")
  if summary["num_resamples"]:
    note = (f"{pct}: {summary['num_resamples']} patient-level bootstrap "
            f"resamples over {summary['num_patients']} patients.")
  else:
    note = "No confidence intervals (no bootstrap resamples)."
  out += ["", "Pairs: images where the label is positive and boxed. Pointing "
          "game: the map's maximum falls in a box; chance: the boxes' share "
          "of the image. IoU hit: the box around pixels at or above "
          f"{summary['fraction']:g} of the map's range overlaps a box with "
          f"IoU ≥ {summary['iou']:g}; chance: that box placed at random. "
          + note]
  return "\n".join(out)
