"""Reading publishers' label files: plain or gzip CSV, with line numbers.

Shared by the readers so that every bad value is reported the same way:
`file: line N, column 'X': message 'value'`.
"""

import csv
import gzip
import io
import math
import os
import posixpath
from typing import Sequence

import numpy as np

from medbridge_jax.errors import UserError


def find(folder: str, names: Sequence[str] | str) -> str | None:
  """The first of `names` (or `name.gz`) present in `folder`, else None."""
  if isinstance(names, str):
    names = (names,)
  for name in names:
    for candidate in (name, name + ".gz"):
      path = os.path.join(folder, candidate)
      if os.path.isfile(path):
        return path
  return None


def open_text(path: str) -> io.TextIOBase:
  """Opens a text file, gunzipping `.gz` files, dropping a UTF-8 BOM."""
  if path.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig",
                            newline="")
  return open(path, "r", encoding="utf-8-sig", newline="")


class Table:
  """A CSV file read whole: header, rows, and each row's line number."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open_text(path) as f:
        reader = csv.reader(f)
        try:
          self.header = [h.strip() for h in next(reader)]
        except StopIteration:
          raise UserError(f"{path}: file is empty (no header)") from None
        self.rows, self.lines = [], []
        rows_append, lines_append = self.rows.append, self.lines.append
        for row in reader:
          if len(row) > 1 or (row and row[0].strip()):  # else a blank line
            rows_append(row)
            lines_append(reader.line_num)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
      raise UserError(f"{path}: cannot read CSV ({e})") from e

  def __len__(self) -> int:
    return len(self.rows)

  def has(self, name: str) -> bool:
    return name in self.header

  def column(self, name: str) -> list[str]:
    """The stripped values of a column; UserError if the header lacks it."""
    if name not in self.header:
      raise UserError(f"{self.path}: missing column {name!r} (header: "
                      f"{','.join(self.header)})")
    j = self.header.index(name)
    try:
      return [row[j].strip() for row in self.rows]
    except IndexError:
      i = next(i for i, row in enumerate(self.rows) if j >= len(row))
      raise UserError(
          f"{self.path}: line {self.lines[i]}: row has {len(self.rows[i])} "
          f"fields, column {name!r} is field {j + 1}") from None

  def where(self, i: int, name: str, message: str, value: str) -> UserError:
    """An error naming the file, line, column and value of row i."""
    return UserError(f"{self.path}: line {self.lines[i]}, column {name!r}: "
                     f"{message} {value!r}")


_CODES = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0,
          "": math.nan}


def label_codes(table: Table, name: str) -> np.ndarray:
  """A CheXpert-style label column (1.0 / 0.0 / -1.0 / blank) as float32."""
  values = table.column(name)
  codes = {}
  for v in set(values):  # a handful of distinct spellings
    code = _CODES.get(v)
    if code is None:
      try:
        code = float(v)
      except ValueError:
        code = None
      if code is not None and not math.isnan(code) and code not in (
          1.0, 0.0, -1.0):
        code = None
      if code is None:
        i = values.index(v)
        raise table.where(i, name, "unexpected label value (expected 1.0, "
                          "0.0, -1.0 or blank)", v)
    codes[v] = code
  return np.fromiter(map(codes.__getitem__, values), np.float32, len(values))


def safe_relpath(table: Table, i: int, name: str, value: str) -> str:
  """A '/'-separated relative path, refused if it is absolute or escapes."""
  p = value.replace("\\", "/")
  if (not p or p.startswith("/") or (len(p) > 1 and p[1] == ":")):
    raise table.where(i, name, "path must be relative to the data set root",
                      value)
  if "/." in p or p.startswith(".") or "//" in p:
    p = posixpath.normpath(p)
    if p == ".." or p.startswith("../") or p == ".":
      raise table.where(i, name, "path escapes the data set root", value)
  return p
