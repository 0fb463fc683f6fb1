"""MedBridge-JAX: frozen vision-language experts adapted to chest X-ray diagnosis.

Subpackages:
  experts/  Flax CLIP and SigLIP towers loaded from Hugging Face folders.
  model/    Focal Sampling, Query-Encoder, cross-view fusion, Mixture of Experts.
  data/     Data set readers, label harmonisation, synthetic data, pipelines.
"""

import os as _os

# TensorFlow, imported by clu's metric writers, prints C++ INFO lines and a
# oneDNN notice when it loads; every command wants them quiet, and the package
# is imported before any of its modules.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
