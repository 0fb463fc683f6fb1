"""Data-efficient task: train on 1%, 10% or 100% of the training patients.

The argument picks the percentage: --config=configs/data_efficient.py:10.
Patients are sampled deterministically by seed, and the subsets are nested
(the 1% patients are among the 10%), and only from the training patients:
the validation split (model selection) and the held-out test split (the
reported numbers) are whole in every variant. Add `,runlocal` for a smoke
run: --config=configs/data_efficient.py:1,runlocal.

Real data: as in_domain.py, e.g. --config.data.dataset=chexpert
--config.data.root=/data/chexpert --config.experts="('/ckpt/clip',)".
"""

from medbridge_jax import default_config

PERCENTAGES = ("1", "10", "100")


def get_config(arg=None):
  parts = [p for p in (arg or "").split(",") if p]
  percent = [p for p in parts if p in PERCENTAGES]
  unknown = [p for p in parts if p not in PERCENTAGES + ("runlocal",)]
  if unknown or len(percent) != 1:
    raise ValueError(
        f"data_efficient.py needs one of {', '.join(PERCENTAGES)} (percent of "
        f"training patients), optionally with ',runlocal'; got {arg!r}")
  c = default_config.get_default()
  c.data.train_fraction = int(percent[0]) / 100.0
  # Fewer examples: fewer steps at a smaller batch before the model has seen
  # every image many times over.
  if c.data.train_fraction < 0.05:
    c.train.batch_size = 16
    c.train.steps = 150
  if "runlocal" in parts:
    default_config.shrink_for_local_run(c)
  return c
