r"""The ablation experiment: variants x seeds, reported on the test split.

  python -m medbridge_jax.ablate --config=configs/in_domain.py \
      [--workdir=DIR] [--variants=full,global_only,...] [--seeds=3] \
      [--config.train.steps=150 ...]
  python -m medbridge_jax.ablate --config=configs/in_domain.py \
      --dose=0.5,1,2,4 [--dose_contrast=0.5,2] [--seeds=3] [...]

Grid. Each variant (`variants`) is the task config with a few switches
changed, trained `--seeds` times (config.seed, config.seed + 1, ...) by
`train.train_and_evaluate` in DIR/<variant>/seed<s>: the checkpoint is
selected on the validation split and everything here is read back from the
held-out test split, from each run's own files (the test set's final record
in metrics.jsonl, the selected model's test probabilities in
predictions_test.npz). Per variant: mean and SD over seeds of the test mean
AUROC, of the global and focal findings' AUROC (plain means of their labels'
AUROCs, groups from `data.synthetic.LABEL_GROUPS`) and of every label; per
seed, the variant's test AUROC minus full's on the same images (same seed),
with a patient-level paired bootstrap interval (`metrics.
paired_auroc_difference`, config.eval.bootstrap resamples, seeded with the
run seed), over all mean labels and over the focal ones. Written to
DIR/results.md and DIR/results.json.

Dose-response (--dose on data.synthetic.focal_scale, --dose_contrast on
focal_contrast, the other knob at 1): full and global_only at every level,
and per seed the focal findings' paired AUROC gain of full over global_only.
As findings grow visible at the experts' global view the gain should
shrink. Level (1, 1) is the default data, so its runs are the grid's own
DIR/full and DIR/global_only runs; other levels train in DIR/dose-fs<x> or
DIR/dose-fc<y> on data generated at that dose, whose folder the runs name in
data.root. Written to DIR/dose.md and DIR/dose.json.

Runs are cached: a sub-workdir keeps the config it was asked to run
(ablation_request.json); when it holds a finished run (ablation_run.json) it
is reused, otherwise it trains, resuming from its checkpoints. Asking the
same sub-workdir to run another config is an error (use another --workdir).
SIGTERM stops after the current run's checkpoint; the same command resumes.

Cost, measured on 2 CPU cores shared with other work (default data and
experts): a full-model run takes about 35 s of set-up and compilation,
0.7 s per training step, 36 s per validation pass and 20 s for the test
split (the sliding windows dominate every evaluation); a global-view run
about a third of that. Evaluations, not steps, set the grid's time, so the
ablation trains 100 steps and validates once, at the end:
--config.train.steps=100 --config.train.warmup_steps=10
--config.train.eval_every=0 (about 65-75 minutes for 11 variants x 3
seeds at that load; idle cores should roughly halve it).

Default workdir: ./workdir/ablate_<config name>[_<variant>].
"""

import copy
import csv
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

# TensorFlow (imported by clu's writers) would print C++ INFO lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from medbridge_jax import cli
from medbridge_jax import errors

