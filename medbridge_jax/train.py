"""Training and evaluation of MedBridge (or of the baseline
`config.method` names, through the very same loop, see methods.py):
`train_and_evaluate(config, workdir)`.

One run, in four steps:
  set up     data (train / valid / test splits, no shared patient), experts,
             model, parameters on the mesh, the train state (fresh or
             resumed), the jitted step, writers;
  train      the jitted data-parallel step; every `eval_every` steps and at
             the last step the validation split is evaluated and a
             checkpoint saved with the thresholds chosen on that evaluation;
  select     the state with the best validation mean AUROC is the run's
             model;
  report     that model (and the frozen experts' zero-shot baseline) on the
             held-out test split and any extra test sets, with patient-level
             intervals: report.md, metrics.jsonl, thresholds.json; and
             run_info.json (method, parameter counts, training speed, peak
             memory) when training ends.

Reproducibility: the step's random key is fold_in(seed, step) and the data
order is a function of (seed, position), so a run resumed from a checkpoint
computes exactly what the uninterrupted run would have.
"""

import dataclasses
import functools
import os
import signal
import sys
import tempfile
import time
from typing import Any, Optional

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from medbridge_jax import checkpoints
from medbridge_jax import config_check
from medbridge_jax import errors
from medbridge_jax import evaluate
from medbridge_jax import localisation
from medbridge_jax.experts import from_config
from medbridge_jax import methods
from medbridge_jax import metrics
from medbridge_jax import optim
from medbridge_jax import overlays
from medbridge_jax import report
from medbridge_jax import run_info
from medbridge_jax import sharding
from medbridge_jax import train_state
from medbridge_jax import train_step as train_step_lib
from medbridge_jax.data import boxes as boxes_lib
from medbridge_jax.data import resolve
from medbridge_jax.model import evidence
from medbridge_jax.model import focal_sampling
from medbridge_jax.model import losses
from medbridge_jax.model import medbridge
from medbridge_jax.model import partition


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
# Set up.


@dataclasses.dataclass
class Run:
  """Everything a run builds before its first step."""
  config: ml_collections.ConfigDict
  workdir: str
  lead: bool  # This process writes the files.
  mesh: Any
  data: resolve.Data
  experts: list
  expert_names: list[str]
  # Per expert (L, 2, P) label-prompt embeddings; None if vision-only.
  prompts: list
  towers: list[dict]  # checkpoints.tower_fingerprints of the experts.
  model: Any  # methods.build's: MedBridge or a baseline.
  param_counts: dict  # partition.count: {"train": n, "frozen": n}.
  frozen: dict  # The experts' towers, on the mesh.
  state: dict  # train_state: step, trainable params, optimizer state.
  abstract_state: dict
  start_step: int
  feed: Any  # Resumable training batches.
  ckpt: checkpoints.Checkpointer
  class_weights: Optional[jax.Array]
  writer: Any
  eval_fn: Any  # evaluate.make_model_fn(model).


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Builds a run: resumes from the workdir's newest checkpoint if any."""
  config_check.check(config)  # Before anything is written or generated.
  workdir = prepare_workdir(workdir)
  from_config.announce(config)
  tc = config.train
  mesh = _mesh(config)
  data = resolve.resolve(config)
  logging.info("Data: %d train / %d %s / %d %s images, %d labels.",
               len(data.train.index), len(data.valid.index), data.valid.name,
               len(data.test.index), data.test.name, len(data.label_names))
  experts = from_config.load(config)
  names = from_config.display_names(experts, bool(config.experts))
  prompts = medbridge.label_prompts(config, experts, data.label_names)
  model = methods.build(config, experts, data.label_names,
                        prompt_embeddings=prompts)
  _log_method(config, experts)
  replicated = sharding.replicated(mesh)
  frozen, state, abstract_state, param_counts = _parameters(
      config, model, experts, replicated)
  weights = losses.class_weights_from_config(
      config.loss, data.train.targets, data.train.mask)
  weights = (None if weights is None
             else jax.device_put(jnp.asarray(weights), replicated))
  lead = jax.process_index() == 0
  if lead:
    report.write_config(workdir, config)
  run = Run(
      config=config, workdir=workdir, lead=lead, mesh=mesh, data=data,
      experts=experts, expert_names=names, prompts=prompts,
      towers=checkpoints.tower_fingerprints(experts, names), model=model,
      param_counts=param_counts, frozen=frozen, state=state,
      abstract_state=abstract_state,
      start_step=0, feed=resolve.train_feed(data, config),
      ckpt=checkpoints.Checkpointer(workdir, int(tc.keep_checkpoints)),
      class_weights=weights,
      writer=metric_writers.create_default_writer(
          workdir, just_logging=not lead, asynchronous=True),
      eval_fn=evaluate.make_model_fn(model))
  _resume(run)
  return run


