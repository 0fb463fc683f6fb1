"""Saving and resuming training state with orbax.

Layout under the workdir:
  checkpoints/<step>/   periodic and final saves, the newest `keep` kept.
  best/<step>/          the one checkpoint with the best validation mean AUROC.
  corrupt/<step>-<n>/   checkpoints that failed to restore, moved aside.

Each checkpoint holds two items: "state" (the train state pytree of
`train_state`: step, trainable parameters, optimizer state) and "meta"
(JSON: the data iterator state, the best metric so far, the config, a
fingerprint of every frozen tower the state was trained with, and, when
the state was just evaluated, the decision thresholds chosen on that
evaluation, so that thresholds always travel with the parameters they were
computed from). A checkpoint whose state holds a
non-finite number is never written. On restore the newest checkpoint that
reads back completely wins; newer unreadable ones (a save killed midway, a
truncated file) are moved to corrupt/ with a warning.
"""

import hashlib
import json
import os
import shutil
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from medbridge_jax import default_config
from medbridge_jax import errors
from medbridge_jax import report

# Which checkpoint to read: see `Checkpointer.restore_which`.
WHICH = ("best", "latest", "selected")
# Config keys that change what the state means: resuming under other values
# would silently mix two experiments. Other differences are only logged.
_IDENTITY_KEYS = ("model", "method", "experts", "random_experts",
                  "data.dataset", "data.labels", "seed")


def all_finite(tree) -> bool:
  """Whether every floating-point leaf of `tree` is finite.

  Checked on the host: the train state holds only the small trainable part
  (the experts are frozen), and a jitted check would cost a compilation.
  """
  for x in jax.tree.leaves(tree):
    x = np.asarray(jax.device_get(x))
    if jnp.issubdtype(x.dtype, jnp.inexact) and not np.isfinite(
        x.astype(np.float32)).all():
      return False
  return True


def config_differences(saved: dict, current: dict
                       ) -> list[tuple[str, Any, Any]]:
  """(key, value there, value now) of every config key that differs.

  A key the saved config lacks differs only when its value now is not the
  schema's default: a key added to the schema since keeps the old behaviour
  at its default, so workdirs written before it stay usable.
  """
  def flat(d):
    return traverse_util.flatten_dict(json.loads(json.dumps(d)), sep=".")
  a, b = flat(saved), flat(current)
  defaults = flat(default_config.get_default().to_dict())
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)
          and not (k not in a and k in defaults and b[k] == defaults[k])]


def check_config(saved: dict | None, current: dict) -> None:
  """UserError when the workdir's checkpoints belong to another experiment."""
  if not saved:
    return
  differ = config_differences(saved, current)
  fatal = [(k, there, now) for k, there, now in differ
           if any(k == p or k.startswith(p + ".") for p in _IDENTITY_KEYS)]
  if fatal:
    k, there, now = fatal[0]
    raise errors.UserError(
        f"the workdir's checkpoints were made with another config "
        f"({k}: {there!r} there, {now!r} now); use another --workdir or the "
        f"same config")
  if differ:
    logging.warning("Resuming with changed config values: %s",
                    ", ".join(k for k, _, _ in differ))


def fingerprint(tree) -> str:
  """A hash of a pytree of arrays: every path, dtype, shape and byte.

  Computed on the host from the weights as loaded, so it names exactly the
  numbers a checkpoint was trained against (another pre-training run, an
  edited folder or a different file give another fingerprint).
  """
  h = hashlib.blake2b(digest_size=16)
  flat = traverse_util.flatten_dict(tree, sep="/")
  for path in sorted(flat):
    x = np.ascontiguousarray(np.asarray(jax.device_get(flat[path])))
    h.update(f"{path}|{x.dtype}|{x.shape}\0".encode())
    h.update(x.tobytes())
  return h.hexdigest()


def tower_fingerprints(experts, names) -> list[dict]:
  """Per expert: its display name, folder and vision tower fingerprint."""
  return [dict(name=n, path=e.path, fingerprint=fingerprint(
      e.params["vision"])) for e, n in zip(experts, names)]


