"""Label and metadata tables: gzip-aware CSV reading with errors that point.

Publishers ship these files plain (`x.csv`) or compressed (`x.csv.gz`, as
PhysioNet does); `find` accepts either. `read_table` parses a whole file with
the csv module (in C) and keeps each column as a numpy string array, so
readers can validate and convert 100k+ rows with vectorised numpy instead of
a Python loop per row. Every error names the file, the line (1 = the header)
and the offending value.
"""

import csv
import dataclasses
import gzip
import io
import os
from typing import Iterable, Sequence

import numpy as np

from medbridge_jax.errors import UserError

_GZIP_MAGIC = b"\x1f\x8b"


def find(root: str, *names: str) -> str:
  """The first of `names` (relative to `root`) present, plain or as `.gz`."""
  for name in names:
    for candidate in (name, name + ".gz"):
      path = os.path.join(root, candidate)
      if os.path.isfile(path):
        return path
  wanted = " or ".join(f"{n}[.gz]" for n in names)
  raise UserError(f"{root}: no {wanted} in this folder")


def exists(root: str, name: str) -> bool:
  """Whether `name` or `name.gz` is a file under `root`."""
  return any(os.path.isfile(os.path.join(root, n))
             for n in (name, name + ".gz"))


def read_text(path: str) -> str:
  """The file's text; gzip is recognised by its magic bytes, not its name."""
  try:
    with open(path, "rb") as f:
      data = f.read()
    if data[:2] == _GZIP_MAGIC:
      data = gzip.decompress(data)
    return data.decode("utf-8-sig")
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise UserError(f"{path}: cannot read ({e})") from e
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"
                    ) from e


@dataclasses.dataclass(frozen=True)
class Table:
  """A CSV file as columns.

  Attributes:
    path: the file read (for messages).
    header: column names as in the file.
    columns: name -> numpy unicode array, one entry per data row.
    lines: int64 array, the file line number of each data row (header = 1).
  """

  path: str
  header: tuple[str, ...]
  columns: dict[str, np.ndarray]
  lines: np.ndarray

  def __len__(self) -> int:
    return len(self.lines)

  def __getitem__(self, name: str) -> np.ndarray:
    return self.columns[name]

  def fail(self, row: int, column: str, value: str, expected: str):
    """Raises the one-line error for a bad value in data row `row`."""
    raise UserError(
        f"{self.path}: line {int(self.lines[row])}: {column} is {value!r}; "
        f"expected {expected}")

  def fail_row(self, row: int, message: str):
    """Raises a one-line error about data row `row`."""
    raise UserError(f"{self.path}: line {int(self.lines[row])}: {message}")


def read_table(path: str, required: Iterable[str] = (),
               only_required: bool = False) -> Table:
  """Reads a CSV file with a header row; `required` columns must exist.

  With `only_required`, other columns are parsed but not kept (saves time and
  memory on wide metadata files).
  """
  required = tuple(required)
  text = read_text(path)
  reader = csv.reader(io.StringIO(text, newline=""))
  try:
    header = next(reader, None)
    rows = list(reader)
  except csv.Error as e:
    raise UserError(f"{path}: line {reader.line_num}: bad CSV ({e})") from e
  if not header:
    raise UserError(f"{path}: empty file; expected a header row")
  header = tuple(h.strip() for h in header)
  missing = [c for c in required if c not in header]
  if missing:
    raise UserError(
        f"{path}: missing column {missing[0]!r} (header: {','.join(header)})")
  lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
  lines = _line_numbers(text, len(rows))
  keep = lengths > 0  # blank lines, e.g. a trailing one
  bad = np.flatnonzero(keep & (lengths != len(header)))
  if bad.size:
    i = bad[0]
    raise UserError(
        f"{path}: line {lines[i]}: {lengths[i]} fields; the header has "
        f"{len(header)}")
  if not keep.all():
    rows = [r for r, k in zip(rows, keep) if k]
    lines = lines[keep]
  if len(set(header)) != len(header):
    raise UserError(f"{path}: repeated column names in the header")
  keep_column = set(required) if only_required else set(header)
  # One list per kept column: zip(*rows) would transpose every column and is
  # slow with hundreds of thousands of rows as arguments.
  columns = {h: np.array([r[j] for r in rows], dtype=str)
             for j, h in enumerate(header) if h in keep_column}
  return Table(path=path, header=header, columns=columns, lines=lines)


