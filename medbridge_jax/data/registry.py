"""Data sets by name: `read_index("chexpert", root, "train")`.

Each reader is a module-level function `read(root, split, **options) ->
Index`, named here as "module:function" and imported only when used, so a
data set's dependencies load only when it is read. Readers check their own
splits and files; this module checks the name and that the root exists.

A reader may come with `sources(root, **options) -> {split: where}`: for
each split it knows, where in this folder the split's rows come from, or
None when the folder lacks it (e.g. CheXpert without test_labels.csv), so
that a run can carve that split out of the training patients instead.
"""

import importlib
import os
from typing import Callable

from medbridge_jax.data import index as index_lib
from medbridge_jax.errors import UserError

Reader = Callable[..., index_lib.Index]

_READERS: dict[str, str | Reader] = {
    "chexpert": "medbridge_jax.data.chexpert:read",
    "nih": "medbridge_jax.data.nih:read",
    "mimic": "medbridge_jax.data.mimic:read",
    "vindr": "medbridge_jax.data.vindr:read",
    "rsna": "medbridge_jax.data.rsna:read",
    "synthetic": "medbridge_jax.data.synthetic:read",
}
# Data sets whose reader says which splits a folder holds (see above).
_SOURCES: dict[str, str | Callable[..., dict]] = {
    name: f"medbridge_jax.data.{name}:sources"
    for name in ("chexpert", "nih", "mimic", "vindr", "rsna")}


def register(name: str, reader: str | Reader,
             sources: str | Callable[..., dict] | None = None) -> None:
  """Adds (or replaces) a reader: a callable or a "module:function" string.

  `sources` (same forms) says which splits a folder holds; without it every
  split the reader accepts is taken to be there.
  """
  _READERS[name] = reader
  _SOURCES.pop(name, None)
  if sources is not None:
    _SOURCES[name] = sources


def known() -> tuple[str, ...]:
  """The registered data set names, sorted."""
  return tuple(sorted(_READERS))


def reader(dataset: str) -> Reader:
  """The reader function of a data set name."""
  if dataset not in _READERS:
    raise UserError(f"unknown data set {dataset!r}; known: "
                    f"{', '.join(known())}")
  return _load(_READERS[dataset])


def _load(entry):
  if callable(entry):
    return entry
  module, function = entry.split(":")
  return getattr(importlib.import_module(module), function)


def read_index(dataset: str, root: str, split: str,
               **options) -> index_lib.Index:
  """Reads the index of one split of a data set from its root folder.

  Args:
    dataset: a registered name (see `known()`).
    root: the data set's own root folder, as its publisher lays it out.
    split: the split name the reader accepts ("train", "valid", "test"...).
    **options: reader-specific options (e.g. CheXpert's `views`).
  """
  read = reader(dataset)
  _check_root(dataset, root)
  return read(root, split, **options)


def sources(dataset: str, root: str,
            **options) -> dict[str, str | None] | None:
  """{split: where its rows come from, None if this folder lacks it}.

  None when the data set's reader does not say (then every split it accepts
  is taken to be there).
  """
  reader(dataset)  # Checks the name.
  _check_root(dataset, root)
  if dataset not in _SOURCES:
    return None
  return _load(_SOURCES[dataset])(root, **options)


def _check_root(dataset: str, root: str) -> None:
  if not root:
    raise UserError(f"no root folder given for data set {dataset!r}")
  if not os.path.isdir(root):
    raise UserError(f"data set root {root} does not exist or is not a "
                    "directory")
