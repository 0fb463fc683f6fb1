r"""Predicts labels for new images with a trained run: the command line.

  python -m medbridge_jax.predict --workdir=DIR --inputs=PATH[,PATH...] \
      [--inputs=PATH ...] [PATH ...] [--output=FILE] \
      [--checkpoint=best|latest] [--batch_size=N] [--skip_bad] \
      [--explain=DIR [--explain_labels=a,b|all]]

Each PATH is an image file (read whatever its name; DICOM by a .dcm/.dicom
suffix) or a folder searched recursively for .png, .jpg, .jpeg, .dcm and
.dicom files (hidden files and folders left out). Words after the flags are
inputs too, so a shell glob (`--inputs=scans/*.png`) works.

The model is rebuilt from DIR/config.json and its experts (the same folders;
generated random experts come from the cache, written again if missing), its
trainable parameters are restored from the best (or the latest) checkpoint,
and every image goes through the evaluation path: `images.read_image` at
config.data.image_size, then the model in evaluation mode (sliding windows).

The CSV (default DIR/predictions.csv) has one row per image, in input order
(a folder's files sorted by path): `path`, one probability column per label,
then `positive_labels`, the labels whose probability is at or above the
threshold stored with the loaded checkpoint (chosen on the validation split
when that very state was evaluated, so best and latest each use their own),
joined by ";". A label without a threshold (one class only in the validation
data) is never listed. The experts' towers must be the ones the checkpoint
was trained with (their fingerprints are compared). With --skip_bad an
unreadable image gets no row and a warning counts them; without it the first
one is an error naming the file. The CSV is written to a temporary file and
renamed, so an error never leaves half a file.

With --explain=DIR the same pass also computes each image's per-label
evidence maps (`model.evidence.maps`, jitted once with the probabilities,
which stay those of the plain path) and writes into DIR, for each image
`<stem>` (its file name less the suffix; `<stem>-2`, ... for later inputs
whose stem is taken):

  <stem>_<label slug>.png  the stored image with the label's map blended on
                           it (`overlays.overlay`), for every positive label
                           (as in the CSV) and every label --explain_labels
                           names ("all": every label);
  <stem>.json              per explained label its probability, threshold
                           and the map's top regions (`overlays.top_regions`)
                           in the stored image's pixels and in the input
                           file's (see `region_json`).

The stored image is the input letterboxed to config.data.image_size
(`images.letterbox`): scaled by size / its longer side and centred on
black. Original coordinates undo that centring and scaling; a point on the
black padding has none (null), a box is clipped to the image (a large JPEG,
decoded at a reduced scale, may be off by a pixel of the stored image's
rounding). Evidence
maps need a MedBridge run with query tokens in "non_destructive" mode
(config.method.name, config.model.queries.*): any other run is refused
before the model loads. Maps take batch x labels x size^2 floats on the
device: lower --batch_size if it runs short of memory.
"""

import concurrent.futures
import csv
import dataclasses
import os
import tempfile
from typing import Callable, Iterator, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

# JAX, the model and the experts are imported where they are used: every
# check of the flags, the workdir and the inputs answers in well under a
# second, before they load.
from medbridge_jax import cli
from medbridge_jax import errors
from medbridge_jax import jsonfile
from medbridge_jax import report
from medbridge_jax.data.images import letterbox_geometry

PROGRAM = "medbridge_jax.predict"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
CHECKPOINTS = ("best", "latest")
TOP_REGIONS = 3  # Regions per explained label in the JSON.


