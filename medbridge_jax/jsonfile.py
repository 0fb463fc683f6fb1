"""Reading a JSON object a user or an earlier run wrote."""

import json
import os

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
