"""Checks that every indexed image of a data set exists and decodes.

  python -m medbridge_jax.data.verify --dataset=NAME --root=DIR [--split=all]

Each image is decoded with `images.read_image` (the pipeline's own decoder,
at a small size: JPEG decodes in draft mode, which still reads the whole
file). Bad images are listed one per line on stdout, then a summary line;
the exit status is 0 if every image decoded, 1 if any did not, 2 for bad
arguments or label files.
"""

import concurrent.futures
import os
import sys
from typing import Sequence

from medbridge_jax import errors
from medbridge_jax.data import cli
from medbridge_jax.data import images
from medbridge_jax.data import index as index_lib


def bad_images(index: index_lib.Index, size: int = 64, workers: int = 4
               ) -> list[tuple[str, str]]:
  """[(path, problem)] for every indexed image that is missing or corrupt."""

  def check(path: str) -> str | None:
    try:
      images.read_image(os.path.join(index.root, path), size)
    except errors.UserError as e:
      return str(e)
    return None

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    problems = list(pool.map(check, index.paths))
  return [(p, e) for p, e in zip(index.paths, problems) if e is not None]


def main(argv: Sequence[str] | None = None) -> int:
  program = "medbridge_jax.data.verify"
  with errors.exit_on_user_error(program):
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64,
                   help="side images are decoded to (small is fast)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="decoding threads")
    args = p.parse_args(argv)
    index = cli.read_index(args.dataset, args.root, args.split,
                           cli.reader_options(args.option))
    bad = bad_images(index, args.size, args.workers)
  for path, problem in bad:
    print(f"BAD {path}: {problem}")
  print(f"{program}: {len(index)} images checked, {len(bad)} bad "
        f"({args.dataset} {args.split} in {args.root})")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