def _define_flags() -> None:
  """The flags, defined only when run as a program: importing this module
  (tests, notebooks) must not clash with main.py's --workdir."""
  flags.DEFINE_string(
      "workdir", None, "Workdir of a finished training run (config.json, "
      "thresholds.json, checkpoints).")
  flags.DEFINE_multi_string(
      "inputs", [], "Image files or folders (searched recursively); "
      "comma-separated and/or repeated.")
  flags.DEFINE_string(
      "output", None, "CSV to write (default: <workdir>/predictions.csv).")
  flags.DEFINE_enum(
      "checkpoint", "best", CHECKPOINTS, "Which checkpoint's parameters: the "
      "best by validation mean AUROC, or the latest saved.")
  flags.DEFINE_integer(
      "batch_size", None, "Images per model call (default: the run's "
      "config.eval.batch_size); rounded up to a multiple of the devices.")
  flags.DEFINE_bool(
      "skip_bad", False, "Skip unreadable images (counted in a warning, no "
      "row) instead of stopping at the first.")
  flags.DEFINE_string(
      "explain", None, "Folder for evidence overlays (PNG per explained "
      "label) and regions (JSON per image); created if missing.")
  flags.DEFINE_string(
      "explain_labels", None, "With --explain: labels to explain whatever "
      "their probability, comma-separated, or 'all' (positive labels are "
      "always explained).")


# ---------------------------------------------------------------------------
# Inputs.


def _split_inputs(values: Sequence[str]) -> list[str]:
  """Flag values and extra words -> paths; a value is split on commas
  unless it names an existing path as a whole."""
  out = []
  for v in values:
    if os.path.exists(v):
      out.append(v)
    else:
      out.extend(p for p in v.split(",") if p)
  return out


def find_images(inputs: Sequence[str]) -> list[str]:
  """The image files of `inputs`, in order, each once.

  A file is taken as named; a folder contributes its image files (by
  suffix, case-insensitive) at any depth, sorted by path, hidden files and
  folders left out.

  Raises:
    UserError: no inputs, an input that does not exist, or no image found.
  """
  if not inputs:
    raise errors.UserError("no inputs given (--inputs=PATH, a file or a "
                           "folder)")
  found, seen = [], set()

  def add(path):
    key = os.path.realpath(path)
    if key not in seen:
      seen.add(key)
      found.append(path)

  for item in inputs:
    path = os.path.expanduser(item)
    if os.path.isfile(path):
      add(path)
    elif os.path.isdir(path):
      for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
          if (not name.startswith(".")
              and name.lower().endswith(IMAGE_SUFFIXES)):
            add(os.path.join(folder, name))
    else:
      raise errors.UserError(f"input not found: {item}")
  if not found:
    raise errors.UserError(
        f"no images found in {', '.join(inputs)} (looked for "
        f"{'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files)")
  return found


# ---------------------------------------------------------------------------
# The trained run.


@dataclasses.dataclass
class Run:
  """What prediction needs from a finished run's workdir."""
  workdir: str
  config: object  # ml_collections.ConfigDict, as saved in config.json.
  label_names: tuple[str, ...]


@dataclasses.dataclass
class Loaded:
  """A restored checkpoint, ready to predict."""
  fn: Callable  # uint8 (B, H, W) on the mesh -> probabilities (B, L).
  mesh: object
  step: int
  thresholds: np.ndarray  # (L,) float64, nan: no threshold.
  chosen_on: str  # The split the thresholds were chosen on.
  model: object = None  # The built module (--explain applies it).
  params: object = None  # Restored trainable parameters, on the mesh.
  frozen: object = None  # The experts' frozen towers, on the mesh.


