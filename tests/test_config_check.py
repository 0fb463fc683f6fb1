"""config_check: every enum, range and cross-field rule, one line each."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from medbridge_jax.ablation import variants
from medbridge_jax import config_check
from medbridge_jax import default_config
from medbridge_jax import methods
from medbridge_jax.data import labels as labels_lib
from medbridge_jax.data import pipeline
from medbridge_jax.data import synthetic_draw
from medbridge_jax.errors import UserError
from medbridge_jax.experts import layers
from medbridge_jax.experts import vit
from medbridge_jax.model import focal_sampling
from medbridge_jax.model import losses
from medbridge_jax.model import medbridge
from medbridge_jax.model import moe
from medbridge_jax.model import peft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**changes):
  """The default config with dotted-key changes ("model.focal.resize")."""
  c = default_config.get_default()
  for key, value in changes.items():
    variants.set_key(c, key, value)
  return c


def _error(**changes) -> str:
  with pytest.raises(UserError) as e:
    config_check.check(_config(**changes))
  message = str(e.value)
  assert "\n" not in message
  return message


def test_default_config_passes():
  config_check.check(default_config.get_default())


# (key, typo, the valid value a reader would have meant, the valid values
# as the module that uses the key defines them).
ENUMS = [
    ("model.queries.mode", "non_destructiv", "non_destructive",
     vit.MODES),
    ("model.queries.mode", "jiont", "joint", vit.MODES),
    ("model.moe.gating", "topk", "top_k", moe.GATINGS),
    ("model.moe.gating", "perlabel", "per_label", moe.GATINGS),
    ("loss.kind", "asymetric", "asymmetric", losses.KINDS),
    ("loss.class_weights", "balance", "balanced", ("none", "balanced")),
    ("model.focal.resize", "lanczos", "lanczos3",
     focal_sampling.RESIZE_METHODS),
    ("model.focal.train_windows", "slidng", "sliding",
     focal_sampling.TRAIN_WINDOWS),
    ("model.compute_dtype", "bfloat61", "bfloat16", ("float32", "bfloat16")),
    ("model.attention_impl", "cudn", "cudnn", layers.ATTENTION_IMPLS),
    ("data.uncertain_policy", "one", "ones", labels_lib.UNCERTAIN_POLICIES),
    ("data.blank_policy", "zero", "zeros", labels_lib.BLANK_POLICIES),
    ("data.on_bad_image", "skipp", "skip", pipeline.BAD_IMAGE_POLICIES),
    ("data.synthetic.variant", "chexpret", "chexpert", synthetic_draw.VARIANTS),
    ("data.dataset", "chexpret", "chexpert", None),
    ("data.dataset", "synthetic:nhi", "synthetic:nih", None),
    ("data.train_split", "trian", "train", ("train", "valid", "test", "all")),
    ("data.valid_split", "vaild", "valid", ("train", "valid", "test", "all")),
    ("data.test_split", "tset", "test", ("train", "valid", "test", "all")),
    ("method.name", "lorra", "lora", methods.NAMES),
    ("method.name", "clip-adapter", "clip_adapter", methods.NAMES),
    ("method.name", "fine_tune", "finetune", methods.NAMES),
]


@pytest.mark.parametrize("key,typo,meant,valid", ENUMS)
def test_enum_typo_names_key_value_choices_and_nearest(key, typo, meant,
                                                       valid):
  message = _error(**{key: typo})
  assert message.startswith(f"config.{key}={typo!r} is not one of ")
  assert message.endswith(f" (did you mean {meant!r}?)")
  for name in valid or (meant,):
    assert repr(name) in message


def test_enum_value_far_from_every_name_gets_no_suggestion():
  message = _error(**{"model.queries.mode": "zzzzzz"})
  assert message == ("config.model.queries.mode='zzzzzz' is not one of "
                     "'non_destructive', 'joint'")


def _valid_values():
  for key, names in (("model.queries.mode", vit.MODES),
                     ("model.moe.gating", moe.GATINGS),
                     ("loss.kind", losses.KINDS),
                     ("model.focal.resize", focal_sampling.RESIZE_METHODS),
                     ("model.focal.train_windows",
                      focal_sampling.TRAIN_WINDOWS),
                     ("model.compute_dtype", tuple(medbridge.DTYPES)),
                     ("model.attention_impl", layers.ATTENTION_IMPLS),
                     ("data.uncertain_policy", labels_lib.UNCERTAIN_POLICIES),
                     ("data.blank_policy", labels_lib.BLANK_POLICIES),
                     ("data.on_bad_image", pipeline.BAD_IMAGE_POLICIES),
                     ("data.synthetic.variant", synthetic_draw.VARIANTS),
                     ("loss.class_weights", ("none", "balanced")),
                     ("method.name", ("medbridge", "linear_probe",
                                      "clip_adapter", "vpt_shallow",
                                      "vpt_deep", "lora", "coop",
                                      "finetune")),
                     ("method.lora_targets", [(t,) for t in
                                              peft.LORA_TARGETS]),
                     ("data.dataset", ("chexpert", "nih", "mimic", "vindr",
                                       "rsna", "synthetic", "synthetic:nih",
                                       "synthetic:chexpert"))):
    for name in names:
      yield key, name


@pytest.mark.parametrize("key,value", list(_valid_values()))
def test_every_valid_name_passes(key, value):
  config_check.check(_config(**{key: value}))


@pytest.mark.parametrize("key,value,rule", [
    ("seed", -1, ">= 0"),
    ("data.image_size", 0, ">= 1"),
    ("data.train_fraction", 0.0, "in (0, 1]"),
    ("data.train_fraction", 1.5, "in (0, 1]"),
    ("data.train_fraction", math.nan, "in (0, 1]"),
    ("data.num_workers", -1, ">= 0"),
    ("loss.gamma_neg", -1.0, ">= 0"),
    ("loss.clip", 1.0, "in [0, 1)"),
    ("train.steps", 0, ">= 1"),
    ("train.batch_size", 0, ">= 1"),
    ("train.grad_accum", 0, ">= 1"),
    ("train.lr", 0.0, "> 0"),
    ("train.lr", math.inf, "> 0"),
    ("train.weight_decay", -1e-4, ">= 0"),
    ("train.grad_clip", -1.0, ">= 0"),
    ("train.log_every", -1, ">= 0"),
    ("train.keep_checkpoints", 0, ">= 1"),
    ("eval.batch_size", 0, ">= 1"),
    ("eval.bootstrap", -5, ">= 0"),
    ("mesh.data", 0, "-1 (all devices) or >= 1"),
    ("mesh.data", -2, "-1 (all devices) or >= 1"),
    ("model.queries.init_std", 0.0, "> 0"),
    ("model.queries.num_queries", -1, ">= 0 (0 = no queries)"),
    ("model.fusion.num_layers", -1, ">= 0"),
    ("model.moe.top_k", 0, ">= 1"),
    ("model.moe.balance_loss", -0.1, ">= 0"),
    ("model.moe.gate_hidden", -1, ">= 0"),
    ("method.adapter_reduction", 0, ">= 1"),
    ("method.adapter_ratio", -0.1, "in [0, 1]"),
    ("method.adapter_ratio", 1.5, "in [0, 1]"),
    ("method.adapter_ratio", math.nan, "in [0, 1]"),
    ("method.vpt_prompts", 0, ">= 1"),
    ("method.lora_rank", 0, ">= 1"),
    ("method.lora_alpha", 0.0, "> 0"),
    ("method.lora_alpha", math.inf, "> 0"),
    ("method.finetune_last", 0, "-1 (every block) or >= 1"),
    ("method.finetune_last", -2, "-1 (every block) or >= 1"),
])
def test_out_of_range_names_key_value_and_range(key, value, rule):
  message = _error(**{key: value})
  assert message.startswith(f"config.{key}={value!r} must be {rule}")


@pytest.mark.parametrize("key,value,fragment", [
    # Focal ranges, through focal_sampling.check_config.
    ("model.focal.num_local", 0, "model.focal.num_local=0 must be >= 1"),
    ("model.focal.eval_overlap", 1.0, "model.focal.eval_overlap=1.0"),
    ("model.focal.lung_bias", 1.5, "model.focal.lung_bias=1.5"),
    ("model.focal.crop_size", -1, "model.focal.crop_size=-1"),
    ("model.focal.crop_size", 300, "model.focal.crop_size=300 is larger"),
    ("model.focal.global_side", 512, "model.focal.global_side=512"),
    ("model.fusion.num_heads", 0, "config.model.fusion.num_heads=0"),
    ("data.synthetic.focal_scale", 0.0, "data.synthetic.focal_scale=0.0"),
    ("data.synthetic.num_patients", 1,
     "config.data.synthetic.num_patients=1 must be >= 2"),
])
def test_other_ranges(key, value, fragment):
  assert fragment in _error(**{key: value})


def test_method_knob_bounds_pass():
  config_check.check(_config(**{"method.adapter_ratio": 0.0,
                                "method.finetune_last": -1,
                                "method.adapter_reduction": 1}))
  config_check.check(_config(**{"method.adapter_ratio": 1.0}))


@pytest.mark.parametrize("targets,fragment", [
    (("query", "vaule"), "config.method.lora_targets entry='vaule' is not "
     "one of 'query', 'key', 'value', 'out' (did you mean 'value'?)"),
    ((), "config.method.lora_targets=() must be a tuple of one or more"),
    (("query", "query"), "names a projection twice"),
])
def test_lora_targets(targets, fragment):
  assert fragment in _error(**{"method.lora_targets": targets})


def test_finetune_deeper_than_a_random_expert_names_it():
  # The default's test-bed experts have 4 blocks.
  assert _error(**{"method.name": "finetune",
                   "method.finetune_last": 5}) == (
      "config.method.finetune_last=5 is more than the 4 blocks of "
      "config.random_experts[0] (-1 fine-tunes every block)")
  # Other methods do not read the knob's depth.
  config_check.check(_config(**{"method.finetune_last": 5}))


def test_generated_data_needs_64_px_but_real_data_does_not():
  assert _error(**{"data.image_size": 48}) == (
      "config.data.image_size=48 must be >= 64 for generated synthetic "
      "data")
  # Real data at 48 px: only the experts' native crops no longer fit.
  message = _error(**{"data.image_size": 48, "data.dataset": "chexpert",
                      "data.root": "/data/chexpert"})
  assert "crop_size=0 gives expert 0 its input side 64 px" in message


def test_switches_off_skip_the_ranges_they_make_moot():
  config_check.check(_config(**{"model.fusion.enabled": False,
                                "model.fusion.num_heads": 0}))
  config_check.check(_config(**{"model.focal.enabled": False,
                                "model.focal.num_local": 0}))


@pytest.mark.parametrize("changes,message", [
    ({"train.warmup_steps": 300},
     "config.train.warmup_steps=300 must be in [0, config.train.steps=300)"),
    ({"train.warmup_steps": -1},
     "config.train.warmup_steps=-1 must be in [0, config.train.steps=300)"),
    ({"train.batch_size": 30, "train.grad_accum": 4},
     "config.train.batch_size=30 is not divisible by "
     "config.train.grad_accum=4"),
    ({"model.moe.gating": "top_k", "model.moe.top_k": 3},
     "config.model.moe.top_k=3 must be in [1, 2] (the number of experts)"),
    ({"model.focal.enabled": False, "model.focal.global_view": False},
     "model.focal.global_view=False needs model.focal.enabled=True: no "
     "views would be left"),
    ({"model.fusion.keep_global": True, "model.focal.global_view": False},
     "config.model.fusion.keep_global=True needs a global view "
     "(config.model.focal.global_view=True)"),
    ({"data.valid_split": "test"},
     "config.data.valid_split and config.data.test_split are both 'test': "
     "training, validation and test need three splits"),
    ({"data.train_split": "valid"},
     "config.data.train_split and config.data.valid_split are both "
     "'valid': training, validation and test need three splits"),
    ({"data.test_datasets": (("nih", "/data/nih"),)},
     "config.data.test_datasets[0]=('nih', '/data/nih') is not (dataset, "
     "root, split)"),
    ({"data.test_datasets": (("nih", "/data/nih", "tets"),)},
     "config.data.test_datasets[0] split='tets' is not one of 'train', "
     "'valid', 'test', 'train_val', 'all' (did you mean 'test'?)"),
    ({"data.test_datasets": (("synthetic:nih", "/x", "test"),)},
     "config.data.test_datasets[0]='synthetic:nih' names generated data: "
     "it takes no root (got '/x')"),
    ({"data.labels": ("Edema", "Edema")},
     "config.data.labels names 'Edema' twice"),
    ({"eval.mean_labels": ("Edemma",)},
     "config.eval.mean_labels entry='Edemma' is not one of 'Cardiomegaly', "
     "'Edema', 'Pleural Effusion', 'Lung Lesion', 'Pneumothorax' (did you "
     "mean 'Edema'?)"),
    ({"data.labels": ("Edema", "Atelectasis"),
      "eval.mean_labels": ("Cardiomegaly",)},
     "config.eval.mean_labels entry='Cardiomegaly' is not one of 'Edema', "
     "'Atelectasis'"),
    ({"model.queries.inject_layer": -5},
     "model.queries.inject_layer=-5 is outside an expert with 4 layers (use "
     "0..3 or -4..-1) (config.random_experts[0])"),
    ({"random_experts": ("clip:width=64,layers=4,heads=4,patch=8",)},
     "config.random_experts[0]: random expert spec "
     "'clip:width=64,layers=4,heads=4,patch=8': missing image="),
    ({"random_experts": (), "experts": ()},
     "no experts: set config.experts to expert folders (CLIP, SigLIP, "
     "open_clip, DINOv2, a VLM) or config.random_experts to specs"),
    ({"zero_shot.positive": "a chest x-ray showing {labels}"},
     "config.zero_shot.positive='a chest x-ray showing {labels}' must hold "
     "{label} (and no other {...})"),
])
def test_cross_field_rules(changes, message):
  assert _error(**changes) == message


def test_top_k_counts_real_experts_and_ignores_one_expert():
  config_check.check(_config(**{
      "experts": ("/a", "/b", "/c"), "model.moe.gating": "top_k",
      "model.moe.top_k": 3}))
  # One expert: no gate at all, whatever top_k says.
  config_check.check(_config(**{
      "random_experts": default_config.RANDOM_EXPERT_SHAPES[:1],
      "model.moe.gating": "top_k", "model.moe.top_k": 3}))


def test_schema_unknown_missing_and_wrong_type():
  c = default_config.get_default()
  c.model.focal.num_locals = 2  # A typo in Python: ConfigDict accepts it.
  with pytest.raises(UserError, match=r"^unknown config key "
                     r"config\.model\.focal\.num_locals \(did you mean "
                     r"config\.model\.focal\.num_local\?\)$"):
    config_check.check(c)
  body = default_config.get_default().to_dict()
  del body["model"]["focal"]["global_side"]
  with pytest.raises(UserError, match=r"^config key "
                     r"config\.model\.focal\.global_side is missing"):
    config_check.check(ml_collections.ConfigDict(body))
  body = default_config.get_default().to_dict()
  body["train"]["steps"] = "300"
  with pytest.raises(UserError, match=r"^config\.train\.steps='300' must "
                     r"be an integer, like its default 300$"):
    config_check.check(ml_collections.ConfigDict(body))
  body = default_config.get_default().to_dict()
  body["model"]["focal"]["enabled"] = 1
  with pytest.raises(UserError, match=r"^config\.model\.focal\.enabled=1 "
                     r"must be True or False, like its default True$"):
    config_check.check(ml_collections.ConfigDict(body))


def test_a_run_config_read_back_from_json_passes():
  # predict rebuilds the config from the workdir's config.json: tuples come
  # back as lists.
  c = _config(**{"data.test_datasets": (("synthetic:nih", "", "test"),),
                 "data.labels": ("Edema", "Cardiomegaly")})
  config_check.check(ml_collections.ConfigDict(json.loads(c.to_json())))


def test_every_ablation_variant_of_the_default_passes():
  config = default_config.get_default()
  grid = variants.for_config(config)
  assert {"full", "local_only", "hires_global", "linear_probe"} <= set(grid)
  for variant in grid.values():
    config_check.check(variants.variant_config(config, variant))


def test_checking_touches_no_device():
  # main checks the config before sharding.maybe_initialize_distributed,
  # which must come before JAX picks its backends.
  code = ("from medbridge_jax import config_check, default_config\n"
          "config_check.check(default_config.get_default())\n"
          "from jax._src import xla_bridge\n"
          "assert not xla_bridge.backends_are_initialized()\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr


# Settings: the model's switches, read from config.model alone.

def test_settings_hold_config_model_and_nothing_else():
  assert [f.name for f in dataclasses.fields(medbridge.Settings)] == ["model"]
  assert medbridge.Settings() == medbridge.settings_from_config(
      default_config.get_default().model)


# (Settings attribute, config.model key, a value other than the default).
SETTINGS = [
    ("crop_size", "focal.crop_size", 32),
    ("global_view", "focal.global_view", False),
    ("global_side", "focal.global_side", 128),
    ("eval_overlap", "focal.eval_overlap", 0.5),
    ("lung_bias", "focal.lung_bias", 0.5),
    ("resize", "focal.resize", "cubic"),
    ("train_windows", "focal.train_windows", "sliding"),
    ("num_local", "focal.num_local", 2),
    ("num_queries", "queries.num_queries", 8),
    ("inject_layer", "queries.inject_layer", -3),
    ("query_mode", "queries.mode", "joint"),
    ("query_init_std", "queries.init_std", 0.1),
    ("fusion", "fusion.enabled", False),
    ("fusion_heads", "fusion.num_heads", 2),
    ("fusion_layers", "fusion.num_layers", 2),
    ("moe", "moe.enabled", False),
    ("gating", "moe.gating", "per_label"),
    ("top_k", "moe.top_k", 2),
    ("gate_hidden", "moe.gate_hidden", 16),
    ("attention_impl", "attention_impl", "xla"),
]


@pytest.mark.parametrize("attribute,key,value", SETTINGS)
def test_each_setting_reads_its_config_key(attribute, key, value):
  before = medbridge.settings_from_config(_config().model)
  assert getattr(before, attribute) != value
  after = medbridge.settings_from_config(_config(**{f"model.{key}": value})
                                         .model)
  assert getattr(after, attribute) == value
  assert after != before and hash(after) != hash(before)


def test_settings_apply_the_switches():
  s = medbridge.settings_from_config(_config(**{
      "model.focal.enabled": False, "model.queries.enabled": False,
      "model.compute_dtype": "bfloat16",
      "model.fusion.keep_global": True}).model)
  assert (s.num_local, s.num_queries, s.dtype) == (0, 0, jnp.bfloat16)
  assert s.fusion_keep_global is True
  assert s.crop_for(48) == 48  # crop_size 0: the expert's own side.
  assert medbridge.settings_from_config(
      _config(**{"model.focal.crop_size": 40}).model).crop_for(48) == 40


def test_settings_are_a_snapshot_and_a_jit_static_argument():
  c = default_config.get_default()
  s = medbridge.settings_from_config(c.model)
  c.model.focal.num_local = 7  # Later edits of the config change nothing.
  assert s.num_local == 4 and s == medbridge.Settings()
  f = jax.jit(lambda x, s: x * s.num_local, static_argnums=1)
  assert float(f(1.0, s)) == 4.0
  # An equal Settings from another config reuses the compiled program.
  assert float(f(1.0, medbridge.Settings())) == 4.0
  assert f._cache_size() == 1  # pylint: disable=protected-access
  assert float(f(1.0, medbridge.settings_from_config(c.model))) == 7.0


def test_settings_from_config_checks_the_model_section():
  with pytest.raises(UserError, match=r"did you mean 'top_k'\?"):
    medbridge.settings_from_config(_config(**{"model.moe.gating": "topk"})
                                   .model)
