"""tensorflow-datasets builders: a data set's own folder -> ArrayRecord shards.

Manual-download style: the user's data set folder (as its publisher lays it
out) is the manual dir; nothing is downloaded. Each builder reads the index
with `registry.read_index` (so labels are exactly the raw reader's) and
decodes every image once with `images.read_image` at the config's side, so a
pod reads small pre-decoded shards from cloud storage instead of DICOMs and
JPEGs. Records, in index order (shuffling at write time is off, so record i
of a split is row i of its index):

  image    uint8 (size, size, 1), stored as lossless PNG: decoding it gives
           exactly the array `images.read_image` returned
  labels   float32 (num_labels,), the raw codes 1, 0, -1, nan
  patient, study, path   text, as in the index

`info.metadata` holds the label names, the reader options and the images
skipped (with `on_bad_image="skip"`). `index-SPLIT.npz`, next to the shards,
holds the split's index without images: `prepared_index` gives a pod that
has only the shards the index aligned with the records (row i, record i).

grain reads a prepared split through `tfds.data_source(
"medbridge_mimic/s1024", split=..., data_dir=...)` (named configs s256, s512,
s1024, with the reader's defaults) or `data_source` below (any side and
reader options), wrapped in `grain.MapDataset.source(...)`. To prepare:

  python -m medbridge_jax.data.tfds_builders --dataset=mimic --root=DIR \
      --data_dir=gs://bucket/tfds --image_size=1024 --workers=16

Builders: medbridge_chexpert, medbridge_nih, medbridge_mimic, medbridge_vindr,
medbridge_rsna, medbridge_synthetic.
"""

import concurrent.futures
import dataclasses
import io
import multiprocessing
import os
import re
import sys
from typing import Any, Iterator, Sequence

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from medbridge_jax import errors
from medbridge_jax.data import chexpert
from medbridge_jax.data import cli
from medbridge_jax.data import csvio
from medbridge_jax.data import images
from medbridge_jax.data import index as index_lib
from medbridge_jax.data import registry
from medbridge_jax.data import synthetic
from medbridge_jax.errors import UserError

DEFAULT_SIZES = (256, 512, 1024)
ON_BAD_IMAGE = ("error", "skip")


@dataclasses.dataclass(eq=False)
class ImageConfig(tfds.core.BuilderConfig):
  """A stored image side and the reader's options (part of the name)."""

  image_size: int = 1024
  reader_options: dict[str, Any] = dataclasses.field(default_factory=dict)


def config(image_size: int, **reader_options) -> ImageConfig:
  """The config for a side and reader options, named e.g. "s1024-rule.any".
  """
  if not isinstance(image_size, int) or image_size < 8:
    raise UserError(f"stored image size {image_size!r} must be an integer "
                    ">= 8")
  name = f"s{image_size}"
  for key in sorted(reader_options):
    value = re.sub(r"[^A-Za-z0-9_.]+", "_", str(reader_options[key]))
    name += f"-{key}.{value}"
  return ImageConfig(name=name, image_size=image_size,
                     reader_options=dict(reader_options),
                     description=f"images stored at {image_size} pixels"
                     + (f", reader options {reader_options}"
                        if reader_options else ""))