def check_towers(saved: list | None, current: list[dict], where: str) -> None:
  """UserError when the experts' towers differ from the checkpoint's.

  A checkpoint's trainable parameters (queries, heads, gates) only mean
  something on top of the exact frozen towers they were trained with.
  Checkpoints written before fingerprints were kept are accepted with a
  warning.
  """
  if saved is None:
    logging.warning("%s records no tower fingerprints; the experts' weights "
                    "cannot be checked against it.", where)
    return
  if len(saved) != len(current):
    raise errors.UserError(
        f"{where} was trained with {len(saved)} expert(s), the config gives "
        f"{len(current)}")
  for k, (s, c) in enumerate(zip(saved, current)):
    if s.get("fingerprint") != c["fingerprint"]:
      raise errors.UserError(
          f"expert {k} ({c['name']}, {c['path']}): its tower weights differ "
          f"from those {where} was trained with (then {s.get('path')}, "
          f"fingerprint {s.get('fingerprint')}; now {c['fingerprint']}): "
          f"another pre-training, platform or edited folder; use the "
          f"original expert folder or train afresh in another --workdir")


def thresholds_meta(split: str, label_names, thresholds) -> dict:
  """The JSON form of per-label thresholds chosen on `split`."""
  return {"chosen_on": split, "rule": "max sensitivity + specificity - 1",
          "thresholds": {n: float(t) if np.isfinite(t) else None
                         for n, t in zip(label_names, thresholds)}}


