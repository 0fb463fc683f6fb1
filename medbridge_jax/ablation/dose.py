"""The dose-response: full's focal gain over global_only against the
synthetic findings' size (focal_scale) and contrast (focal_contrast)."""

import copy
from typing import Sequence

import ml_collections

from medbridge_jax.ablation import numbers
from medbridge_jax.ablation import runs
from medbridge_jax.ablation import tables
from medbridge_jax.ablation import variants
from medbridge_jax import cache
from medbridge_jax.data import synthetic
from medbridge_jax.data import synthetic_draw
from medbridge_jax import errors
from medbridge_jax import train

DOSE_VARIANTS = ("full", "global_only")


def dose_levels(scales: Sequence[float], contrasts: Sequence[float]
                ) -> list[tuple[float, float]]:
  """(focal_scale, focal_contrast) levels: the scales at contrast 1, then
  the contrasts at scale 1, each once, in the order given."""
  out = []
  for level in [(float(s), 1.0) for s in scales] + [
      (1.0, float(c)) for c in contrasts]:
    synthetic_draw.check_dose(*level)
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
  _check_dose_data(config)
  d = config.data
  c = copy.deepcopy(config)
  if (float(scale), float(contrast)) == (1.0, 1.0):
    return c
  c.data.synthetic.focal_scale = float(scale)
  c.data.synthetic.focal_contrast = float(contrast)
  c.data.root = synthetic.ensure(
      cache.path("data"),
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
  grid = variants.for_config(config)
  run_seeds = runs.seeds(config, num_seeds)
  workdir = train.prepare_workdir(workdir)
  jobs = []
  for scale, contrast in levels:
    base = dose_config(config, scale, contrast)
    name = level_name(scale, contrast)
    jobs += [((scale, contrast, v, s),
              variants.variant_config(base, grid[v], s),
              runs.run_folder(workdir, v, s, name))
             for v in DOSE_VARIANTS for s in run_seeds]
  done, stopped = runs.train_all(jobs)
  result = dose_table(config, levels, run_seeds, done)
  result["stopped"] = stopped
  result["markdown"] = tables.dose_markdown(result)
  if result["levels"]:
    tables.write_result(workdir, "dose", result)
  return result


def dose_table(config: ml_collections.ConfigDict, levels: Sequence[tuple],
               run_seeds: Sequence[int], done: dict) -> dict:
  """Per finished level: per seed the paired focal gain of full over
  global_only on the same test images, and its mean and SD over seeds."""
  out = []
  for scale, contrast in levels:
    keys = [(scale, contrast, v, s) for v in DOSE_VARIANTS for s in run_seeds]
    if all(k in done for k in keys):
      per_seed = [_seed_gain(config, done, scale, contrast, s)
                  for s in run_seeds]
      out.append(_level_row(scale, contrast, per_seed))
  return dict(config=config.to_dict(), seeds=list(run_seeds),
              variants=list(DOSE_VARIANTS), levels=out)


def _seed_gain(config: ml_collections.ConfigDict, done: dict, scale: float,
               contrast: float, seed: int) -> dict:
  """One seed's paired focal gain of full over global_only at a level, and
  both runs' numbers."""
  full, glob = (runs.read_run(done[scale, contrast, v, seed]["run_dir"],
                              done[scale, contrast, v, seed]["test_set"])
                for v in DOSE_VARIANTS)
  focal = numbers.label_groups(full.label_names)["focal"]
  if not focal:
    raise errors.UserError("--dose: the runs have no focal labels "
                           f"({', '.join(full.label_names)})")
  gain = numbers.paired(full, glob, focal, int(config.eval.bootstrap), seed)
  return dict(seed=seed, gain=gain, full=numbers.seed_numbers(full),
              global_only=numbers.seed_numbers(glob))


def _level_row(scale: float, contrast: float, per_seed: list[dict]) -> dict:
  """A level's gains per seed and their spread over the seeds."""
  spread = numbers.spread
  focal = list(per_seed[0]["gain"]["mean_labels"])
  return dict(
      focal_scale=scale, focal_contrast=contrast, focal_labels=focal,
      per_seed=per_seed,
      gain=spread([p["gain"]["mean_difference"] for p in per_seed]),
      label_gain={n: spread([p["gain"]["labels"][n]["difference"]
                             for p in per_seed]) for n in focal},
      full_focal=spread([p["full"]["focal_auroc"] for p in per_seed]),
      global_only_focal=spread([p["global_only"]["focal_auroc"]
                                for p in per_seed]))
