"""Localisation metrics against brute-force loops and hand-computed cases.

The references walk pixels one by one (first maximum, box membership, the
union of boxes, IoU of pixel sets, every placement of a box) and share only
the documented conventions with the code: inclusive pixel bounds, the first
maximum in row-major order, the binarisation rule, and the bootstrap's draws
(patients numbered by first appearance in (row, label) order, resample b
drawing `rng.integers(0, G, G)` from one `np.random.default_rng(seed)`).
"""

import dataclasses

import numpy as np
import pytest

from medbridge_jax import localisation as loc
from medbridge_jax.data import boxes as boxes_lib
from medbridge_jax.data import registry
from medbridge_jax.errors import UserError
from tests import test_data_boxes as boxes_fixture

# ---------------------------------------------------------------------------
# Brute-force references.


def _in(r, c, box):
  y0, x0, y1, x1 = box
  return y0 <= r <= y1 and x0 <= c <= x1


def _first_max(heat):
  best, where = -np.inf, None
  for r in range(heat.shape[0]):
    for c in range(heat.shape[1]):
      if heat[r, c] > best:  # strictly: ties keep the earlier pixel
        best, where = heat[r, c], (r, c)
  return where


def _pixels(box):
  y0, x0, y1, x1 = box
  return {(r, c) for r in range(y0, y1 + 1) for c in range(x0, x1 + 1)}


def _set_iou(a, b):
  a, b = _pixels(a), _pixels(b)
  return len(a & b) / len(a | b)


def _covered_by_hand(cell, size):
  hits = sum(any(_in(r, c, b) for b in cell)
             for r in range(size[0]) for c in range(size[1]))
  return hits / (size[0] * size[1])


def _random_gt(rng, num_rows=12, labels=("A", "B", "C"), size=(9, 11),
               boxed=0.6, positive=0.8):
  """Random overlapping boxes, some labels boxed but not positive."""
  rows = []
  for _ in range(num_rows):
    row = []
    for _ in labels:
      cell = []
      if rng.random() < boxed:
        for _ in range(rng.integers(1, 4)):
          y0, x0 = rng.integers(0, size[0]), rng.integers(0, size[1])
          cell.append((int(y0), int(x0),
                       int(rng.integers(y0, size[0])),
                       int(rng.integers(x0, size[1]))))
      row.append(tuple(cell))
    rows.append(tuple(row))
  return loc.GroundTruth(
      label_names=labels, size=size, boxes=tuple(rows),
      positive=rng.random((num_rows, len(labels))) < positive)


def _random_maps(rng, gt):
  # Few distinct values: ties and plateaus everywhere.
  return rng.integers(0, 4, (len(gt), len(gt.label_names)) + gt.size
                      ).astype(np.float32)


def _pairs_by_hand(gt):
  return [(i, j) for i in range(len(gt))
          for j in range(len(gt.label_names))
          if gt.positive[i, j] and gt.boxes[i][j]]


# ---------------------------------------------------------------------------
# Boxes into pixels.


def _box(x, y, w, h):
  return boxes_lib.Box(image="i.png", label="Mass", x=x, y=y, width=w,
                       height=h, source="f.csv", line=2)


@pytest.mark.parametrize("box,want", [
    ((2, 3, 3, 2), (3, 2, 4, 4)),  # edges on pixel borders
    ((2.5, 3.2, 1, 1), (3, 2, 4, 3)),  # straddles: both pixels touched
    ((5.2, 1.4, 0.1, 0.1), (1, 5, 1, 5)),  # tiny: its one pixel
    ((1.9999999999, 0, 2.0000000002, 1), (0, 2, 0, 3)),  # float noise
    ((6, 7, 4, 5), (7, 6, 9, 7)),  # past the map: clipped
])
def test_pixel_box_is_every_pixel_the_box_overlaps(box, want):
  assert loc.pixel_box(_box(*box), (10, 8)) == want


