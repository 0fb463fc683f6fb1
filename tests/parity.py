"""How parity tests compare our outputs with a reference implementation."""

import numpy as np

TOL = 1e-4  # Max relative error in float32.


def relative_error(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|: one number per compared tensor."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  if ours.shape != theirs.shape:
    raise AssertionError(f"shapes differ: ours {ours.shape}, reference "
                         f"{theirs.shape}")
  scale = max(float(np.max(np.abs(theirs))), 1e-12)
  return float(np.max(np.abs(ours - theirs))) / scale


def assert_close(ours, theirs, what: str, tol: float = TOL):
  err = relative_error(ours, theirs)
  assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"
