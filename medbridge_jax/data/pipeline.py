"""grain input pipelines: an `Index` to batches of images, targets and masks.

Training (`train_batches`): this host's rows, shuffled by seed and reshuffled
every epoch, repeating, lightly augmented, in fixed-size batches

  dict(image=uint8 (B, H, W), targets=float32 (B, L), mask=float32 (B, L)).

The iterator is deterministic given the seed and resumes exactly from
`get_state()` (a JSON-able dict) through `set_state()`.

Evaluation (`eval_batches`): one ordered pass over this host's rows; the
last batch is padded, `valid` (B,) marks real rows and `row` (B,) gives
their row in the index (-1 for padding). Every host yields the same number
of batches, so collective evaluation steps never wait for a host that ran
out.

Hosts (`shard` = (p, P), default `jax.process_index()`,
`jax.process_count()`; `B` is the host-local batch, `sharding.host_batch_size`,
made global by `sharding.to_global`): in training every host draws the same
global stream (shuffle, repeat and augmentation over all rows) and takes its
own B elements of each global batch of P * B, decoding only those; so the
global batches, and the iterator state (kept in global elements), are the
same on any number of hosts, and a run resumes on another number (a
skipped bad image is made up from the host's next elements, so from then on
the batches are no longer exactly one process's). In evaluation host p
reads rows p, p + P, p + 2P, ...

Images are decoded from the index's files, or read from prepared ArrayRecord
shards (`prepared=tfds_builders.data_source(...)`), with labels from the
index either way.

Decoding runs in grain's reader threads, or in `num_workers` worker
processes. A missing or corrupt image never yields a wrong label: with
`on_bad_image="error"` it raises the `UserError` naming the file; with
"skip" its row (image and labels) is dropped, counted in `.skipped` and
listed in `.skipped_paths` (first 100). Both decisions are taken in the main
process, so they hold with worker processes too.
"""

import dataclasses
import math
import os
from typing import Any, Iterator

import grain
import numpy as np
from PIL import Image

from medbridge_jax.data import images
from medbridge_jax.data import index as index_lib
from medbridge_jax.data import labels as labels_lib
from medbridge_jax.errors import UserError

BAD_IMAGE_POLICIES = ("error", "skip")
_KEEP_PATHS = 100


@dataclasses.dataclass(frozen=True)
class Augment:
  """Light training augmentation: small shift and scale, contrast/brightness.

  No flips or large rotations: left and right matter in a chest X-ray.
  """
  max_shift: float = 0.03  # fraction of the side
  max_scale: float = 0.05  # zoom in or out by up to 5%
  max_contrast: float = 0.15  # multiply deviations from the mean by 1 +- this
  max_brightness: float = 0.05  # add up to this fraction of full scale

  def __call__(self, image: np.ndarray, rng: np.random.Generator
               ) -> np.ndarray:
    h, w = image.shape
    s = 1.0 + rng.uniform(-self.max_scale, self.max_scale)
    tx, ty = rng.uniform(-self.max_shift, self.max_shift, 2) * (w, h)
    cx, cy = w / 2, h / 2
    # Output pixel (x, y) samples input ((x - cx) / s + cx - tx, ...).
    warped = Image.fromarray(image, "L").transform(
        (w, h), Image.Transform.AFFINE,
        (1 / s, 0, cx - cx / s - tx, 0, 1 / s, cy - cy / s - ty),
        resample=Image.Resampling.BICUBIC, fillcolor=0)
    x = np.asarray(warped)
    c = 1.0 + rng.uniform(-self.max_contrast, self.max_contrast)
    b = 255.0 * rng.uniform(-self.max_brightness, self.max_brightness)
    m = float(x.mean())
    # A 256-entry table: the same as the float formula, 5x faster.
    table = np.clip(np.rint((np.arange(256) - m) * c + m + b), 0, 255)
    return table.astype(np.uint8)[x]


