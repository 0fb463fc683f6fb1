"""Multi-host: the real command as two processes of 4 CPU devices each.

Two processes of `python -m medbridge_jax.main` (MEDBRIDGE_MULTIHOST=1, as
launch/ runs it; a coordinator on 127.0.0.1, gloo collectives) train,
evaluate and report exactly like one process of 8 devices; checkpoints move
between one and two processes; a SIGTERM to one of the two stops both at
the same step. The one-process run is the reference throughout.
"""

import glob
import json
import os
import re
import signal

import jax
import numpy as np
from PIL import Image
import pytest

from medbridge_jax import checkpoints, errors, report, sharding, train
from medbridge_jax.data import index as index_lib
from medbridge_jax.data import pipeline
from medbridge_jax.data import resolve
from tests import multihost_launch
from tests import tiny_run

# Every step logged, so that processes agree on a SIGTERM at every step;
# class weights computed on each host and laid out on all devices; one local
# view and no fusion: what the processes share is the same, the
# compilations are shorter.
STEPS = {"train.steps": 8, "train.eval_every": 4,
         "train.checkpoint_every": 2, "train.log_every": 1,
         "train.keep_checkpoints": 3, "loss.class_weights": "balanced",
         "model.focal.num_local": 1, "model.fusion.enabled": False}
TOTAL = STEPS["train.steps"]
# Seconds for one two-process run: about a minute alone, more when CI runs
# another test beside it on the same two cores.
TIMEOUT = 300
TOL = 1e-5


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """Data and experts are generated here by the reference run, before any
  child starts: two processes never write them at once."""
  yield from tiny_run.private_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
  """The workdir of one uninterrupted process with 8 devices."""
  del cache
  workdir = str(tmp_path_factory.mktemp("one_process") / "run")
  train.train_and_evaluate(tiny_run.tiny_config(**STEPS), workdir)
  return workdir