def test_boxes_for_joins_scales_and_matches_labels_by_meaning(tmp_path):
  root = boxes_fixture._nih(tmp_path)  # pylint: disable=protected-access
  index = registry.read_index("nih", root, "all")
  found = boxes_lib.read("nih", root)
  card = "images_001/images/00000001_000.png"  # an empty file
  lesion = "images_002/images/00000004_000.png"  # a 100 x 80 (w x h) PNG
  names = ("Lung Lesion", "Cardiomegaly", "Infiltration", "Edema")
  with pytest.raises(UserError, match="line 2: the size of .*00000001_000"):
    loc.boxes_for(index, found, names, 50)
  gt = loc.boxes_for(index, found, names, 50, sizes={card: (1024, 1024)})
  assert gt.size == (50, 50) and gt.label_names == names
  row_card, row_lesion = index.paths.index(card), index.paths.index(lesion)
  # 1024 x 1024 into 50: scale 50 / 1024, no padding.
  x, y, w, h = (225.084745762712, 547.019216763771, 86.7796610169491,
                79.1864406779661)
  s = 50 / 1024
  want_card = (int(y * s), int(x * s), int(np.ceil((y + h) * s)) - 1,
               int(np.ceil((x + w) * s)) - 1)
  assert want_card == (26, 10, 30, 15)
  # 80 x 100 into 50: scale 1/2, 40 rows, 5 black rows on top.
  # Mass 5.5, 6, 20, 10 -> x 2.75..12.75, y 8..13; Nodule the whole image
  # -> x 0..50, y 5..45. Both are Lung Lesion's (NIH has no Lung Lesion).
  for i in range(len(index)):
    for j, name in enumerate(names):
      want = {(row_card, 1): (want_card,),
              # Infiltrate 10, 20, 30, 40: x 0.49..1.95, y 0.98..2.93.
          (row_card, 2): ((0, 0, 2, 1),),
              (row_lesion, 0): ((8, 2, 12, 12), (5, 0, 44, 49))
              }.get((i, j), ())
      assert gt.boxes[i][j] == want, (index.paths[i], name)
  # Infiltration is boxed but not among 00000001_000's findings.
  assert gt.positive[row_card].tolist() == [False, True, False, False]
  assert gt.positive[row_lesion].tolist() == [True, False, False, False]
  assert gt.left_out == 0
  # The test split holds 00000004_000 only; Mass alone is asked for.
  test = registry.read_index("nih", root, "test")
  gt = loc.boxes_for(test, found, ("Mass",), 50, sizes={card: (1024, 1024)})
  assert gt.boxes == ((((8, 2, 12, 12),),),)
  assert gt.left_out == 3  # Cardiomegaly, Infiltrate (elsewhere), Nodule


# ---------------------------------------------------------------------------
# Pointing game.


def test_pointing_game_matches_a_pixel_by_pixel_loop():
  rng = np.random.default_rng(0)
  gt = _random_gt(rng)
  maps = _random_maps(rng, gt)
  got = loc.pointing_game(maps, gt)
  pairs = _pairs_by_hand(gt)
  assert 10 < len(pairs) < 30
  assert list(zip(got.rows.tolist(), got.labels.tolist())) == pairs
  hits = [any(_in(*_first_max(maps[i, j]), b) for b in gt.boxes[i][j])
          for i, j in pairs]
  assert 0 < sum(hits) < len(hits)
  assert got.hit.tolist() == hits
  np.testing.assert_allclose(
      got.chance, [_covered_by_hand(gt.boxes[i][j], gt.size)
                   for i, j in pairs], rtol=0, atol=1e-12)


def test_chance_counts_overlapping_boxes_once():
  # 16 + 16 pixels overlapping in 4, and a box inside the first: 28 of 100.
  cell = ((0, 0, 3, 3), (2, 2, 5, 5), (1, 1, 2, 2))
  assert loc.covered(cell, (10, 10)) == pytest.approx(0.28)
  gt = loc.GroundTruth(("A",), (10, 10), (((cell),),), np.ones((1, 1), bool))
  assert loc.pointing_game(np.zeros((1, 1, 10, 10)), gt).chance.tolist() == [
      pytest.approx(0.28)]


def test_ties_point_at_the_first_maximum_in_row_major_order():
  size = (6, 6)
  heat = np.zeros(size)
  heat[1, 4] = heat[4, 1] = 1.0  # (1, 4) comes first
  box_first, box_second = (0, 3, 2, 5), (3, 0, 5, 2)
  gt = loc.GroundTruth(("A", "B"), size, (((box_first,), (box_second,)),),
                       np.ones((1, 2), bool))
  got = loc.pointing_game(np.stack([heat, heat])[None], gt)
  assert got.hit.tolist() == [True, False]
  # A flat map points at (0, 0).
  gt = loc.GroundTruth(("A", "B"), size, ((((0, 0, 0, 0),), (box_first,)),),
                       np.ones((1, 2), bool))
  assert loc.pointing_game(np.ones((1, 2) + size), gt).hit.tolist() == [
      True, False]


