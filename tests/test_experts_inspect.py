"""`python -m medbridge_jax.experts.inspect`: what a folder holds."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from medbridge_jax.experts import testbed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return subprocess.run(
      [sys.executable, "-m", "medbridge_jax.experts.inspect", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def clip_folder():
  spec, seed = testbed.shipped_specs()[0]
  return os.path.join(os.path.dirname(testbed.__file__),
                      testbed.folder_name(spec, seed))


def test_prints_the_folder_and_its_views(clip_folder, tmp_path):
  vision_only = str(tmp_path / "no_tokenizer")
  shutil.copytree(clip_folder, vision_only)
  for name in os.listdir(vision_only):
    if name.startswith(("vocab", "merges", "tokenizer", "special_tokens")):
      os.remove(os.path.join(vision_only, name))
  out = _run(clip_folder, vision_only, "--config=configs/in_domain.py",
             "--config.data.image_size=128")
  assert out.returncode == 0, out.stderr
  first, second = out.stdout.split(vision_only, 1)
  tensors = load_file(os.path.join(clip_folder, "model.safetensors"))
  total = sum(int(np.size(a)) for a in tensors.values())
  vision = sum(int(np.size(a)) for k, a in tensors.items()
               if k.startswith(("vision_model.", "visual_projection.")))
  assert f"parameters: {total:,} (vision {vision:,})" in first
  assert f"{total * 2 / 2**20:,.1f} MiB in bfloat16" in first
  for line in ("family: clip", "format: hf_clip", "input side: 64 px",
               "patch: 8 px (8x8 patches)", "layers: 4", "width: 64",
               "tokenizer: CLIPTokenizer", "dtype on disk: float32"):
    assert line in first, line
  assert "text tower: yes" in first
  # 128 px images, native 64 px crops, overlap 0.25: stride 48, windows at
  # 0, 48 and 64 on each axis.
  assert "on 128 px images" in first and "eval 1 + 3x3 = 10 views" in first
  assert "text tower: no (no tokenizer files" in second
  assert "tokenizer: none" in second
  assert f"parameters: {vision:,} (vision {vision:,})" in second


def test_a_folder_it_cannot_read_is_one_line_naming_it(tmp_path):
  (tmp_path / "weights.npz").write_bytes(b"")
  out = _run(str(tmp_path))
  assert out.returncode == 2
  assert "no supported expert format" in out.stderr
  assert "weights.npz" in out.stderr and "Traceback" not in out.stderr
  assert _run().returncode == 2