def open_run(workdir: str) -> Run:
  """Reads the run's config and thresholds; UserError unless it finished."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  if not workdir:
    raise errors.UserError("no workdir given (--workdir)")
  path = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(path):
    raise errors.UserError(f"workdir not found: {workdir}")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise errors.UserError(
        f"{workdir} has no config.json: not the workdir of a training run "
        f"(python -m medbridge_jax.main --workdir=... writes it)")
  config = ml_collections.ConfigDict(jsonfile.read(config_path, "run config"))
  # thresholds.json (the selected checkpoint's) lists the run's labels in
  # the model's output order.
  thresholds_path = os.path.join(path, "thresholds.json")
  if not os.path.isfile(thresholds_path):
    raise errors.UserError(
        f"{workdir} has no thresholds.json: its run has not finished (rerun "
        f"the same training command to finish it)")
  label_names = tuple(report.thresholds_table(
      jsonfile.read(thresholds_path, "thresholds file"), thresholds_path))
  wanted = tuple(config.data.labels)
  if wanted and wanted != label_names:
    raise errors.UserError(
        f"{thresholds_path} lists labels {list(label_names)}, config.json "
        f"{list(wanted)}: the files come from different runs")
  return Run(path, config, label_names)


def _has_step(folder: str) -> bool:
  return os.path.isdir(folder) and any(
      name.isdigit() for name in os.listdir(folder))


def load_model(run: Run, checkpoint: str = "best") -> Loaded:
  """The run's best (or latest) checkpoint, with its own thresholds.

  The function maps uint8 images (B, H, W), B a multiple of the mesh's
  devices, sharded over the mesh's batch axis, to float32 probabilities
  (B, L): `evaluate.make_model_fn` with the restored trainable parameters
  and the experts' frozen towers bound. UserError when the experts' towers
  are not those the checkpoint was trained with, or when the checkpoint
  was not evaluated (no thresholds).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from medbridge_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from medbridge_jax import config_check  # pylint: disable=g-import-not-at-top
  from medbridge_jax import evaluate  # pylint: disable=g-import-not-at-top
  from medbridge_jax import methods  # pylint: disable=g-import-not-at-top
  from medbridge_jax import optim  # pylint: disable=g-import-not-at-top
  from medbridge_jax import sharding  # pylint: disable=g-import-not-at-top
  from medbridge_jax import train_state  # pylint: disable=g-import-not-at-top
  from medbridge_jax.experts import from_config  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import medbridge  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import partition  # pylint: disable=g-import-not-at-top

  config = run.config
  config_check.check(config)
  _check_saved(run.workdir, checkpoint)
  from_config.announce(config)
  experts = from_config.load(config)
  # The head's text initialisation only sets initial values, which the
  # checkpoint replaces: skip the prompts' text forward (and tokenizers).
  build_config = ml_collections.ConfigDict(config.to_dict())
  build_config.model.head.text_init = False
  model = methods.build(build_config, experts, run.label_names)
  rules = methods.partition_rules(config, experts)

  # Prediction runs on this machine's devices, whatever the run trained on.
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1}))
  replicated = sharding.replicated(mesh)
  abstract = medbridge.abstract_params(model, int(config.data.image_size))
  trainable, _ = partition.split(abstract, rules)
  # The loaded towers, less what the method trained (fine-tuned blocks):
  # that comes from the checkpoint.
  frozen = jax.device_put(
      partition.split(medbridge.tower_params(abstract, experts), rules)[1],
      replicated)
  abstract_state = train_state.abstract(trainable, optim.make(config.train),
                                        replicated)
  state, meta, where = _restore(run, checkpoint, abstract_state, experts)
  table = checkpoints.thresholds_of(meta, where)
  if tuple(table) != run.label_names:
    raise errors.UserError(f"{where} has thresholds for {list(table)}, the "
                           f"run's labels are {list(run.label_names)}")
  logging.info("Restored %s.", where)
  model_fn = evaluate.make_model_fn(model)
  params = state["params"]
  return Loaded(
      fn=lambda x: model_fn(params, frozen, x), mesh=mesh,
      step=int(meta["step"]),
      thresholds=np.array([np.nan if t is None else float(t)
                           for t in table.values()]),
      chosen_on=str(meta["thresholds"].get("chosen_on", "validation data")),
      model=model, params=params, frozen=frozen)


