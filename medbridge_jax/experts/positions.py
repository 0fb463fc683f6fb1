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


MATRICES = {"bicubic": bicubic_matrix}


def resize(pos: Array, grid: Tuple[int, int], new_grid: Tuple[int, int],
           kind: str = "bicubic") -> Array:
  """A (gh*gw, D) position table resized to `new_grid`, as `kind` does."""
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