def test_negative_labels_and_unboxed_labels_are_not_pairs():
  size = (5, 5)
  miss = np.zeros(size)
  miss[4, 4] = 1.0  # outside every box
  gt = loc.GroundTruth(
      ("A", "B", "C"), size, ((((0, 0, 1, 1),), ((0, 0, 1, 1),), ()),),
      np.array([[True, False, True]]))
  maps = np.stack([miss, miss, miss])[None]
  got = loc.pointing_game(maps, gt)
  assert got.labels.tolist() == [0] and got.hit.tolist() == [False]
  summary = loc.summarize(maps, gt, ["p"])
  assert [summary["labels"][n]["pairs"] for n in "ABC"] == [1, 0, 0]
  assert [summary["labels"][n]["not_positive"] for n in "ABC"] == [0, 1, 0]
  assert summary["labels"]["B"]["pointing_game"] is None
  assert summary["mean"]["labels"] == ["A"]


# ---------------------------------------------------------------------------
# IoU hit.


def test_iou_hit_by_hand():
  heat = np.zeros((10, 10))
  heat[2:6, 3:7] = 1.0  # rows 2..5, columns 3..6: 16 pixels
  heat[9, 9] = 0.4
  assert loc.predicted_box(heat, 0.5) == (2, 3, 5, 6)
  assert loc.predicted_box(heat, 0.3) == (2, 3, 9, 9)  # the 0.4 joins
  # The threshold is on the map's range: offset and scale change nothing.
  assert loc.predicted_box(3 * heat - 7, 0.5) == (2, 3, 5, 6)
  assert loc.predicted_box(heat + 10, 0.3) == (2, 3, 9, 9)
  assert loc.predicted_box(heat, 1.0) == (2, 3, 5, 6)
  assert loc.predicted_box(np.full((4, 5), 2.0), 0.5) == (0, 0, 3, 4)
  # Box rows 4..7, columns 5..8: 4 pixels shared of 16 + 16 - 4 = 28.
  truth = (4, 5, 7, 8)
  assert loc.box_iou((2, 3, 5, 6), truth) == pytest.approx(4 / 28)
  gt = loc.GroundTruth(("A",), (10, 10), (((truth,),),), np.ones((1, 1), bool))
  maps = heat[None, None]
  assert loc.iou_hit(maps, gt, iou=0.1).hit.tolist() == [True]
  assert loc.iou_hit(maps, gt, iou=0.15).hit.tolist() == [False]
  # A far box, and one inside: IoU 0 and 4 / 16.
  gt = loc.GroundTruth(("A",), (10, 10), ((((8, 0, 9, 1), (3, 4, 4, 5)),),),
                       np.ones((1, 1), bool))
  assert loc.iou_hit(maps, gt, iou=0.25).hit.tolist() == [True]
  assert loc.iou_hit(maps, gt, iou=0.26).hit.tolist() == [False]


def test_box_iou_equals_the_iou_of_pixel_sets():
  rng = np.random.default_rng(1)
  for _ in range(200):
    a, b = (tuple(int(v) for v in (y0, x0, y0 + rng.integers(0, 5),
                                    x0 + rng.integers(0, 5)))
            for y0, x0 in rng.integers(0, 8, (2, 2)))
    assert loc.box_iou(a, b) == pytest.approx(_set_iou(a, b))