PROGRAM = "medbridge_jax.ablate"
REQUEST_FILE = "ablation_request.json"  # In each sub-workdir: its config.
RESULT_FILE = "ablation_run.json"  # Written when its run has finished.
PREDICTIONS_FILE = "predictions_test.npz"  # The trainer's, test split.
GROUPS = ("global", "focal")
REFERENCE = "full"  # Every variant's paired differences are against it.
DOSE_VARIANTS = ("full", "global_only")
# random_experts spec item of the held-out-shapes pre-training (no disks, no
# thin lines: experts.pretrain).
HELDOUT_ITEM = "pretrain_shapes=heldout"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the grid: a name, what it changes, the config overrides."""
  name: str
  description: str
  # ((dotted config key, value), ...), or the special keys "single_expert"
  # (keep expert k only) and "random_experts_item" (add to every spec).
  overrides: tuple


# ---------------------------------------------------------------------------
# The variants.


def expert_geometry(config: ml_collections.ConfigDict
                    ) -> list[tuple[int, int]]:
  """(input side, patch size) of each expert, without loading weights."""
  from medbridge_jax import experts_setup  # pylint: disable=g-import-not-at-top
  from medbridge_jax.experts import loader  # pylint: disable=g-import-not-at-top
  from medbridge_jax.experts import random_experts  # pylint: disable=g-import-not-at-top
  out = []
  if config.experts:
    for path in experts_setup.expert_paths(config)[0]:
      raw = loader.read_json(os.path.join(path, "config.json"),
                             "expert config")
      vision, _ = loader.parse_config(raw, path)
      out.append((vision.image_size, vision.patch_size))
  else:
    for spec in experts_setup.as_list(config.random_experts,
                                      "config.random_experts"):
      _, v = random_experts.parse_spec(spec)
      out.append((v["image"], v["patch"]))
  return out


def training_tokens(config: ml_collections.ConfigDict) -> int:
  """Patch tokens per image in a training step of `config`, all experts."""
  f = config.model.focal
  total = 0
  for side, patch in expert_geometry(config):
    if f.enabled:
      total += int(f.num_local) * (side // patch) ** 2
    if f.global_view or not f.enabled:  # Focal off keeps the global view.
      total += ((int(f.global_side) or side) // patch) ** 2
  return total


def matched_global_side(config: ml_collections.ConfigDict) -> int:
  """The whole-image side whose single view per expert costs full's tokens.

  Compute is matched on patch tokens per training image over all experts:
  full reads 1 + num_local views of each expert's own side; the returned
  side G (a multiple of every expert's patch, at most data.image_size) is
  the one whose one view per expert gives the nearest token count (the
  smaller G on a tie). Default: 5 x 64 + 5 x 36 = 500 tokens; G = 128
  gives 2 x 256 = 512.
  """
  geometry = expert_geometry(config)
  target = training_tokens(config)
  step = math.lcm(*(p for _, p in geometry))
  sides = range(step, int(config.data.image_size) + 1, step)
  if not sides:
    raise errors.UserError(
        f"data.image_size={config.data.image_size} is smaller than the "
        f"experts' patch ({step} px): no whole-image view to match")
  return min(sides, key=lambda g: (abs(sum((g // p) ** 2
                                           for _, p in geometry) - target), g))


def _heldout_supported(spec: str) -> bool:
  from medbridge_jax.experts import random_experts  # pylint: disable=g-import-not-at-top
  try:
    random_experts.parse_spec(f"{spec},{HELDOUT_ITEM}")
  except errors.UserError:
    return False
  return True


def variants(config: ml_collections.ConfigDict) -> dict[str, Variant]:
  """The grid for `config`, in table order: name -> Variant.

  `single_k` keeps only expert k. Random experts are generated per position
  (their seed is the index), so the single-expert run is pointed at the very
  folder the full model loads as expert k: the same frozen weights.
  `heldout_pretraining` exists for pre-trained random experts only, and only
  where experts.random_experts knows `HELDOUT_ITEM`.
  """
  from medbridge_jax import experts_setup  # pylint: disable=g-import-not-at-top
  from medbridge_jax.experts import random_experts  # pylint: disable=g-import-not-at-top
  geometry = expert_geometry(config)
  side = matched_global_side(config)
  hires = sum((side // p) ** 2 for _, p in geometry)
  crop = max(s for s, _ in geometry)
  num_local = int(config.model.focal.num_local)
  resized = [f"expert {k} ({s} px) reads them x{s / crop:.2f}"
             for k, (s, _) in enumerate(geometry) if s != crop]
  out = [
      Variant("full", "MedBridge: global + local views, queries, fusion, MoE",
              ()),
      Variant("global_only", "focal sampling off (global view only)",
              (("model.focal.enabled", False),)),
      Variant("local_only", f"local views only ({num_local} crops in "
              "training), no global view",
              (("model.focal.global_view", False),)),
      Variant("hires_global", f"global view only, at {side} px: "
              f"{hires} patch tokens per training image against full's "
              f"{training_tokens(config)} (1 + {num_local} views)",
              (("model.focal.enabled", False),
               ("model.focal.global_side", side))),
      # MoE off too: a gate over the experts would make it non-linear.
      Variant("linear_probe", "text-initialised linear probe on the pooled "
              "global features (no focal, queries, fusion, gate)",
              (("model.focal.enabled", False),
               ("model.queries.enabled", False),
               ("model.fusion.enabled", False),
               ("model.moe.enabled", False))),
      Variant("no_queries", "queries off (pooled features of the views)",
              (("model.queries.enabled", False),)),
      Variant("no_moe", "MoE off (plain average of the experts)",
              (("model.moe.enabled", False),)),
  ]
  if config.experts:
    names = [os.path.basename(os.path.normpath(p)) for p in
             experts_setup.as_list(config.experts, "config.experts")]
  else:
    names = [s.split(":", 1)[0] + " (random)"
             for s in experts_setup.as_list(config.random_experts,
                                            "config.random_experts")]
  if len(names) > 1:
    for k, name in enumerate(names):
      out.append(Variant(f"single_{k}", f"expert {k} alone: {name}",
                         (("single_expert", k),)))
  out.append(Variant(
      "shared_crop", f"one crop side for all experts, {crop} px ("
      + ("; ".join(resized) or "all read it natively") + "), against each "
      "expert's native side", (("model.focal.crop_size", crop),)))
  if not config.experts:
    specs = experts_setup.as_list(config.random_experts,
                                  "config.random_experts")
    pretrained = all(random_experts.parse_spec(s)[1]["pretrain"]
                     for s in specs)
    if pretrained and all(_heldout_supported(s) for s in specs):
      out.append(Variant(
          "heldout_pretraining", "experts pre-trained without the findings' "
          "shapes (no disks, no thin lines)",
          (("random_experts_item", HELDOUT_ITEM),)))
    elif pretrained:
      logging.warning("Ablation: no heldout_pretraining variant (this "
                      "experts.random_experts does not know %r).",
                      HELDOUT_ITEM)
  return {v.name: v for v in out}


def set_key(c: ml_collections.ConfigDict, key: str, value) -> None:
  """c.<dotted key> = value."""
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def variant_config(config: ml_collections.ConfigDict, variant: Variant,
                   seed: Optional[int] = None) -> ml_collections.ConfigDict:
  """A copy of `config` with the variant's overrides (and `seed`) applied."""
  c = copy.deepcopy(config)
  for key, value in variant.overrides:
    if key == "single_expert":
      _keep_one_expert(c, value)
    elif key == "random_experts_item":
      from medbridge_jax import experts_setup  # pylint: disable=g-import-not-at-top
      c.random_experts = tuple(
          f"{s},{value}" for s in experts_setup.as_list(
              c.random_experts, "config.random_experts"))
    else:
      set_key(c, key, value)
  if seed is not None:
    c.seed = int(seed)
  return c


def _keep_one_expert(c: ml_collections.ConfigDict, k: int) -> None:
  from medbridge_jax import experts_setup  # pylint: disable=g-import-not-at-top
  if c.experts:
    c.experts = (experts_setup.as_list(c.experts, "config.experts")[k],)
  else:
    spec = experts_setup.as_list(c.random_experts, "config.random_experts")[k]
    c.experts = (experts_setup.random_expert_folder(spec, k),)


def label_groups(label_names: Sequence[str]) -> dict[str, list[str]]:
  """"global"/"focal" -> the run's labels in that group (synthetic names)."""
  from medbridge_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return {g: [n for n in label_names if synthetic.LABEL_GROUPS.get(n) == g]
          for g in GROUPS}


def seeds(config: ml_collections.ConfigDict, num_seeds: int) -> list[int]:
  """The training seeds: config.seed, config.seed + 1, ..."""
  if int(num_seeds) < 1:
    raise errors.UserError(f"--seeds={num_seeds} must be at least 1")
  return [int(config.seed) + k for k in range(int(num_seeds))]


# ---------------------------------------------------------------------------
# One run: trained once, then read back from its files.


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _first_difference(a: dict, b: dict) -> Optional[str]:
  fa, fb = _flat(a), _flat(b)
  for k in sorted(set(fa) | set(fb)):
    if fa.get(k) != fb.get(k):
      return f"{k}: {fa.get(k)!r} there, {fb.get(k)!r} now"
  return None


def _write_json(path: str, data) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(data, f, indent=1)
  os.replace(path + ".tmp", path)


def _write_result(workdir: str, stem: str, result: dict) -> None:
  """workdir/<stem>.json (everything) and <stem>.md (its markdown)."""
  _write_json(os.path.join(workdir, f"{stem}.json"), result)
  with open(os.path.join(workdir, f"{stem}.md"), "w") as f:
    f.write(result["markdown"])


def run_one(config: ml_collections.ConfigDict, run_dir: str) -> dict:
  """Trains `config` in `run_dir`, or reuses the finished run there.

  Returns:
    {"run_dir", "test_set", "wall_s", "reused"}, or {"run_dir", "stopped"}
    when a SIGTERM stopped the training.
  """
  from medbridge_jax import train  # pylint: disable=g-import-not-at-top
  wanted = json.loads(json.dumps(config.to_dict()))
  os.makedirs(run_dir, exist_ok=True)
  request = os.path.join(run_dir, REQUEST_FILE)
  if os.path.isfile(request):
    with open(request) as f:
      asked = json.load(f)
    diff = _first_difference(asked, wanted)
    if diff:
      raise errors.UserError(
          f"ablation sub-run {run_dir} was made with another config ({diff});"
          f" use another --workdir")
  else:
    _write_json(request, wanted)
  done = os.path.join(run_dir, RESULT_FILE)
  if os.path.isfile(done) and os.path.isfile(
      os.path.join(run_dir, PREDICTIONS_FILE)):
    with open(done) as f:
      info = json.load(f)
    logging.info("Ablation: %s finished before; reused.", run_dir)
    return dict(info, run_dir=run_dir, reused=True)
  logging.info("Ablation: training in %s.", run_dir)
  start = time.monotonic()
  record = train.train_and_evaluate(config, run_dir)
  if record.get("stopped"):
    return dict(run_dir=run_dir, stopped=record["stopped"])
  info = dict(test_set=record["set"], wall_s=round(time.monotonic() - start,
                                                   1))
  _write_json(done, info)
  return dict(info, run_dir=run_dir, reused=False)


@dataclasses.dataclass
class RunResult:
  """A finished run's test record and test predictions, from its files."""
  run_dir: str
  record: dict  # The test set's final metrics.jsonl record.
  label_names: list[str]  # The columns of probs, in order.
  probs: np.ndarray  # (N, L)
  targets: np.ndarray
  mask: np.ndarray
  patients: Optional[np.ndarray]  # (N,) or None: image-level bootstrap.
  wall_s: Optional[float] = None


def _label_names(run_dir: str, arrays: dict) -> list[str]:
  """The label order of the saved probabilities: the npz's own
  `label_names` when it has them, else that of thresholds.json (written by
  the same run from the same label list; metrics.jsonl sorts its keys)."""
  if "label_names" in arrays:
    return [str(n) for n in arrays["label_names"]]
  path = os.path.join(run_dir, "thresholds.json")
  if not os.path.isfile(path):
    raise errors.UserError(f"{run_dir} has no thresholds.json: cannot tell "
                           f"the label order of {PREDICTIONS_FILE}")
  with open(path) as f:
    return list(json.load(f)["thresholds"])


def read_run(run_dir: str, test_set: str) -> RunResult:
  """The last final record of `test_set` in run_dir/metrics.jsonl and the
  arrays of run_dir/predictions_test.npz."""
  from medbridge_jax import report  # pylint: disable=g-import-not-at-top
  finals = [r for r in report.read_jsonl(run_dir)
            if r.get("final") and r.get("set") == test_set]
  if not finals:
    raise errors.UserError(f"{run_dir}/metrics.jsonl has no final record "
                           f"of {test_set}; remove {RESULT_FILE} there to "
                           "report again")
  record = finals[-1]
  with np.load(os.path.join(run_dir, PREDICTIONS_FILE)) as z:
    arrays = {k: z[k] for k in z.files}
  patients = arrays["patients"]
  if patients.ndim != 1 or len(patients) != len(arrays["probs"]):
    patients = None  # Saved without patient ids.
  names = _label_names(run_dir, arrays)
  if (arrays["probs"].shape[1:] != (len(names),)
      or sorted(names) != sorted(record["auroc"])):
    raise errors.UserError(
        f"{run_dir}/{PREDICTIONS_FILE} holds {arrays['probs'].shape[1:]} "
        f"columns for the labels {', '.join(record['auroc'])} of its test "
        "record")
  return RunResult(run_dir, record, names, arrays["probs"],
                   arrays["targets"], arrays["mask"], patients)


def paired(a: RunResult, b: RunResult, subset: Sequence[str],
           num_resamples: int, seed: int) -> dict:
  """AUROC of run `a` minus run `b` on the same test images, with its
  patient-level paired bootstrap interval (`metrics.PairedDifference` as
  JSON), the mean taken over `subset` (all labels if empty)."""
  from medbridge_jax import metrics  # pylint: disable=g-import-not-at-top
  same = (a.label_names == b.label_names
          and a.targets.shape == b.targets.shape
          and np.array_equal(a.targets, b.targets, equal_nan=True)
          and np.array_equal(a.mask, b.mask)
          and (a.patients is None) == (b.patients is None)
          and (a.patients is None or np.array_equal(a.patients, b.patients)))
  if not same:
    raise errors.UserError(
        f"runs {a.run_dir} and {b.run_dir} were not tested on the same "
        "images and labels: no paired difference")
  d = metrics.paired_auroc_difference(
      a.probs, b.probs, a.targets, a.mask, groups=a.patients,
      label_names=a.label_names, subset=tuple(subset),
      num_resamples=int(num_resamples), seed=int(seed))
  return d.to_json()


# ---------------------------------------------------------------------------
# Numbers over seeds.


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
  v = [float(x) for x in values if x is not None and np.isfinite(x)]
  return float(np.mean(v)) if v else None


def spread(values: Sequence[Optional[float]]) -> dict:
  """{"mean", "sd" (ddof 1; None below 2 values), "n", "values"} of the
  defined values."""
  v = [float(x) for x in values if x is not None and np.isfinite(x)]
  return dict(mean=float(np.mean(v)) if v else None,
              sd=float(np.std(v, ddof=1)) if len(v) > 1 else None,
              n=len(v), values=[None if x is None else float(x)
                                for x in values])


def seed_numbers(r: RunResult) -> dict:
  """One seed's test numbers: mean AUROC, group means, per-label AUROC."""
  auroc = r.record["auroc"]
  groups = label_groups(r.label_names)
  return dict(mean_auroc=r.record["mean_auroc"],
              **{f"{g}_auroc": _mean([auroc[n] for n in groups[g]])
                 for g in GROUPS},
              auroc={n: auroc[n] for n in r.label_names},
              step=r.record.get("step"))


def over_seeds(per_seed: Sequence[dict]) -> dict:
  """`spread` of every number of `seed_numbers` over the seeds."""
  keys = ["mean_auroc"] + [f"{g}_auroc" for g in GROUPS]
  out = {k: spread([s[k] for s in per_seed]) for k in keys}
  labels = list(per_seed[0]["auroc"])
  out["auroc"] = {n: spread([s["auroc"][n] for s in per_seed])
                  for n in labels}
  return out


# ---------------------------------------------------------------------------
# The grid.


def _run_dir(workdir: str, variant: str, seed: int, level: str = "") -> str:
  return os.path.join(workdir, *([level] if level else []), variant,
                      f"seed{seed}")


def _check_names(grid: dict, names: Sequence[str]) -> list[str]:
  names = list(names) or list(grid)
  unknown = [n for n in names if n not in grid]
  if unknown:
    raise errors.UserError(
        f"unknown ablation variant {unknown[0]!r} (--variants); known: "
        f"{', '.join(grid)}")
  if len(set(names)) != len(names):
    raise errors.UserError(f"--variants names a variant twice: "
                           f"{','.join(names)}")
  return names


def _train_all(jobs: Sequence[tuple]) -> tuple[dict, Optional[str]]:
  """Runs (key, config, run_dir) jobs in order: ({key: run_one's dict},
  the run_dir a SIGTERM stopped, or None)."""
  done = {}
  for key, c, run_dir in jobs:
    info = run_one(c, run_dir)
    if info.get("stopped"):
      return done, run_dir
    done[key] = info
  return done, None


def run(config: ml_collections.ConfigDict, workdir: str,
        names: Sequence[str] = (), num_seeds: int = 3,
        reference: str = REFERENCE) -> dict:
  """Runs the grid (all variants if `names` is empty) and writes the tables.

  Args:
    config: the task config.
    workdir: the grid's folder.
    names: variants to run, in table order.
    num_seeds: seeds per variant.
    reference: the variant every other is compared with on the same
      images; without its runs there are no differences.

  Returns:
    The results.json contents: {"rows": [...], "markdown": str, ...}.
  """
  grid = variants(config)
  names = _check_names(grid, names)
  run_seeds = seeds(config, num_seeds)
  from medbridge_jax import train  # pylint: disable=g-import-not-at-top
  workdir = train.prepare_workdir(workdir)
  jobs = [((n, s), variant_config(config, grid[n], s),
           _run_dir(workdir, n, s)) for n in names for s in run_seeds]
  done, stopped = _train_all(jobs)
  result = table(config, workdir, grid, names, run_seeds, done, reference)
  result["stopped"] = stopped
  result["markdown"] = markdown(result)
  if result["rows"]:
    _write_result(workdir, "results", result)
  return result


def table(config: ml_collections.ConfigDict, workdir: str, grid: dict,
          names: Sequence[str], run_seeds: Sequence[int], done: dict,
          reference: str = REFERENCE) -> dict:
  """The grid's numbers from the finished runs' files.

  A variant is a row once all its seeds have finished. Its "vs_reference"
  holds per seed the paired difference from `reference`'s run of that seed
  over config.eval.mean_labels ("mean") and over the focal labels
  ("focal").
  """
  results, rows = {}, []
  for name in names:
    if not all((name, s) in done for s in run_seeds):
      continue
    results[name] = [read_run(done[name, s]["run_dir"],
                              done[name, s]["test_set"]) for s in run_seeds]
    for r, s in zip(results[name], run_seeds):
      r.wall_s = done[name, s].get("wall_s")
  bootstrap = int(config.eval.bootstrap)
  for name, runs in results.items():
    per_seed = [seed_numbers(r) for r in runs]
    row = dict(variant=name, description=grid[name].description,
               seeds=list(run_seeds), per_seed=per_seed,
               **over_seeds(per_seed),
               wall_s=[r.wall_s for r in runs],
               run_dirs=[os.path.relpath(r.run_dir, workdir) for r in runs])
    if name != reference and reference in results:
      focal = label_groups(runs[0].label_names)["focal"]
      row["vs_reference"] = [
          dict(seed=s,
               mean=paired(r, ref, tuple(config.eval.mean_labels),
                           bootstrap, s),
               focal=paired(r, ref, focal, bootstrap, s) if focal else None)
          for s, r, ref in zip(run_seeds, runs, results[reference])]
    rows.append(row)
  out = dict(config=config.to_dict(), reference=reference,
             seeds=list(run_seeds), rows=rows, zero_shot=[], groups={},
             test_set=None, selected_on=None)
  if rows:
    first = (results.get(reference) or next(iter(results.values())))[0]
    out.update(test_set=first.record["set"],
               selected_on=first.record.get("selected_on"),
               groups=label_groups(first.label_names),
               zero_shot=zero_shot_rows(first.run_dir, first.record["set"],
                                        first.label_names))
  return out


def zero_shot_rows(run_dir: str, set_name: str,
                   label_names: Sequence[str]) -> list[dict]:
  """The frozen experts' zero-shot AUROC on `set_name`, from a finished
  run's report/metrics.csv (the same for every seed: no training)."""
  path = os.path.join(run_dir, "report", "metrics.csv")
  if not os.path.isfile(path):
    return []
  per = {}
  with open(path, newline="") as f:
    for r in csv.DictReader(f):
      if r["set"] != set_name or not r["method"].startswith("zero-shot "):
        continue
      v = float(r["auroc"])
      per.setdefault(r["method"], {})[r["label"]] = (
          v if np.isfinite(v) else None)
  rows = []
  for method, values in per.items():
    mean = values.pop("MEAN", None)
    auroc = {n: values.get(n) for n in label_names}
    groups = label_groups(label_names)
    rows.append(dict(variant=method, description="frozen expert, label "
                     "prompts, no training", mean_auroc=mean,
                     **{f"{g}_auroc": _mean([auroc[n] for n in groups[g]])
                        for g in GROUPS}, auroc=auroc))
  return rows


# ---------------------------------------------------------------------------
# Dose-response.


def dose_levels(scales: Sequence[float], contrasts: Sequence[float]
                ) -> list[tuple[float, float]]:
  """(focal_scale, focal_contrast) levels: the scales at contrast 1, then
  the contrasts at scale 1, each once, in the order given."""
  from medbridge_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  out = []
  for level in [(float(s), 1.0) for s in scales] + [
      (1.0, float(c)) for c in contrasts]:
    synthetic.check_dose(*level)
    if level not in out:
      out.append(level)
  if not out:
    raise errors.UserError("no dose levels: give --dose and/or "
                           "--dose_contrast")
  return out


def level_name(scale: float, contrast: float) -> str:
  """"" for the default data, else "dose-fs<scale>[-fc<contrast>]"."""
  parts = [f"{tag}{float(v)!r}" for tag, v in (("fs", scale),
                                               ("fc", contrast))
           if float(v) != 1.0]
  return "-".join(["dose"] + parts) if parts else ""


def _check_dose_data(config: ml_collections.ConfigDict) -> None:
  d = config.data
  if d.dataset != "synthetic" or d.root:
    raise errors.UserError(
        f"--dose needs the generated synthetic data (config.data.dataset="
        f"synthetic, no data.root); got {d.dataset!r}"
        + (f" at {d.root}" if d.root else ""))


def dose_config(config: ml_collections.ConfigDict, scale: float,
                contrast: float) -> ml_collections.ConfigDict:
  """`config` on synthetic data drawn at this dose.

  The default dose leaves the config as it is. Another generates the data
  set once (synthetic.ensure, in the cache) and names its folder in
  data.root, so the run reads exactly those images whatever else resolves
  data; data.synthetic.focal_* record the dose.
  """
  from medbridge_jax import experts_setup  # pylint: disable=g-import-not-at-top
  from medbridge_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  _check_dose_data(config)
  d = config.data
  c = copy.deepcopy(config)
  if (float(scale), float(contrast)) == (1.0, 1.0):
    return c
  c.data.synthetic.focal_scale = float(scale)
  c.data.synthetic.focal_contrast = float(contrast)
  c.data.root = synthetic.ensure(
      os.path.join(experts_setup.cache_dir(), "data"),
      num_patients=int(d.synthetic.num_patients), seed=int(d.synthetic.seed),
      variant=d.synthetic.variant, image_size=int(d.image_size),
      focal_scale=float(scale), focal_contrast=float(contrast))
  return c


def run_dose(config: ml_collections.ConfigDict, workdir: str,
             scales: Sequence[float] = (), contrasts: Sequence[float] = (),
             num_seeds: int = 3) -> dict:
  """Trains full and global_only at every dose level and writes the table
  of the focal findings' gain (dose.md, dose.json).

  Returns:
    The dose.json contents: {"levels": [...], "markdown": str, ...}.
  """
  levels = dose_levels(scales, contrasts)
  _check_dose_data(config)
  grid = variants(config)
  run_seeds = seeds(config, num_seeds)
  from medbridge_jax import train  # pylint: disable=g-import-not-at-top
  workdir = train.prepare_workdir(workdir)
  jobs = []
  for scale, contrast in levels:
    base = dose_config(config, scale, contrast)
    name = level_name(scale, contrast)
    jobs += [((scale, contrast, v, s), variant_config(base, grid[v], s),
              _run_dir(workdir, v, s, name))
             for v in DOSE_VARIANTS for s in run_seeds]
  done, stopped = _train_all(jobs)
  result = dose_table(config, levels, run_seeds, done)
  result["stopped"] = stopped
  result["markdown"] = dose_markdown(result)
  if result["levels"]:
    _write_result(workdir, "dose", result)
  return result


def dose_table(config: ml_collections.ConfigDict, levels: Sequence[tuple],
               run_seeds: Sequence[int], done: dict) -> dict:
  """Per finished level: per seed the paired focal gain of full over
  global_only on the same test images, and its mean and SD over seeds."""
  bootstrap = int(config.eval.bootstrap)
  out = []
  for scale, contrast in levels:
    keys = [(scale, contrast, v, s) for v in DOSE_VARIANTS for s in run_seeds]
    if not all(k in done for k in keys):
      continue
    per_seed = []
    for s in run_seeds:
      full, glob = (read_run(done[scale, contrast, v, s]["run_dir"],
                             done[scale, contrast, v, s]["test_set"])
                    for v in DOSE_VARIANTS)
      focal = label_groups(full.label_names)["focal"]
      if not focal:
        raise errors.UserError("--dose: the runs have no focal labels "
                               f"({', '.join(full.label_names)})")
      gain = paired(full, glob, focal, bootstrap, s)
      per_seed.append(dict(
          seed=s, gain=gain,
          full=seed_numbers(full), global_only=seed_numbers(glob)))
    focal = list(per_seed[0]["gain"]["mean_labels"])
    out.append(dict(
        focal_scale=scale, focal_contrast=contrast, focal_labels=focal,
        per_seed=per_seed,
        gain=spread([p["gain"]["mean_difference"] for p in per_seed]),
        label_gain={n: spread([p["gain"]["labels"][n]["difference"]
                               for p in per_seed]) for n in focal},
        full_focal=spread([p["full"]["focal_auroc"] for p in per_seed]),
        global_only_focal=spread([p["global_only"]["focal_auroc"]
                                  for p in per_seed])))
  return dict(config=config.to_dict(), seeds=list(run_seeds),
              variants=list(DOSE_VARIANTS), levels=out)


# ---------------------------------------------------------------------------
# The tables as markdown.


def _num(x, sign: bool = False) -> str:
  if x is None or not np.isfinite(x):
    return "n/a"
  return f"{x:+.3f}" if sign else f"{x:.3f}"


def _pm(s: dict, sign: bool = False) -> str:
  """"mean ± sd" of a `spread` dict."""
  if s.get("mean") is None:
    return "n/a"
  if s.get("sd") is None:
    return _num(s["mean"], sign)
  return f"{_num(s['mean'], sign)} ± {s['sd']:.3f}"


def _diff(d: Optional[dict], label: Optional[str] = None) -> str:
  """"+0.012 [-0.004, +0.030]" of a paired difference (mean or a label)."""
  if d is None:
    return "n/a"
  if label is None:
    value, (lo, hi) = d["mean_difference"], d["mean_interval"]
  else:
    value, (lo, hi) = (d["labels"][label]["difference"],
                       d["labels"][label]["interval"])
  if lo is None or hi is None:
    return _num(value, True)
  return f"{_num(value, True)} [{_num(lo, True)}, {_num(hi, True)}]"


def _seconds(values) -> str:
  v = [x for x in values if x]
  return f"{np.mean(v):.0f}" if v else ""


def _row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"


def _facts(c: dict, run_seeds: Sequence[int], test_set: str,
           selected_on: Optional[str]) -> str:
  return (f"Each run: {c['train']['steps']} steps of batch "
          f"{c['train']['batch_size']}, checkpoint selected on "
          f"{selected_on or 'validation'}; reported on the held-out test "
          f"split {test_set}. Seed{'s' if len(run_seeds) > 1 else ''} "
          f"{', '.join(map(str, run_seeds))} "
          f"(config.seed: initialisation, data order, crops; the frozen "
          f"experts and the data are the same for every seed).")


def markdown(result: dict) -> str:
  """The grid as markdown: means over seeds, paired differences per seed,
  per-label AUROC, zero-shot rows."""
  rows, zs = result["rows"], result["zero_shot"]
  if not rows:
    return "No finished ablation runs.\n"
  c, groups, ref = result["config"], result["groups"], result["reference"]
  run_seeds = result["seeds"]
  boot = c["eval"]["bootstrap"]
  out = [
      "# MedBridge ablation", "",
      _facts(c, run_seeds, result["test_set"], result["selected_on"]),
      f"Global findings: {', '.join(groups['global']) or 'none'}; focal "
      f"findings: {', '.join(groups['focal']) or 'none'}; a group's AUROC "
      f"is the mean of its labels' AUROCs."
      + (f" Values: mean ± SD over the {len(run_seeds)} seeds."
         if len(run_seeds) > 1 else ""), ""]
  head = ["Variant", "What changes", "Mean AUROC", "Global findings",
          "Focal findings", "Train+eval (s)"]
  out += [_row(head), "|" + "---|" * len(head)]
  for r in rows:
    out.append(_row([r["variant"], r["description"], _pm(r["mean_auroc"]),
                     _pm(r["global_auroc"]), _pm(r["focal_auroc"]),
                     _seconds(r["wall_s"])]))
  for r in zs:
    out.append(_row([r["variant"], r["description"], _num(r["mean_auroc"]),
                     _num(r["global_auroc"]), _num(r["focal_auroc"]), ""]))
  compared = [r for r in rows if "vs_reference" in r]
  if compared:
    out += ["", f"Test AUROC minus {ref}'s on the same images, per seed, "
            f"with a 95% patient-level paired bootstrap interval ({boot} "
            f"resamples); mean over "
            f"{', '.join(c['eval']['mean_labels']) or 'all labels'}, and "
            f"over the focal findings:", ""]
    head = ["Variant", "Δ"] + [f"seed {s}" for s in run_seeds]
    out += [_row(head), "|" + "---|" * len(head)]
    for r in compared:
      for what in ("mean", "focal"):
        out.append(_row([r["variant"], what] + [
            _diff(v[what]) for v in r["vs_reference"]]))
  labels = list(rows[0]["auroc"])
  out += ["", "Per-label test AUROC (mean ± SD over seeds):", "",
          _row(["Variant"] + labels), "|" + "---|" * (len(labels) + 1)]
  for r in rows:
    out.append(_row([r["variant"]] + [_pm(r["auroc"][n]) for n in labels]))
  for r in zs:
    out.append(_row([r["variant"]]
                    + [_num(r["auroc"].get(n)) for n in labels]))
  if result.get("stopped"):
    out += ["", f"Stopped (SIGTERM) in {result['stopped']}; rerun the same "
            "command to resume."]
  return "\n".join(out) + "\n"


def dose_markdown(result: dict) -> str:
  """The dose-response table as markdown."""
  levels = result["levels"]
  if not levels:
    return "No finished dose-response runs.\n"
  c, run_seeds = result["config"], result["seeds"]
  focal = levels[0]["focal_labels"]
  out = [
      "# Focal gain against the findings' size and contrast", "",
      _facts(c, run_seeds, "the test split", None),
      "Each level draws the focal findings (" + ", ".join(focal) + ") with "
      "data.synthetic.focal_scale times their size (nodule radius, pleural "
      "line width) and focal_contrast times their contrast. Gain: full's "
      "test AUROC minus global_only's on the same images, mean ± SD over "
      "seeds; per seed with a 95% patient-level paired bootstrap interval "
      f"({c['eval']['bootstrap']} resamples).", ""]
  head = (["focal_scale", "focal_contrast", "Focal gain"]
          + [f"{n} gain" for n in focal]
          + ["full focal AUROC", "global_only focal AUROC"])
  out += [_row(head), "|" + "---|" * len(head)]
  for lv in levels:
    out.append(_row([f"{lv['focal_scale']:g}", f"{lv['focal_contrast']:g}",
                     _pm(lv["gain"], True)]
                    + [_pm(lv["label_gain"][n], True) for n in focal]
                    + [_pm(lv["full_focal"]), _pm(lv["global_only_focal"])]))
  head = ["focal_scale", "focal_contrast", "seed", "Focal gain"] + [
      f"{n} gain" for n in focal]
  out += ["", "Per seed:", "", _row(head), "|" + "---|" * len(head)]
  for lv in levels:
    for p in lv["per_seed"]:
      out.append(_row([f"{lv['focal_scale']:g}", f"{lv['focal_contrast']:g}",
                       str(p["seed"]), _diff(p["gain"])]
                      + [_diff(p["gain"], n) for n in focal]))
  if result.get("stopped"):
    out += ["", f"Stopped (SIGTERM) in {result['stopped']}; rerun the same "
            "command to resume."]
  return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# Command line.


def _define_flags():
  """The flags, defined only when run as a program (so that importing this
  module next to `medbridge_jax.main` defines no flag twice)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file(
      "config", None, "Task config file, optionally with a variant: "
      "configs/in_domain.py[:runlocal]; --config.<key>=... overrides apply "
      "to every ablation run.", lock_config=True)
  flags.DEFINE_string(
      "workdir", None, "Directory of the experiment: one sub-workdir per "
      "run, results.md/json (grid), dose.md/json (dose-response) (default: "
      "./workdir/ablate_<config>).")
  flags.DEFINE_list(
      "variants", [], "Grid variants to run, comma-separated (default: all "
      "of them; see the module docstring).")
  flags.DEFINE_integer("seeds", 3, "Training seeds per variant (config.seed "
                       "and the next ones).")
  flags.DEFINE_list(
      "dose", [], "Dose-response instead of the grid: focal_scale levels, "
      "e.g. 0.5,1,2,4 (full and global_only at each).")
  flags.DEFINE_list(
      "dose_contrast", [], "Dose-response: focal_contrast levels, e.g. "
      "0.5,2 (with --dose or alone).")
  flags.mark_flag_as_required("config")
  return config


def _parse_flags(argv):
  """absl's parsing, each failure as one line naming the flag; exit 2."""
  return cli.parse_flags(PROGRAM, argv)


def _floats(values: Sequence[str], flag: str) -> list[float]:
  try:
    return [float(v) for v in values]
  except ValueError:
    raise errors.UserError(f"--{flag}={','.join(values)}: not numbers"
                           ) from None


def main(argv, config_flag) -> None:
  config = cli.load_config(PROGRAM, argv, config_flag)
  workdir = flags.FLAGS.workdir or os.path.join(
      "workdir", "ablate_" + cli.config_name(cli.config_spec()))
  cli.quiet_libraries()
  with errors.exit_on_user_error(PROGRAM):
    from medbridge_jax import sharding  # pylint: disable=g-import-not-at-top
    fl = flags.FLAGS
    dose = fl.dose or fl.dose_contrast
    if dose and fl.variants:
      raise errors.UserError("--variants is for the grid; --dose runs full "
                             "and global_only")
    scales = _floats(fl.dose, "dose")
    contrasts = _floats(fl.dose_contrast, "dose_contrast")
    sharding.maybe_initialize_distributed()
    cli.enable_compilation_cache()  # Later runs skip compilation.
    if dose:
      result = run_dose(config, workdir, scales, contrasts, fl.seeds)
      name = "dose.md"
    else:
      result = run(config, workdir, fl.variants, fl.seeds)
      name = "results.md"
    print(result["markdown"])
    logging.info("Table: %s", os.path.join(os.path.abspath(workdir), name))
    if result["stopped"]:
      sys.exit(1)


if __name__ == "__main__":
  _config_flag = _define_flags()
  app.run(lambda argv: main(argv, _config_flag), flags_parser=_parse_flags)
