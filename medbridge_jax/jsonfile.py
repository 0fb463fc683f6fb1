"""Reading a JSON object a user or an earlier run wrote, and writing one."""

import json
import os
from typing import Any

from medbridge_jax import errors


def read(path: str, what: str) -> dict:
  """The JSON object in `path`; UserError naming `what` and `path` if not."""
  if not os.path.isfile(path):
    raise errors.UserError(f"{what} not found: {path}")
  try:
    with open(path, encoding="utf-8") as f:
      body = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(
        f"cannot read {what} {path}: {errors.one_line(e)}") from None
  if not isinstance(body, dict):
    raise errors.UserError(f"{what} {path} does not hold a JSON object")
  return body


def write(path: str, body: Any, indent: int = 2) -> None:
  """`body` as JSON at `path`, replaced whole: a reader never sees half."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(body, f, indent=indent)
  os.replace(tmp, path)
