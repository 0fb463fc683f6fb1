"""The data of a run: which folders, which splits, which labels.

`resolve(config)` turns `config.data` into the split indexes of a run (label
policies applied, labels harmonised to the training labels); `train_feed`
gives this host's endless, shuffled, resumable training batches.
"""

import dataclasses
import os

import ml_collections

from medbridge_jax import errors
from medbridge_jax import evaluate
from medbridge_jax import experts_setup
from medbridge_jax import sharding
from medbridge_jax.data import pipeline
from medbridge_jax.data import registry
from medbridge_jax.data import splits


@dataclasses.dataclass
class Data:
  """The resolved data of a run."""
  label_names: tuple[str, ...]
  train: evaluate.EvalSet  # The training split (targets after policies).
  eval: evaluate.EvalSet  # The split evaluated periodically and at the end.
  tests: list[evaluate.EvalSet]  # config.data.test_datasets.


def _root(dataset: str, root: str, config: ml_collections.ConfigDict,
          where: str = "config.data.root") -> tuple[str, str]:
  """(registry name, folder) of a data set named in the config.

  "synthetic" (the variant of `config.data.synthetic`) with an empty root
  is generated once into the cache. "synthetic:nih" is the domain-shifted
  variant, read by the real NIH ChestX-ray14 reader (it is written in that
  layout, with all 14 NIH labels), so cross-domain runs harmonise its labels
  exactly as they would a real NIH folder's. Every other data set needs its
  folder.
  """
  d = config.data
  name, _, variant = dataset.partition(":")
  if name == "synthetic" and not root:
    from medbridge_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    if variant and variant not in synthetic.VARIANTS:
      raise errors.UserError(
          f"data set {dataset!r}: unknown synthetic variant; known: "
          f"{', '.join(synthetic.VARIANTS)}")
    return ("nih" if variant == "nih" else name), synthetic.ensure(
        os.path.join(experts_setup.cache_dir(), "data"),
        num_patients=int(d.synthetic.num_patients), seed=int(d.synthetic.seed),
        variant=variant or d.synthetic.variant, image_size=int(d.image_size))
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


def resolve(config: ml_collections.ConfigDict) -> Data:
  """Reads the split indexes and applies the label policies."""
  d = config.data
  dataset, root = _root(d.dataset, d.root, config)
  train_index = registry.read_index(dataset, root, d.train_split)
  # Nested patient subsets: the 1% patients are among the 10%.
  train_index = splits.fraction(train_index, float(d.train_fraction),
                                int(config.seed))
  label_names = tuple(d.labels) or tuple(train_index.label_names)
  eval_index = registry.read_index(dataset, root, d.eval_split)
  tests = []
  for item in d.test_datasets:
    if isinstance(item, str) or len(item) != 3:
      raise errors.UserError(
          f"config.data.test_datasets entry {item!r} is not (dataset, root, "
          f"split)")
    test_name, test_root, split = item
    index = registry.read_index(
        *_root(test_name, test_root, config, "config.data.test_datasets"),
        split)
    tests.append(evaluate.make_eval_set(f"{test_name}/{split}", index,
                                        label_names, d))
  return Data(
      label_names=label_names,
      train=evaluate.make_eval_set(f"{d.dataset}/{d.train_split}",
                                   train_index, label_names, d),
      eval=evaluate.make_eval_set(f"{d.dataset}/{d.eval_split}", eval_index,
                                  label_names, d),
      tests=tests)


def train_feed(data: Data, config: ml_collections.ConfigDict):
  """This host's endless, shuffled, resumable training batches."""
  return pipeline.train_batches(
      data.train.index,
      batch_size=sharding.host_batch_size(int(config.train.batch_size)),
      seed=int(config.seed), available=data.train.available,
      augment=bool(config.data.augment),
      **pipeline.options_from_config(config.data))