class _IndexBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder: subclasses set DATASET and, if needed, `_splits`."""

  DATASET = ""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [config(s) for s in DEFAULT_SIZES]
  DEFAULT_CONFIG_NAME = "s1024"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the data set's folder, laid out as its publisher ships it, as the "
      "manual dir; medbridge_jax/data/<data set>.py describes each layout.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9's own lookup for a builder defined in a package imports the
    # `importlib_resources` backport, which Python >= 3.9 does not install.
    return epath.Path(__file__)

  def __init__(self, *, on_bad_image: str = "error", num_workers: int = 0,
               **kwargs):
    """Args: on_bad_image: "error" | "skip" (counted in info.metadata);
    num_workers: processes decoding images (0: in this process)."""
    if on_bad_image not in ON_BAD_IMAGE:
      raise UserError(f"on_bad_image {on_bad_image!r} is not one of "
                      f"{ON_BAD_IMAGE}")
    self._on_bad_image = on_bad_image
    self._num_workers = num_workers
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.DATASET} images at {size} pixels, raw labels.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(size, size, 1), dtype=np.uint8, encoding_format="png"),
            "labels": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            "patient": tfds.features.Text(),
            "study": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _splits(self, root: str) -> tuple[str, ...]:
    """The splits this data set has in `root` (overridden where it varies)."""
    del root
    return ("train", "valid", "test")

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    options = self.builder_config.reader_options
    indexes = {s: registry.read_index(self.DATASET, root, s, **options)
               for s in self._splits(root)}
    first = next(iter(indexes.values()))
    self.info.metadata.update(
        dataset=self.DATASET, label_names=list(first.label_names),
        reader_options=options, image_size=self.builder_config.image_size,
        skipped={})
    return {s: self._generate_examples(index) for s, index in indexes.items()}

  def _generate_examples(self, index: index_lib.Index):
    skipped = self.info.metadata["skipped"].setdefault(index.split, [])
    encoded = _encode_all(index, self.builder_config.image_size,
                          self._num_workers)
    first_problem = None
    for i, (path, png) in enumerate(zip(index.paths, encoded)):
      if isinstance(png, UserError):
        if self._on_bad_image == "error":
          raise png
        skipped.append(path)
        first_problem = first_problem or png
        continue
      yield path, {"image": png, "labels": index.labels[i],
                   "patient": index.patients[i], "study": index.studies[i],
                   "path": path}
    if len(skipped) == len(index) and len(index):
      raise UserError(f"every image of {self.DATASET} split {index.split!r} "
                      f"is missing or corrupt, e.g. {first_problem}")
    bad = set(skipped)
    kept = index.select([i for i, p in enumerate(index.paths) if p not in bad])
    # Written inside tfds' temporary folder, moved into place with the shards.
    _write_index(self.data_path / _index_file(index.split), kept)


def _index_file(split: str) -> str:
  return f"index-{split}.npz"


def _write_index(path: epath.Path, index: index_lib.Index) -> None:
  """The records' index (no images) as numpy arrays, for `prepared_index`."""
  with path.open("wb") as f:
    np.savez(f, dataset=index.dataset, split=index.split,
             paths=np.array(index.paths, str),
             patients=np.array(index.patients, str),
             studies=np.array(index.studies, str),
             label_names=np.array(index.label_names, str),
             labels=index.labels)


def _encode(root: str, path: str, size: int) -> bytes | UserError:
  """PNG bytes of one decoded image, or the UserError saying why not."""
  try:
    pixels = images.read_image(os.path.join(root, path), size)
  except UserError as e:
    return e
  buf = io.BytesIO()
  Image.fromarray(pixels, "L").save(buf, format="PNG")
  return buf.getvalue()


def _encode_all(index: index_lib.Index, size: int, workers: int
                ) -> Iterator[bytes | UserError]:
  """Encoded images in index order, decoded by `workers` processes."""
  if workers <= 0:
    for path in index.paths:
      yield _encode(index.root, path, size)
    return
  n = len(index.paths)
  # spawn, not fork: the parent may already run JAX or grain threads.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, context) as pool:
    yield from pool.map(_encode, [index.root] * n, index.paths, [size] * n,
                        chunksize=16)


class MedbridgeChexpert(_IndexBuilder):
  """CheXpert v1.0 / v1.0-small (the folder holding CheXpert-v1.0[-small]/)."""

  DATASET = "chexpert"

  def _splits(self, root):
    return _chexpert_splits(root)


def _chexpert_splits(root: str) -> tuple[str, ...]:
  """CheXpert's test labels are optional (released later, separately)."""
  folders = [os.path.join(root, f) for f in chexpert.FOLDERS] + [root]
  has_test = any(csvio.exists(f, n) for f in folders
                 for n in chexpert.SPLIT_FILES["test"])
  return ("train", "valid") + (("test",) if has_test else ())


class MedbridgeNih(_IndexBuilder):
  """NIH ChestX-ray14."""

  DATASET = "nih"


class MedbridgeMimic(_IndexBuilder):
  """MIMIC-CXR-JPG 2.0.0."""

  DATASET = "mimic"


class MedbridgeVindr(_IndexBuilder):
  """VinDr-CXR (PhysioNet: train, valid, test) or VinBigData (no test)."""

  DATASET = "vindr"

  def _splits(self, root):
    variant = self.builder_config.reader_options.get("variant", "auto")
    physionet = (variant == "physionet" or variant == "auto" and csvio.exists(
        root, "annotations/image_labels_train.csv"))
    return ("train", "valid") + (("test",) if physionet else ())


class MedbridgeRsna(_IndexBuilder):
  """RSNA Pneumonia Detection (derived patient-level splits)."""

  DATASET = "rsna"


class MedbridgeSynthetic(_IndexBuilder):
  """The generated synthetic chest X-rays (root from `synthetic.ensure`)."""

  DATASET = "synthetic"

  def _splits(self, root):
    if os.path.isdir(os.path.join(root, synthetic.CHEXPERT_FOLDER)):
      return _chexpert_splits(root)
    return ("train", "valid", "test")


