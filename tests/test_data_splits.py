"""Patient-level splits and training fractions, and helpers the data-reader
tests use to resolve their fixtures as a run would."""

import hashlib

import numpy as np
import pytest

from medbridge_jax import default_config
from medbridge_jax.data import index as index_lib
from medbridge_jax.data import splits
from medbridge_jax.errors import UserError


def data_config(dataset, root, **data):
  """The default config on a data set folder, with `config.data` overrides."""
  c = default_config.get_default()
  c.data.dataset, c.data.root = dataset, str(root)
  for key, value in data.items():
    c.data[key] = value
  return c


def first_by_hash(patients, share, seed=0):
  """The round(share * n) (at least one) distinct patients first in the
  order of blake2b("holdout", seed, patient): an independent statement of
  how a held-out split is drawn."""
  distinct = sorted(set(patients))
  key = lambda p: hashlib.blake2b(f"holdout\0{seed}\0{p}".encode(),
                                  digest_size=8).digest()
  k = max(1, int(round(share * len(distinct))))
  return set(sorted(distinct, key=key)[:k])


def _index(num_patients=200, seed=0):
  rng = np.random.default_rng(seed)
  patients = [f"pt{p}" for p in range(num_patients)
              for _ in range(rng.integers(1, 5))]
  n = len(patients)
  return index_lib.Index(
      dataset="toy", split="train", root="/r",
      paths=tuple(f"img{i}.png" for i in range(n)), patients=tuple(patients),
      studies=tuple(f"{p}/s{i}" for i, p in enumerate(patients)),
      label_names=("A",), labels=np.zeros((n, 1), np.float32))


def test_holdout_is_patient_level_exact_and_deterministic():
  idx = _index()
  train, valid = splits.holdout(idx, 0.15, seed=3)
  splits.check_disjoint(train, valid)
  assert len(train) + len(valid) == len(idx)
  assert len(set(valid.patients)) == 30
  assert (train.split, valid.split) == ("train", "valid")
  again = splits.holdout(idx, 0.15, seed=3)[1]
  assert again.paths == valid.paths
  assert splits.holdout(idx, 0.15, seed=4)[1].paths != valid.paths


def test_holdout_ignores_row_order():
  idx = _index()
  shuffled = idx.select(np.random.default_rng(1).permutation(len(idx)))
  a = set(splits.holdout(idx, 0.2, seed=0)[1].patients)
  b = set(splits.holdout(shuffled, 0.2, seed=0)[1].patients)
  assert a == b


def test_holdout_keeps_both_sides_non_empty():
  idx = _index(num_patients=3)
  train, valid = splits.holdout(idx, 0.01, seed=0)
  assert len(set(valid.patients)) == 1 and len(set(train.patients)) == 2
  with pytest.raises(UserError, match="fraction"):
    splits.holdout(idx, 1.0, seed=0)


def test_fractions_by_patient_nested_and_deterministic():
  idx = _index(num_patients=1000)
  one, ten, full = (splits.fraction(idx, f, seed=5) for f in (0.01, 0.1, 1.0))
  assert full is idx
  assert len(set(one.patients)) == 10 and len(set(ten.patients)) == 100
  assert set(one.patients) <= set(ten.patients)
  # Whole patients: every image of a chosen patient comes along.
  counts = {p: idx.patients.count(p) for p in set(ten.patients)}
  assert all(ten.patients.count(p) == c for p, c in counts.items())
  assert splits.fraction(idx, 0.1, seed=5).paths == ten.paths
  assert set(splits.fraction(idx, 0.1, seed=6).patients) != set(ten.patients)
  tiny = splits.fraction(_index(num_patients=20), 0.01, seed=0)
  assert len(set(tiny.patients)) == 1
  with pytest.raises(UserError, match="fraction"):
    splits.fraction(idx, 0.0, seed=0)


def test_check_disjoint_names_data_set_both_splits_and_first_patient():
  idx = _index(num_patients=6)
  rows = {p: [i for i, q in enumerate(idx.patients) if q == p]
          for p in set(idx.patients)}
  a = idx.select(rows["pt0"] + rows["pt1"] + rows["pt4"], split="train")
  b = idx.select(rows["pt2"], split="valid")
  # Shares pt0, pt1 and pt4 with a; pt1 comes first in its rows (neither
  # first nor last by name): pt1 is named.
  c = idx.select(rows["pt3"] + rows["pt1"] + rows["pt4"] + rows["pt0"],
                 split="test")
  splits.check_disjoint(a, b)
  splits.check_disjoint(b, c)
  with pytest.raises(UserError, match=r"^toy: patient pt1 is in both the "
                     r"'train' split and the 'test' split$"):
    splits.check_disjoint(a, b, c)
  with pytest.raises(UserError, match=r"^toy: patient pt1 is in both A and "
                     r"C$"):
    splits.check_disjoint(a, b, c, names=("A", "B", "C"))
  # Same split names, told apart by `names`.
  with pytest.raises(UserError, match="both the valid split 'valid' and the "
                     "test split 'valid'"):
    splits.check_disjoint(
        b, b, names=("the valid split 'valid'", "the test split 'valid'"))
  with pytest.raises(ValueError, match="2 names for 3"):
    splits.check_disjoint(a, b, c, names=("A", "B"))


def test_first_by_hash_matches_holdout():
  # The tests' reference and splits.holdout draw the same patients.
  idx = _index(num_patients=50)
  held = splits.holdout(idx, 0.1, seed=0)[1]
  assert set(held.patients) == first_by_hash(idx.patients, 0.1)
