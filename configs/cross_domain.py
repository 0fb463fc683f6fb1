"""Cross-domain task: train on one data set, test on others.

Labels are harmonised to the training set's label names (synonyms such as
Effusion / Pleural Effusion are matched; a label a test set lacks is masked
out there, never counted as negative).

Default: train on the synthetic CheXpert-layout data and test on the
domain-shifted synthetic NIH-layout data (other contrast, noise and scanner
look), generated in the cache.

Real data: --config.data.dataset=chexpert --config.data.root=/data/chexpert
  --config.data.test_datasets="(('nih','/data/nih','test'),('mimic','/data/mimic','test'))"
  --config.data.labels="('Cardiomegaly','Edema','Pleural Effusion','Pneumothorax','Atelectasis')"
Variant `runlocal` is a smoke run.
"""

from medbridge_jax import default_config


def get_config(arg=None):
  c = default_config.get_default()
  # ("synthetic:nih", "", split): the generated NIH-layout variant.
  c.data.test_datasets = (("synthetic:nih", "", "test"),)
  if arg == "runlocal":
    default_config.shrink_for_local_run(c)
  elif arg:
    raise ValueError(
        f"unknown variant {arg!r} of cross_domain.py; known: runlocal")
  return c
