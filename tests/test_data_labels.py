"""Label policies and cross-data-set harmonisation, against hand-made codes."""

import numpy as np
import pytest

from medbridge_jax.data import index as index_lib
from medbridge_jax.data import labels
from medbridge_jax.errors import UserError

N = np.nan
RAW = np.array([[1, 0, -1, N]], np.float32)


@pytest.mark.parametrize("unc, blank, want_t, want_m", [
    ("ignore", "zeros", [1, 0, 0, 0], [1, 1, 0, 1]),
    ("zeros", "zeros", [1, 0, 0, 0], [1, 1, 1, 1]),
    ("ones", "zeros", [1, 0, 1, 0], [1, 1, 1, 1]),
    ("ones", "ignore", [1, 0, 1, 0], [1, 1, 1, 0]),
    ("ignore", "ignore", [1, 0, 0, 0], [1, 1, 0, 0]),
])
def test_policies(unc, blank, want_t, want_m):
  t, m = labels.targets(RAW, unc, blank)
  assert t.dtype == np.float32 and m.dtype == np.float32
  np.testing.assert_array_equal(t, [want_t])
  np.testing.assert_array_equal(m, [want_m])


def test_unavailable_columns_are_masked_even_with_blank_zeros():
  t, m = labels.targets(np.array([[1, N], [0, N]], np.float32), "ones",
                        "zeros", available=np.array([True, False]))
  np.testing.assert_array_equal(m, [[1, 0], [1, 0]])
  np.testing.assert_array_equal(t, [[1, 0], [0, 0]])


def test_unknown_policy_is_a_user_error():
  with pytest.raises(UserError, match="maybe"):
    labels.targets(RAW, "maybe", "zeros")
  with pytest.raises(UserError, match="guess"):
    labels.targets(RAW, "ignore", "guess")


def _index(names, rows):
  rows = np.array(rows, np.float32)
  n = len(rows)
  return index_lib.Index(
      dataset="d", split="train", root="/r", paths=tuple(map(str, range(n))),
      patients=tuple(map(str, range(n))), studies=tuple(map(str, range(n))),
      label_names=tuple(names), labels=rows)


def test_canonical_synonyms():
  assert labels.canonical("Effusion") == "Pleural Effusion"
  assert labels.canonical("Pleural_Thickening") == "Pleural Thickening"
  assert labels.canonical("pleural thickening") == "Pleural Thickening"
  assert labels.canonical("No finding") == "No Finding"
  assert labels.canonical("Pulmonary fibrosis") == "Fibrosis"
  assert labels.canonical("Something New") == "Something New"


def test_harmonise_nih_to_chexpert_names():
  nih = _index(["Effusion", "Nodule", "Mass", "Pleural_Thickening"],
               [[1, 0, 0, 1],
                [0, 1, 0, 0],
                [0, 0, 1, 0],
                [0, 0, 0, 0]])
  target = ("Pleural Effusion", "Lung Lesion", "Pleural Thickening",
            "Cardiomegaly")
  h = labels.harmonise(nih, target)
  assert h.label_names == target
  np.testing.assert_array_equal(h.labels[:, :3], [[1, 0, 1], [0, 1, 0],
                                                  [0, 1, 0], [0, 0, 0]])
  assert np.isnan(h.labels[:, 3]).all()
  np.testing.assert_array_equal(labels.available(nih.label_names, target),
                                [True, True, True, False])


def test_composed_label_is_blank_when_a_part_is_unknown():
  d = _index(["Nodule", "Mass"], [[0, N], [N, 1], [0, 0], [-1, 0]])
  h = labels.harmonise(d, ["Lung Lesion"])
  np.testing.assert_array_equal(h.labels[:, 0], [N, 1, 0, -1])


def test_exact_column_wins_over_composition():
  d = _index(["Lung Lesion", "Nodule"], [[0, 1]])
  assert labels.harmonise(d, ["Lung Lesion"]).labels[0, 0] == 0


def test_chexpert_lung_lesion_does_not_give_nih_nodule():
  d = _index(["Lung Lesion"], [[1]])
  assert not labels.available(d.label_names, ["Nodule"])[0]
  assert np.isnan(labels.harmonise(d, ["Nodule"]).labels[0, 0])


def test_harmonise_refuses_the_same_finding_twice():
  d = _index(["Effusion"], [[1]])
  with pytest.raises(UserError, match="twice"):
    labels.harmonise(d, ["Effusion", "Pleural Effusion"])


def test_select():
  d = _index(["A", "B", "C"], [[1, 0, -1]])
  s = labels.select(d, ["C", "A"])
  assert s.label_names == ("C", "A")
  np.testing.assert_array_equal(s.labels, [[-1, 1]])
  with pytest.raises(UserError, match="'Z'"):
    labels.select(d, ["Z"])
