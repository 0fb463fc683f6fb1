"""Data sets by name: `read_index("chexpert", root, "train")`.

Each reader is a module-level function `read(root, split, **options) ->
Index`, named here as "module:function" and imported only when used, so a
data set's dependencies load only when it is read. Readers check their own
splits and files; this module checks the name and that the root exists.
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


def register(name: str, reader: str | Reader) -> None:
  """Adds (or replaces) a reader: a callable or a "module:function" string."""
  _READERS[name] = reader


def known() -> tuple[str, ...]:
  """The registered data set names, sorted."""
  return tuple(sorted(_READERS))


def reader(dataset: str) -> Reader:
  """The reader function of a data set name."""
  if dataset not in _READERS:
    raise UserError(f"unknown data set {dataset!r}; known: "
                    f"{', '.join(known())}")
  entry = _READERS[dataset]
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
  if not root:
    raise UserError(f"no root folder given for data set {dataset!r}")
  if not os.path.isdir(root):
    raise UserError(f"data set root {root} does not exist or is not a "
                    "directory")
  return read(root, split, **options)