def _restore(run: Run, checkpoint: str, abstract_state, experts
             ) -> tuple[dict, dict, str]:
  """(state, meta, a description of it) of the run's `checkpoint`, its
  towers checked against the loaded experts'."""
  from medbridge_jax import checkpoints  # pylint: disable=g-import-not-at-top
  # Read-only: a training run may still be writing into this workdir.
  ckpt = checkpoints.Checkpointer(run.workdir,
                                  int(run.config.train.keep_checkpoints),
                                  async_save=False, read_only=True)
  try:
    restored = ckpt.restore_which(checkpoint, abstract_state,
                                  run.config.to_dict())
  finally:
    ckpt.close()
  if restored is None:
    raise errors.UserError(f"no {checkpoint} checkpoint in {run.workdir}")
  state, meta = restored
  where = f"the {checkpoint} checkpoint of {run.workdir} (step {meta['step']})"
  checkpoints.check_towers(
      meta.get("towers"),
      checkpoints.tower_fingerprints(experts, [e.name for e in experts]),
      where)
  return state, meta, where


def _check_saved(workdir: str, checkpoint: str) -> None:
  """UserError, before anything loads, when `checkpoint` was never saved."""
  if checkpoint not in CHECKPOINTS:
    raise errors.UserError(f"checkpoint {checkpoint!r}: expected one of "
                           f"{CHECKPOINTS}")
  folder = os.path.join(workdir,
                        "best" if checkpoint == "best" else "checkpoints")
  if not _has_step(folder):
    hint = (" (no validation mean AUROC was ever defined; try "
            "--checkpoint=latest)" if checkpoint == "best"
            and _has_step(os.path.join(workdir, "checkpoints")) else "")
    raise errors.UserError(f"no {checkpoint} checkpoint in {folder}{hint}")


# ---------------------------------------------------------------------------
# Prediction.


def _read(path: str, size: int):
  """(image, None) or (None, one-line reason) for an unreadable file."""
  from medbridge_jax.data import images  # pylint: disable=g-import-not-at-top
  try:
    return images.read_image(path, size), None
  except errors.UserError as e:
    return None, errors.one_line(e)


def _read_batches(paths: Sequence[str], batch: int, size: int
                  ) -> Iterator[list[tuple[str, Optional[np.ndarray],
                                           Optional[str]]]]:
  """Chunks of `batch` (path, image, error), decoded by a thread pool that
  reads the next chunk while the caller computes on this one."""
  workers = max(1, min(8, os.cpu_count() or 1))
  chunks = [paths[i:i + batch] for i in range(0, len(paths), batch)]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    submit = lambda chunk: [pool.submit(_read, p, size) for p in chunk]
    pending = submit(chunks[0])
    try:
      for i, chunk in enumerate(chunks):
        done = [f.result() for f in pending]
        pending = submit(chunks[i + 1]) if i + 1 < len(chunks) else []
        yield [(p, image, error) for p, (image, error) in zip(chunk, done)]
    finally:
      for f in pending:
        f.cancel()


