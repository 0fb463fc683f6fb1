"""The data of a run: which folders, which splits, which labels.

`resolve(config)` turns `config.data` into the splits of a run, label
policies applied and labels harmonised to the training labels:

  train        what the model learns from (`train_fraction` of its patients);
  valid        evaluated periodically; picks the best checkpoint and the
               decision thresholds;
  test         held out: every reported number comes from it;
  extra_tests  `config.data.test_datasets`, e.g. other domains.

Where a folder has no labelled split for valid or test (its reader's
`sources` says None: CheXpert without test_labels.csv, Kaggle's VinBigData),
that split is carved out of the training patients here; readers that derive
their own (NIH and VinDr valid, all of RSNA) are read as they are. Before
anything uses them, train, valid and test, and with them each extra test set
of the same data set and folder, are checked to share no patient.
`train_feed` gives this host's endless, shuffled, resumable training
batches.
"""

import dataclasses
import os

from absl import logging
import ml_collections

from medbridge_jax import cache
from medbridge_jax import errors
from medbridge_jax import sharding
from medbridge_jax.data import index as index_lib
from medbridge_jax.data import labels
from medbridge_jax.data import pipeline
from medbridge_jax.data import registry
from medbridge_jax.data import splits
from medbridge_jax.data import synthetic
from medbridge_jax.data import synthetic_draw

# Share of the training patients carved out for a split the folder lacks:
# test first, then valid from the patients left (patient-level, by
# `splits.holdout`).
TEST_FRACTION = 0.1
VALID_FRACTION = 0.1
# Seed of those carves. Fixed rather than config.seed, so that every run on a
# folder, whatever its seed, is tested on the same patients.
HOLDOUT_SEED = 0
ROLES = ("train", "valid", "test")


@dataclasses.dataclass
class Data:
  """The resolved data of a run."""
  label_names: tuple[str, ...]
  train: labels.LabelledSplit  # What the model learns from.
  valid: labels.LabelledSplit  # Periodic evaluation, best checkpoint,
                               # thresholds.
  test: labels.LabelledSplit  # Held out: every reported number comes from it.
  extra_tests: list[labels.LabelledSplit]  # config.data.test_datasets.
  sources: dict[str, str]  # train | valid | test -> where its rows came from.


def _locate(dataset: str, root: str, config: ml_collections.ConfigDict,
            where: str = "config.data.root") -> tuple[str, str]:
  """(registry name, folder) of a data set named in the config.

  "synthetic[:variant]" with an empty root is the generated data set
  (`generate`); every other data set is a folder the user brings.
  """
  name, _, variant = dataset.partition(":")
  if name == "synthetic" and not root:
    return generate(variant, config)
  if variant:
    raise errors.UserError(
        f"data set {dataset!r}: only generated synthetic data takes a "
        f"':variant' (and then no root)")
  if not root:
    raise errors.UserError(
        f"{where} is empty: give the folder of data set {dataset!r}")
  folder = os.path.expanduser(root)
  if not os.path.isdir(folder):
    raise errors.UserError(f"data root not found: {root} ({where})")
  return name, folder


def generate(variant: str, config: ml_collections.ConfigDict
             ) -> tuple[str, str]:
  """(registry name, folder) of generated synthetic data, made on first use.

  Written once into the cache (`synthetic.ensure`) from
  `config.data.synthetic`; `variant` "" is `config.data.synthetic.variant`.
  "nih" is the domain-shifted variant, read by the real NIH ChestX-ray14
  reader (it is written in that layout, with all 14 NIH labels), so
  cross-domain runs harmonise its labels exactly as they would a real NIH
  folder's.
  """
  if variant and variant not in synthetic_draw.VARIANTS:
    raise errors.UserError(
        f"data set 'synthetic:{variant}': unknown synthetic variant; known: "
        f"{', '.join(synthetic_draw.VARIANTS)}")
  d = config.data
  folder = synthetic.ensure(
      cache.path("data"),
      num_patients=int(d.synthetic.num_patients), seed=int(d.synthetic.seed),
      variant=variant or d.synthetic.variant, image_size=int(d.image_size),
      focal_scale=float(d.synthetic.focal_scale),
      focal_contrast=float(d.synthetic.focal_contrast))
  return ("nih" if variant == "nih" else "synthetic"), folder


