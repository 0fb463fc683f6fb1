"""Test setup: 8 virtual CPU devices, no network, absl flags parsed, no
triton."""

import os

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import sys  # pylint: disable=g-import-not-at-top,g-bad-import-order

# The reference torch is a CUDA build (the one torchvision, which open_clip
# and timm need, pairs with); torch._dynamo then imports triton, whose LLVM
# crashes the process when TensorFlow's (clu's writers) is already loaded.
# Nothing here compiles with triton: make `import triton` fail, as on a
# machine without it.
sys.modules.setdefault("triton", None)

from absl import flags  # pylint: disable=g-import-not-at-top

# grain's worker processes read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()
