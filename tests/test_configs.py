"""The task configs: variants, fractions, and cross-domain label harmonisation."""

import csv
import importlib.util
import os
import re

import numpy as np
import pytest

from medbridge_jax import config_check
from medbridge_jax.data import resolve
from medbridge_jax.data import nih

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _get_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("arg,fraction", [("1", 0.01), ("10", 0.1),
                                          ("100", 1.0), ("10,runlocal", 0.1)])
def test_data_efficient_fraction(arg, fraction):
  assert _get_config("data_efficient", arg).data.train_fraction == fraction


@pytest.mark.parametrize("name,arg", [("data_efficient", None),
                                      ("data_efficient", "5"),
                                      ("in_domain", "huge"),
                                      ("cross_domain", "nope")])
def test_unknown_variant_is_an_error_naming_it(name, arg):
  with pytest.raises(ValueError, match=name):
    _get_config(name, arg)


def test_data_efficient_subsets_are_nested_by_patient(tmp_path, monkeypatch):
  monkeypatch.setenv("MEDBRIDGE_CACHE", str(tmp_path))
  patients = {}
  for arg in ("10,runlocal", "100,runlocal"):
    config = _get_config("data_efficient", arg)
    config.data.synthetic.num_patients = 200
    data = resolve.resolve(config)
    patients[arg] = set(data.train.index.patients)
    # The subset never reaches into the held-out patients.
    assert not patients[arg] & (set(data.valid.index.patients)
                                | set(data.test.index.patients))
  assert patients["10,runlocal"] < patients["100,runlocal"]
  share = len(patients["10,runlocal"]) / len(patients["100,runlocal"])
  assert 0.05 < share < 0.15


def _csv_split(path, frontal):
  """(rows kept, their patients) of a label file, read with the csv module:
  the frontal rows (by column if it has one, else by file name)."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  kept = [r for r in rows
          if (r["Frontal/Lateral"] == "Frontal" if frontal
              else r["Path"].endswith("_frontal.jpg"))]
  return len(kept), {re.search(r"patient\d+", r["Path"]).group()
                     for r in kept}


def test_synthetic_default_has_train_valid_test_without_shared_patient(
    tmp_path, monkeypatch):
  monkeypatch.setenv("MEDBRIDGE_CACHE", str(tmp_path))
  config = _get_config("in_domain", "runlocal")
  data = resolve.resolve(config)
  base = os.path.join(data.train.index.root, "CheXpert-v1.0-small")
  want = {"train": _csv_split(os.path.join(base, "train.csv"), True),
          "valid": _csv_split(os.path.join(base, "valid.csv"), True),
          "test": _csv_split(os.path.join(base, "test_labels.csv"), False)}
  got = {role: getattr(data, role).index for role in want}
  for role, (count, patients) in want.items():
    assert len(got[role]) == count > 0, role
    assert set(got[role].patients) == patients, role
  assert not (want["train"][1] & want["valid"][1]
              or want["train"][1] & want["test"][1]
              or want["valid"][1] & want["test"][1])
  assert (data.valid.name, data.test.name) == ("synthetic/valid",
                                                "synthetic/test")
  assert data.extra_tests == []


def test_cross_domain_tests_on_shifted_nih_layout_with_harmonised_labels(
    tmp_path, monkeypatch):
  monkeypatch.setenv("MEDBRIDGE_CACHE", str(tmp_path))
  config = _get_config("cross_domain", "runlocal")
  data = resolve.resolve(config)
  (test,) = data.extra_tests
  assert test.index.label_names == data.label_names
  assert test.available.all()  # Lung Lesion composed from Nodule and Mass.
  # The same rows read by the NIH reader directly: Effusion is the test
  # set's "Pleural Effusion", Nodule (no masses are simulated) its lesion.
  raw = nih.read(test.index.root, "test")
  assert raw.paths == test.index.paths
  names = data.label_names
  col = {n: raw.label_names.index(n) for n in ("Effusion", "Nodule", "Mass")}
  np.testing.assert_array_equal(
      test.targets[:, names.index("Pleural Effusion")],
      raw.labels[:, col["Effusion"]])
  np.testing.assert_array_equal(
      test.targets[:, names.index("Lung Lesion")],
      np.maximum(raw.labels[:, col["Nodule"]], raw.labels[:, col["Mass"]]))


# Every task config and variant, as `--config=configs/<name>.py[:<arg>]`.
VARIANTS = {
    "in_domain": (None, "runlocal"),
    "cross_domain": (None, "runlocal"),
    "data_efficient": ("1", "10", "100", "1,runlocal", "10,runlocal",
                       "100,runlocal"),
}


def test_every_config_file_has_its_variants_listed():
  names = {os.path.splitext(f)[0] for f in os.listdir(CONFIGS)
           if f.endswith(".py") and not f.startswith("_")}
  assert names == set(VARIANTS)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in VARIANTS.items()
                                      for a in args])
def test_every_config_and_variant_passes_the_config_check(name, arg):
  config_check.check(_get_config(name, arg))