class _Source:
  """grain random-access source: row i of the host's rows, decoded.

  Images come from the index's files or, with `prepared`, from record `row`
  of prepared shards (tfds_builders.data_source: record i is index row i);
  a record whose raw labels differ from the index row is refused, so shards
  and index can never pair an image with another image's labels.

  A bad image gives an element with a non-empty "error" instead of raising,
  so the decision (raise or skip) is taken in the main process.
  """

  def __init__(self, index: index_lib.Index, rows: np.ndarray,
               targets: np.ndarray, mask: np.ndarray, image_size: int,
               prepared=None):
    self._root = index.root
    self._paths = [index.paths[r] for r in rows]
    self._rows = np.asarray(rows, np.int64)
    self._raw = index.labels[self._rows]
    self._targets = targets[self._rows]
    self._mask = mask[self._rows]
    self._size = image_size
    self._prepared = prepared
    if prepared is not None and len(prepared) != len(index):
      raise UserError(f"prepared shards hold {len(prepared)} records, the "
                      f"{index.dataset} {index.split!r} index {len(index)} "
                      "rows: prepared from other files or options")

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, i: int) -> dict[str, Any]:
    error, fatal = "", False
    if self._prepared is None:
      path = os.path.join(self._root, self._paths[i])
      try:
        image = images.read_image(path, self._size)
      except UserError as e:
        image, error = None, str(e)
    else:
      record = self._prepared[int(self._rows[i])]
      image = np.asarray(record["image"], np.uint8)
      if image.ndim == 3:
        image = image[..., 0]
      if image.shape != (self._size, self._size):
        image = images.letterbox(image, self._size)
      codes = np.asarray(record["labels"], np.float32)
      if codes.shape != self._raw[i].shape or not np.array_equal(
          codes, self._raw[i], equal_nan=True):
        error, fatal = (f"prepared record {int(self._rows[i])} has labels "
                        f"{codes.tolist()}, index row {self._paths[i]} has "
                        f"{self._raw[i].tolist()}: shards and index differ"
                        ), True
    if image is None or fatal:
      image = np.zeros((self._size, self._size), np.uint8)
    return dict(image=image, targets=self._targets[i], mask=self._mask[i],
                row=self._rows[i], error=error, fatal=fatal)


@dataclasses.dataclass(frozen=True)
class _RandomAugment:
  augment: Augment

  def __call__(self, element: dict, rng: np.random.Generator) -> dict:
    if not element["error"]:
      element = dict(element, image=self.augment(element["image"], rng))
    return element


class _BadImages:
  """Main-process filter: raises on or counts (and drops) bad images."""

  def __init__(self, policy: str):
    self.policy = policy
    self.count = 0
    self.paths: list[str] = []

  def __call__(self, element: dict) -> bool:
    if not element["error"]:
      return True
    if self.policy == "error" or element["fatal"]:
      raise UserError(element["error"])
    self.count += 1
    if len(self.paths) < _KEEP_PATHS:
      self.paths.append(element["error"])
    return False


def _strip(element: dict) -> dict:
  return {k: element[k] for k in ("image", "targets", "mask")}


def _check(index, image_size, on_bad_image, num_workers, batch_size):
  if on_bad_image not in BAD_IMAGE_POLICIES:
    raise UserError(f"on_bad_image {on_bad_image!r} is not one of "
                    f"{BAD_IMAGE_POLICIES}")
  if batch_size < 1:
    raise UserError(f"batch size must be positive, got {batch_size}")
  if num_workers < 0:
    raise UserError(f"num_workers must be >= 0, got {num_workers}")
  if image_size < 1:
    raise UserError(f"image size must be positive, got {image_size}")
  if not len(index):
    raise UserError(f"{index.dataset} split {index.split!r} has no images")


def _shard(shard: tuple[int, int] | None) -> tuple[int, int]:
  """(host index, host count), from jax when `shard` is None."""
  if shard is None:
    # JAX only here, when no shard is given: grain's worker processes import
    # this module and should not load JAX.
    import jax  # pylint: disable=g-import-not-at-top
    shard = (jax.process_index(), jax.process_count())
  p, count = shard
  if not 0 <= p < count:
    raise ValueError(f"shard {shard}: need 0 <= index < count")
  return p, count