def resolve(config: ml_collections.ConfigDict) -> Data:
  """Reads the splits, checks them patient-disjoint, applies the policies."""
  d = config.data
  dataset, root = _locate(d.dataset, d.root, config)
  indexes, where = _splits(dataset, root, d)
  for role in ROLES:
    idx = indexes[role]
    logging.info("Data %s: %s split %r, %d images of %d patients, from %s.",
                 role, d.dataset, idx.split, len(idx), len(set(idx.patients)),
                 where[role])
  names = [f"the {role} split {indexes[role].split!r}" for role in ROLES]
  splits.check_disjoint(*(indexes[r] for r in ROLES), names=names)
  train_index = indexes["train"]
  label_names = tuple(d.labels) or tuple(train_index.label_names)
  extra_tests = []
  for item in d.test_datasets:
    if isinstance(item, str) or len(item) != 3:
      raise errors.UserError(
          f"config.data.test_datasets entry {item!r} is not (dataset, root, "
          f"split)")
    test_name, test_root, split = item
    test_dataset, test_folder = _locate(test_name, test_root, config,
                                      "config.data.test_datasets")
    index = registry.read_index(test_dataset, test_folder, split)
    if _same_folder((test_dataset, index), (dataset, train_index)):
      # Checked on its own: extra test sets may overlap one another.
      splits.check_disjoint(
          *(indexes[r] for r in ROLES), index,
          names=names + [f"the extra test set {test_name}/{split}"])
    extra_tests.append(labels.labelled_split(f"{test_name}/{split}", index,
                                              label_names, d))
  # After the check, and from the training patients only. Nested patient
  # subsets: the 1% patients are among the 10%.
  train_index = splits.fraction(train_index, float(d.train_fraction),
                                int(config.seed))
  return Data(
      label_names=label_names,
      train=labels.labelled_split(f"{d.dataset}/{d.train_split}",
                                   train_index, label_names, d),
      valid=labels.labelled_split(f"{d.dataset}/{d.valid_split}",
                                   indexes["valid"], label_names, d),
      test=labels.labelled_split(f"{d.dataset}/{d.test_split}",
                                  indexes["test"], label_names, d),
      extra_tests=extra_tests, sources=where)


def _splits(dataset: str, root: str, d: ml_collections.ConfigDict
            ) -> tuple[dict[str, index_lib.Index], dict[str, str]]:
  """({role: index}, {role: where its rows came from}) of train/valid/test.

  A valid or test split the folder lacks is carved out of the training
  patients (test first); any other split is read, so that a split name the
  reader does not know is the reader's error.
  """
  offered = registry.sources(dataset, root) or {}
  train = registry.read_index(dataset, root, d.train_split)
  where = {"train": offered.get(d.train_split) or f"split {d.train_split!r}"}
  indexes = {}
  for role, split, share in (("test", d.test_split, TEST_FRACTION),
                             ("valid", d.valid_split, VALID_FRACTION)):
    if split in offered and offered[split] is None:
      train, indexes[role] = splits.holdout(train, share, HOLDOUT_SEED,
                                            (train.split, split))
      where[role] = (f"{share:g} of the patients of {where['train']} (carved "
                     f"here, seed {HOLDOUT_SEED}: {root} has no {split!r} "
                     "split)")
      where["train"] += f" less the {role} patients"
    else:
      indexes[role] = registry.read_index(dataset, root, split)
      where[role] = offered.get(split) or f"split {split!r}"
  indexes["train"] = train
  for role in ROLES:
    if not len(indexes[role]):
      raise errors.UserError(
          f"data set {d.dataset}: the {role} split {indexes[role].split!r} "
          f"has no images (from {where[role]})")
  return indexes, where


def _same_folder(a: tuple[str, index_lib.Index],
                 b: tuple[str, index_lib.Index]) -> bool:
  """Whether two (registry name, index) come from one data set folder."""
  return a[0] == b[0] and (os.path.realpath(a[1].root)
                           == os.path.realpath(b[1].root))


def train_feed(data: Data, config: ml_collections.ConfigDict):
  """This host's endless, shuffled, resumable training batches."""
  return pipeline.train_batches(
      data.train.index,
      batch_size=sharding.host_batch_size(int(config.train.batch_size)),
      seed=int(config.seed), available=data.train.available,
      augment=bool(config.data.augment),
      **pipeline.options_from_config(config.data))