def predict_files(fn: Callable, mesh, paths: Sequence[str], image_size: int,
                  batch_size: int, skip_bad: bool = False,
                  each_batch: Optional[Callable] = None
                  ) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
  """Probabilities of every readable image.

  Args:
    fn: sharded uint8 (B, H, W) -> probabilities (B, L), as `load_model`'s;
      with `each_batch`, -> (probabilities, another (B, ...) array), as
      `evidence_fn`'s.
    mesh: the mesh `fn` runs on (its size divides every batch).
    paths: image files, in output order.
    image_size: side the images are read at (config.data.image_size).
    batch_size: images per call; the last batch is padded with black images.
    skip_bad: leave unreadable images out instead of raising.
    each_batch: optional; called for every batch, in order, with (paths,
      their uint8 images (n, H, W), probabilities (n, L), fn's other
      output (n, ...)) as numpy arrays, padding rows dropped.

  Returns:
    (paths predicted, float32 probabilities (N, L) in that order, skipped
    (path, reason) pairs).

  Raises:
    UserError: an unreadable image (naming it) unless `skip_bad`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from medbridge_jax import sharding  # pylint: disable=g-import-not-at-top
  batch_sharding = sharding.batch_sharding(mesh)
  kept, probs, skipped = [], [], []
  running = None  # (device outputs, paths, images) of the previous batch.

  def collect(outputs, names, images):
    n = len(names)
    if each_batch is None:
      probs.append(np.asarray(jax.device_get(outputs))[:n])
      return
    host = jax.device_get(outputs)
    probs.append(np.asarray(host[0])[:n])
    each_batch(names, images[:n], probs[-1], np.asarray(host[1])[:n])

  for chunk in _read_batches(paths, batch_size, image_size):
    rows = np.zeros((batch_size, image_size, image_size), np.uint8)
    names = []
    for path, image, error in chunk:
      if error is not None:
        if not skip_bad:
          raise errors.UserError(
              f"{error} (--skip_bad skips unreadable images)")
        skipped.append((path, error))
        continue
      rows[len(names)] = image
      names.append(path)
    if not names:
      continue
    # Dispatch is asynchronous: this batch computes while the previous
    # one's probabilities come back and the next one is decoded.
    out = fn(jax.device_put(rows, batch_sharding))
    if running is not None:
      collect(*running)
    running = (out, names, rows)
    kept.extend(names)
  if running is not None:
    collect(*running)
  if skipped:
    logging.warning("%d unreadable image(s) skipped, no row for them: %s%s",
                    len(skipped), skipped[0][1],
                    f" (and {len(skipped) - 1} more)" if len(skipped) > 1
                    else "")
  if not kept:
    raise errors.UserError(f"none of the {len(paths)} images could be read "
                           f"(e.g. {skipped[0][1]})")
  return kept, np.concatenate(probs).astype(np.float32), skipped


def positive_labels(probs: np.ndarray, label_names: Sequence[str],
                    thresholds: np.ndarray) -> list[list[str]]:
  """Per row, the labels with probability >= their threshold (none if nan).

  Compared in float64, as the thresholds were chosen on float64 copies of
  float32 probabilities.
  """
  probs = np.asarray(probs, np.float64)
  # nan never compares >=: a label without a threshold is never positive.
  hits = probs >= np.asarray(thresholds, np.float64)[None]
  return [[n for n, h in zip(label_names, row) if h] for row in hits]


def write_csv(path: str, paths: Sequence[str], probs: np.ndarray,
              label_names: Sequence[str], thresholds: np.ndarray) -> None:
  """The predictions CSV (see module doc), written atomically.

  Probabilities are written as the shortest decimals that read back to the
  same float32.
  """
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".predictions-", suffix=".csv",
                             dir=folder)
  try:
    with os.fdopen(fd, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["path", *label_names, "positive_labels"])
      positives = positive_labels(probs, label_names, thresholds)
      for p, row, pos in zip(paths, np.asarray(probs, np.float32), positives):
        w.writerow([p, *(repr(float(v)) for v in row), ";".join(pos)])
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# ---------------------------------------------------------------------------
# Explanations (--explain).


def check_explainable(config, where: str) -> None:
  """UserError, from the config alone, unless evidence maps can explain
  the run's model: MedBridge with query tokens in "non_destructive" mode
  (`evidence.check_model`'s rule). `where` names the config file."""
  method = config.get("method", {}).get("name", "medbridge")
  queries = config.model.get("queries", {})
  why = "(evidence maps read the query tokens' attention)"
  if method != "medbridge":
    raise errors.UserError(f"--explain needs config.method.name='medbridge' "
                           f"{why}; {where} has {method!r}")
  if not queries.get("enabled", True):
    raise errors.UserError(f"--explain needs query tokens {why}; {where} "
                           f"has config.model.queries.enabled=False")
  if int(queries.get("num_queries", 1)) < 1:
    raise errors.UserError(
        f"--explain needs query tokens {why}; {where} has "
        f"config.model.queries.num_queries={queries.get('num_queries')}")
  mode = queries.get("mode", "non_destructive")
  if mode != "non_destructive":
    raise errors.UserError(
        f"--explain needs config.model.queries.mode='non_destructive' (in "
        f"{mode!r} mode the queries change the image tokens, so their "
        f"attention is not the image's evidence); {where} has {mode!r}")


def parse_explain_labels(value, label_names: Sequence[str]
                         ) -> tuple[str, ...]:
  """--explain_labels ("a,b", "all", a sequence, or None) -> the run's
  label names it picks, in the run's order. A label is named as the run
  spells it or by its slug ("pleural_effusion")."""
  if value is None:
    return ()
  words = ([w.strip() for w in value.split(",")] if isinstance(value, str)
           else [str(w).strip() for w in value])
  words = [w for w in words if w]
  if words == ["all"]:
    return tuple(label_names)
  by_name = {n: n for n in label_names}
  by_name.update({report.slug(n): n for n in label_names})
  unknown = [w for w in words if w not in by_name]
  if unknown or not words:
    raise errors.UserError(
        f"--explain_labels: {', '.join(map(repr, unknown)) or 'nothing'} "
        f"{'is' if len(unknown) == 1 else 'are'} not among the run's labels "
        f"({', '.join(label_names)}; or 'all')")
  chosen = {by_name[w] for w in words}
  return tuple(n for n in label_names if n in chosen)


def _check_explain_dir(path: str) -> str:
  """The folder's absolute path; UserError unless it is a writable folder
  or can be made one (it is made later, once the model has loaded)."""
  path = os.path.abspath(os.path.expanduser(path))
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise errors.UserError(f"--explain {path}: {existing} is a file, not a "
                           f"folder")
  if not os.access(existing, os.W_OK):
    raise errors.UserError(f"--explain folder {existing} cannot be written")
  return path


def evidence_fn(loaded: Loaded) -> Callable:
  """Sharded uint8 (B, H, W) -> (probabilities (B, L), evidence maps
  (B, L, H, W) float32) of the loaded model, jitted (one compilation per
  batch shape). The probabilities are those of the evaluation's apply,
  as `load_model`'s function gives them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import evidence  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import partition  # pylint: disable=g-import-not-at-top
  model = loaded.model
  evidence.check_model(model)

  @jax.jit
  def fn(trainable, frozen, images):
    params = partition.merge(trainable, frozen)
    maps, info = evidence.maps(model, params, images)
    return jax.nn.sigmoid(info["logits"].astype(jnp.float32)), maps

  return lambda x: fn(loaded.params, loaded.frozen, x)


def original_point(y: int, x: int, hw: tuple[int, int], size: int
                   ) -> Optional[tuple[int, int]]:
  """The input pixel under the centre of stored pixel (y, x); None on the
  letterbox's padding. Exact integer arithmetic: the letterbox maps the
  image's edges 0..h onto top..top + new_h (and likewise across)."""
  top, left, new_h, new_w = letterbox_geometry(hw, size)
  h, w = (int(v) for v in hw)
  if not (top <= y < top + new_h and left <= x < left + new_w):
    return None
  return (((2 * (y - top) + 1) * h) // (2 * new_h),
          ((2 * (x - left) + 1) * w) // (2 * new_w))


def original_box(box: Sequence[int], hw: tuple[int, int], size: int
                 ) -> Optional[tuple[int, int, int, int]]:
  """Inclusive stored box (y0, x0, y1, x1) -> the inclusive box of every
  input pixel it overlaps, after clipping it to the image (None if it
  lies on the padding only)."""
  top, left, new_h, new_w = letterbox_geometry(hw, size)
  h, w = (int(v) for v in hw)
  y0, x0 = max(box[0] - top, 0), max(box[1] - left, 0)
  y1, x1 = min(box[2] - top, new_h - 1), min(box[3] - left, new_w - 1)
  if y0 > y1 or x0 > x1:
    return None
  # Stored pixels a..b cover [a, b + 1) * h / new_h of the input.
  return ((y0 * h) // new_h, (x0 * w) // new_w,
          -((-(y1 + 1) * h) // new_h) - 1, -((-(x1 + 1) * w) // new_w) - 1)


def region_json(region: dict, hw: Optional[tuple[int, int]], size: int
                ) -> dict:
  """One `overlays.top_regions` entry for the JSON: its score, and its peak
  and box in "stored" pixels and in "original" ones (null where there are
  none: on the padding, or the input's size unknown)."""
  y, x, box = region["y"], region["x"], tuple(region["box"])
  point = original_point(y, x, hw, size) if hw else None
  frame = original_box(box, hw, size) if hw else None
  return {
      "score": region["score"],
      "stored": {"y": y, "x": x, "box": list(box)},
      "original": {"y": point[0] if point else None,
                   "x": point[1] if point else None,
                   "box": list(frame) if frame else None},
  }


def unique_stems(paths: Sequence[str]) -> list[str]:
  """Each path's file name less its suffix; a stem already taken by an
  earlier input gets "-2", "-3", ... (the first free one)."""
  taken, out = set(), []
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0] or "image"
    name, k = stem, 1
    while name in taken:
      k += 1
      name = f"{stem}-{k}"
    taken.add(name)
    out.append(name)
  return out


@dataclasses.dataclass
class Explainer:
  """Writes the overlays and JSON of each batch (`predict_files`'s
  `each_batch`)."""
  folder: str
  label_names: tuple[str, ...]
  thresholds: np.ndarray
  forced: tuple[str, ...]
  size: int
  stems: dict  # path -> stem.
  step: int
  images: int = 0
  overlays: int = 0

  def __call__(self, paths, images, probs, maps):
    for path, image, p, m in zip(paths, images, probs, maps):
      self.write(path, image, p, m)

  def write(self, path: str, image: np.ndarray, probs: np.ndarray,
            maps: np.ndarray) -> None:
    """`path`'s overlays and JSON from its stored image, probabilities
    (L,) and maps (L, H, W)."""
    from medbridge_jax import overlays  # pylint: disable=g-import-not-at-top
    from medbridge_jax.data import boxes  # pylint: disable=g-import-not-at-top
    stem = self.stems[path]
    positive = positive_labels(probs[None], self.label_names,
                               self.thresholds)[0]
    hw = boxes.image_hw(path)
    labels = {}
    for i, name in enumerate(self.label_names):
      if name not in positive and name not in self.forced:
        continue
      file = f"{stem}_{report.slug(name)}.png"
      overlays.save_png(overlays.overlay(image, maps[i]),
                        os.path.join(self.folder, file))
      self.overlays += 1
      t = self.thresholds[i]
      labels[name] = {
          "probability": float(probs[i]),
          "threshold": float(t) if np.isfinite(t) else None,
          "positive": name in positive, "forced": name in self.forced,
          "overlay": file,
          "regions": [region_json(r, hw, self.size) for r in
                      overlays.top_regions(maps[i], TOP_REGIONS)]}
    top, left, new_h, new_w = (letterbox_geometry(hw, self.size) if hw
                               else (None,) * 4)
    jsonfile.write(os.path.join(self.folder, f"{stem}.json"), {
        "path": path, "checkpoint_step": self.step,
        "coordinates": {
            "stored": {"height": self.size, "width": self.size,
                       "what": "pixels of the image the model saw: the "
                               "input letterboxed to data.image_size"},
            "original": {"height": hw[0] if hw else None,
                         "width": hw[1] if hw else None,
                         "what": "pixels of the input file"},
            "letterbox": {"top": top, "left": left, "height": new_h,
                          "width": new_w,
                          "what": "where the input lies in the stored "
                                  "image, scaled to height x width"}},
        "positive_labels": positive,
        "labels": labels})
    self.images += 1


def _check_output(path: str) -> str:
  path = os.path.abspath(os.path.expanduser(path))
  folder = os.path.dirname(path)
  if os.path.isdir(path):
    raise errors.UserError(f"--output {path} is a folder; give a file name")
  if not os.path.isdir(folder):
    raise errors.UserError(f"output folder not found: {folder}")
  if not os.access(folder, os.W_OK):
    raise errors.UserError(f"output folder {folder} cannot be written")
  return path


def run(workdir: str, inputs: Sequence[str], output: Optional[str] = None,
        checkpoint: str = "best", batch_size: Optional[int] = None,
        skip_bad: bool = False, explain: Optional[str] = None,
        explain_labels=None) -> dict:
  """Predicts `inputs` with the run in `workdir` and writes the CSV (and,
  with `explain`, the evidence overlays and JSON there; `explain_labels`
  as --explain_labels takes it).

  Every cheap check (workdir, inputs, output, whether the run can be
  explained) comes before the experts are loaded, so a mistake is reported
  in a second.

  Returns:
    {"output": CSV path, "rows": images predicted, "skipped": count,
     "step": the checkpoint's step, "labels": label names}, and with
    `explain` "explained": {"folder", "images", "overlays"}.
  """
  r = open_run(workdir)
  if explain is None and explain_labels is not None:
    raise errors.UserError("--explain_labels needs --explain=DIR")
  if explain is not None:
    check_explainable(r.config, os.path.join(r.workdir, "config.json"))
    forced = parse_explain_labels(explain_labels, r.label_names)
    explain = _check_explain_dir(explain)
  paths = find_images(_split_inputs(inputs))
  output = _check_output(output or os.path.join(r.workdir, "predictions.csv"))
  if batch_size is None:
    batch_size = int(r.config.eval.batch_size)
  if batch_size < 1:
    raise errors.UserError(f"--batch_size={batch_size} must be >= 1")
  loaded = load_model(r, checkpoint)
  # A multiple of the devices, and no larger than the inputs need.
  devices = loaded.mesh.size
  batch_size = -(-min(batch_size, len(paths)) // devices) * devices
  logging.info("Predicting %d image(s) at %d px in batches of %d.",
               len(paths), int(r.config.data.image_size), batch_size)
  fn, explainer = loaded.fn, None
  if explain is not None:
    fn = evidence_fn(loaded)
    os.makedirs(explain, exist_ok=True)
    explainer = Explainer(
        explain, r.label_names, loaded.thresholds, forced,
        int(r.config.data.image_size), dict(zip(paths, unique_stems(paths))),
        loaded.step)
  kept, probs, skipped = predict_files(
      fn, loaded.mesh, paths, int(r.config.data.image_size),
      batch_size, skip_bad, each_batch=explainer)
  write_csv(output, kept, probs, r.label_names, loaded.thresholds)
  logging.info("Wrote %d row(s) to %s (thresholds of step %d, chosen on "
               "%s).", len(kept), output, loaded.step, loaded.chosen_on)
  out = dict(output=output, rows=len(kept), skipped=len(skipped),
             step=loaded.step, labels=list(r.label_names))
  if explainer is not None:
    logging.info("Wrote %d overlay(s) and %d JSON file(s) to %s.",
                 explainer.overlays, explainer.images, explain)
    out["explained"] = dict(folder=explain, images=explainer.images,
                            overlays=explainer.overlays)
  return out


# ---------------------------------------------------------------------------
# Command line.


def parse_flags(argv):
  """absl's parsing, with every failure as one line and exit status 2."""
  return cli.parse_flags(PROGRAM, argv)


def main(argv):
  f = flags.FLAGS
  with errors.exit_on_user_error(PROGRAM):
    if not f.workdir:
      raise errors.UserError("no workdir given (--workdir=DIR of a finished "
                             "training run)")
    # Words after the flags are inputs too: a shell glob expands to them.
    inputs = list(f.inputs) + list(argv[1:])
    cli.quiet_libraries()
    cli.enable_compilation_cache()
    out = run(f.workdir, inputs, output=f.output, checkpoint=f.checkpoint,
              batch_size=f.batch_size, skip_bad=f.skip_bad,
              explain=f.explain, explain_labels=f.explain_labels)
    explained = out.get("explained")
    print(f"{out['output']}: {out['rows']} image(s), {len(out['labels'])} "
          f"labels, checkpoint step {out['step']}"
          + (f", {out['skipped']} unreadable skipped" if out["skipped"]
             else "")
          + (f"; {explained['overlays']} overlay(s) in "
             f"{explained['folder']}" if explained else ""))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=parse_flags)
