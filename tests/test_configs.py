"""The task configs: variants, fractions, and cross-domain label harmonisation."""

import importlib.util
import os

import numpy as np
import pytest

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
    patients[arg] = set(resolve.resolve(config).train.index.patients)
  assert patients["10,runlocal"] < patients["100,runlocal"]
  share = len(patients["10,runlocal"]) / len(patients["100,runlocal"])
  assert 0.05 < share < 0.15


def test_cross_domain_tests_on_shifted_nih_layout_with_harmonised_labels(
    tmp_path, monkeypatch):
  monkeypatch.setenv("MEDBRIDGE_CACHE", str(tmp_path))
  config = _get_config("cross_domain", "runlocal")
  data = resolve.resolve(config)
  (test,) = data.tests
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
