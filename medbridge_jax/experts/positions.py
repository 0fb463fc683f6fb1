"""Resizing a ViT's learned position table to another patch grid.

Each reference resizes the table of patch positions with PyTorch's
`interpolate(mode="bicubic", align_corners=False)`, some with
`antialias=True`; we build the same resampling as two (out, in) matrices
and apply them on the device, so any grid works inside jit.
"""

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of PyTorch's bicubic resize, align_corners=False.

  Same sampling points (no clamping of the source coordinate), the same
  Keys kernel with a = -0.75, and the same border clamping of taps as
  `torch.nn.functional.interpolate(mode="bicubic")`, which transformers
  uses for `interpolate_pos_encoding=True`.
  """
  a = -0.75
  scale = in_size / out_size
  w = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = scale * (i + 0.5) - 0.5
    x0 = int(np.floor(src))
    t = src - x0
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    taps = (far(t + 1), near(t), near(1 - t), far(2 - t))
    for j, c in enumerate(taps):
      w[i, min(max(x0 - 1 + j, 0), in_size - 1)] += c
  return w.astype(np.float32)


def _keys_half(x: float) -> float:
  """The Keys cubic with a = -0.5 (PIL's), as PyTorch's antialiased
  bicubic uses it."""
  a = -0.5
  x = abs(x)
  if x < 1:
    return ((a + 2) * x - (a + 3)) * x * x + 1
  if x < 2:
    return (((x - 5) * x + 8) * x - 4) * a
  return 0.0


@functools.lru_cache(maxsize=64)
def bicubic_antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of PyTorch's antialiased bicubic resize.

  `interpolate(mode="bicubic", align_corners=False, antialias=True)` is a
  different filter from the plain one even when upsampling: Keys' kernel
  with a = -0.5, taps cut at the border (not clamped) and each row
  normalised to sum 1; when downsampling the kernel is also stretched by
  the scale (support 2 * scale), which is the antialiasing. Same index and
  weight arithmetic as ATen's `_compute_weights_aa`.
  """
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1 else 2.0
  invscale = 1.0 / scale if scale >= 1 else 1.0
  w = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (i + 0.5)
    # int() truncates toward zero, as ATen's static_cast does.
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    for j in range(lo, hi):
      w[i, j] = _keys_half((j - center + 0.5) * invscale)
    total = w[i].sum()
    if total != 0:
      w[i] /= total
  return w.astype(np.float32)


MATRICES = {"bicubic": bicubic_matrix,
            "bicubic_antialias": bicubic_antialias_matrix}


def resize(pos: Array, grid: Tuple[int, int], new_grid: Tuple[int, int],
           kind: str = "bicubic") -> Array:
  """A (gh*gw, D) position table resized to `new_grid`, as `kind` does
  (a key of MATRICES)."""
  if kind not in MATRICES:
    raise ValueError(f"position interpolation {kind!r} not in "
                     f"{tuple(MATRICES)}")
  if tuple(grid) == tuple(new_grid):
    return pos
  matrix = MATRICES[kind]
  d = pos.shape[-1]
  table = pos.reshape(grid[0], grid[1], d)
  wh = jnp.asarray(matrix(grid[0], new_grid[0]))
  ww = jnp.asarray(matrix(grid[1], new_grid[1]))
  hi = jax.lax.Precision.HIGHEST
  table = jnp.einsum("ih,hwd->iwd", wh, table, precision=hi)
  table = jnp.einsum("jw,iwd->ijd", ww, table, precision=hi)
  return table.reshape(new_grid[0] * new_grid[1], d)
