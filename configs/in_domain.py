"""In-domain task: train and test on the same data set.

Default: the embedded synthetic chest X-rays with two small random experts.
Real data: --config.data.dataset=chexpert --config.data.root=/data/chexpert
  --config.experts="('/ckpt/clip-vit-base-patch16','/ckpt/siglip-base')"
Variants (--config=configs/in_domain.py:runlocal): `runlocal` is a seconds-long
smoke run.
"""

from medbridge_jax import default_config


def get_config(arg=None):
  c = default_config.get_default()
  if arg == "runlocal":
    default_config.shrink_for_local_run(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of in_domain.py; known: runlocal")
  return c
