"""MedBridge-JAX: frozen vision-language experts adapted to chest X-ray diagnosis.

Subpackages:
  experts/  Flax CLIP and SigLIP towers loaded from Hugging Face folders.
  model/    Focal Sampling, Query-Encoder, cross-view fusion, Mixture of Experts.
  data/     Data set readers, label harmonisation, synthetic data, pipelines.
"""

__version__ = "0.1.0"