def _host_rows(n: int, shard: tuple[int, int] | None) -> np.ndarray:
  p, count = _shard(shard)
  return np.arange(p, n, count, dtype=np.int64)


class _HostShare(grain.MapDataset):
  """Host `host`'s elements of a global stream cut into global batches of
  `count` * `batch_size`: elements [host * batch_size, (host + 1) *
  batch_size) of each (only those are read, decoded and augmented)."""

  def __init__(self, parent: grain.MapDataset, host: int, count: int,
               batch_size: int):
    super().__init__(parent)
    self._host, self._count, self._b = host, count, batch_size

  def __len__(self) -> int:
    return len(self._parent) // self._count

  def _global(self, k: int) -> int:
    n, i = divmod(k, self._b)
    return (n * self._count + self._host) * self._b + i

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global(index)]


def _read_options(num_workers: int, buffer: int) -> grain.ReadOptions:
  threads = max(1, min(4, os.cpu_count() or 1)) if num_workers == 0 else 1
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(threads, buffer))


class _CountsSkips:
  """`skipped` / `skipped_paths` of a batch iterator holding `_bad`."""
  _bad: _BadImages

  @property
  def skipped(self) -> int:
    """Bad images skipped so far (their rows were dropped)."""
    return self._bad.count

  @property
  def skipped_paths(self) -> list[str]:
    """Messages naming the first skipped files."""
    return list(self._bad.paths)