def _scalars(workdir: str, tag: str) -> dict[int, list[float]]:
  """step -> values of TensorBoard scalar `tag` in every event file."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag:
          out.setdefault(event.step, []).append(
              float(tf.make_ndarray(v.tensor)))
  return out


def _close(got, want, what: str) -> None:
  if want is None:
    assert got is None, what
  else:
    assert got == pytest.approx(want, abs=TOL), what


def _assert_same_run(got_dir: str, want_dir: str) -> None:
  """metrics.jsonl (validation at each evaluation, the final test record:
  mean and per-label AUROC, AUPRC, ECE) and the training loss at every
  logged step agree to TOL."""
  got, want = report.read_jsonl(got_dir), report.read_jsonl(want_dir)
  key = lambda r: (r["step"], r["set"], bool(r.get("final")))
  assert [key(r) for r in got] == [key(r) for r in want]
  for g, w in zip(got, want):
    where = f"{w['set']} at step {w['step']}"
    for name in ("mean_auroc", "mean_auprc", "mean_ece"):
      _close(g[name], w[name], f"{name}, {where}")
    for name in ("auroc", "auprc"):
      assert set(g[name]) == set(w[name])
      for label, v in w[name].items():
        _close(g[name][label], v, f"{name} of {label}, {where}")
  got_loss = _scalars(got_dir, "train/loss")
  want_loss = _scalars(want_dir, "train/loss")
  assert sorted(want_loss) == list(range(1, TOTAL + 1))
  assert sorted(got_loss) == sorted(want_loss)
  for step, (w,) in want_loss.items():
    for g in got_loss[step]:
      _close(g, w, f"train/loss at step {step}")


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if (
      os.path.isdir(d)) else []


def _restore(workdir: str, abstract=None):
  """The newest checkpoint (state, meta); `abstract` None reads the arrays
  as saved, which orbax allows on the saving topology only."""
  c = checkpoints.Checkpointer(workdir, 3, read_only=True)
  try:
    return c.restore(abstract, tiny_run.tiny_config(**STEPS).to_dict())
  finally:
    c.close()


def _on_one_device(state):
  """An abstract state to restore any checkpoint into on one device."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def test_two_processes_train_evaluate_and_report_like_one(reference, cache,
                                                          tmp_path):
  workdir = str(tmp_path / "run")
  with multihost_launch.Launch(workdir, tiny_run.as_flags(**STEPS),
                               cache) as run:
    run.wait(TIMEOUT)
    logs = [run.log(0), run.log(1)]
  for i, log in enumerate(logs):
    assert f"jax.distributed: process {i} of 2, 4 local / 8 devices" in log
  _assert_same_run(workdir, reference)

  # Files: process 0's alone. A second writer would add an event file,
  # append every record twice, or log its own report.
  assert len(glob.glob(os.path.join(workdir, "events.out.tfevents*"))) == 1
  assert "Report: " in logs[0] and "Report: " not in logs[1]
  assert os.path.isfile(os.path.join(workdir, "run_info.json"))
  got = report.read_jsonl(workdir)
  assert len(got) == len(report.read_jsonl(reference))
  g, w = (_read_json(os.path.join(d, "thresholds.json"))
          for d in (workdir, reference))
  assert g["thresholds"].keys() == w["thresholds"].keys()
  for label, t in w["thresholds"].items():
    _close(g["thresholds"][label], t, f"threshold of {label}")
  g, w = (np.load(os.path.join(d, "predictions_test.npz"))
          for d in (workdir, reference))
  np.testing.assert_array_equal(g["patients"], w["patients"])
  np.testing.assert_allclose(g["probs"], w["probs"], atol=TOL)

  # Checkpoints: the same steps; each process wrote its own shards (orbax's
  # OCDBT layout), and together they hold the one-process state.
  assert _steps(workdir) == _steps(reference) == [4, 6, 8]
  state_dir = os.path.join(workdir, "checkpoints", str(TOTAL), "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
  w_state, w_meta = _restore(reference)
  g_state, g_meta = _restore(workdir, _on_one_device(w_state))
  assert g_meta["data"] == w_meta["data"]  # iterator position, global units
  assert jax.tree.structure(g_state) == jax.tree.structure(w_state)
  for g, w in zip(jax.tree.leaves(g_state), jax.tree.leaves(w_state)):
    np.testing.assert_allclose(g, w, atol=TOL)


class _SigtermAt:
  """Training batches that send this process SIGTERM while batch `n` is
  fetched, as a scheduler would mid-step."""

  def __init__(self, feed, n):
    self._feed, self._n, self._i = feed, n, 0

  def __iter__(self):
    return self

  def __next__(self):
    self._i += 1
    if self._i == self._n:
      handler = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
      # Without the trainer's handler the signal would end pytest itself.
      assert isinstance(handler, train._Sigterm), handler  # pylint: disable=protected-access
      signal.raise_signal(signal.SIGTERM)
    return next(self._feed)

  def __getattr__(self, name):
    return getattr(self._feed, name)


def _logged_steps(log: str) -> int:
  """The newest step whose training metrics a process has logged."""
  return max((int(s) for s in re.findall(r"\[(\d+)\] train/", log)),
             default=0)


def _sigterm_lines(log: str) -> list[int]:
  return [int(s) for s in re.findall(r"SIGTERM: saved step (\d+) and stopped",
                                     log)]


def test_checkpoints_move_between_one_and_two_processes(reference, cache,
                                                        tmp_path,
                                                        monkeypatch):
  """One process (stopped at step 2) -> two (SIGTERM to process 1 only:
  both stop at one step n) -> one process to the end: the same run as the
  uninterrupted reference."""
  workdir = str(tmp_path / "run")
  original = resolve.train_feed
  with monkeypatch.context() as m:
    m.setattr(resolve, "train_feed",
              lambda data, config: _SigtermAt(original(data, config), 2))
    out = train.train_and_evaluate(tiny_run.tiny_config(**STEPS), workdir)
  assert out == {"step": 2, "stopped": "SIGTERM"}

  with multihost_launch.Launch(workdir, tiny_run.as_flags(**STEPS),
                               cache) as run:
    # Once process 1 has logged a step of its own, its handler is in place.
    run.wait_until(lambda: _logged_steps(run.log(1)) > 2, TIMEOUT,
                   "training step after step 2")
    run.signal(1)
    run.wait(TIMEOUT)
    logs = [run.log(0), run.log(1)]
  for log in logs:
    assert f"Resuming at step 2 of {TOTAL}." in log
  stops = [_sigterm_lines(log) for log in logs]
  # Process 0 got no signal: it stopped because process 1 did.
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops
  stopped = stops[0][0]
  assert 2 < stopped < TOTAL
  assert max(_steps(workdir)) == stopped
  _, meta = _restore(workdir, _on_one_device(_restore(reference)[0]))
  assert meta["step"] == stopped
  # The data position in global elements, as one process counts them.
  assert meta["data"]["grain"]["next_index"] == stopped * 8

  record = train.train_and_evaluate(tiny_run.tiny_config(**STEPS), workdir)
  assert record["final"]
  _assert_same_run(workdir, reference)


# ---------------------------------------------------------------------------
# The parts, in this process.

ROWS, SIZE = 10, 16


@pytest.fixture
def noise_index(tmp_path):
  """Noise images: any difference in augmentation shows."""
  rng = np.random.default_rng(0)
  paths = []
  for r in range(ROWS):
    paths.append(f"img{r}.png")
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), np.uint8)).save(
        tmp_path / paths[-1])
  return index_lib.Index(
      dataset="toy", split="train", root=str(tmp_path), paths=tuple(paths),
      patients=tuple(f"p{r}" for r in range(ROWS)),
      studies=tuple(f"s{r}" for r in range(ROWS)), label_names=("A", "B"),
      labels=rng.choice(np.array([1, 0], np.float32), size=(ROWS, 2)))


def _feed(index, hosts, host=0):
  return pipeline.train_batches(index, batch_size=6 // hosts, seed=3,
                                image_size=SIZE, shard=(host, hosts))


def _joined(feeds):
  """The global batch: the hosts' batches in host order (to_global's)."""
  parts = [next(f) for f in feeds]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_hosts_share_the_one_process_training_stream(noise_index):
  one = _feed(noise_index, 1)
  two = [_feed(noise_index, 2, h) for h in range(2)]
  # Four global batches of 6 cross two epochs of 10 rows.
  for _ in range(4):
    want, got = next(one), _joined(two)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  state = one.get_state()
  assert state["grain"]["next_index"] == 24
  assert all(f.get_state() == state for f in two)
  # Positions move across host counts: two -> one and one -> two.
  one_again = _feed(noise_index, 1)
  one_again.set_state(two[0].get_state())
  two_again = [_feed(noise_index, 2, h) for h in range(2)]
  for f in two_again:
    f.set_state(state)
  want = next(one)
  for got in (next(one_again), _joined(two_again)):
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_distributed_arguments_come_from_the_environment():
  assert sharding.distributed_arguments({}) == {}
  assert sharding.distributed_arguments(
      {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": " 1"}) == {
          "num_processes": 2, "process_id": 1}
  with pytest.raises(errors.UserError, match=r"JAX_PROCESS_ID='one'"):
    sharding.distributed_arguments({"JAX_PROCESS_ID": "one"})