class Checkpointer:
  """Periodic, final and best-by-metric checkpoints of one workdir.

  `read_only` (for readers such as predict, which may run beside a training
  run in the same workdir): nothing in the workdir is created, cleaned up,
  moved or saved; unreadable checkpoints are skipped in place.
  """

  def __init__(self, workdir: str, keep: int, async_save: bool = True,
               read_only: bool = False):
    self._workdir = workdir
    self._keep = keep
    self._async = async_save
    self._read_only = read_only
    self._periodic = self._manager("checkpoints", keep)
    self._best = self._manager("best", 1)
    self.best_metric = float("-inf")

  def _manager(self, name: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(self._workdir, name),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max(1, keep), create=not self._read_only,
            enable_async_checkpointing=self._async,
            # A save killed midway leaves a temporary directory behind; a
            # reader must not remove a running save's one.
            cleanup_tmp_directories=not self._read_only,
            read_only=self._read_only,
            # On several hosts each manager's background save ends with
            # barriers across the processes; the two managers' barriers
            # share names unless prefixed, and a step saved to both (a new
            # best) then fails with "Barrier ... is already ongoing".
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=name)))

  @property
  def directory(self) -> str:
    return os.path.join(self._workdir, "checkpoints")

  def latest_step(self) -> int | None:
    return self._periodic.latest_step()

  def save(self, step: int, state: Any, meta: dict, *,
           metric: float | None = None, force: bool = False) -> bool:
    """Saves `state` at `step` unless it holds a non-finite value.

    Args:
      step: the optimizer step the state is after.
      state: the train state pytree.
      meta: JSON-able extras (data iterator state, ...).
      metric: validation mean AUROC of this state, if just evaluated; a new
        best also goes to best/.
      force: save even when not on the periodic schedule (final, SIGTERM).

    Returns:
      Whether anything was written.
    """
    if self._read_only:
      raise ValueError(f"checkpoints of {self._workdir} were opened "
                       f"read-only")
    if not all_finite(state):
      logging.error("Not saving step %d: the state holds NaN or inf.", step)
      return False
    meta = dict(meta, step=int(step))
    if metric is not None and np.isfinite(metric) and metric > self.best_metric:
      self.best_metric = float(metric)
      meta["best_metric"] = self.best_metric
      if step not in self._best.all_steps():
        self._best.save(step, args=self._args(state, meta), force=True)
        logging.info("New best mean AUROC %.4f at step %d.", metric, step)
    meta["best_metric"] = self.best_metric if np.isfinite(
        self.best_metric) else None
    if step in self._periodic.all_steps():
      return False
    return self._periodic.save(step, args=self._args(state, meta), force=force)

  @staticmethod
  def _args(state, meta):
    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(meta))

  def wait(self) -> None:
    self._periodic.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._periodic.close()
    self._best.close()

  def _move_aside(self, step: int, reason: str) -> None:
    src = os.path.join(self.directory, str(step))
    dst_root = os.path.join(self._workdir, "corrupt")
    os.makedirs(dst_root, exist_ok=True)
    n = 0
    while os.path.exists(os.path.join(dst_root, f"{step}-{n}")):
      n += 1
    dst = os.path.join(dst_root, f"{step}-{n}")
    logging.warning("Checkpoint %s is unreadable (%s); moved to %s and "
                    "skipped.", src, reason, dst)
    if jax.process_index() == 0 and os.path.exists(src):
      shutil.move(src, dst)

  def restore(self, abstract_state: Any, config: dict
              ) -> tuple[Any, dict] | None:
    """The newest readable checkpoint as (state, meta), or None if none.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings; None
        restores the arrays as saved (for inspection).
      config: the current config as a dict (checked against the saved one).
    """
    steps = sorted(self._periodic.all_steps(), reverse=True)
    if not steps:
      return None
    skipped, last_error = [], None
    for step in steps:
      try:
        meta = self._periodic.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # pylint: disable=broad-except
        skipped.append((step, e))
        last_error = e
        continue
      # A different experiment is the user's mistake, not a corrupt file.
      check_config(meta.get("config"), config)
      try:
        restored = self._periodic.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
        if abstract_state is None:
          restored = jax.tree.map(np.asarray, restored)
        if not all_finite(restored):
          raise ValueError("it holds NaN or inf")
      except Exception as e:  # pylint: disable=broad-except
        skipped.append((step, e))
        last_error = e
        continue
      for bad, err in skipped:
        reason = f"{type(err).__name__}: {str(err)[:200]}"
        if self._read_only:
          logging.warning("Checkpoint %d in %s is unreadable (%s); skipped.",
                          bad, self.directory, reason)
        else:
          self._move_aside(bad, reason)
      if skipped and not self._read_only:
        # The managers cache their step lists; start them afresh.
        self._periodic.close()
        self._periodic = self._manager("checkpoints", self._keep)
      best = meta.get("best_metric")
      self.best_metric = float(best) if best is not None else float("-inf")
      logging.info("Resumed from %s at step %d.", self.directory, step)
      return restored, meta
    raise errors.UserError(
        f"no checkpoint in {self.directory} could be read (newest error: "
        f"{type(last_error).__name__}: "
        f"{str(last_error).splitlines()[0][:200]}); "
        f"move the directory away to start afresh")

  def restore_best(self, abstract_state: Any, config: dict
                   ) -> tuple[Any, dict] | None:
    """The best checkpoint as (state, meta), or None if there is none.

    UserError when it cannot be read, or was made with another config.
    """
    step = self._best.latest_step()
    if step is None:
      return None
    where = os.path.join(self._workdir, "best")
    try:
      out = self._best.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise errors.UserError(
          f"cannot read the best checkpoint in {where} "
          f"({type(e).__name__}: {errors.one_line(e)[:200]}); the latest "
          f"checkpoint may still be readable") from None
    check_config(out["meta"].get("config"), config)
    return out["state"], out["meta"]

  def restore_which(self, which: str, abstract_state: Any, config: dict
                    ) -> tuple[Any, dict] | None:
    """(state, meta) of checkpoint `which`, or None if there is none.

    "best": the best on validation; "latest": the newest readable one;
    "selected": the best, or the latest when no validation AUROC was ever
    defined (what a run reports on).
    """
    if which not in WHICH:
      raise errors.UserError(f"checkpoint {which!r}: expected one of "
                             f"{WHICH}")
    if which == "latest":
      return self.restore(abstract_state, config)
    best = self.restore_best(abstract_state, config)
    if best is None and which == "selected":
      return self.restore(abstract_state, config)
    return best


def thresholds_of(meta: dict, where: str) -> dict:
  """The {label: threshold or None} a checkpoint's meta holds; UserError
  naming `where` when it holds none (saved between evaluations)."""
  if meta.get("thresholds") is None:
    raise errors.UserError(
        f"{where} holds no thresholds: it was saved between evaluations; "
        f"use the best checkpoint, or train on to the end")
  return report.thresholds_table(meta["thresholds"], where)