def _line_numbers(text: str, num_rows: int) -> np.ndarray:
  """The file line of each parsed row (quoted newlines make rows span lines)."""
  newlines = text.count("\n") + (0 if text.endswith("\n") else 1)
  if newlines == num_rows + 1:  # no quoted newlines: row i is line i + 2
    return np.arange(2, num_rows + 2, dtype=np.int64)
  reader = csv.reader(io.StringIO(text, newline=""))
  next(reader, None)
  lines = []
  start = reader.line_num + 1
  for _ in reader:
    lines.append(start)
    start = reader.line_num + 1
  return np.asarray(lines, dtype=np.int64)


def codes(table: Table, names: Sequence[str],
          allowed: Sequence[float] = (1.0, 0.0, -1.0),
          blank: bool = True) -> np.ndarray:
  """Label columns as float32 codes; blank -> nan; anything else an error.

  A value is accepted when it parses as a number equal to one of `allowed`
  ("1", "1.0", "-1.0", " 0 " alike) or, if `blank`, is empty.
  """
  out = np.empty((len(table), len(names)), dtype=np.float32)
  expected = ", ".join(f"{a:g}" for a in allowed) + (" or blank" if blank
                                                      else "")
  spellings = {f"{a:g}": a for a in allowed}
  spellings.update({f"{a:.1f}": a for a in allowed})
  if blank:
    spellings[""] = np.nan
  for j, name in enumerate(names):
    column = table[name]
    # Fast path: a few vectorised comparisons with the usual spellings.
    out[:, j] = np.nan
    seen = np.zeros(len(column), bool)
    for text, code in spellings.items():
      hit = column == text
      out[hit, j] = code
      seen |= hit
    if seen.all():
      continue
    values, inverse = np.unique(column, return_inverse=True)
    mapped = np.empty(len(values), dtype=np.float32)
    for k, v in enumerate(values):
      code = _code(v, allowed, blank)
      if code is None:
        table.fail(int(np.argmax(inverse == k)), name, str(v), expected)
      mapped[k] = code
    out[:, j] = mapped[inverse.reshape(-1)]
  return out


def _code(value: str, allowed: Sequence[float], blank: bool) -> float | None:
  value = value.strip()
  if not value:
    return np.nan if blank else None
  try:
    number = float(value)
  except ValueError:
    return None
  return number if number in allowed else None


def integers(table: Table, name: str) -> np.ndarray:
  """A column of non-negative decimal integers as int64; else an error."""
  col = np.char.strip(table[name])
  ok = np.char.isdecimal(col) & (np.char.str_len(col) <= 18)
  if not ok.all():
    i = int(np.argmin(ok))
    table.fail(i, name, str(table[name][i]), "a non-negative integer")
  return col.astype(np.int64) if len(col) else np.zeros(0, np.int64)


def names(table: Table, name: str) -> np.ndarray:
  """A column of identifiers used in file names: non-empty, no path parts.

  Identifiers become path components, so "..", slashes or a drive letter
  would let a label file point outside the data set root.
  """
  col = np.char.strip(table[name])
  bad = ((np.char.str_len(col) == 0) | (col == ".") | (col == "..")
         | (np.char.find(col, "/") >= 0) | (np.char.find(col, "\\") >= 0)
         | (np.char.find(col, ":") >= 0))
  if bad.any():
    i = int(np.argmax(bad))
    table.fail(i, name, str(table[name][i]),
               "a plain identifier (no '/', '\\', ':' or '..'), as it "
               "becomes part of a file path")
  return col


def first_duplicate(keys: np.ndarray) -> int | None:
  """The row of the first repeat of an earlier key, or None."""
  if len(set(keys.tolist())) == len(keys):  # fast common case
    return None
  _, first = np.unique(keys, return_index=True)
  seen = np.zeros(len(keys), dtype=bool)
  seen[first] = True
  return int(np.argmin(seen))


def positions(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
  """For each query, the row of the equal key (keys unique), -1 if none."""
  where = {k: i for i, k in enumerate(keys.tolist())}
  return np.fromiter((where.get(q, -1) for q in queries.tolist()),
                     dtype=np.int64, count=len(queries))


def first_seen(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Unique keys in order of first appearance, and each row's place there."""
  unique, first, inverse = np.unique(keys, return_index=True,
                                     return_inverse=True)
  order = np.argsort(first, kind="stable")
  rank = np.empty(len(order), np.int64)
  rank[order] = np.arange(len(order))
  return unique[order], rank[inverse.reshape(-1)]
