"""Prediction with a trained run: the CSV equals the evaluation pipeline's
probabilities, thresholds applied by hand, deterministic row order, and bad
input as one line on stderr with a non-zero exit.

One tiny runlocal run is trained in-process for the whole module.
"""

import csv
import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from medbridge_jax import checkpoints, errors, evaluate, experts_setup
from medbridge_jax import metrics, optim, predict, sharding, train
from medbridge_jax.data import resolve
from tests import tiny_run

REPO = tiny_run.REPO
PROGRAM = "medbridge_jax.predict"


def _config():
  """The tiny run without zero-shot; trained on one device (it compiles
  faster), while prediction uses all eight."""
  return tiny_run.tiny_config(**{"zero_shot.enabled": False,
                                 "eval.bootstrap": 0, "mesh.data": 1})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  yield from tiny_run.private_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
  """(workdir, config, validation EvalSet, final record) of one finished
  tiny run."""
  del cache
  config = _config()
  workdir = str(tmp_path_factory.mktemp("run"))
  record = train.train_and_evaluate(config, workdir)
  data = resolve.resolve(config)
  return workdir, config, data.eval, record


def _read_csv(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


def _thresholds(workdir):
  with open(os.path.join(workdir, "thresholds.json")) as f:
    return json.load(f)["thresholds"]


def _evaluation_probs(workdir, config, eval_set):
  """The evaluation pipeline's probabilities of every row of `eval_set`.

  Built apart from predict.py: towers through medbridge.init_params, the
  newest periodic checkpoint through Checkpointer.restore, rows through
  evaluate.predict's data pipeline.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import medbridge  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import partition  # pylint: disable=g-import-not-at-top
  experts = experts_setup.load(config)
  model = medbridge.build(config, experts, eval_set.index.label_names)
  params = medbridge.init_params(model, jax.random.key(1), experts,
                                 int(config.data.image_size))
  trainable, frozen = partition.split(params)
  tx = optim.make(config.train)
  state = dict(step=jax.numpy.zeros((), jax.numpy.int32), params=trainable,
               opt_state=tx.init(trainable))
  mesh = sharding.make_mesh(config.mesh)
  replicated = sharding.replicated(mesh)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      state)
  ckpt = checkpoints.Checkpointer(workdir, 2)
  restored, meta = ckpt.restore(abstract, config.to_dict())
  ckpt.close()
  assert meta["step"] == config.train.steps
  fn = functools.partial(evaluate.make_model_fn(model), restored["params"],
                         jax.device_put(frozen, replicated))
  probs, seen = evaluate.predict(fn, eval_set, int(config.eval.batch_size),
                                 mesh, config.data)
  assert seen.all()
  return probs


@pytest.fixture(scope="module")
def valid_csv(run, tmp_path_factory):
  """(result, header, rows) of predicting the run's whole validation folder."""
  workdir, _, eval_set, _ = run
  folder = os.path.join(eval_set.index.root, os.path.dirname(
      os.path.dirname(os.path.dirname(eval_set.index.paths[0]))))
  out = str(tmp_path_factory.mktemp("predict") / "valid.csv")
  result = predict.run(workdir, [folder], output=out)
  return (result, *_read_csv(out))


def _probs(rows):
  return np.array([[float(x) for x in r[1:-1]] for r in rows])


def test_probabilities_equal_the_evaluation_pipeline(run, valid_csv):
  workdir, config, eval_set, record = run
  result, header, rows = valid_csv
  root = eval_set.index.root
  assert result["rows"] == len(eval_set.index) and result["skipped"] == 0
  assert result["step"] == config.train.steps
  labels = list(eval_set.index.label_names)
  assert header == ["path"] + labels + ["positive_labels"]
  # One row per image, in sorted path order.
  paths = [r[0] for r in rows]
  assert paths == sorted(paths)
  assert sorted(os.path.relpath(p, root) for p in paths) == sorted(
      eval_set.index.paths)
  got = _probs(rows)
  want = _evaluation_probs(workdir, config, eval_set)
  order = [eval_set.index.paths.index(os.path.relpath(p, root))
           for p in paths]
  np.testing.assert_allclose(got, want[order], atol=1e-6, rtol=0)

  # The thresholds and the final metrics came from these very images.
  targets, mask = eval_set.targets[order], eval_set.mask[order]
  chosen = _thresholds(workdir)
  np.testing.assert_allclose(
      metrics.youden_thresholds(got, targets, mask),
      [np.nan if chosen[n] is None else chosen[n] for n in labels],
      atol=1e-6)
  summary = metrics.summarize(got, targets, mask, labels)
  assert summary.mean_auroc == pytest.approx(record["mean_auroc"], abs=1e-6)


def test_positive_labels_are_the_thresholds_applied(run, valid_csv):
  chosen = _thresholds(run[0])
  _, header, rows = valid_csv
  labels = header[1:-1]
  # Written exactly: the CSV's numbers are the float32 probabilities.
  for r, p in zip(rows, _probs(rows)):
    assert all(float(np.float32(v)) == v for v in p)
    want = [n for n, v in zip(labels, p)
            if chosen[n] is not None and v >= chosen[n]]
    assert r[-1] == ";".join(want)
  # Youden thresholds are scores that occur: some rows sit exactly on one.
  assert any(v == chosen[n] for p in _probs(rows) for n, v in zip(labels, p))
  assert any(r[-1] for r in rows) and not all(
      r[-1] == ";".join(labels) for r in rows)


def test_latest_checkpoint_and_explicit_files(run, valid_csv, tmp_path):
  workdir, _, eval_set, _ = run
  root = eval_set.index.root
  files = [os.path.join(root, p) for p in eval_set.index.paths[:3]]
  out = str(tmp_path / "latest.csv")
  # A comma-separated value, a repeat of a file: each image once, as given.
  result = predict.run(workdir, [f"{files[2]},{files[0]}", files[2],
                                 files[1]],
                       output=out, checkpoint="latest", batch_size=3)
  assert result["rows"] == 3
  _, rows = _read_csv(out)
  assert [r[0] for r in rows] == [files[2], files[0], files[1]]
  # The run's last checkpoint is also its best: the same probabilities
  # (from batches of another size).
  best = {os.path.realpath(r[0]): r for r in valid_csv[2]}
  np.testing.assert_allclose(
      _probs(rows), _probs([best[os.path.realpath(f)] for f in
                            [files[2], files[0], files[1]]]),
      atol=1e-6, rtol=0)


def test_find_images_order(tmp_path):
  for name in ["b/2.PNG", "b/1.dcm", "a/x.jpeg", "a/.hidden.png",
               ".git/y.png", "a/notes.txt", "c.jpg", "d/._z.png", "d/e.csv"]:
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
  base = str(tmp_path / "in")
  found = predict.find_images([f"{base}/c.jpg", base])
  assert [os.path.relpath(p, base) for p in found] == [
      "c.jpg", "a/x.jpeg", "b/1.dcm", "b/2.PNG"]
  with pytest.raises(errors.UserError, match="no images found"):
    predict.find_images([f"{base}/d"])
  with pytest.raises(errors.UserError, match="input not found: nope"):
    predict.find_images([base, "nope"])


def _cli(args, cache, timeout=300):
  env = dict(os.environ, MEDBRIDGE_CACHE=cache, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", PROGRAM] + args, cwd=REPO,
                        env=env, capture_output=True, text=True,
                        timeout=timeout)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  return proc.returncode, lines[-1] if lines else "", proc


def _copy_images(eval_set, folder, count):
  os.makedirs(folder, exist_ok=True)
  out = []
  for k, p in enumerate(eval_set.index.paths[:count]):
    dst = os.path.join(folder, f"{k}{os.path.splitext(p)[1]}")
    shutil.copy(os.path.join(eval_set.index.root, p), dst)
    out.append(dst)
  return out


def test_cli_corrupt_image(run, valid_csv, cache, tmp_path):
  workdir, _, eval_set, _ = run
  folder = str(tmp_path / "images")
  good = _copy_images(eval_set, folder, 2)
  bad = os.path.join(folder, "1b-corrupt.png")
  with open(bad, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n not really a png")

  out = str(tmp_path / "p.csv")
  code, last, proc = _cli([f"--workdir={workdir}", f"--inputs={folder}",
                           f"--output={out}"], cache)
  assert code == 2, proc.stderr
  assert last.startswith(f"{PROGRAM}: error: {bad}: cannot decode image")
  assert "--skip_bad" in last and "Traceback" not in proc.stderr
  assert not os.path.exists(out)

  # Skipped and counted. A fresh cache: the random experts are written again
  # and give the same probabilities. Words after the flags are inputs too
  # (a shell glob).
  fresh = str(tmp_path / "fresh-cache")
  code, _, proc = _cli([f"--workdir={workdir}", f"--inputs={good[0]}",
                        f"--output={out}", "--skip_bad", bad, good[1]],
                       fresh)
  assert code == 0, proc.stderr
  assert "1 unreadable image(s) skipped" in proc.stderr
  assert os.path.isdir(os.path.join(fresh, "experts"))
  _, rows = _read_csv(out)
  assert [r[0] for r in rows] == good
  by_path = {os.path.realpath(r[0]): r for r in valid_csv[2]}
  ref_rows = [by_path[os.path.realpath(os.path.join(eval_set.index.root, p))]
              for p in eval_set.index.paths[:2]]
  np.testing.assert_allclose(_probs(rows), _probs(ref_rows), atol=1e-6,
                             rtol=0)


def _workdir_with(tmp_path, run, *names):
  """A workdir holding only some of the run's files."""
  path = tmp_path / "-".join(names)
  path.mkdir()
  for name in names:
    shutil.copy(os.path.join(run[0], name), path / name)
  return str(path)


@pytest.mark.parametrize("case,message", [
    ("no_workdir_flag", "no workdir given"),
    ("missing_workdir", "workdir not found: "),
    ("no_config", "has no config.json"),
    ("unfinished", "has no thresholds.json: its run has not finished"),
    ("no_checkpoint", "no best checkpoint in "),
    ("missing_input", "input not found: "),
    ("no_images", "no images found in "),
    ("bad_checkpoint_flag", "--checkpoint"),
])
def test_cli_bad_input_is_one_line(case, message, run, cache, tmp_path):
  workdir = run[0]
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("no images here")
  image = os.path.join(run[2].index.root, run[2].index.paths[0])
  unfinished = _workdir_with(tmp_path, run, "config.json")
  no_checkpoint = _workdir_with(tmp_path, run, "config.json",
                                "thresholds.json")
  args = {
      "no_workdir_flag": [f"--inputs={image}"],
      "missing_workdir": [f"--workdir={tmp_path}/nope", f"--inputs={image}"],
      "no_config": [f"--workdir={empty}", f"--inputs={image}"],
      "unfinished": [f"--workdir={unfinished}", f"--inputs={image}"],
      "no_checkpoint": [f"--workdir={no_checkpoint}", f"--inputs={image}"],
      "missing_input": [f"--workdir={workdir}",
                        f"--inputs={image},/no/such.png"],
      "no_images": [f"--workdir={workdir}", f"--inputs={empty}"],
      "bad_checkpoint_flag": [f"--workdir={workdir}", f"--inputs={image}",
                              "--checkpoint=newest"],
  }[case]
  code, last, proc = _cli(args, cache)
  assert code == 2, proc.stderr
  assert last.startswith(f"{PROGRAM}: error: ") and message in last, last
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(os.path.join(workdir, "predictions.csv"))
