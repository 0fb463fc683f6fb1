"""Training and evaluation of MedBridge: `train_and_evaluate(config, workdir)`.

One run: resolve the data and the experts, build the model, initialise or
resume, train with a jitted data-parallel step over the device mesh,
evaluate periodically, then evaluate the final model (and, once, the frozen
experts' zero-shot baseline) and write the report.

Reproducibility: the step's random key is fold_in(seed, step) and the data
order is a function of (seed, position), so a run resumed from a checkpoint
computes exactly what the uninterrupted run would have.
"""

import functools
import os
import signal
import sys
import tempfile
import time
from typing import Optional

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medbridge_jax import checkpoints
from medbridge_jax import errors
from medbridge_jax import evaluate
from medbridge_jax import experts_setup
from medbridge_jax import metrics
from medbridge_jax import optim
from medbridge_jax import report
from medbridge_jax import sharding
from medbridge_jax import train_step as train_step_lib
from medbridge_jax.data import resolve


# ---------------------------------------------------------------------------
# Workdir.


def prepare_workdir(workdir: str) -> str:
  """The absolute workdir, created; UserError if it cannot be written."""
  if not workdir:
    raise errors.UserError("no workdir given (--workdir)")
  path = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
      pass
  except OSError as e:
    raise errors.UserError(
        f"workdir {workdir} cannot be written: {e.strerror or e}") from None
  return path


# ---------------------------------------------------------------------------
# Helpers of the loop.


