"""The methods framework: every baseline wired into the real train step.

Two random experts (CLIP width 32 at 32 px, SigLIP width 32 at 24 px, two
layers each, one text layer) written as Hugging Face folders and loaded as
real checkpoints are; 64 px stored images. Each method is built with
`methods.build`, its params split with `methods.partition_rules` and
trained a few steps with `train_step.make_train_step`, jitted and donated
as `train.py` does it. The peft and coop modules are tested on their own;
here the wired model is.
"""

import json
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbridge_jax import config_check
from medbridge_jax import default_config
from medbridge_jax import errors
from medbridge_jax import methods
from medbridge_jax import optim
from medbridge_jax import run_info
from medbridge_jax import sharding
from medbridge_jax import train_step
from medbridge_jax.experts import zero_shot
from medbridge_jax.model import medbridge
from medbridge_jax.model import partition
from tests import tiny_run

LABELS = ("effusion", "nodule", "pneumothorax")
SIDE = 64
SPECS = ("clip:width=32,layers=2,heads=2,patch=8,image=32,text_layers=1",
         "siglip:width=32,layers=2,heads=2,patch=8,image=24,text_layers=1")
BASELINES = tuple(n for n in methods.NAMES if n != "medbridge")


def config(method, **knobs):
  c = default_config.get_default()
  c.method.name = method
  c.method.update(knobs)
  c.model.moe.gate_hidden = 8
  c.train.steps, c.train.warmup_steps, c.train.lr = 10, 0, 1e-2
  return c


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
  return tiny_run.random_experts_in(tmp_path_factory.mktemp("experts"), SPECS)


@pytest.fixture(scope="module")
def prompts(experts):
  return [zero_shot.prompt_embeddings(e, list(LABELS)) for e in experts]


def images(n, seed):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, SIDE, SIDE)).astype(np.uint8)


def batch(n, seed):
  rng = np.random.default_rng(seed + 100)
  return {"image": images(n, seed),
          "targets": (rng.random((n, len(LABELS))) < 0.4).astype(np.float32),
          "mask": np.ones((n, len(LABELS)), np.float32)}


