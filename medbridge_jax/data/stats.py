"""Counts of images, patients and label values of a data set split.

  python -m medbridge_jax.data.stats --dataset=NAME --root=DIR [--split=SPLIT]

prints one JSON object:

  {"dataset": ..., "split": ..., "root": ..., "images": N, "patients": P,
   "studies": S, "labels": {NAME: {"positive": a, "negative": b,
                                   "uncertain": c, "blank": d}, ...}}

counting the raw codes of the index (1, 0, -1, blank), before any policy.

`--split=all` (the default) counts every image the label files describe:
  chexpert   every row of train.csv, valid.csv and the test labels if
             present, lateral views included (views=all)
  nih        every row of Data_Entry_2017[_v2020].csv
  mimic      every image of the split file whose study has a label row,
             lateral and unknown views included (views=None)
  vindr      every image of the train and test label files (PhysioNet) or of
             train.csv (Kaggle), after combining radiologists (one count per
             image, not per radiologist row)
  rsna       every image of stage_2_train_labels.csv (one per patientId)
  synthetic  every generated image
Any other split is the reader's own (frontal views only for CheXpert and
MIMIC). Reader options pass with --option KEY=VALUE, e.g. --option rule=any.
"""

import json
import sys
from typing import Sequence

import numpy as np

from medbridge_jax import errors
from medbridge_jax.data import cli
from medbridge_jax.data import index as index_lib

# Options that make split "all" mean every row of the label files.
_ALL_ROWS = {"chexpert": {"views": "all"}, "mimic": {"views": None}}


def counts(index: index_lib.Index) -> dict:
  """The statistics object of an index (see module docstring)."""
  raw = np.asarray(index.labels, np.float32)
  labels = {}
  for j, name in enumerate(index.label_names):
    col = raw[:, j]
    labels[name] = {
        "positive": int((col == index_lib.POSITIVE).sum()),
        "negative": int((col == index_lib.NEGATIVE).sum()),
        "uncertain": int((col == index_lib.UNCERTAIN).sum()),
        "blank": int(np.isnan(col).sum()),
    }
  return {
      "dataset": index.dataset, "split": index.split, "root": index.root,
      "images": len(index), "patients": len(set(index.patients)),
      "studies": len(set(index.studies)), "labels": labels,
  }


def main(argv: Sequence[str] | None = None) -> int:
  with errors.exit_on_user_error("medbridge_jax.data.stats"):
    args = cli.parser(__doc__.splitlines()[0]).parse_args(argv)
    options = cli.reader_options(args.option)
    if args.split == "all":
      options = {**_ALL_ROWS.get(args.dataset, {}), **options}
    index = cli.read_index(args.dataset, args.root, args.split, options)
    print(json.dumps(counts(index), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