class _Sigterm:
  """Records SIGTERM so the loop can save and stop between steps."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _stop_requested(sigterm: _Sigterm, step: int, tc) -> bool:
  """Whether to save and stop after this step because of a SIGTERM.

  On several hosts all must stop at the same step (or the others would wait
  in the next step's collectives forever), so they agree on log and
  checkpoint steps only, where a collective costs little.
  """
  if jax.process_count() == 1:
    return sigterm.received
  if not (_is_due(step, int(tc.checkpoint_every))
          or _is_due(step, int(tc.log_every))):
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.array([sigterm.received]))
  return bool(np.any(flags))


class NonFiniteLoss(errors.UserError):
  """The loss became NaN or inf (a diverging run: a config problem)."""


def _check_finite(step: int, m: dict, last_saved: Optional[int]) -> None:
  bad = {k: v for k, v in m.items() if not np.isfinite(v)}
  if bad:
    kept = (f"the last good checkpoint (step {last_saved}) is kept"
            if last_saved is not None else "no checkpoint was saved")
    raise NonFiniteLoss(
        f"non-finite {', '.join(f'{k}={v}' for k, v in sorted(bad.items()))} "
        f"at step {step}; stopped, {kept} (check the data, or lower "
        f"config.train.lr)")


def _is_due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def _progress_bar(total: int, initial: int):
  if not sys.stderr.isatty() or jax.process_index() != 0:
    return None
  try:
    import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm.tqdm(total=total, initial=initial, unit="step",
                   dynamic_ncols=True)


def _log_eval(writer, step, set_name, summary, prefix="eval"):
  scalars = {f"{prefix}/mean_auroc": summary.mean_auroc,
             f"{prefix}/mean_auprc": summary.mean_auprc,
             f"{prefix}/mean_ece": summary.mean_ece}
  for name, v in zip(summary.label_names, summary.auroc):
    if np.isfinite(v):
      scalars[f"{prefix}/auroc/{name}"] = v
  writer.write_scalars(step, {k: float(v) for k, v in scalars.items()
                              if np.isfinite(v)})
  logging.info("Step %d, %s: mean AUROC %.4f (%d labels%s).", step, set_name,
               summary.mean_auroc, len(summary.mean_labels),
               f"; no AUROC for {', '.join(summary.undefined)}"
               if summary.undefined else "")


# ---------------------------------------------------------------------------
# The run.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict:
  """Trains, evaluates and writes the report; returns the final record.

  Rerunning with the same workdir resumes from its newest readable
  checkpoint (a finished run only re-evaluates and rewrites the report).
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  from medbridge_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from medbridge_jax.experts import zero_shot  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import losses  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import medbridge  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import partition  # pylint: disable=g-import-not-at-top

  t_start = time.monotonic()
  workdir = prepare_workdir(workdir)
  experts_setup.announce(config)
  lead = jax.process_index() == 0
  tc = config.train
  total_steps = int(tc.steps)
  schedule = optim.schedule(tc)  # Validates steps and warm-up early.
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(int(tc.batch_size), mesh, "config.train.batch_size",
                            int(tc.grad_accum))
  sharding.check_batch_size(int(config.eval.batch_size), mesh,
                            "config.eval.batch_size")

  data = resolve.resolve(config)
  label_names = data.label_names
  logging.info("Data: %d train / %d %s images, %d labels.",
               len(data.train.index), len(data.eval.index), data.eval.name,
               len(label_names))
  experts = experts_setup.load(config)
  expert_names = experts_setup.display_names(experts, bool(config.experts))
  prompts = [zero_shot.prompt_embeddings(e, list(label_names),
                                         config.zero_shot.positive,
                                         config.zero_shot.negative)
             for e in experts]
  model = medbridge.build(config, experts, label_names,
                          prompt_embeddings=prompts)

  # Parameters laid out directly on the mesh (replicated: data parallel).
  # The towers come from the loaded experts (checked against the model's
  # shapes); only MedBridge's own parameters are initialised.
  replicated = sharding.replicated(mesh)
  init_key = jax.random.fold_in(jax.random.key(int(config.seed)), 0)
  params = medbridge.init_params(model, init_key, experts,
                                 int(config.data.image_size), replicated)
  logging.info("%s.", partition.describe(params))
  trainable, frozen = partition.split(params)
  del params

  tx = optim.make(tc)
  state = dict(step=jnp.zeros((), jnp.int32), params=trainable,
               opt_state=tx.init(trainable))
  state = jax.device_put(state, replicated)
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      state)

  class_weights = losses.class_weights_from_config(
      config.loss, data.train.targets, data.train.mask)
  class_weights = (None if class_weights is None
                   else jax.device_put(jnp.asarray(class_weights), replicated))

  feed = resolve.train_feed(data, config)
  if lead:
    report.write_config(workdir, config)
  ckpt = checkpoints.Checkpointer(workdir, int(tc.keep_checkpoints))
  config_dict = config.to_dict()
  restored = ckpt.restore(abstract_state, config_dict)
  start_step = 0
  if restored is not None:
    state, meta = restored
    start_step = int(meta["step"])
    if start_step > total_steps:
      raise errors.UserError(
          f"the workdir's checkpoint is at step {start_step}, beyond "
          f"config.train.steps={total_steps}; use another --workdir")
    feed.set_state(meta["data"])
    logging.info("Resuming at step %d of %d.", start_step, total_steps)
    if lead:
      report.truncate_jsonl(workdir, start_step)
  elif lead:
    report.truncate_jsonl(workdir, -1)

  train_step = jax.jit(
      train_step_lib.make_train_step(model, tx, schedule, config, mesh), donate_argnums=(0,),
      out_shardings=(jax.tree.map(lambda _: replicated, abstract_state),
                     replicated))

  writer = metric_writers.create_default_writer(
      workdir, just_logging=not lead, asynchronous=True)
  if start_step == 0:
    flat = traverse_util.flatten_dict(config_dict, sep=".")
    writer.write_hparams({k: v for k, v in flat.items()
                          if isinstance(v, (int, float, str, bool))})
  progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer,
      every_steps=int(tc.log_every) or None, every_secs=None)
  bar = _progress_bar(total_steps, start_step)
  last_saved = start_step if restored is not None else None
  eval_kwargs = dict(batch_size=int(config.eval.batch_size), mesh=mesh,
                     data_config=config.data,
                     label_names=label_names,
                     mean_labels=tuple(config.eval.mean_labels))

  def save(step, metric=None, force=False):
    nonlocal last_saved
    meta = {"data": feed.get_state(), "config": config_dict}
    if ckpt.save(step, state, meta, metric=metric, force=force):
      last_saved = step

  model_fn = evaluate.make_model_fn(model)

  def run_eval(step, bootstrap=0, eval_set=None):
    eval_set = eval_set or data.eval
    fn = functools.partial(model_fn, state["params"], frozen)
    result = evaluate.evaluate(fn, eval_set, bootstrap=bootstrap,
                               seed=int(config.seed), **eval_kwargs)
    prefix = "eval" if eval_set is data.eval else f"test/{eval_set.name}"
    _log_eval(writer, step, eval_set.name, result.summary, prefix=prefix)
    return result

  # -- Training. -------------------------------------------------------------
  interval = []  # Host metrics since the last log, to average.
  pending = None  # (step, device metrics) not yet checked.
  stopped_by_signal = False
  try:
    with _Sigterm() as sigterm:
      for step in range(start_step + 1, total_steps + 1):
        batch = pipeline.to_global(next(feed), mesh)
        state, m = train_step(state, frozen, batch, class_weights)
        # Check the previous step's loss now: reading it here does not stall
        # the device, which already works on this step.
        if pending is not None:
          interval.append(_host(pending[1]))
          _check_finite(pending[0], interval[-1], last_saved)
        pending = (step, m)
        progress(step)
        if bar is not None:
          bar.update(1)
        eval_due = _is_due(step, int(tc.eval_every)) and step < total_steps
        stop = _stop_requested(sigterm, step, tc)
        save_due = _is_due(step, int(tc.checkpoint_every)) or stop
        if eval_due or save_due or _is_due(step, int(tc.log_every)):
          interval.append(_host(m))
          pending = None
          _check_finite(step, interval[-1], last_saved)
          if _is_due(step, int(tc.log_every)):
            writer.write_scalars(step, {
                f"train/{k}": float(np.mean([x[k] for x in interval]))
                for k in interval[-1]})
          if _is_due(step, int(tc.log_every)) or int(tc.log_every) <= 0:
            interval = []
        metric = None
        if eval_due:
          result = run_eval(step)
          metric = result.summary.mean_auroc
          if lead:
            report.append_jsonl(workdir, evaluate.record(
                step, data.eval.name, result.summary))
        if save_due or (eval_due and metric is not None):
          save(step, metric=metric, force=stop)
        if stop and step < total_steps:
          stopped_by_signal = True
          break
      if pending is not None:
        _check_finite(pending[0], _host(pending[1]), last_saved)
  finally:
    if bar is not None:
      bar.close()
    feed.close()
    ckpt.wait()

  if stopped_by_signal:
    ckpt.close()
    writer.close()
    logging.info("SIGTERM: saved step %d and stopped; rerun the same command "
                 "to resume.", last_saved)
    return {"step": last_saved, "stopped": "SIGTERM"}

  # -- Final evaluation. -----------------------------------------------------
  step = total_steps
  final = run_eval(step, bootstrap=int(config.eval.bootstrap))
  save(step, metric=final.summary.mean_auroc, force=True)
  ckpt.close()
  sets = {data.eval.name: {"MedBridge": final}}
  zs_names = {}
  if config.zero_shot.enabled:
    for e, p, name in zip(experts, prompts, expert_names):
      zs_names[name] = f"zero-shot {name}"
      zs_fn = evaluate.make_zero_shot_fn(e, p)
      for es in [data.eval] + data.tests:
        sets.setdefault(es.name, {})[zs_names[name]] = evaluate.evaluate(
            zs_fn, es, seed=int(config.seed), **eval_kwargs)
  for es in data.tests:
    sets[es.name]["MedBridge"] = run_eval(
        step, bootstrap=int(config.eval.bootstrap), eval_set=es)
  # MedBridge first in every section: it is the table's subject.
  sets = {k: {"MedBridge": v["MedBridge"],
              **{m: r for m, r in v.items() if m != "MedBridge"}}
          for k, v in sets.items()}
  records = {}
  for set_name, results in sets.items():
    records[set_name] = evaluate.record(
        step, set_name, results["MedBridge"].summary, final=True,
        zero_shot={n: _none_if_nan(results[z].summary.mean_auroc)
                   for n, z in zs_names.items() if z in results})
  if lead:
    for r in records.values():
      report.append_jsonl(workdir, r)
    header = [
        f"Data: {config.data.dataset} "
        f"({config.data.root or 'synthetic, generated in the cache'}), "
        f"{len(data.train.index)} training images, labels: "
        f"{', '.join(label_names)}.",
        "Experts: " + ", ".join(
            f"{n} ({e.path})" for n, e in zip(expert_names, experts))
        + (" (small random experts, at most briefly pre-trained on generic "
           "synthetic images: no pretrained weights configured)."
           if not config.experts else "."),
        f"Training: {total_steps} steps of batch {tc.batch_size}, seed "
        f"{config.seed}; mean AUROC over "
        f"{', '.join(config.eval.mean_labels) or 'all labels'}; 95% CIs from "
        f"{config.eval.bootstrap} bootstrap resamples.",
        "Zero-shot: each frozen expert with the label prompts "
        f"\"{config.zero_shot.positive}\" / \"{config.zero_shot.negative}\".",
    ]
    path = report.write(workdir, sets, header)
    report.write_thresholds(workdir, data.eval.name, label_names,
                            metrics.youden_thresholds(
                                final.probs, final.targets, final.mask))
    logging.info("Report: %s", path)
  writer.flush()
  writer.close()
  logging.info("Done in %.1f s: %s mean AUROC %.4f.",
               time.monotonic() - t_start, data.eval.name,
               final.summary.mean_auroc)
  return records[data.eval.name]


def _none_if_nan(x: float) -> Optional[float]:
  return float(x) if np.isfinite(x) else None


def _host(m: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(m).items()}

