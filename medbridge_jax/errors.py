"""The one exception type for problems a user can fix.

Anything the user controls (a config key, a path, a file's contents) that is
wrong raises `UserError` with a one-line message naming the thing. The
command-line entry points print that line and exit non-zero instead of
showing a traceback; everything else is a bug and keeps its traceback.
"""

import contextlib
import sys


class UserError(Exception):
  """A problem with the user's input, described in one line."""


def one_line(e: BaseException) -> str:
  """An exception's message on one line, whitespace collapsed.

  absl wraps a config file's exception in a traceback: keep its head and
  the exception itself.
  """
  lines = [" ".join(l.split()) for l in str(e).splitlines() if l.strip()]
  if not lines:
    return type(e).__name__
  return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


@contextlib.contextmanager
def exit_on_user_error(program: str):
  """Turns a `UserError` into `program: error: message` and exit status 2."""
  try:
    yield
  except UserError as e:
    print(f"{program}: error: {e}", file=sys.stderr)
    sys.exit(2)