def _mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The device mesh, after checking both batch sizes split over it."""
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(int(config.train.batch_size), mesh,
                            "config.train.batch_size",
                            int(config.train.grad_accum))
  sharding.check_batch_size(int(config.eval.batch_size), mesh,
                            "config.eval.batch_size")
  return mesh


def _log_method(config: ml_collections.ConfigDict, experts) -> None:
  logging.info("Method: %s.", methods.describe(config))
  if config.method.name == "medbridge":
    logging.info("%s.", focal_sampling.summary(focal_sampling.describe(
        int(config.data.image_size), [int(e.image_size) for e in experts],
        config.model.focal)))


def _parameters(config: ml_collections.ConfigDict, model, experts,
                replicated) -> tuple[dict, dict, dict, dict]:
  """(frozen params, train state, its abstract twin, parameter counts).

  Laid out directly on the mesh (replicated: data parallel). The towers
  come from the loaded experts (checked against the model's shapes); only
  the method's own parameters are initialised.
  """
  init_key = jax.random.fold_in(jax.random.key(int(config.seed)), 0)
  params = medbridge.init_params(model, init_key, experts,
                                 int(config.data.image_size), replicated)
  rules = methods.partition_rules(config, experts)
  logging.info("%s.", partition.describe(params, rules))
  counts = partition.count(params, rules)
  trainable, frozen = partition.split(params, rules)
  del params
  tx = optim.make(config.train)
  return (frozen, train_state.create(trainable, tx, replicated),
          train_state.abstract(trainable, tx, replicated), counts)


def _resume(run: Run) -> None:
  """Restores the newest checkpoint into `run`, or starts the logs afresh."""
  config_dict = run.config.to_dict()
  restored = run.ckpt.restore(run.abstract_state, config_dict)
  if restored is None:
    if run.lead:
      report.truncate_jsonl(run.workdir, -1)
    flat = traverse_util.flatten_dict(config_dict, sep=".")
    run.writer.write_hparams({k: v for k, v in flat.items()
                              if isinstance(v, (int, float, str, bool))})
    return
  state, meta = restored
  checkpoints.check_towers(meta.get("towers"), run.towers,
                           f"the checkpoint at step {meta['step']}")
  total = int(run.config.train.steps)
  if int(meta["step"]) > total:
    raise errors.UserError(
        f"the workdir's checkpoint is at step {meta['step']}, beyond "
        f"config.train.steps={total}; use another --workdir")
  run.state, run.start_step = state, int(meta["step"])
  run.feed.set_state(meta["data"])
  logging.info("Resuming at step %d of %d.", run.start_step, total)
  if run.lead:
    report.truncate_jsonl(run.workdir, run.start_step)


def _meta(run: Run, result: Optional[report.Result] = None) -> dict:
  """A checkpoint's JSON: data position, config, towers, and (right after
  an evaluation of this state on validation) its thresholds."""
  meta = {"data": run.feed.get_state(), "config": run.config.to_dict(),
          "towers": run.towers}
  if result is not None:
    meta["thresholds"] = checkpoints.thresholds_meta(
        run.data.valid.name, run.data.label_names,
        metrics.youden_thresholds(result.probs, result.targets, result.mask))
  return meta


def _evaluate(run: Run, params, eval_set, step: int, prefix: str,
              bootstrap: int = 0) -> report.Result:
  """MedBridge with trainable `params` on one split, logged."""
  result = evaluate.evaluate(
      functools.partial(run.eval_fn, params, run.frozen), eval_set,
      bootstrap=bootstrap, seed=int(run.config.seed), **_eval_kwargs(run))
  _log_eval(run.writer, step, eval_set.name, result.summary, prefix)
  return result


def _explains(run: Run) -> bool:
  """Whether the run's model has evidence maps (MedBridge with readable
  queries: `evidence.check_model`)."""
  if run.config.method.name != "medbridge":
    return False
  try:
    evidence.check_model(run.model)
  except errors.UserError as e:
    logging.info("No evidence maps: %s", e)
    return False
  return True


def _localise(run: Run, evidence_fn, eval_set,
              bootstrap: int) -> Optional[dict]:
  """The evidence maps' pointing game and IoU hit against the split's boxes
  (`evaluate.localise`), or None: no boxes in the data set, no evidence
  maps (`evidence_fn` None), or `eval.localise` off."""
  c = run.config
  if not c.eval.localise or evidence_fn is None:
    return None
  index = eval_set.index
  try:
    found = boxes_lib.read(index.dataset, index.root)
  except errors.UserError as e:
    logging.info("%s: no localisation scores (%s).", eval_set.name, e)
    return None
  return evaluate.localise(
      evidence_fn, eval_set, found, batch_size=int(c.eval.batch_size),
      mesh=run.mesh, data_config=c.data, bootstrap=bootstrap,
      seed=int(c.seed))


GALLERY = 2  # Images per label and kind in report.md's evidence gallery.


def _gallery(run: Run, evidence_fn, eval_set, result: report.Result,
             thresholds: dict, step: int) -> list[str]:
  """report.md lines: per label, the split's most confident true positives
  and its missed findings (positives below the threshold, least confident
  first) with their evidence overlays (report/gallery/*.png); the same
  overlays go to TensorBoard. Every host computes the maps, the lead
  writes."""
  if len(result.probs) != len(eval_set.index):
    return []  # Skipped images: rows no longer line up; no gallery.
  names = list(eval_set.index.label_names)
  picks = []  # (label index, kind, row)
  for j, label in enumerate(names):
    t = thresholds.get(label)
    known = (result.mask[:, j] > 0) & (result.targets[:, j] == 1)
    if t is None or not known.any():
      continue
    p = result.probs[:, j]
    hits = [int(r) for r in np.argsort(-p) if known[r] and p[r] >= t]
    missed = [int(r) for r in np.argsort(p) if known[r] and p[r] < t]
    picks += [(j, "found", r) for r in hits[:GALLERY]]
    picks += [(j, "missed", r) for r in missed[:GALLERY]]
  if not picks:
    return []
  rows = sorted({r for _, _, r in picks})
  images, maps = evaluate.evidence_rows(
      evidence_fn, eval_set, rows, mesh=run.mesh,
      data_config=run.config.data)
  if not run.lead:
    return []
  folder = os.path.join(run.workdir, "report", "gallery")
  os.makedirs(folder, exist_ok=True)
  at = {r: k for k, r in enumerate(rows)}
  lines = ["### Evidence gallery", "",
           "Per label: the most confident true positives, then missed "
           "findings (positives below the threshold), with their evidence "
           "maps.", ""]
  for j, label in enumerate(names):
    cells = []
    for kind, row in [(k, r) for jj, k, r in picks if jj == j]:
      rgb = overlays.overlay(images[at[row]], maps[at[row], j])
      name = (f"{report.slug(eval_set.name)}_{report.slug(label)}_{kind}_"
              f"{row}.png")
      overlays.save_png(rgb, os.path.join(folder, name))
      run.writer.write_images(
          step, {f"evidence/{eval_set.name}/{label}/{kind}": rgb[None]})
      cells.append(f"![{label}, {kind}, p={result.probs[row, j]:.2f}]"
                   f"(report/gallery/{name})")
    if cells:
      lines += [f"**{label}**: " + " ".join(cells), ""]
  return lines


def _eval_kwargs(run: Run) -> dict:
  return dict(batch_size=int(run.config.eval.batch_size), mesh=run.mesh,
              data_config=run.config.data, label_names=run.data.label_names,
              mean_labels=tuple(run.config.eval.mean_labels))


# ---------------------------------------------------------------------------
# Train.


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

  def stop_after(self, step: int, tc) -> bool:
    """Whether to save and stop after this step.

    On several hosts all must stop at the same step (or the others would
    wait in the next step's collectives forever), so they agree on log and
    checkpoint steps only, where a collective costs little.
    """
    if jax.process_count() == 1:
      return self.received
    if not (_is_due(step, int(tc.checkpoint_every))
            or _is_due(step, int(tc.log_every))):
      return False
    flags = multihost_utils.process_allgather(np.array([self.received]))
    return bool(np.any(flags))


class NonFiniteLoss(errors.UserError):
  """The loss became NaN or inf (a diverging run: a config problem)."""


class _TrainMetrics:
  """The training metrics between two logs, checked for NaN one step late.

  Reading a step's metrics right after dispatching it would stall the
  device; reading them after the next step is dispatched costs nothing. At
  log, eval and checkpoint steps they are read at once (`flush`).
  """

  def __init__(self):
    self.last_saved: Optional[int] = None
    self._pending = None  # (step, device metrics) not yet read.
    self._interval = []  # Host metrics since the last log.

  def add(self, step: int, m: dict) -> None:
    self._read_pending()
    self._pending = (step, m)

  def flush(self) -> None:
    self._read_pending()

  def mean_and_reset(self) -> dict:
    out = {k: float(np.mean([x[k] for x in self._interval]))
           for k in self._interval[-1]} if self._interval else {}
    self._interval = []
    return out

  def _read_pending(self) -> None:
    if self._pending is None:
      return
    step, m = self._pending
    self._pending = None
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    self._interval.append(m)
    bad = {k: v for k, v in m.items() if not np.isfinite(v)}
    if bad:
      kept = (f"the last good checkpoint (step {self.last_saved}) is kept"
              if self.last_saved is not None else "no checkpoint was saved")
      raise NonFiniteLoss(
          f"non-finite {', '.join(f'{k}={v}' for k, v in sorted(bad.items()))}"
          f" at step {step}; stopped, {kept} (check the data, or lower "
          f"config.train.lr)")


def _is_due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def train(run: Run) -> bool:
  """Trains from run.start_step to config.train.steps; False if stopped
  early by SIGTERM (after saving)."""
  tc = run.config.train
  total = int(tc.steps)
  step_fn = _jitted_step(run)
  progress = periodic_actions.ReportProgress(
      num_train_steps=total, writer=run.writer,
      every_steps=int(tc.log_every) or None, every_secs=None)
  bar = _progress_bar(total, run.start_step)
  speed = run_info.Speed(int(tc.batch_size))
  watch = _TrainMetrics()
  watch.last_saved = run.start_step if run.start_step else None
  try:
    with _Sigterm() as sigterm:
      for step in range(run.start_step + 1, total + 1):
        batch = sharding.to_global(next(run.feed), run.mesh)
        run.state, m = step_fn(run.state, run.frozen, batch,
                               run.class_weights)
        speed.stepped(run.state)
        watch.add(step, m)
        progress(step)
        if bar is not None:
          bar.update(1)
        stop = sigterm.stop_after(step, tc)
        _log_evaluate_save(run, step, watch, speed, stop)
        if stop and step < total:
          logging.info("SIGTERM: saved step %d and stopped; rerun the same "
                       "command to resume.", watch.last_saved)
          return False
      watch.flush()
      speed.stop(run.state)
  finally:
    if bar is not None:
      bar.close()
    run.feed.close()
    run.ckpt.wait()
  # A finished run rerun (to report again) trains nothing: its file stays.
  if run.lead and run.start_step < total:
    run_info.write(run.workdir, str(run.config.method.name),
                   run.param_counts, speed.images_per_s())
  return True


def _jitted_step(run: Run):
  """The jitted train step; the state is donated, and comes back laid out
  as it went in (replicated)."""
  tc = run.config.train
  replicated = sharding.replicated(run.mesh)
  return jax.jit(
      train_step_lib.make_train_step(run.model, optim.make(tc),
                                     optim.schedule(tc), run.config, run.mesh),
      donate_argnums=(0,),
      out_shardings=(jax.tree.map(lambda _: replicated, run.abstract_state),
                     replicated))


def _log_evaluate_save(run: Run, step: int, watch: _TrainMetrics,
                       speed: run_info.Speed, stop: bool) -> None:
  """What is due after `step`: the training log, the evaluation on
  validation (always at the last step: its checkpoint, like every evaluated
  one, carries its own thresholds) and the checkpoint (also on `stop`).
  Evaluation and saving are left out of the training speed."""
  tc = run.config.train
  eval_due = _is_due(step, int(tc.eval_every)) or step == int(tc.steps)
  save_due = _is_due(step, int(tc.checkpoint_every)) or stop
  log_due = _is_due(step, int(tc.log_every))
  if eval_due or save_due or log_due:
    watch.flush()  # Waits for the step: the pause below is not it.
  if eval_due or save_due:
    speed.pause()
  if log_due:
    run.writer.write_scalars(step, {
        f"train/{k}": v for k, v in watch.mean_and_reset().items()})
  elif int(tc.log_every) <= 0:
    watch.mean_and_reset()  # No logs: keep nothing.
  result = (_evaluate(run, run.state["params"], run.data.valid, step,
                      "valid") if eval_due else None)
  if result is not None and run.lead:
    report.append_jsonl(run.workdir, evaluate.record(
        step, run.data.valid.name, result.summary))
  if save_due or result is not None:
    if run.ckpt.save(step, run.state, _meta(run, result),
                     metric=_metric(result), force=stop):
      watch.last_saved = step
  speed.resume()


def _metric(result: Optional[report.Result]) -> Optional[float]:
  return None if result is None else result.summary.mean_auroc


def _progress_bar(total: int, initial: int):
  if not sys.stderr.isatty() or jax.process_index() != 0:
    return None
  try:
    import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:  # Optional: the logs carry the progress too.
    return None
  return tqdm.tqdm(total=total, initial=initial, unit="step",
                   dynamic_ncols=True)


def _log_eval(writer, step, set_name, summary, prefix):
  scalars = {f"{prefix}/mean_auroc": summary.mean_auroc,
             f"{prefix}/mean_auprc": summary.mean_auprc,
             f"{prefix}/mean_ece": summary.mean_ece}
  for name, v in zip(summary.label_names, summary.auroc):
    scalars[f"{prefix}/auroc/{name}"] = v
  writer.write_scalars(step, {k: float(v) for k, v in scalars.items()
                              if np.isfinite(v)})
  logging.info("Step %d, %s: mean AUROC %.4f (%d labels%s).", step, set_name,
               summary.mean_auroc, len(summary.mean_labels),
               f"; no AUROC for {', '.join(summary.undefined)}"
               if summary.undefined else "")


# ---------------------------------------------------------------------------
# Select and report.


def select(run: Run) -> tuple[dict, dict]:
  """The (params, checkpoint meta) of the best state on validation (the
  last one when no validation AUROC was ever defined)."""
  state, meta = run.ckpt.restore_which("selected", run.abstract_state,
                                       run.config.to_dict())
  checkpoints.thresholds_of(
      meta, f"the selected checkpoint (step {meta['step']}) of {run.workdir}")
  logging.info("Selected step %d (validation mean AUROC %s).", meta["step"],
               report.num(meta.get("best_metric"), 4))
  return state["params"], meta


def report_on_tests(run: Run, params, meta: dict) -> dict:
  """The selected model and the zero-shot baseline on the test split and
  the extra test sets; writes the report and thresholds.json."""
  c = run.config
  step = int(meta["step"])
  bootstrap = int(c.eval.bootstrap)
  # One jitted evidence function for every set and the gallery.
  evidence_fn = (functools.partial(evaluate.make_evidence_fn(run.model),
                                   params, run.frozen)
                 if _explains(run) else None)
  sets, located = {}, {}
  for es in [run.data.test] + list(run.data.extra_tests):
    sets[es.name] = {"MedBridge": _evaluate(run, params, es, step,
                                            f"test/{es.name}", bootstrap)}
    located[es.name] = _localise(run, evidence_fn, es, bootstrap)
    if c.zero_shot.enabled:
      for e, p, name in zip(run.experts, run.prompts, run.expert_names):
        if p is None:  # Vision-only: no text to score prompts with.
          continue
        sets[es.name][f"zero-shot {name}"] = evaluate.evaluate(
            evaluate.make_zero_shot_fn(e, p), es, bootstrap=bootstrap,
            seed=int(c.seed), **_eval_kwargs(run))
  gallery = []
  if evidence_fn is not None:
    gallery = _gallery(run, evidence_fn, run.data.test,
                       sets[run.data.test.name]["MedBridge"],
                       meta["thresholds"]["thresholds"], step)
  records = {
      name: evaluate.record(
          step, name, results["MedBridge"].summary, final=True,
          selected_on=run.data.valid.name,
          valid_mean_auroc=meta.get("best_metric"),
          zero_shot={n: _none_if_nan(results[f"zero-shot {n}"]
                                     .summary.mean_auroc)
                     for n in run.expert_names
                     if f"zero-shot {n}" in results},
          **({"localisation": located[name]} if located[name] else {}))
      for name, results in sets.items()}
  if run.lead:
    for r in records.values():
      report.append_jsonl(run.workdir, r)
    header = report.run_header(c, run.data, run.expert_names, run.experts,
                               meta)
    sections = {name: ["### Where: evidence maps against the boxes", "",
                       localisation.markdown(summary), ""]
                for name, summary in located.items() if summary}
    sections.setdefault(run.data.test.name, []).extend(gallery)
    path = report.write(run.workdir, sets, header, bootstrap=bootstrap,
                        seed=int(c.seed), sections=sections)
    report.write_thresholds(run.workdir, meta["thresholds"])
    for k, (name, results) in enumerate(sets.items()):
      report.write_predictions(run.workdir, "test" if k == 0 else name,
                               results["MedBridge"])
    logging.info("Report: %s", path)
  return records[run.data.test.name]


def _none_if_nan(x: float) -> Optional[float]:
  return float(x) if np.isfinite(x) else None


# ---------------------------------------------------------------------------
# The whole run.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict:
  """Trains, selects on validation, reports on test; returns the test
  split's final record.

  Rerunning with the same workdir resumes from its newest readable
  checkpoint (a finished run only selects and reports again).
  """
  t_start = time.monotonic()
  run = setup(config, workdir)
  try:
    if not train(run):
      return {"step": run.ckpt.latest_step(), "stopped": "SIGTERM"}
    params, meta = select(run)
    record = report_on_tests(run, params, meta)
  finally:
    run.ckpt.close()
    run.writer.flush()
    run.writer.close()
  logging.info("Done in %.1f s: %s mean AUROC %s (step %d).",
               time.monotonic() - t_start, run.data.test.name,
               report.num(record["mean_auroc"], 4), meta["step"])
  return record
