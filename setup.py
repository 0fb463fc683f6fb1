"""MedBridge-JAX: adapting frozen vision-language models to chest X-ray diagnosis."""

import setuptools

# Runtime dependencies. tensorflow-cpu and tensorboard are here only because
# clu's metric writers import TensorFlow and write TensorBoard event files.
INSTALL_REQUIRES = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "transformers>=5.0",  # tokenizers and configs only; no Flax models in 5.x
    "tensorflow-datasets>=4.9",
    "array_record>=0.8",  # tfds' ArrayRecord shards, read by grain
    "grain>=0.2.18",
    "ml_collections>=1.0",
    "clu>=0.0.12",
    "tensorflow-cpu>=2.21",
    "tensorboard>=2.21",
    "safetensors>=0.4",  # read Hugging Face checkpoints without torch
    "sentencepiece>=0.2",  # SigLIP's tokenizer
    "numpy>=2.0",
    "pillow>=10",  # PNG / JPEG decoding
    "pydicom>=3.0",  # DICOM decoding (VinDr-CXR, RSNA Pneumonia)
    "matplotlib>=3.8",  # ROC curves in reports
    "absl-py>=2.0",
]

EXTRAS_REQUIRE = {
    "test": [
        # References for parity tests only. open_clip and timm need
        # torchvision, whose wheels are CUDA builds: torch and torchvision
        # are pinned as the pair that loads together (CUDA libraries
        # unused on CPU).
        "torch==2.14.1",
        "torchvision==0.29.1",
        "open_clip_torch==3.3.0",
        "timm==1.0.29",
        "scikit-learn>=1.4",  # reference for metrics
        "pytest>=8",
        "pytest-xdist>=3",
        "nbformat>=5",
        "nbclient>=0.10",
        "ipykernel>=6",
    ],
}

setuptools.setup(
    name="medbridge_jax",
    version="0.1.0",
    description="MedBridge in JAX: focal sampling, query-encoder and mixture of "
    "frozen vision-language experts for chest X-ray diagnosis.",
    packages=setuptools.find_packages(include=["medbridge_jax", "medbridge_jax.*"]),
    # The shipped test-bed experts: Hugging Face folders under the package.
    package_data={"medbridge_jax.experts.testbed": ["README.md", "*/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