def flat(tree):
  return {partition.path_string(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def built(c, experts, prompts, seed=0):
  model = methods.build(c, experts, LABELS, prompts)
  params = medbridge.init_params(model, jax.random.key(seed), experts, SIDE)
  return model, jax.tree.map(np.asarray, params)


def train(c, model, params, rules, steps=3):
  """(trainable before, state after, frozen) of `steps` real steps."""
  mesh = sharding.make_mesh(c.mesh)
  replicated = sharding.replicated(mesh)
  trainable, frozen = partition.split(params, rules)
  tx = optim.make(c.train)
  state = jax.device_put(dict(step=jnp.zeros((), jnp.int32),
                              params=trainable,
                              opt_state=tx.init(trainable)), replicated)
  frozen = jax.device_put(frozen, replicated)
  step = jax.jit(
      train_step.make_train_step(model, tx, optim.schedule(c.train), c,
                                 mesh), donate_argnums=(0,))
  for i in range(steps):
    state, m = step(state, frozen, sharding.to_global(batch(8, i), mesh),
                    None)
    assert np.isfinite(float(m["loss"]))
  return trainable, jax.device_get(state), jax.device_get(frozen)


def loaded_paths(expert, k, params):
  """{model path: loaded weight} of every tower weight in `params`."""
  out = {}
  for path in flat(params):
    parts = path.split("/")
    for name, part in (("tower", "vision"), ("text_tower", "text")):
      if parts[0] == f"expert_{k}" and name in parts:
        inner = "/".join(parts[parts.index(name) + 1:])
        out[path] = flat(expert.params[part])[inner]
  return out


# -- Every baseline through the real, donated step. ---------------------------


@pytest.mark.parametrize("method", BASELINES)
def test_only_the_methods_own_params_train(experts, prompts, method):
  c = config(method, finetune_last=1)
  model, params = built(c, experts, prompts)
  rules = methods.partition_rules(c, experts)
  before, state, frozen = train(c, model, params, rules)
  after = flat(partition.merge(state["params"], frozen))
  trained = flat(state["params"])

  # What trains, by method; the rest of every tower is the loaded weights.
  tuned = {p for p in trained if "tower/" in p}
  if method == "finetune":
    # The last block and what follows it, of both towers (CLIP: post-norm
    # and projection; SigLIP: post-norm and pooling head), nothing else.
    prefixes = ("tower/layers_1/", "tower/post_norm/", "tower/projection/",
                "tower/head/")
    want = {p for p in after if "/tower/" in p
            and any(x in p for x in prefixes)}
    assert tuned == want
    assert any("expert_0/tower/projection/" in p for p in tuned)
    assert any("expert_1/tower/head/" in p for p in tuned)
  else:
    assert not tuned
  seen = 0
  for k, e in enumerate(experts):
    for path, weight in loaded_paths(e, k, after).items():
      if path not in tuned:
        assert np.array_equal(after[path], weight), path
        seen += 1
  assert seen >= 30
  if method == "coop":
    assert any("/text_tower/" in p for p in after)
    assert not [p for p in trained if "text_tower" in p]
  # Every trainable leaf moved (the tuned tower blocks too).
  for path, value in flat(before).items():
    assert not np.array_equal(trained[path], value), path
  own = {"linear_probe": "/head/kernel", "clip_adapter": "/adapter/up/kernel",
         "vpt_shallow": "/peft/prompts", "vpt_deep": "/peft/prompts",
         "lora": "/peft/lora/layers_1/value/b",
         "coop": "/prompts/positive_context",
         "finetune": "/tower/layers_1/mlp/fc2/kernel"}[method]
  assert any(p.endswith(own) for p in trained), own


def test_finetune_all_blocks_trains_whole_towers(experts, prompts):
  c = config("finetune", finetune_last=-1)
  model = methods.build(c, experts, LABELS, prompts)
  abstract = medbridge.abstract_params(model, SIDE)
  decided = partition.decide(abstract, methods.partition_rules(c, experts))
  assert set(decided.values()) == {"train"}
  assert any("expert_0/tower/patch_embed/" in p for p in decided)


def test_finetune_deeper_than_the_tower_is_a_user_error(experts, prompts):
  with pytest.raises(errors.UserError, match="finetune_last=3.*2 blocks"):
    methods.build(config("finetune", finetune_last=3), experts, LABELS,
                  prompts)


def test_medbridge_is_built_unchanged(experts, prompts):
  c = config("medbridge")
  assert methods.build(c, experts, LABELS, prompts) == medbridge.build(
      c, experts, LABELS, prompts)
  assert methods.partition_rules(c, experts) == partition.DEFAULT_RULES


def test_decay_rules_by_method(experts, prompts):
  """The adapter and LoRA factors decay; prompts, contexts, heads and
  fine-tuned tower blocks keep their values."""
  decays = {}
  for method in BASELINES:
    c = config(method, finetune_last=1)
    model = methods.build(c, experts, LABELS, prompts)
    trainable, _ = partition.split(medbridge.abstract_params(model, SIDE),
                                   methods.partition_rules(c, experts))
    decays.update(flat(optim.decay_mask(trainable)))
  on = {p for p, v in decays.items() if v}
  assert on == {p for p in decays if "/adapter/" in p
                or "/peft/lora/" in p or p.startswith("gate/")
                and p.endswith("/kernel")}
  assert "expert_0/peft/prompts" in decays
  assert "expert_1/tower/layers_1/mlp/fc1/kernel" in decays


# -- Where the methods start. -------------------------------------------------


def global_features(expert, x):
  """The expert's image features of the whole image at its side, computed
  as a plain CLIP/SigLIP user would (evaluate.make_zero_shot_fn's way)."""
  side = int(expert.image_size)
  v = jax.image.resize(jnp.asarray(x, jnp.float32) / 255.0,
                       (x.shape[0], side, side), "linear", antialias=True)
  pixels = expert.normalize_pixels(v[..., None])
  return np.asarray(expert.image_features(pixels), np.float64)


def zero_shot_logits(expert, embeddings, x):
  """s cos(f, e_pos) - s cos(f, e_neg), in float64 numpy: the logit whose
  sigmoid is the zero-shot softmax over the prompt pair."""
  f = global_features(expert, x)
  f = f / np.linalg.norm(f, axis=-1, keepdims=True)
  e = np.asarray(embeddings, np.float64)
  return float(expert.logit_scale) * (f @ e[:, 0].T - f @ e[:, 1].T)


def test_linear_probe_starts_at_the_text_classifier(experts, prompts):
  model, params = built(config("linear_probe"), experts, prompts)
  x = images(4, 7)
  logits, aux = model.apply({"params": params}, x, train=False)
  got = np.asarray(aux["expert_logits"])
  for k, (e, p) in enumerate(zip(experts, prompts)):
    np.testing.assert_allclose(got[:, k], zero_shot_logits(e, p, x),
                               rtol=1e-4, atol=1e-4)
  # Equal gates at the start: the mean of the two.
  np.testing.assert_allclose(np.asarray(logits), got.mean(1), atol=1e-5)


@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_starts_at_zero_shot(experts, prompts, class_specific):
  model, params = built(config("coop", coop_class_specific=class_specific),
                        experts, prompts)
  x = images(4, 8)
  _, aux = model.apply({"params": params}, x, train=False)
  got = np.asarray(aux["expert_logits"])
  for k, e in enumerate(experts):
    want = zero_shot_logits(e, prompts[k], x)
    np.testing.assert_allclose(got[:, k], want, rtol=1e-4, atol=1e-4)
    # ... whose sigmoid is the zero-shot probability.
    probs = zero_shot.probabilities(
        global_features(e, x).astype(np.float32), prompts[k], e)
    np.testing.assert_allclose(1 / (1 + np.exp(-got[:, k])), probs,
                               atol=1e-5)


def test_lora_with_zero_b_is_the_frozen_model(experts, prompts):
  x = images(4, 9)
  probe, probe_params = built(config("linear_probe"), experts, prompts)
  want = np.asarray(probe.apply({"params": probe_params}, x,
                                train=False)[1]["expert_logits"])
  lora, params = built(config("lora"), experts, prompts)
  got = np.asarray(lora.apply({"params": params}, x,
                              train=False)[1]["expert_logits"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # A non-zero B moves them: the adapters are in the path.
  moved = flat(params)
  for path in moved:
    if path.endswith("/b"):
      moved[path] = np.full_like(moved[path], 0.5)
  moved = traverse_util.unflatten_dict(moved, sep="/")
  changed = np.asarray(lora.apply({"params": moved}, x,
                                  train=False)[1]["expert_logits"])
  assert np.abs(changed - want).max() > 1e-3


# -- Config. -----------------------------------------------------------------


def test_unknown_method_names_the_nearest(experts, prompts):
  with pytest.raises(errors.UserError,
                     match=r"config.method.name='lorra'.*did you mean 'lora'"):
    methods.build(config("lorra"), experts, LABELS, prompts)
  with pytest.raises(errors.UserError, match="did you mean 'vpt_deep'"):
    config_check.check(config("vpt-deep"))


def test_describe_names_the_method_and_its_knobs():
  assert methods.describe(config("lora", lora_rank=16)).startswith(
      "lora: LoRA (rank 16")
  assert "full fine-tuning" in methods.describe(
      config("finetune", finetune_last=-1))


# -- One run end to end. ------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  yield from tiny_run.private_cache(tmp_path_factory)


def test_clip_adapter_run_writes_run_info(cache, tmp_path):
  from medbridge_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  c = tiny_run.tiny_config(**{"method.name": "clip_adapter",
                              "train.steps": 4})
  record = train.train_and_evaluate(c, workdir)
  assert record["final"] and np.isfinite(record["mean_auroc"])
  info = run_info.read(workdir)
  with open(os.path.join(workdir, run_info.FILE)) as f:
    assert json.load(f) == info
  # The counts, from the config alone: per expert a head (P x L + L) and
  # the adapter (P x P/4 twice), the gate (linear over both widths);
  # frozen: the two towers as loaded.
  # pylint: disable-next=g-import-not-at-top
  from medbridge_jax.experts import from_config
  loaded = from_config.load(c)
  n_labels = len(record["auroc"])
  widths = [e.vision.config.projection_dim or e.vision.config.hidden_size
            for e in loaded]
  want_train = sum(p * n_labels + n_labels + 2 * p * (p // 4)
                   for p in widths) + sum(widths) * 2 + 2
  want_frozen = sum(int(np.size(v)) for e in loaded
                    for v in jax.tree_util.tree_leaves(e.params["vision"]))
  assert info["method"] == "clip_adapter"
  assert info["trainable_params"] == want_train
  assert info["frozen_params"] == want_frozen
  # 3 timed steps of 8 images on 2 cores: more than 0, less than absurd.
  assert 0.1 < info["train_images_per_s"] < 1e5
  assert info["peak_memory_kind"] in ("device", "host_rss")
  assert 10 * 2 ** 20 < info["peak_memory_bytes"] < 64 * 2 ** 30


def test_finetune_run_predicts_with_its_tuned_blocks(cache, tmp_path):
  """predict.load_model restores the fine-tuned tower blocks from the
  checkpoint and takes the rest from the expert folders: its test-split
  probabilities are the ones the run reported."""
  # pylint: disable=g-import-not-at-top
  from medbridge_jax import evaluate
  from medbridge_jax import predict
  from medbridge_jax import train
  from medbridge_jax.data import resolve
  # pylint: enable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  c = tiny_run.tiny_config(**{"method.name": "finetune",
                              "method.finetune_last": 1, "train.lr": 1e-2})
  train.train_and_evaluate(c, workdir)
  loaded = predict.load_model(predict.open_run(workdir), "best")
  test = resolve.resolve(c).test
  probs, seen = evaluate.predict(loaded.fn, test, int(c.eval.batch_size),
                                 loaded.mesh, c.data)
  assert seen.all()
  saved = np.load(os.path.join(workdir, "predictions_test.npz"))
  np.testing.assert_allclose(probs, saved["probs"], atol=1e-6, rtol=0)
  assert run_info.read(workdir)["method"] == "finetune"
