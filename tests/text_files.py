"""Writing the small label files the data-reader tests build their folders
from, plain or gzip-compressed as some publishers ship them."""

import gzip
import os


def write_lines(path: str, lines, gz: bool = False) -> str:
  """Writes `lines` (one per line) to `path` (+ ".gz" if `gz`), making its
  folder; returns the path written."""
  if gz:
    path += ".gz"
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  data = ("\n".join(lines) + "\n").encode("utf-8")
  with open(path, "wb") as f:
    f.write(gzip.compress(data) if gz else data)
  return path
