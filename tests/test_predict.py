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

from medbridge_jax import checkpoints, errors, evaluate
from medbridge_jax import metrics, optim, predict, sharding, train
from medbridge_jax.data import resolve
from medbridge_jax.experts import from_config
from tests import tiny_run

REPO = tiny_run.REPO
PROGRAM = "medbridge_jax.predict"


def _config():
  """The tiny run without zero-shot; trained on one device (it compiles
  faster), while prediction uses all eight."""
  return tiny_run.tiny_config(**{"zero_shot.enabled": False,
                                 "eval.bootstrap": 0, "mesh.data": 1,
                                 "train.eval_every": 2})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  yield from tiny_run.private_cache(tmp_path_factory)


# The selection metric is rigged so that the best checkpoint (step 2) is
# not the last one (step 4): predict must then apply step 2's thresholds
# with step 2's parameters.
BEST_STEP = 2


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
  """(workdir, config, validation EvalSet, final record) of one finished
  tiny run whose best checkpoint is not its last."""
  del cache
  config = _config()
  workdir = str(tmp_path_factory.mktemp("run"))
  original = checkpoints.Checkpointer.save

  def save(self, step, state, meta, *, metric=None, force=False):
    if metric is not None and step != BEST_STEP:
      metric -= 1.0  # Any other evaluated step loses the selection.
    return original(self, step, state, meta, metric=metric, force=force)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(checkpoints.Checkpointer, "save", save)
    record = train.train_and_evaluate(config, workdir)
  data = resolve.resolve(config)
  return workdir, config, data.valid, record


def _read_csv(path):
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  return rows[0], rows[1:]


def _thresholds(workdir):
  with open(os.path.join(workdir, "thresholds.json")) as f:
    return json.load(f)["thresholds"]


def _evaluation_probs(workdir, config, eval_set, which):
  """The evaluation pipeline's probabilities of every row of `eval_set`
  with the `which` ("best" or "latest") checkpoint, and its step.

  Built apart from predict.py: towers through medbridge.init_params, the
  checkpoint through Checkpointer, rows through evaluate.predict's data
  pipeline.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import medbridge  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import partition  # pylint: disable=g-import-not-at-top
  experts = from_config.load(config)
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
  if which == "best":
    restored, meta = ckpt.restore_best(abstract, config.to_dict())
  else:
    restored, meta = ckpt.restore(abstract, config.to_dict())
  ckpt.close()
  fn = functools.partial(evaluate.make_model_fn(model), restored["params"],
                         jax.device_put(frozen, replicated))
  probs, seen = evaluate.predict(fn, eval_set, int(config.eval.batch_size),
                                 mesh, config.data)
  assert seen.all()
  return probs, meta["step"]


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
  assert result["step"] == record["step"] == BEST_STEP
  labels = list(eval_set.index.label_names)
  assert header == ["path"] + labels + ["positive_labels"]
  # One row per image, in sorted path order.
  paths = [r[0] for r in rows]
  assert paths == sorted(paths)
  assert sorted(os.path.relpath(p, root) for p in paths) == sorted(
      eval_set.index.paths)
  got = _probs(rows)
  want, step = _evaluation_probs(workdir, config, eval_set, "best")
  assert step == BEST_STEP
  order = [eval_set.index.paths.index(os.path.relpath(p, root))
           for p in paths]
  np.testing.assert_allclose(got, want[order], atol=1e-6, rtol=0)

  # The thresholds and the validation metrics came from these very images
  # and this very checkpoint.
  targets, mask = eval_set.targets[order], eval_set.mask[order]
  chosen = _thresholds(workdir)
  np.testing.assert_allclose(
      metrics.youden_thresholds(got, targets, mask),
      [np.nan if chosen[n] is None else chosen[n] for n in labels],
      atol=1e-6)
  summary = metrics.summarize(got, targets, mask, labels)
  assert summary.mean_auroc == pytest.approx(record["valid_mean_auroc"],
                                             abs=1e-6)


def test_each_checkpoint_brings_its_own_thresholds(run, tmp_path):
  """Best and latest differ here: each is applied with the thresholds
  chosen on validation for that very state, not the other's."""
  workdir, config, eval_set, _ = run
  root = eval_set.index.root
  files = [os.path.join(root, p) for p in eval_set.index.paths]
  labels = list(eval_set.index.label_names)
  chosen = {}
  for which in ("best", "latest"):
    out = str(tmp_path / f"{which}.csv")
    result = predict.run(workdir, files, output=out, checkpoint=which)
    probs, step = _evaluation_probs(workdir, config, eval_set, which)
    assert result["step"] == step
    _, rows = _read_csv(out)
    np.testing.assert_allclose(_probs(rows), probs, atol=1e-6, rtol=0)
    want = metrics.youden_thresholds(probs, eval_set.targets, eval_set.mask)
    for r, p in zip(rows, _probs(rows)):
      listed = r[-1].split(";") if r[-1] else []
      for n, v, t in zip(labels, p, want):
        if np.isfinite(t) and abs(v - t) > 1e-6:  # Off the threshold itself.
          assert (n in listed) == (v > t), (which, n, v, t)
    chosen[which] = want
  assert result["step"] == config.train.steps != BEST_STEP
  assert not np.allclose(chosen["best"], chosen["latest"], equal_nan=True)


def test_other_towers_are_refused(run, tmp_path):
  """An expert folder edited after training (one weight moved by 1e-3):
  the checkpoint's trainable parameters no longer belong to it, and
  predict says which expert."""
  workdir, config, eval_set, _ = run
  folder = from_config.expert_paths(config)[0][1]
  image = os.path.join(eval_set.index.root, eval_set.index.paths[0])
  with tiny_run.edited_expert(folder, str(tmp_path)):
    with pytest.raises(errors.UserError,
                       match=rf"expert 1 \(.*{os.path.basename(folder)}\): "
                             r"its tower weights differ"):
      predict.run(workdir, [image], output=str(tmp_path / "p.csv"))


def test_explicit_files_in_given_order(run, valid_csv, tmp_path):
  workdir, _, eval_set, _ = run
  root = eval_set.index.root
  files = [os.path.join(root, p) for p in eval_set.index.paths[:3]]
  out = str(tmp_path / "explicit.csv")
  # A comma-separated value, a repeat of a file: each image once, as given.
  result = predict.run(workdir, [f"{files[2]},{files[0]}", files[2],
                                 files[1]], output=out, batch_size=3)
  assert result["rows"] == 3
  _, rows = _read_csv(out)
  assert [r[0] for r in rows] == [files[2], files[0], files[1]]
  # The same probabilities as the whole folder's (batches of another size).
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
