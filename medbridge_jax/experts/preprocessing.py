"""The pixel normalisation an expert was trained with.

Hugging Face folders state it in `preprocessor_config.json` (`image_mean`,
`image_std`) or, as transformers 5 saves processors, inside
`processor_config.json`; where a folder has neither, the family's processor
default.
"""

import os
from typing import Optional, Sequence, Tuple

from medbridge_jax import jsonfile
from medbridge_jax.errors import UserError

Triple = Tuple[float, float, float]

# transformers' image processors' defaults per family.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FAMILY_MEAN_STD = {
    "clip": ((0.48145466, 0.4578275, 0.40821073),
             (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": IMAGENET,
}


def triple(value, key: str, where: str) -> Triple:
  """3 floats (one number is repeated, as open_clip's configs allow)."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = (value,) * 3
  if (not isinstance(value, (list, tuple)) or len(value) != 3
      or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                 for x in value)):
    raise UserError(f"{key} in {where} must be 3 numbers; got {value!r}")
  if key.endswith("std") and min(value) <= 0:
    raise UserError(f"{key} in {where} must be positive; got {value!r}")
  return tuple(float(x) for x in value)


def mean_std(path: str, family: str,
             default: Optional[Tuple[Sequence[float], Sequence[float]]] = None
             ) -> Tuple[Triple, Triple]:
  """(mean, std) from the folder's preprocessor_config.json, else from the
  image processor inside processor_config.json (what transformers 5's
  processors save), else `default`, else the family's."""
  mean, std = default or FAMILY_MEAN_STD[family]
  where = "the defaults"
  file = os.path.join(path, "preprocessor_config.json")
  nested = os.path.join(path, "processor_config.json")
  raw = None
  if os.path.isfile(file):
    raw, where = jsonfile.read(file, "preprocessor config"), file
  elif os.path.isfile(nested):
    raw = jsonfile.read(nested, "processor config").get("image_processor")
    where = f"image_processor in {nested}"
  if isinstance(raw, dict):
    mean = raw.get("image_mean", mean)
    std = raw.get("image_std", std)
  return triple(mean, "image_mean", where), triple(std, "image_std", where)
