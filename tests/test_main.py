"""The command line: bad input is one line on stderr and a non-zero exit."""

import os
import stat
import subprocess
import sys
import time

import pytest

from medbridge_jax import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.random_experts=('clip:width=32,layers=2,heads=2,patch=8,"
        "image=32',)", "--config.data.image_size=128",
        "--config.data.synthetic.num_patients=40"]


def _run(args, cache, timeout=300):
  env = dict(os.environ, MEDBRIDGE_CACHE=cache, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "medbridge_jax.main",
       "--config=configs/in_domain.py:runlocal"] + args,
      cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  return proc.returncode, lines[-1] if lines else "", proc.stderr


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("args,message", [
    (["--config.train.stepz=3"],
     "unknown config key 'train.stepz' in --config.train.stepz=3 (did you "
     "mean train.steps?)"),
    (["--config.trian.steps=3"], "unknown config key 'trian.steps'"),
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--workdirr=/tmp/x"], "Unknown command line flag 'workdirr'"),
])
def test_bad_flags_are_one_line(args, message, cache, tmp_path):
  code, last, stderr = _run(args + [f"--workdir={tmp_path}"], cache)
  assert code == 2, stderr
  assert last.startswith("medbridge_jax.main: error: ") and message in last
  assert "Traceback" not in stderr


def test_unwritable_workdir(cache, tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
  if os.access(str(locked), os.W_OK):
    pytest.skip("running as a user who can write anywhere (root)")
  code, last, stderr = _run([f"--workdir={locked}/run"], cache)
  assert code == 2 and "Traceback" not in stderr
  assert last.startswith("medbridge_jax.main: error: workdir ")


def test_workdir_that_is_a_file(cache, tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  code, last, stderr = _run([f"--workdir={path}"], cache)
  assert code == 2 and "Traceback" not in stderr
  assert last.startswith(f"medbridge_jax.main: error: workdir {path} ")


def test_missing_data_root(cache, tmp_path):
  code, last, stderr = _run(
      [f"--workdir={tmp_path}", "--config.data.dataset=chexpert",
       "--config.data.root=/no/such/chexpert"], cache)
  assert code == 2 and "Traceback" not in stderr
  assert last == ("medbridge_jax.main: error: data root not found: "
                  "/no/such/chexpert (config.data.root)")


def test_missing_expert_folder(cache, tmp_path):
  code, last, stderr = _run(
      [f"--workdir={tmp_path}", "--config.experts=('/no/such/clip',)"] + TINY,
      cache)
  assert code == 2 and "Traceback" not in stderr
  assert last == ("medbridge_jax.main: error: expert folder not found: "
                  "/no/such/clip (config.experts[0])")


def test_default_workdir():
  assert main.default_workdir("configs/in_domain.py") == "workdir/in_domain"
  assert main.default_workdir("configs/in_domain.py:runlocal") == (
      "workdir/in_domain_runlocal")


def test_bad_value_is_refused_before_any_data_or_expert(tmp_path):
  # The full in-domain config: generating its data set alone takes far
  # longer than the check, and would fill the cache.
  cache = tmp_path / "cache"
  cache.mkdir()
  env = dict(os.environ, MEDBRIDGE_CACHE=str(cache), JAX_PLATFORMS="cpu")
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, "-m", "medbridge_jax.main",
       "--config=configs/in_domain.py",
       "--config.model.queries.mode=non_destructiv",
       f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  elapsed = time.monotonic() - start
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "medbridge_jax.main: error: config.model.queries.mode='non_destructiv' "
      "is not one of 'non_destructive', 'joint' (did you mean "
      "'non_destructive'?)"]
  assert not os.listdir(cache) and not (tmp_path / "run").exists()
  assert elapsed < 60, elapsed


def test_ablate_checks_the_config_too(tmp_path):
  env = dict(os.environ, MEDBRIDGE_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "medbridge_jax.ablate",
       "--config=configs/in_domain.py:runlocal", "--config.loss.kind=bse",
       f"--workdir={tmp_path / 'ablate'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "medbridge_jax.ablate: error: config.loss.kind='bse' is not one of "
      "'bce', 'asymmetric' (did you mean 'bce'?)")
  assert not os.listdir(tmp_path)