def test_iou_hit_and_its_chance_match_brute_force():
  rng = np.random.default_rng(2)
  gt = _random_gt(rng, num_rows=8, size=(7, 9))
  # A blob of random place and width on noise, offset: the threshold is on
  # the range, not a fraction of the maximum.
  rr, cc = np.indices(gt.size)
  shape = (len(gt), len(gt.label_names))
  cy, cx = rng.random(shape) * gt.size[0], rng.random(shape) * gt.size[1]
  width = rng.uniform(0.7, 3, shape)
  maps = 2 + np.exp(-((rr - cy[..., None, None]) ** 2
                      + (cc - cx[..., None, None]) ** 2)
                    / (2 * width[..., None, None] ** 2))
  maps += 0.1 * rng.random(maps.shape)
  got = loc.iou_hit(maps, gt, fraction=0.6, iou=0.3)
  pairs = _pairs_by_hand(gt)
  assert list(zip(got.rows.tolist(), got.labels.tolist())) == pairs
  hits, chances, sizes = [], [], set()
  for i, j in pairs:
    heat = maps[i, j]
    thr = heat.min() + 0.6 * (heat.max() - heat.min())
    on = [(r, c) for r in range(heat.shape[0]) for c in range(heat.shape[1])
          if heat[r, c] >= thr]
    box = (min(r for r, _ in on), min(c for _, c in on),
           max(r for r, _ in on), max(c for _, c in on))
    cell = gt.boxes[i][j]
    hits.append(any(_set_iou(box, g) >= 0.3 for g in cell))
    h, w = box[2] - box[0] + 1, box[3] - box[1] + 1
    sizes.add((h, w))
    placed = [any(_set_iou((t, l, t + h - 1, l + w - 1), g) >= 0.3
                  for g in cell)
              for t in range(gt.size[0] - h + 1)
              for l in range(gt.size[1] - w + 1)]
    chances.append(np.mean(placed))
  assert 0 < sum(hits) < len(hits) and len(sizes) > 5
  assert got.hit.tolist() == hits
  assert 0 < np.mean(chances) < 1
  np.testing.assert_allclose(got.chance, chances, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------
# Summaries and the patient-level bootstrap.


def _patients_for(rng, n, num_patients):
  ids = [f"p{k:03d}" for k in rng.permutation(num_patients)]
  return [ids[k] for k in rng.integers(0, num_patients, n)]


def _reference_summary(hit_by_pair, chance_by_pair, pairs, patients,
                       num_labels, bootstrap, seed):
  """Per label (rate, interval) and the mean's, resampling explicit lists."""
  first = {}
  for i, _ in pairs:
    first.setdefault(patients[i], len(first))
  pairs_of = [[] for _ in first]
  for k, (i, _) in enumerate(pairs):
    pairs_of[first[patients[i]]].append(k)
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(bootstrap):
    picked = [k for g in rng.integers(0, len(first), len(first))
              for k in pairs_of[g]]
    rates = []
    for j in range(num_labels):
      mine = [hit_by_pair[k] for k in picked if pairs[k][1] == j]
      rates.append(np.mean(mine) if mine else np.nan)
    samples.append(rates)
  samples = np.array(samples)

  def interval(v):
    v = v[np.isfinite(v)]
    return np.quantile(v, [0.025, 0.975]) if v.size > 1 else [np.nan] * 2

  per_label = []
  for j in range(num_labels):
    mine = [k for k, p in enumerate(pairs) if p[1] == j]
    per_label.append((
        np.mean([hit_by_pair[k] for k in mine]) if mine else np.nan,
        interval(samples[:, j]),
        np.mean([chance_by_pair[k] for k in mine]) if mine else np.nan))
  means = [np.nanmean(s) for s in samples if np.isfinite(s).any()]
  return per_label, interval(np.array(means))


def _none_to_nan(values):
  return [np.nan if v is None else v for v in values]


def test_summary_intervals_resample_patients_like_a_brute_force_loop():
  rng = np.random.default_rng(3)
  gt = _random_gt(rng, num_rows=30, labels=("A", "B", "C", "D"))
  # D has one pair only: resamples without its patient skip it.
  positive = gt.positive.copy()
  positive[:, 3] = False
  first_d = next(i for i in range(len(gt)) if gt.boxes[i][3])
  positive[first_d, 3] = True
  gt = dataclasses.replace(gt, positive=positive)
  maps = _random_maps(rng, gt)
  patients = _patients_for(rng, len(gt), 9)
  got = loc.summarize(maps, gt, patients, bootstrap=40, seed=5,
                      fraction=0.5, iou=0.2)
  pairs = _pairs_by_hand(gt)
  for key, scores in (
      ("pointing_game", loc.pointing_game(maps, gt)),
      ("iou_hit", loc.iou_hit(maps, gt, fraction=0.5, iou=0.2))):
    chance_key = "pointing_chance" if key == "pointing_game" else "iou_chance"
    per_label, mean = _reference_summary(
        scores.hit.tolist(), scores.chance.tolist(), pairs, patients, 4, 40,
        5)
    for j, name in enumerate(gt.label_names):
      e = got["labels"][name]
      rate, interval, chance = per_label[j]
      assert e["pairs"] == sum(p[1] == j for p in pairs)
      np.testing.assert_allclose(e[key], rate, atol=1e-12)
      np.testing.assert_allclose(_none_to_nan(e[key + "_ci"]), interval,
                                 atol=1e-12)
      np.testing.assert_allclose(e[chance_key], chance, atol=1e-12)
    assert got["labels"]["A"][key + "_ci"][0] < got["labels"]["A"][
        key + "_ci"][1]
    np.testing.assert_allclose(got["mean"][key], np.mean(
        [r for r, _, _ in per_label]), atol=1e-12)
    np.testing.assert_allclose(got["mean"][key + "_ci"], mean, atol=1e-12)
    np.testing.assert_allclose(got["mean"][chance_key], np.mean(
        [c for _, _, c in per_label]), atol=1e-12)
  assert got["num_patients"] == len({patients[i] for i, _ in pairs})
  assert (got["ci_unit"], got["num_resamples"], got["seed"]) == (
      "patients", 40, 5)


def test_copying_every_image_within_its_patient_keeps_the_interval():
  """Twice the images of the same patients carry no new information: a
  patient-level interval must not move (an image-level one narrows)."""
  rng = np.random.default_rng(4)
  gt = _random_gt(rng, num_rows=60, labels=("A", "B"))
  maps = rng.random((len(gt), 2) + gt.size)
  patients = _patients_for(rng, len(gt), 25)
  twice = dataclasses.replace(gt, boxes=gt.boxes * 2,
                              positive=np.concatenate([gt.positive] * 2))
  kwargs = dict(bootstrap=400, seed=7)
  once = loc.summarize(maps, gt, patients, **kwargs)
  for key in ("pointing_game_ci", "iou_hit_ci"):
    lo, hi = once["labels"]["A"][key]
    assert 0 < hi - lo < 1
  doubled = loc.summarize(np.concatenate([maps, maps]), twice, patients * 2,
                          **kwargs)
  for name in ("A", "B"):
    for key in ("pointing_game", "pointing_game_ci", "iou_hit", "iou_hit_ci"):
      np.testing.assert_allclose(doubled["labels"][name][key],
                                 once["labels"][name][key], atol=1e-12)
    assert doubled["labels"][name]["pairs"] == 2 * once["labels"][name][
        "pairs"]
  # The same copies as new patients: the interval narrows, so the test above
  # can tell the two bootstraps apart.
  apart = loc.summarize(np.concatenate([maps, maps]), twice,
                        patients + [p + "'" for p in patients], **kwargs)
  def width(s):
    return np.mean([np.diff(s["labels"][n][k]) for n in ("A", "B")
                    for k in ("pointing_game_ci", "iou_hit_ci")])
  assert width(apart) < 0.85 * width(once)  # about 1 / sqrt(2)


# ---------------------------------------------------------------------------
# Streaming.


def test_accumulator_over_shuffled_padded_batches_equals_one_shot():
  rng = np.random.default_rng(5)
  gt = _random_gt(rng, num_rows=20)
  maps = rng.random((len(gt), len(gt.label_names)) + gt.size)
  patients = _patients_for(rng, len(gt), 8)
  want = loc.summarize(maps, gt, patients, bootstrap=30, seed=1)
  acc = loc.Accumulator(gt)
  order = rng.permutation(len(gt))
  for start in range(0, len(gt), 6):
    rows = np.full(6, -1)
    rows[:len(order[start:start + 6])] = order[start:start + 6]
    # Padding rows carry garbage, NaN included: it must be skipped.
    batch = np.where((rows >= 0)[:, None, None, None], maps[rows], np.nan)
    acc.add(rows, batch)
  assert acc.summary(patients, bootstrap=30, seed=1) == want
  for got, ref in zip(acc.scores(), (loc.pointing_game(maps, gt),
                                     loc.iou_hit(maps, gt))):
    for f in dataclasses.fields(ref):
      np.testing.assert_array_equal(getattr(got, f.name), getattr(ref, f.name))
  with pytest.raises(ValueError, match=f"row {order[0]} added twice"):
    acc.add(order[:1], maps[order[:1]])
  with pytest.raises(ValueError, match="row 3 added twice"):
    loc.Accumulator(gt).add([3, 3], maps[[3, 3]])


def test_accumulator_takes_jax_bfloat16_maps():
  jnp = pytest.importorskip("jax.numpy")
  rng = np.random.default_rng(6)
  gt = _random_gt(rng, num_rows=4)
  maps = _random_maps(rng, gt)  # small integers: exact in bfloat16
  acc = loc.Accumulator(gt)
  acc.add(np.arange(4), jnp.asarray(maps, jnp.bfloat16))
  assert acc.summary(["p"] * 4) == loc.summarize(maps, gt, ["p"] * 4)


# ---------------------------------------------------------------------------
# Edge cases and the report table.


def test_no_boxes_gives_none_everywhere():
  gt = loc.GroundTruth(("A", "B"), (4, 4), (((), ()),) * 3,
                       np.ones((3, 2), bool))
  s = loc.summarize(np.zeros((3, 2, 4, 4)), gt, ["a", "b", "c"],
                    bootstrap=10)
  for e in list(s["labels"].values()) + [s["mean"]]:
    assert e["pairs"] == 0
    assert e["pointing_game"] is None and e["iou_hit"] is None
    assert e["pointing_game_ci"] == [None, None]
    assert e["pointing_chance"] is None and e["iou_chance"] is None
  assert s["mean"]["labels"] == [] and s["num_patients"] == 0
  table = loc.markdown(s)
  assert "| A | 0 | n/a | n/a | n/a | n/a |" in table
  assert "| Mean (0 labels) | 0 | n/a | n/a | n/a | n/a |" in table


def test_bad_input_is_named():
  gt = loc.GroundTruth(("A",), (4, 4), ((((0, 0, 1, 1),),),),
                       np.ones((1, 1), bool))
  with pytest.raises(ValueError, match=r"maps have shape \(1, 1, 4, 5\)"):
    loc.pointing_game(np.zeros((1, 1, 4, 5)), gt)
  with pytest.raises(ValueError, match="the A map of row 0 is not finite"):
    loc.pointing_game(np.full((1, 1, 4, 4), np.nan), gt)
  with pytest.raises(ValueError, match="row 1 is not one of the 1 rows"):
    loc.pointing_game(np.zeros((1, 1, 4, 4)), gt, rows=[1])
  with pytest.raises(UserError, match="localisation fraction 1.5"):
    loc.Accumulator(gt, fraction=1.5)
  with pytest.raises(UserError, match="localisation iou threshold 0"):
    loc.iou_hit(np.zeros((1, 1, 4, 4)), gt, iou=0)
  with pytest.raises(ValueError, match="patients has 2 entries for 1 rows"):
    loc.summarize(np.zeros((1, 1, 4, 4)), gt, ["a", "b"])
  with pytest.raises(ValueError, match=r"box \(0, 0, 4, 1\) is not inside"):
    loc.GroundTruth(("A",), (4, 4), ((((0, 0, 4, 1),),),),
                    np.ones((1, 1), bool))


def test_markdown_table_from_a_summary():
  entry = dict(pairs=4, not_positive=0, pointing_game=0.5,
               pointing_game_ci=[0.125, 0.875], pointing_chance=0.0625,
               iou_hit=0.25, iou_hit_ci=[None, None], iou_chance=0.03125)
  summary = dict(fraction=0.5, iou=0.1, level=0.95, num_resamples=100,
                 seed=0, ci_unit="patients", num_patients=3,
                 labels={"Mass": entry},
                 mean=dict(entry, labels=["Mass"]))
  table = loc.markdown(summary).splitlines()
  assert table[0] == ("| Label | Pairs | Pointing game [95% CI] | Chance | "
                      "IoU ≥ 0.1 hit [95% CI] | Chance |")
  assert table[2] == ("| Mass | 4 | 0.500 [0.125, 0.875] | 0.062 | 0.250 | "
                      "0.031 |")
  assert table[3].startswith("| Mean (1 label) | 4 | 0.500 [0.125, 0.875]")
  assert "100 patient-level bootstrap resamples over 3 patients" in table[-1]
