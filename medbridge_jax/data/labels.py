"""Label policies and the harmonisation of label names across data sets.

An `Index` keeps the publishers' raw codes (1, 0, -1, blank). Training needs a
target and a mask per label; `targets` decides them by two policies:

  uncertain (-1): "ignore" (masked out) | "zeros" | "ones"   (CheXpert's U-*)
  blank (nan):    "zeros" (no mention = negative) | "ignore"

Cross-domain work trains on one data set and tests on another, so labels must
be matched by meaning, not spelling. `canonical` maps every known spelling to
one name (CheXpert's wording where CheXpert has the finding); `harmonise`
rebuilds an index's label columns in a requested order, blank where the data
set does not have the finding, and `available` says which columns are real.
A column that is not available is masked out by `targets` whatever the blank
policy, so a missing label never becomes a negative one.
"""

import dataclasses
from typing import Sequence

import numpy as np

from medbridge_jax.data import index as index_lib
from medbridge_jax.errors import UserError

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
BLANK_POLICIES = ("zeros", "ignore")

# Spellings of the same finding, keyed by a lower-case, underscore-free form.
# Canonical names follow CheXpert where CheXpert has the finding.
_SYNONYMS = {
    "no finding": "No Finding",
    "enlarged cardiomediastinum": "Enlarged Cardiomediastinum",
    "cardiomegaly": "Cardiomegaly",
    "lung opacity": "Lung Opacity",
    "lung lesion": "Lung Lesion",
    "edema": "Edema",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "atelectasis": "Atelectasis",
    "pneumothorax": "Pneumothorax",
    "pleural effusion": "Pleural Effusion",
    "effusion": "Pleural Effusion",  # NIH ChestX-ray14
    "pleural other": "Pleural Other",
    "fracture": "Fracture",
    "support devices": "Support Devices",
    "infiltration": "Infiltration",
    "mass": "Mass",
    "nodule": "Nodule",
    "nodule/mass": "Nodule/Mass",  # VinDr-CXR
    "emphysema": "Emphysema",
    "fibrosis": "Fibrosis",
    "pulmonary fibrosis": "Fibrosis",  # VinDr-CXR
    "pleural thickening": "Pleural Thickening",  # NIH: Pleural_Thickening
    "hernia": "Hernia",
    "aortic enlargement": "Aortic Enlargement",
    "calcification": "Calcification",
    "clavicle fracture": "Clavicle Fracture",
    "rib fracture": "Rib Fracture",
    "enlarged pa": "Enlarged PA",
    "ild": "ILD",
    "lung cavity": "Lung Cavity",
    "lung cyst": "Lung Cyst",
    "mediastinal shift": "Mediastinal Shift",
    "other lesion": "Other Lesion",
    "copd": "COPD",
    "lung tumor": "Lung Tumor",
    "tuberculosis": "Tuberculosis",
    "other disease": "Other Disease",
    "other diseases": "Other Disease",
}

# A broader finding that a data set lacks but can be composed from narrower
# ones it has, which together cover it: positive if any part is positive,
# negative only if every part is negative (see `_combine`). Used only when the
# data set has no column for the broader finding itself.
_COMPOSED = {
    "Lung Lesion": (("Nodule", "Mass"), ("Nodule/Mass",)),
    "Fracture": (("Rib Fracture", "Clavicle Fracture"),),
}


def _key(name: str) -> str:
  return " ".join(name.replace("_", " ").lower().split())


def canonical(name: str) -> str:
  """The canonical spelling of a label name (unknown names pass unchanged)."""
  return _SYNONYMS.get(_key(name), name.strip())


