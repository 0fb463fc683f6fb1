"""Shared command-line parsing for the data tools (stats, verify).

Errors in the arguments are `UserError`s, so every tool reports them as one
line through `errors.exit_on_user_error` rather than argparse's usage block.
"""

import argparse
import inspect
import json
from typing import Sequence

from medbridge_jax.data import registry
from medbridge_jax.errors import UserError

DATASETS = ("chexpert", "nih", "mimic", "vindr", "rsna", "synthetic")


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise UserError(message)


def parser(description: str) -> argparse.ArgumentParser:
  """A parser with --dataset, --root, --split and repeatable --option."""
  p = _Parser(description=description)
  p.add_argument("--dataset", required=True, choices=DATASETS,
                 help="data set name")
  p.add_argument("--root", required=True,
                 help="the data set's folder, as its publisher lays it out")
  p.add_argument("--split", default="all",
                 help="split name, or 'all' (default)")
  p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                 help="reader option, e.g. rule=any (VinDr) or "
                 "labeler=negbio (MIMIC); VALUE is JSON if it parses, else "
                 "a string")
  return p


def reader_options(pairs: Sequence[str]) -> dict:
  """{"key": value} from ["key=value", ...]; values JSON where they parse."""
  options = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
      raise UserError(f"--option {pair!r} is not KEY=VALUE")
    try:
      options[key.strip()] = json.loads(value)
    except json.JSONDecodeError:
      options[key.strip()] = value
  return options


def check_options(dataset: str, options: dict) -> None:
  """UserError for an --option the data set's reader does not take."""
  params = inspect.signature(registry.reader(dataset)).parameters
  known = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY]
  for key in options:
    if key not in known:
      raise UserError(f"--option {key}: the {dataset} reader takes "
                      f"{', '.join(known) or 'no options'}")


def read_index(dataset: str, root: str, split: str, options: dict):
  """registry.read_index, refusing options the reader does not take."""
  check_options(dataset, options)
  return registry.read_index(dataset, root, split, **options)