class TrainBatches(_CountsSkips):
  """Endless, shuffled, augmented batches; resumable (see module doc)."""

  def __init__(self, dataset: grain.IterDataset, bad: _BadImages,
               hosts: int = 1):
    self._bad = bad
    self._it = iter(dataset)
    self._hosts = hosts

  def __iter__(self) -> "TrainBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict:
    """JSON-able position; "grain"'s next_index counts global elements (a
    host's own times the host count), as one process would."""
    position = self._it.get_state()
    if self._hosts > 1:
      position = dict(position,
                      next_index=position["next_index"] * self._hosts)
    return {"grain": position, "skipped": self._bad.count,
            "skipped_paths": list(self._bad.paths)}

  def set_state(self, state: dict) -> None:
    """Resumes at `get_state`'s position, saved on any number of hosts
    (the skip counts are the saving host's own)."""
    position = state["grain"]
    if self._hosts > 1:
      position = dict(position,
                      next_index=position["next_index"] // self._hosts)
    self._it.set_state(position)
    self._bad.count = int(state["skipped"])
    self._bad.paths = list(state["skipped_paths"])

  def close(self) -> None:
    """Stops worker processes, if any."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def train_batches(index: index_lib.Index, *, batch_size: int, seed: int,
                  image_size: int, uncertain_policy: str = "ignore",
                  blank_policy: str = "zeros",
                  available: np.ndarray | None = None, augment: bool = True,
                  on_bad_image: str = "error", num_workers: int = 0,
                  shard: tuple[int, int] | None = None,
                  prepared=None) -> TrainBatches:
  """Training batches: this host's share of each global batch (see module
  doc).

  Args:
    index: the training split.
    batch_size: host-local batch size (see `sharding.host_batch_size`).
    seed: shuffle and augmentation seed; the same seed, the same batches.
    image_size: side of the decoded square images.
    uncertain_policy, blank_policy, available: see `labels.targets`.
    augment: apply `Augment()`.
    on_bad_image: "error" | "skip".
    num_workers: grain worker processes (0 = threads of this process).
    shard: (host index, host count); default from jax.
    prepared: optional random-access source of prepared records aligned with
      the index (tfds_builders.data_source of the same split); images are
      read from it instead of the files.
  """
  _check(index, image_size, on_bad_image, num_workers, batch_size)
  targets, mask = labels_lib.targets(index.labels, uncertain_policy,
                                     blank_policy, available)
  host, hosts = _shard(shard)
  ds = grain.MapDataset.source(_Source(
      index, np.arange(len(index)), targets, mask, image_size, prepared))
  # Shuffle before repeat: every epoch is a new permutation of the rows.
  ds = ds.shuffle(seed=seed % 2**32).repeat()
  if augment:
    # grain seeds each element's augmentation by its position in the
    # stream: the same on every host and for any host count.
    ds = ds.random_map(_RandomAugment(Augment()), seed=(seed + 1) % 2**32)
  if hosts > 1:
    ds = _HostShare(ds, host, hosts, batch_size)
  it = ds.to_iter_dataset(_read_options(num_workers, 2 * batch_size))
  if num_workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  bad = _BadImages(on_bad_image)
  it = it.filter(bad).map(_strip).batch(batch_size, drop_remainder=True)
  return TrainBatches(it, bad, hosts)


class EvalBatches(_CountsSkips):
  """One ordered, padded pass per iteration (see module doc)."""

  def __init__(self, dataset: grain.IterDataset, bad: _BadImages,
               num_batches: int, batch_size: int, image_size: int,
               num_labels: int):
    self._dataset = dataset
    self._bad = bad
    self._num_batches = num_batches
    self._batch_size = batch_size
    self._size = image_size
    self._num_labels = num_labels

  def __len__(self) -> int:
    return self._num_batches

  def _empty(self) -> dict[str, np.ndarray]:
    b, s, l = self._batch_size, self._size, self._num_labels
    return dict(image=np.zeros((b, s, s), np.uint8),
                targets=np.zeros((b, l), np.float32),
                mask=np.zeros((b, l), np.float32),
                valid=np.zeros((b,), np.float32),
                row=np.full((b,), -1, np.int32))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    batch, filled, done = self._empty(), 0, 0
    for element in self._dataset:
      for key in ("image", "targets", "mask", "row"):
        batch[key][filled] = element[key]
      batch["valid"][filled] = 1.0
      filled += 1
      if filled == self._batch_size:
        yield batch
        batch, filled, done = self._empty(), 0, done + 1
    if filled:
      yield batch
      done += 1
    for _ in range(done, self._num_batches):  # other hosts have more rows
      yield self._empty()


def eval_batches(index: index_lib.Index, *, batch_size: int, image_size: int,
                 uncertain_policy: str = "ignore", blank_policy: str = "zeros",
                 available: np.ndarray | None = None,
                 on_bad_image: str = "error", num_workers: int = 0,
                 shard: tuple[int, int] | None = None,
                 prepared=None) -> EvalBatches:
  """Evaluation batches of this host's rows, padded (see module doc).

  Arguments as for `train_batches`. Batches add `valid` float32 (B,) and
  `row` int32 (B,) to the training keys.
  """
  _check(index, image_size, on_bad_image, num_workers, batch_size)
  targets, mask = labels_lib.targets(index.labels, uncertain_policy,
                                     blank_policy, available)
  rows = _host_rows(len(index), shard)
  count = shard[1] if shard is not None else None
  if count is None:
    import jax  # pylint: disable=g-import-not-at-top
    count = jax.process_count()
  largest_shard = math.ceil(len(index) / count)
  num_batches = math.ceil(largest_shard / batch_size)
  ds = grain.MapDataset.source(
      _Source(index, rows, targets, mask, image_size, prepared))
  it = ds.to_iter_dataset(_read_options(num_workers, 2 * batch_size))
  if num_workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  bad = _BadImages(on_bad_image)
  return EvalBatches(it.filter(bad), bad, num_batches, batch_size, image_size,
                     len(index.label_names))


def options_from_config(data_config) -> dict[str, Any]:
  """`train_batches` / `eval_batches` keyword arguments from `config.data`."""
  return dict(image_size=int(data_config.image_size),
              uncertain_policy=data_config.uncertain_policy,
              blank_policy=data_config.blank_policy,
              on_bad_image=data_config.on_bad_image,
              num_workers=int(data_config.num_workers))