def targets(index_labels: np.ndarray, uncertain_policy: str,
            blank_policy: str, available: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
  """Training targets and mask from raw label codes.

  Args:
    index_labels: float array (rows, labels) of codes 1, 0, -1, nan.
    uncertain_policy: what -1 becomes: "ignore" | "zeros" | "ones".
    blank_policy: what nan becomes: "zeros" | "ignore".
    available: optional bool (labels,); False columns are masked out entirely
      (the data set does not have that label; see `harmonise`).

  Returns:
    (targets, mask), float32 arrays of the input's shape; a masked entry has
    target 0.
  """
  if uncertain_policy not in UNCERTAIN_POLICIES:
    raise UserError(f"uncertain label policy {uncertain_policy!r} is not one "
                    f"of {UNCERTAIN_POLICIES}")
  if blank_policy not in BLANK_POLICIES:
    raise UserError(
        f"blank label policy {blank_policy!r} is not one of {BLANK_POLICIES}")
  raw = np.asarray(index_labels, np.float32)
  positive = raw == index_lib.POSITIVE
  negative = raw == index_lib.NEGATIVE
  uncertain = raw == index_lib.UNCERTAIN
  blank = np.isnan(raw)
  if not (positive | negative | uncertain | blank).all():
    bad = raw[~(positive | negative | uncertain | blank)][0]
    raise ValueError(f"raw label code {bad!r} is not 1, 0, -1 or blank")
  target = positive.astype(np.float32)
  mask = (positive | negative).astype(np.float32)
  if uncertain_policy != "ignore":
    mask[uncertain] = 1.0
    if uncertain_policy == "ones":
      target[uncertain] = 1.0
  if blank_policy == "zeros":
    mask[blank] = 1.0
  if available is not None:
    available = np.asarray(available, bool)
    if available.shape != (raw.shape[-1],):
      raise ValueError(f"available has shape {available.shape}, expected "
                       f"({raw.shape[-1]},)")
    mask[..., ~available] = 0.0
  target *= mask
  return target, mask


def _combine(columns: np.ndarray) -> np.ndarray:
  """One code per row from the codes of its parts (rows, k).

  Positive if any part is; else uncertain if any part is; else negative if
  every part is negative; else blank (a part unknown, none positive).
  """
  out = np.full(columns.shape[0], np.nan, np.float32)
  out[(columns == index_lib.NEGATIVE).all(axis=1)] = index_lib.NEGATIVE
  out[(columns == index_lib.UNCERTAIN).any(axis=1)] = index_lib.UNCERTAIN
  out[(columns == index_lib.POSITIVE).any(axis=1)] = index_lib.POSITIVE
  return out


def sources(label_names: Sequence[str], target: str) -> list[int]:
  """Columns of `label_names` that give `target`'s value ([] if none)."""
  by_name = {}
  for i, name in enumerate(label_names):
    by_name.setdefault(canonical(name), []).append(i)
  want = canonical(target)
  if want in by_name:
    return by_name[want]
  for parts in _COMPOSED.get(want, ()):
    if all(p in by_name for p in parts):
      return [i for p in parts for i in by_name[p]]
  return []


def available(label_names: Sequence[str],
              target_label_names: Sequence[str]) -> np.ndarray:
  """bool (targets,): whether a data set with `label_names` has each target."""
  return np.array([bool(sources(label_names, t)) for t in target_label_names],
                  bool)


def harmonise(index: index_lib.Index,
              target_label_names: Sequence[str]) -> index_lib.Index:
  """The index with label columns `target_label_names`, matched by meaning.

  A target the data set has under another spelling (Effusion for Pleural
  Effusion) takes that column; one it can compose from narrower findings
  (Lung Lesion from NIH's Nodule and Mass) takes their combination; one it
  lacks is blank in every row: pass `available(index.label_names, targets)`
  to `targets` so those columns are masked rather than read as negatives.
  """
  target_label_names = tuple(target_label_names)
  if len(set(map(canonical, target_label_names))) != len(target_label_names):
    raise UserError(f"label names {target_label_names} name the same finding "
                    "twice")
  columns = []
  for target in target_label_names:
    src = sources(index.label_names, target)
    if not src:
      columns.append(np.full(len(index), np.nan, np.float32))
    elif len(src) == 1:
      columns.append(index.labels[:, src[0]].astype(np.float32))
    else:
      columns.append(_combine(index.labels[:, src]))
  labels = (np.stack(columns, axis=1) if columns
            else np.zeros((len(index), 0), np.float32))
  return dataclasses.replace(
      index, label_names=target_label_names, labels=labels)


def select(index: index_lib.Index,
           label_names: Sequence[str]) -> index_lib.Index:
  """The index restricted to some of its own columns (exact names)."""
  missing = [n for n in label_names if n not in index.label_names]
  if missing:
    raise UserError(f"{index.dataset} has no label(s) {missing}; its labels "
                    f"are {list(index.label_names)}")
  cols = [index.label_names.index(n) for n in label_names]
  return dataclasses.replace(index, label_names=tuple(label_names),
                             labels=index.labels[:, cols])


@dataclasses.dataclass
class LabelledSplit:
  """One split's images with targets in a run's label order."""
  name: str  # e.g. "synthetic/valid"; the report's section title.
  index: index_lib.Index  # Harmonised to the run's labels.
  available: np.ndarray  # (L,) bool: labels this data set has at all.
  targets: np.ndarray  # (N, L) float32, after the label policies.
  mask: np.ndarray  # (N, L) float32, 0 = unknown.


def labelled_split(name: str, index: index_lib.Index,
                   label_names: Sequence[str], data_config) -> LabelledSplit:
  """Harmonises `index` to `label_names` and applies `data_config`'s
  uncertain and blank policies."""
  is_available = available(index.label_names, label_names)
  index = harmonise(index, label_names)
  t, mask = targets(index.labels, data_config.uncertain_policy,
                    data_config.blank_policy, is_available)
  return LabelledSplit(name, index, is_available, t, mask)
