"""predict --explain: overlays exactly for the positive and forced labels,
peaks equal to evidence maps computed apart from predict.py, coordinates
in the input file's pixels checked by hand, and runs evidence cannot
explain refused before anything loads.

One tiny runlocal run is trained in-process for the whole module (as in
test_predict.py).
"""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from medbridge_jax import checkpoints, errors, optim, overlays, predict
from medbridge_jax import report, train
from medbridge_jax.data import images, resolve
from medbridge_jax.experts import from_config
from tests import tiny_run

SIZE = 128  # tiny_run's data.image_size.
WIDE = (200, 300)  # (height, width) of the non-square input.


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  yield from tiny_run.private_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
  """(workdir, config, validation split) of one finished tiny run."""
  del cache
  config = tiny_run.tiny_config(**{"zero_shot.enabled": False,
                                   "eval.bootstrap": 0, "mesh.data": 1})
  assert config.data.image_size == SIZE
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(config, workdir)
  return workdir, config, resolve.resolve(config).valid


def _read_csv(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


def _probs(rows):
  return np.array([[float(x) for x in r[1:-1]] for r in rows])


def _thresholds(workdir):
  with open(os.path.join(workdir, "thresholds.json")) as f:
    table = json.load(f)["thresholds"]
  return {n: (np.nan if t is None else t) for n, t in table.items()}


@pytest.fixture(scope="module")
def explained(run, tmp_path_factory):
  """Three validation images and a 300 x 200 one made from a fourth,
  predicted without and then with --explain (one label forced)."""
  workdir, _, valid = run
  base = tmp_path_factory.mktemp("explain")
  inputs = base / "inputs"
  inputs.mkdir()
  for k, p in enumerate(valid.index.paths[:3]):
    shutil.copy(os.path.join(valid.index.root, p), inputs / f"v{k}.png")
  with Image.open(os.path.join(valid.index.root,
                               valid.index.paths[3])) as img:
    img.convert("L").resize(WIDE[::-1]).save(inputs / "wide.png")
  plain = str(base / "plain.csv")
  predict.run(workdir, [str(inputs)], output=plain)
  header, rows = _read_csv(plain)
  labels = header[1:-1]
  # Force the label positive least often, so forcing shows.
  thresholds = _thresholds(workdir)
  probs = _probs(rows)
  hits = [(probs[:, i] >= thresholds[n]).sum() for i, n in enumerate(labels)]
  forced = labels[int(np.argmin(hits))]
  folder = str(base / "out" / "explained")  # Made, parents too.
  with_maps = str(base / "explained.csv")
  result = predict.run(workdir, [str(inputs)], output=with_maps,
                       explain=folder, explain_labels=forced)
  return dict(result=result, folder=folder, forced=forced, labels=labels,
              plain=rows, rows=_read_csv(with_maps)[1],
              thresholds=thresholds)


def _json(folder, stem):
  with open(os.path.join(folder, f"{stem}.json")) as f:
    return json.load(f)


def test_overlays_exactly_for_positive_and_forced_labels(explained):
  e = explained
  labels, folder, forced = e["labels"], e["folder"], e["forced"]
  # The CSV is the one prediction without --explain writes.
  assert [r[0] for r in e["rows"]] == [r[0] for r in e["plain"]]
  np.testing.assert_allclose(_probs(e["rows"]), _probs(e["plain"]),
                             atol=1e-6, rtol=0)
  assert [r[-1] for r in e["rows"]] == [r[-1] for r in e["plain"]]

  want_png, forced_negative = set(), 0
  for row, p in zip(e["rows"], _probs(e["rows"])):
    stem = os.path.splitext(os.path.basename(row[0]))[0]
    positive = {n for n, v in zip(labels, p) if v >= e["thresholds"][n]}
    forced_negative += forced not in positive
    explained_ = positive | {forced}
    want_png |= {f"{stem}_{report.slug(n)}.png" for n in explained_}
    body = _json(folder, stem)
    assert body["path"] == row[0]
    assert body["checkpoint_step"] == e["result"]["step"]
    assert set(body["labels"]) == explained_
    assert body["positive_labels"] == [n for n in labels if n in positive]
    for n, entry in body["labels"].items():
      i = labels.index(n)
      assert entry["probability"] == pytest.approx(p[i], abs=1e-6)
      t = e["thresholds"][n]
      assert (entry["threshold"] is None) == bool(np.isnan(t))
      if entry["threshold"] is not None:
        assert entry["threshold"] == pytest.approx(t)
      assert entry["positive"] == (n in positive)
      assert entry["forced"] == (n == forced)
      assert entry["overlay"] == f"{stem}_{report.slug(n)}.png"
      assert 1 <= len(entry["regions"]) <= predict.TOP_REGIONS
  # The forced label is explained where it is not positive too.
  assert forced_negative > 0
  files = set(os.listdir(folder))
  assert {f for f in files if f.endswith(".png")} == want_png
  assert {f for f in files if f.endswith(".json")} == {
      f"{s}.json" for s in ("v0", "v1", "v2", "wide")}
  assert e["result"]["explained"] == dict(
      folder=folder, images=4, overlays=len(want_png))


def _independent_maps(workdir, config, labels, paths):
  """Evidence maps and probabilities of `paths` from the best checkpoint,
  built apart from predict.py (as test_predict's reference is)."""
  import jax  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import evidence  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import medbridge  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import partition  # pylint: disable=g-import-not-at-top
  experts = from_config.load(config)
  model = medbridge.build(config, experts, labels)
  params = medbridge.init_params(model, jax.random.key(1), experts, SIZE)
  trainable, frozen = partition.split(params)
  tx = optim.make(config.train)
  state = dict(step=jax.numpy.zeros((), jax.numpy.int32), params=trainable,
               opt_state=tx.init(trainable))
  ckpt = checkpoints.Checkpointer(workdir, 2)
  restored, _ = ckpt.restore_best(state, config.to_dict())
  ckpt.close()
  merged = partition.merge(restored["params"], frozen)
  stored = np.stack([images.read_image(p, SIZE) for p in paths])
  maps, info = jax.jit(lambda p, x: evidence.maps(model, p, x))(
      merged, stored)
  return stored, np.asarray(maps), np.asarray(jax.nn.sigmoid(info["logits"]))


def test_peaks_and_overlays_follow_independent_evidence_maps(run, explained):
  workdir, config, _ = run
  e = explained
  paths = [r[0] for r in e["rows"]]
  stored, maps, probs = _independent_maps(workdir, config, e["labels"],
                                          paths)
  np.testing.assert_allclose(probs, _probs(e["rows"]), atol=1e-5)
  checked = 0
  for k, path in enumerate(paths):
    stem = os.path.splitext(os.path.basename(path))[0]
    for n, entry in _json(e["folder"], stem)["labels"].items():
      m = maps[k, e["labels"].index(n)]
      y, x = np.unravel_index(np.argmax(m), m.shape)
      peak = entry["regions"][0]
      assert (peak["stored"]["y"], peak["stored"]["x"]) == (y, x), (stem, n)
      assert peak["score"] == pytest.approx(float(m.max()), rel=1e-4)
      with Image.open(os.path.join(e["folder"], entry["overlay"])) as img:
        got = np.asarray(img.convert("RGB")).astype(int)
      want = overlays.overlay(stored[k], m).astype(int)
      assert np.abs(got - want).max() <= 1  # Rounding of float maps.
      checked += 1
  assert checked >= len(paths)


def test_original_coordinates_of_a_non_square_input(explained):
  body = _json(explained["folder"], "wide")
  coords = body["coordinates"]
  assert (coords["stored"]["height"], coords["stored"]["width"]) == (SIZE,
                                                                     SIZE)
  assert (coords["original"]["height"], coords["original"]["width"]) == WIDE
  # By hand: 300 -> 128, 200 -> round(200 * 128 / 300) = 85 rows, centred
  # at (128 - 85) // 2 = 21.
  box = coords["letterbox"]
  assert (box["top"], box["left"], box["height"], box["width"]) == (
      21, 0, 85, 128)
  # ... which is where images.letterbox puts a white 300 x 200 image.
  white = images.letterbox(np.full(WIDE, 255, np.uint8), SIZE)
  rows = np.nonzero(white.max(axis=1))[0]
  assert (rows[0], rows[-1] + 1 - rows[0]) == (21, 85)
  seen = 0
  for entry in body["labels"].values():
    for r in entry["regions"]:
      y, x = r["stored"]["y"], r["stored"]["x"]
      o = r["original"]
      if 21 <= y < 21 + 85:
        # The stored pixel's centre in the input's pixels.
        assert o["y"] == math.floor((y - 21 + 0.5) * 200 / 85)
        assert o["x"] == math.floor((x + 0.5) * 300 / 128)
        seen += 1
      else:
        assert o["y"] is None and o["x"] is None
      y0, x0, y1, x1 = r["stored"]["box"]
      if y1 < 21 or y0 >= 106:
        assert o["box"] is None
      else:
        assert o["box"] == [
            math.floor((max(y0, 21) - 21) * 200 / 85),
            math.floor(x0 * 300 / 128),
            math.ceil((min(y1, 105) + 1 - 21) * 200 / 85) - 1,
            math.ceil((x1 + 1) * 300 / 128) - 1]
  assert seen > 0


def test_original_point_and_box_by_hand():
  hw = WIDE
  # Stored (64, 64): rows (64 - 21 + 0.5) * 200 / 85 = 102.35, columns
  # 64.5 * 300 / 128 = 151.17.
  assert predict.original_point(64, 64, hw, SIZE) == (102, 151)
  assert predict.original_point(20, 64, hw, SIZE) is None  # Padding.
  assert predict.original_point(106, 64, hw, SIZE) is None
  # (105 - 21 + 0.5) * 200 / 85 = 198.8, 127.5 * 300 / 128 = 298.8.
  assert predict.original_point(105, 127, hw, SIZE) == (198, 298)
  assert predict.original_point(21, 0, hw, SIZE) == (1, 1)
  assert predict.original_box((0, 0, 127, 127), hw, SIZE) == (0, 0, 199,
                                                              299)
  # One stored pixel covers 200 / 85 = 2.35 rows and 2.34 columns.
  assert predict.original_box((21, 0, 21, 0), hw, SIZE) == (0, 0, 2, 2)
  assert predict.original_box((0, 0, 20, 127), hw, SIZE) is None
  # Upscaling: a 64 x 32 image is 128 x 64, centred at column 32.
  assert images.letterbox_geometry((64, 32), SIZE) == (0, 32, 128, 64)
  assert predict.original_point(5, 33, (64, 32), SIZE) == (2, 0)
  assert predict.original_box((4, 40, 7, 41), (64, 32), SIZE) == (2, 4, 3, 4)


def test_explain_labels_and_stems():
  names = ("Pleural Effusion", "Nodule", "Atelectasis")
  parse = predict.parse_explain_labels
  assert parse(None, names) == ()
  assert parse("all", names) == names
  assert parse("Atelectasis, pleural_effusion", names) == (
      "Pleural Effusion", "Atelectasis")
  with pytest.raises(errors.UserError,
                     match=r"'Mass' is not among the run's labels "
                           r"\(Pleural Effusion, Nodule, Atelectasis"):
    parse("Nodule,Mass", names)
  assert predict.unique_stems(["a/x.png", "b/x.dcm", "x-2.png", "c/x.jpg",
                               "y.png"]) == ["x", "x-2", "x-2-2", "x-3", "y"]


def _workdir_with_config(run, tmp_path, **changes):
  """A workdir holding the run's config.json (changed) and thresholds.json,
  and no checkpoint: only a check before loading can answer."""
  folder = tmp_path / "workdir"
  folder.mkdir()
  with open(os.path.join(run[0], "config.json")) as f:
    config = json.load(f)
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  with open(folder / "config.json", "w") as f:
    json.dump(config, f)
  shutil.copy(os.path.join(run[0], "thresholds.json"), folder)
  return str(folder)


@pytest.mark.parametrize("changes,message", [
    ({"model.queries.enabled": False},
     "has config.model.queries.enabled=False"),
    ({"model.queries.num_queries": 0},
     "has config.model.queries.num_queries=0"),
    ({"model.queries.mode": "joint"},
     "needs config.model.queries.mode='non_destructive'"),
    ({"method.name": "lora"}, "needs config.method.name='medbridge'"),
])
def test_unexplainable_runs_are_refused_before_loading(changes, message, run,
                                                       tmp_path):
  workdir = _workdir_with_config(run, tmp_path, **changes)
  bad = tmp_path / "corrupt.png"
  bad.write_bytes(b"not an image")
  folder = tmp_path / "explained"
  with pytest.raises(errors.UserError, match=message):
    predict.run(workdir, [str(bad)], output=str(tmp_path / "p.csv"),
                explain=str(folder))
  assert not folder.exists()
  # Without --explain the same workdir goes on to look for a checkpoint.
  with pytest.raises(errors.UserError, match="no best checkpoint"):
    predict.run(workdir, [str(bad)], output=str(tmp_path / "p.csv"))


def test_cli_refuses_queries_off_in_one_line(run, cache, tmp_path):
  workdir = _workdir_with_config(run, tmp_path,
                                 **{"model.queries.enabled": False})
  image = os.path.join(run[2].index.root, run[2].index.paths[0])
  env = dict(os.environ, MEDBRIDGE_CACHE=cache, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "medbridge_jax.predict", f"--workdir={workdir}",
       f"--inputs={image}", f"--explain={tmp_path}/out",
       "--explain_labels=all"],
      cwd=tiny_run.REPO, env=env, capture_output=True, text=True,
      timeout=120)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr
  assert lines[-1].startswith("medbridge_jax.predict: error: --explain "
                              "needs query tokens"), lines[-1]
  assert "config.model.queries.enabled=False" in lines[-1]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(f"{tmp_path}/out")


def test_explain_labels_need_explain(run, tmp_path):
  image = os.path.join(run[2].index.root, run[2].index.paths[0])
  with pytest.raises(errors.UserError, match="--explain_labels needs "
                                             "--explain"):
    predict.run(run[0], [image], output=str(tmp_path / "p.csv"),
                explain_labels="all")
