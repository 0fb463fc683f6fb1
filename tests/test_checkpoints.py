"""Checkpointer: keep-N, best, NaN refusal, corrupt skipping, config check."""

import glob
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbridge_jax import checkpoints, errors

CONFIG = {"seed": 0, "model": {"width": 8}, "train": {"steps": 10}}


def _state(step, value=1.0):
  return {"step": jnp.int32(step), "params": {"w": jnp.full((4, 3), value)}}


ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        _state(0))


def _save_steps(workdir, steps, metrics=None):
  c = checkpoints.Checkpointer(str(workdir), keep=2)
  for i, step in enumerate(steps):
    c.save(step, _state(step, float(step)),
           {"data": {"next_index": step}, "config": CONFIG},
           metric=None if metrics is None else metrics[i])
  c.close()


def test_keep_n_best_and_resume(tmp_path):
  _save_steps(tmp_path, [2, 4, 6, 8], metrics=[0.5, 0.9, 0.7, 0.6])
  c = checkpoints.Checkpointer(str(tmp_path), keep=2)
  assert sorted(os.listdir(c.directory)) == ["6", "8"]
  state, meta = c.restore(ABSTRACT, CONFIG)
  assert meta["step"] == 8 and meta["data"] == {"next_index": 8}
  assert float(state["params"]["w"][0, 0]) == 8.0
  assert c.best_metric == 0.9
  best, best_meta = c.restore_best(ABSTRACT, CONFIG)
  assert best_meta["step"] == 4 and float(best["params"]["w"][0, 0]) == 4.0
  c.close()


def test_nan_state_is_never_saved(tmp_path):
  c = checkpoints.Checkpointer(str(tmp_path), keep=2)
  assert c.save(2, _state(2), {})
  assert not c.save(4, _state(4, float("nan")), {}, metric=0.99)
  c.close()
  assert os.listdir(tmp_path / "checkpoints") == ["2"]
  assert not os.path.exists(tmp_path / "best") or not os.listdir(
      tmp_path / "best")


