"""One run per sub-workdir: trained once, then read back from its files.

A sub-workdir keeps the config it was asked to run (REQUEST_FILE); when it
holds a finished run (RESULT_FILE and the test predictions) it is reused,
otherwise it trains, resuming from its checkpoints. Asking the same
sub-workdir to run another config is an error.
"""

import dataclasses
import json
import os
import time
from typing import Optional, Sequence

from absl import logging
import ml_collections
import numpy as np

from medbridge_jax import checkpoints
from medbridge_jax import errors
from medbridge_jax import jsonfile
from medbridge_jax import report
from medbridge_jax import train

REQUEST_FILE = "ablation_request.json"  # In each sub-workdir: its config.
RESULT_FILE = "ablation_run.json"  # Written when its run has finished.
PREDICTIONS_FILE = "predictions_test.npz"  # The trainer's, test split.


def seeds(config: ml_collections.ConfigDict, num_seeds: int) -> list[int]:
  """The training seeds: config.seed, config.seed + 1, ..."""
  if int(num_seeds) < 1:
    raise errors.UserError(f"--seeds={num_seeds} must be at least 1")
  return [int(config.seed) + k for k in range(int(num_seeds))]


def run_folder(workdir: str, variant: str, seed: int, level: str = "") -> str:
  """workdir/[level/]variant/seed<seed>."""
  return os.path.join(workdir, *([level] if level else []), variant,
                      f"seed{seed}")


def train_all(jobs: Sequence[tuple]) -> tuple[dict, Optional[str]]:
  """Runs (key, config, run_dir) jobs in order: ({key: run_one's dict},
  the run_dir a SIGTERM stopped, or None)."""
  done = {}
  for key, c, run_dir in jobs:
    info = run_one(c, run_dir)
    if info.get("stopped"):
      return done, run_dir
    done[key] = info
  return done, None


def run_one(config: ml_collections.ConfigDict, run_dir: str) -> dict:
  """Trains `config` in `run_dir`, or reuses the finished run there.

  Returns:
    {"run_dir", "test_set", "wall_s", "reused"}, or {"run_dir", "stopped"}
    when a SIGTERM stopped the training.
  """
  _claim(run_dir, json.loads(json.dumps(config.to_dict())))
  done = os.path.join(run_dir, RESULT_FILE)
  if os.path.isfile(done) and os.path.isfile(
      os.path.join(run_dir, PREDICTIONS_FILE)):
    info = jsonfile.read(done, "finished sub-run record")
    logging.info("%s finished before; reused.", run_dir)
    return dict(info, run_dir=run_dir, reused=True)
  logging.info("Training in %s.", run_dir)
  start = time.monotonic()
  record = train.train_and_evaluate(config, run_dir)
  if record.get("stopped"):
    return dict(run_dir=run_dir, stopped=record["stopped"])
  info = dict(test_set=record["set"], wall_s=round(time.monotonic() - start,
                                                   1))
  jsonfile.write(done, info, indent=1)
  return dict(info, run_dir=run_dir, reused=False)


def _claim(run_dir: str, wanted: dict) -> None:
  """Records `wanted` as the run_dir's config, or checks it is the one
  recorded there before."""
  os.makedirs(run_dir, exist_ok=True)
  request = os.path.join(run_dir, REQUEST_FILE)
  if not os.path.isfile(request):
    jsonfile.write(request, wanted, indent=1)
    return
  asked = jsonfile.read(request, "sub-run config record")
  diff = _first_difference(asked, wanted)
  if diff:
    raise errors.UserError(
        f"sub-run {run_dir} was made with another config ({diff});"
        f" use another --workdir")


def _first_difference(a: dict, b: dict) -> Optional[str]:
  differ = checkpoints.config_differences(a, b)
  if not differ:
    return None
  k, there, now = differ[0]
  return f"{k}: {there!r} there, {now!r} now"


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


def read_run(run_dir: str, test_set: str,
             predictions_file: str = PREDICTIONS_FILE) -> RunResult:
  """The last final record of `test_set` in run_dir/metrics.jsonl and the
  arrays of run_dir/`predictions_file` (predictions_test.npz: the main test
  split's; an extra test set's is predictions_<report.slug(set)>.npz)."""
  record = _final_record(run_dir, test_set)
  with np.load(os.path.join(run_dir, predictions_file)) as z:
    arrays = {k: z[k] for k in z.files}
  patients = arrays["patients"]
  if patients.ndim != 1 or len(patients) != len(arrays["probs"]):
    patients = None  # Saved without patient ids.
  names = _label_names(run_dir, arrays)
  if (arrays["probs"].shape[1:] != (len(names),)
      or sorted(names) != sorted(record["auroc"])):
    raise errors.UserError(
        f"{run_dir}/{predictions_file} holds {arrays['probs'].shape[1:]} "
        f"columns for the labels {', '.join(record['auroc'])} of its test "
        "record")
  return RunResult(run_dir, record, names, arrays["probs"],
                   arrays["targets"], arrays["mask"], patients)


def _final_record(run_dir: str, test_set: str) -> dict:
  """The last final record of `test_set` in run_dir/metrics.jsonl."""
  finals = [r for r in report.read_jsonl(run_dir)
            if r.get("final") and r.get("set") == test_set]
  if not finals:
    raise errors.UserError(f"{run_dir}/metrics.jsonl has no final record "
                           f"of {test_set}; remove {RESULT_FILE} there "
                           "to report again")
  return finals[-1]


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
  return list(report.thresholds_table(
      jsonfile.read(path, "thresholds file"), path))