BUILDERS = {b.DATASET: b for b in (MedbridgeChexpert, MedbridgeNih,
                                   MedbridgeMimic, MedbridgeVindr,
                                   MedbridgeRsna, MedbridgeSynthetic)}


def builder(dataset: str, data_dir: str, image_size: int = 1024, *,
            on_bad_image: str = "error", num_workers: int = 0,
            **reader_options) -> tfds.core.DatasetBuilder:
  """The builder of a data set, for one side and set of reader options."""
  if dataset not in BUILDERS:
    raise UserError(f"no tfds builder for data set {dataset!r}; known: "
                    f"{', '.join(sorted(BUILDERS))}")
  cfg = config(image_size, **reader_options)
  if any(c.name == cfg.name for c in BUILDERS[dataset].BUILDER_CONFIGS):
    cfg = cfg.name  # tfds refuses a new object named like a class config
  return BUILDERS[dataset](
      data_dir=data_dir, config=cfg,
      file_format="array_record", on_bad_image=on_bad_image,
      num_workers=num_workers)


def prepare(dataset: str, root: str, data_dir: str, image_size: int = 1024,
            *, on_bad_image: str = "error", num_workers: int = 0,
            **reader_options) -> tfds.core.DatasetBuilder:
  """Prepares the shards of every split from the folder `root` (once)."""
  if not os.path.isdir(root):
    raise UserError(f"data set root {root} does not exist or is not a "
                    "directory")
  b = builder(dataset, data_dir, image_size, on_bad_image=on_bad_image,
              num_workers=num_workers, **reader_options)
  b.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=root))
  return b


def data_source(dataset: str, data_dir: str, split: str,
                image_size: int = 1024, **reader_options):
  """Random-access source of a prepared split (for `grain.MapDataset`)."""
  b = builder(dataset, data_dir, image_size, **reader_options)
  if not b.is_prepared():
    raise UserError(f"{dataset} at {image_size} pixels with options "
                    f"{reader_options} is not prepared in {data_dir} (run "
                    "tfds_builders.prepare first)")
  if split not in b.info.splits:
    raise UserError(f"prepared {dataset} has no split {split!r}; it has "
                    f"{', '.join(sorted(b.info.splits))}")
  return b.as_data_source(split)


def main(argv: Sequence[str] | None = None) -> int:
  with errors.exit_on_user_error("medbridge_jax.data.tfds_builders"):
    p = cli.parser("Prepares ArrayRecord shards of a data set folder.")
    p.add_argument("--data_dir", required=True, help="where shards are written")
    p.add_argument("--image_size", type=int, default=1024,
                   help="side of the stored square images")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="image decoding processes")
    p.add_argument("--on_bad_image", default="error", choices=ON_BAD_IMAGE)
    args = p.parse_args(argv)
    if args.split != "all":
      raise UserError("--split: every split of the data set is prepared; "
                      "leave --split out")
    b = prepare(args.dataset, args.root, args.data_dir, args.image_size,
                on_bad_image=args.on_bad_image, num_workers=args.workers,
                **cli.reader_options(args.option))
  for split, info in sorted(b.info.splits.items()):
    skipped = len(b.info.metadata["skipped"].get(split, ()))
    print(f"{split}: {info.num_examples} images, {skipped} skipped")
  print(f"prepared {b.data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())


def prepared_index(dataset: str, data_dir: str, split: str,
                   image_size: int = 1024, **reader_options
                   ) -> index_lib.Index:
  """The index of a prepared split, row i describing record i, read without
  the data set's label files or any image (what a pod that has only the
  shards uses). Its `root` is the prepared folder; its paths are the
  original relative paths, for messages only.
  """
  data_source(dataset, data_dir, split, image_size, **reader_options)
  b = builder(dataset, data_dir, image_size, **reader_options)
  path = b.data_path / _index_file(split)
  try:
    with path.open("rb") as f:
      z = np.load(f)
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"{path}: cannot read the prepared index ({e})") from e
  return index_lib.Index(
      dataset=str(arrays["dataset"]), split=str(arrays["split"]),
      root=os.fspath(b.data_path), paths=tuple(arrays["paths"].tolist()),
      patients=tuple(arrays["patients"].tolist()),
      studies=tuple(arrays["studies"].tolist()),
      label_names=tuple(arrays["label_names"].tolist()),
      labels=arrays["labels"].astype(np.float32))