# orbax's failed async read of a truncated file leaves a callback on a closed
# event loop; harmless, but pytest reports it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "no_state", "flip_bytes"])
def test_corrupt_newest_is_skipped(tmp_path, damage):
  _save_steps(tmp_path, [2, 4])
  newest = str(tmp_path / "checkpoints" / "4")
  files = glob.glob(newest + "/state/**/d/*", recursive=True)
  if damage == "truncate":  # A save killed while writing its data files.
    for f in files:
      open(f, "w").close()
  elif damage == "no_state":
    shutil.rmtree(newest + "/state")
  else:
    for f in files:
      b = bytearray(open(f, "rb").read())
      b[len(b) // 2] ^= 0xFF
      open(f, "wb").write(bytes(b))
  # An interrupted save's temporary directory is ignored too.
  os.makedirs(str(tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1"))
  c = checkpoints.Checkpointer(str(tmp_path), keep=2)
  state, meta = c.restore(ABSTRACT, CONFIG)
  assert meta["step"] == 2 and float(state["params"]["w"][0, 0]) == 2.0
  assert os.listdir(c.directory) == ["2"]
  assert os.listdir(tmp_path / "corrupt") == ["4-0"]
  # Training goes on and saves step 4 again.
  assert c.save(4, _state(4), {"config": CONFIG})
  c.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_read_only_reader_changes_nothing(tmp_path):
  """A reader beside a running training (predict) leaves a save in progress
  and a corrupt newest checkpoint where they are, and cannot save."""
  _save_steps(tmp_path, [2, 4])
  for f in glob.glob(str(tmp_path / "checkpoints" / "4" / "state" / "**" /
                         "d" / "*"), recursive=True):
    open(f, "w").close()
  in_progress = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1"
  os.makedirs(str(in_progress))
  listing = sorted(os.listdir(tmp_path / "checkpoints"))
  c = checkpoints.Checkpointer(str(tmp_path), keep=2, read_only=True)
  state, meta = c.restore(ABSTRACT, CONFIG)
  assert meta["step"] == 2 and float(state["params"]["w"][0, 0]) == 2.0
  assert c.restore_best(ABSTRACT, CONFIG) is None  # no metric was ever saved
  with pytest.raises(ValueError, match="read-only"):
    c.save(8, _state(8), {"config": CONFIG})
  c.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == listing
  assert not os.path.exists(tmp_path / "corrupt")
  # A writer (training resuming) does clean both up; orbax removes the
  # unfinished save in a background thread, so allow it a moment.
  checkpoints.Checkpointer(str(tmp_path), keep=2).close()
  deadline = time.monotonic() + 20
  while in_progress.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not in_progress.exists()


def test_other_experiment_is_a_user_error(tmp_path):
  _save_steps(tmp_path, [2])
  c = checkpoints.Checkpointer(str(tmp_path), keep=2)
  other = dict(CONFIG, model={"width": 16})
  with pytest.raises(errors.UserError, match="model.width"):
    c.restore(ABSTRACT, other)
  # A changed step count only warns.
  _, meta = c.restore(ABSTRACT, dict(CONFIG, train={"steps": 20}))
  assert meta["step"] == 2
  c.close()


def test_all_finite():
  assert checkpoints.all_finite({"a": jnp.ones(3), "i": jnp.int32(1)})
  assert not checkpoints.all_finite({"a": jnp.array([1.0, jnp.inf])})
  assert checkpoints.all_finite({"a": np.zeros(0)})


class _Expert:
  """What tower_fingerprints reads of a loaded expert."""

  def __init__(self, path, vision):
    self.path, self.params = path, {"vision": vision}


def _tower(seed=0):
  rng = np.random.default_rng(seed)
  return {"layer_0": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                      "bias": rng.normal(size=(3,)).astype(np.float32)}}


def test_fingerprint_names_every_byte_path_and_shape():
  base = checkpoints.fingerprint(_tower())
  assert checkpoints.fingerprint(_tower()) == base
  # One float32 ulp in one weight.
  t = _tower()
  t["layer_0"]["kernel"][2, 1] = np.nextafter(t["layer_0"]["kernel"][2, 1],
                                              np.float32(np.inf))
  assert checkpoints.fingerprint(t) != base
  # The same numbers under another name, or in another shape.
  t = _tower()
  t["layer_1"] = t.pop("layer_0")
  assert checkpoints.fingerprint(t) != base
  t = _tower()
  t["layer_0"]["kernel"] = t["layer_0"]["kernel"].reshape(3, 4)
  assert checkpoints.fingerprint(t) != base
  # The same numbers in another dtype.
  t = jax.tree.map(lambda x: x.astype(np.float64), _tower())
  assert checkpoints.fingerprint(t) != base


def test_other_towers_are_an_error_naming_the_expert():
  saved = checkpoints.tower_fingerprints(
      [_Expert("/m/a", _tower(0)), _Expert("/m/b", _tower(1))], ["a", "b"])
  checkpoints.check_towers(saved, saved, "ckpt")
  edited = _tower(1)
  edited["layer_0"]["bias"][0] += 1e-3
  now = checkpoints.tower_fingerprints(
      [_Expert("/m/a", _tower(0)), _Expert("/m/b2", edited)], ["a", "b"])
  with pytest.raises(errors.UserError,
                     match=r"expert 1 \(b, /m/b2\): its tower weights differ "
                           r"from those ckpt was trained with \(then /m/b"):
    checkpoints.check_towers(saved, now, "ckpt")
  with pytest.raises(errors.UserError, match="trained with 2 expert"):
    checkpoints.check_towers(saved, now[:1], "ckpt")
  # Checkpoints from before fingerprints: accepted (warned).
  checkpoints.check_towers(None, now, "ckpt")


def test_keys_added_to_the_schema_since_keep_old_workdirs_usable():
  """A workdir saved before `config.method` existed resumes under the
  default method; another method, or another value of a key both configs
  hold, is another experiment."""
  from medbridge_jax import default_config  # pylint: disable=g-import-not-at-top
  now = default_config.get_default().to_dict()
  old = default_config.get_default().to_dict()
  del old["method"]
  assert checkpoints.config_differences(old, now) == []
  checkpoints.check_config(old, now)
  lora = default_config.get_default()
  lora.method.name = "lora"
  assert checkpoints.config_differences(old, lora.to_dict()) == [
      ("method.name", None, "lora")]
  with pytest.raises(errors.UserError, match="method.name: None there, "
                     "'lora' now"):
    checkpoints.check_config(old, lora.to_dict())
  # Present on both sides: any change counts, default or not.
  other = default_config.get_default().to_dict()
  other["method"]["vpt_prompts"] = 3
  assert checkpoints.config_differences(other, now) == [
      ("method.vpt_prompts", 3, 8)]
  with pytest.raises(errors.UserError, match="method.vpt_prompts"):
    checkpoints.check_config(other, now)
