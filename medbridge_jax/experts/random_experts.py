"""Small randomly initialised CLIP / SigLIP checkpoints in Hugging Face format.

`write(path, spec, seed)` produces a folder that transformers'
`CLIPModel.from_pretrained` / `SiglipModel.from_pretrained` load, and that
`experts.load` reads through the very same code path as a real checkpoint:
config.json (transformers' own format), model.safetensors, tokenizer files
and preprocessor_config.json. No torch: our Flax towers are initialised with
JAX and their params mapped to HF names by `formats.hf_clip`.

Spec: "family:key=value,...", e.g. "clip:width=64,layers=4,heads=4,patch=8,
image=64". Keys: width, layers, heads, patch, image, mlp (default 4*width),
proj (projection width, default width), text_width (32), text_layers (2),
text_heads (4), text_mlp (4*text_width), text_len (CLIP 77, SigLIP 64),
pretrain (0): steps of the generic vision pre-training of
`experts.pretrain` (small blobs and thin lines on textures, no chest X-rays),
which gives the vision tower the sight of small things that real foundation
models have; 0 leaves it purely random. pretrain_shapes (all | heldout):
heldout pre-trains on images with no blobs and no thin lines (squares and
rectangles instead). A pre-trained folder also holds `pretraining.json`
(spec, seed, steps, recipe, platform, jax version, date, final losses).
The tokenizers are tiny: CLIP gets a character-level byte BPE (no merges),
SigLIP a sentencepiece model trained here on a built-in word list.
"""

import datetime
import io
import json
import os
import platform
import shutil
import tempfile
import time
from typing import Callable, Dict, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from safetensors.numpy import save_file

from medbridge_jax import machine
from medbridge_jax.errors import UserError
from medbridge_jax.experts import names
from medbridge_jax.experts import tokenizers
from medbridge_jax.experts.formats import hf_clip
from medbridge_jax.experts import pretrain
from medbridge_jax.experts.preprocessing import FAMILY_MEAN_STD
from medbridge_jax.experts.text import TextConfig, TextTower
from medbridge_jax.experts.vit import VisionConfig, VisionTower

KEYS = ("width", "layers", "heads", "patch", "image", "mlp", "proj",
        "text_width", "text_layers", "text_heads", "text_mlp", "text_len",
        "pretrain", "pretrain_shapes")
STRING_KEYS = {"pretrain_shapes": ("all", "heldout")}
REQUIRED = ("width", "layers", "heads", "patch", "image")

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
SIGLIP_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2.

# Text the SigLIP sentencepiece model is trained on: everyday English and
# the chest X-ray vocabulary our prompts use.
WORDS = """
a an the of with no and or in on at to is are was be this that there
showing shows chest x-ray xray radiograph image photo picture view frontal
lateral left right bilateral upper lower lobe lung lungs heart mediastinum
normal abnormal finding findings evidence sign signs of small large mild
moderate severe acute chronic new old stable increased decreased
atelectasis cardiomegaly consolidation edema effusion pleural emphysema
fibrosis hernia infiltration mass nodule pneumonia pneumothorax thickening
enlarged cardiomediastinum lesion opacity fracture support devices device
tube line catheter pacemaker no finding calcification granuloma scarring
tuberculosis collapse widening aortic enlargement interstitial disease
cat dog house tree car person man woman child water sky city road book
""".split()


def parse_spec(spec: str) -> Tuple[str, Dict[str, int | str]]:
  """("clip" | "siglip", {key: value}) from a spec string; checks everything.

  Values are ints but for pretrain_shapes (a string).
  """
  family, _, rest = str(spec).partition(":")
  family = family.strip().lower()
  if family not in ("clip", "siglip"):
    raise UserError(f"random expert spec {spec!r}: family must be 'clip' or "
                    f"'siglip'")
  values = {}
  for item in filter(None, (s.strip() for s in rest.split(","))):
    key, eq, value = item.partition("=")
    key = key.strip()
    if not eq or key not in KEYS:
      raise UserError(f"random expert spec {spec!r}: bad item {item!r}; "
                      f"keys are {', '.join(KEYS)}")
    if key in STRING_KEYS:
      values[key] = value.strip()
      if values[key] not in STRING_KEYS[key]:
        raise UserError(f"random expert spec {spec!r}: {key} must be one of "
                        f"{', '.join(STRING_KEYS[key])}, got {value!r}")
      continue
    try:
      values[key] = int(value)
    except ValueError:
      raise UserError(f"random expert spec {spec!r}: {key} must be an "
                      f"integer, got {value!r}") from None
    if key == "pretrain" and values[key] < 0:
      raise UserError(f"random expert spec {spec!r}: pretrain must be 0 or "
                      f"more (steps)")
    if key != "pretrain" and values[key] <= 0:
      raise UserError(f"random expert spec {spec!r}: {key} must be positive")
  missing = [k for k in REQUIRED if k not in values]
  if missing:
    raise UserError(f"random expert spec {spec!r}: missing {missing[0]}=")
  v = values
  v.setdefault("mlp", 4 * v["width"])
  v.setdefault("proj", v["width"])
  v.setdefault("text_width", 32)
  v.setdefault("text_layers", 2)
  v.setdefault("text_heads", 4)
  v.setdefault("text_mlp", 4 * v["text_width"])
  v.setdefault("text_len", 77 if family == "clip" else 64)
  v.setdefault("pretrain", 0)
  v.setdefault("pretrain_shapes", "all")
  if v["pretrain_shapes"] != "all" and not v["pretrain"]:
    raise UserError(f"random expert spec {spec!r}: pretrain_shapes needs "
                    f"pretrain=STEPS")
  for w, h in (("width", "heads"), ("text_width", "text_heads")):
    if v[w] % v[h]:
      raise UserError(f"random expert spec {spec!r}: {w}={v[w]} is not "
                      f"divisible by {h}={v[h]}")
  if v["image"] % v["patch"]:
    raise UserError(f"random expert spec {spec!r}: image={v['image']} is "
                    f"not a multiple of patch={v['patch']}")
  return family, v


# ---- Tokenizers -------------------------------------------------------------

def _byte_symbols():
  """The printable stand-in for each byte used by byte-level BPE (GPT-2)."""
  keep = (list(range(ord("!"), ord("~") + 1)) +
          list(range(ord("\xa1"), ord("\xac") + 1)) +
          list(range(ord("\xae"), ord("\xff") + 1)))
  symbols, extra = {}, 0
  for b in range(256):
    if b in keep:
      symbols[b] = chr(b)
    else:
      symbols[b] = chr(256 + extra)
      extra += 1
  return [symbols[b] for b in range(256)]


def clip_vocab() -> Dict[str, int]:
  """A character-level CLIP vocabulary: each byte, alone and word-final."""
  chars = _byte_symbols()
  tokens = chars + [c + "</w>" for c in chars] + [CLIP_BOS, CLIP_EOS]
  return {t: i for i, t in enumerate(tokens)}


def write_clip_tokenizer(path: str, max_length: int) -> Dict[str, int]:
  vocab = clip_vocab()
  _write_json(os.path.join(path, "vocab.json"), vocab)
  with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
  _write_json(os.path.join(path, "special_tokens_map.json"), {
      "bos_token": CLIP_BOS, "eos_token": CLIP_EOS,
      "unk_token": CLIP_EOS, "pad_token": CLIP_EOS})
  _write_json(os.path.join(path, "tokenizer_config.json"), {
      "tokenizer_class": "CLIPTokenizer", "bos_token": CLIP_BOS,
      "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS,
      "model_max_length": max_length, "do_lower_case": True})
  return {"bos": vocab[CLIP_BOS], "eos": vocab[CLIP_EOS],
          "pad": vocab[CLIP_EOS], "vocab_size": len(vocab)}


def _siglip_sentences():
  """A fixed corpus: every word, then prompt-like sentences."""
  out = list(WORDS)
  for i, w in enumerate(WORDS):
    out.append(f"a chest x-ray showing {w}")
    out.append(f"a chest x-ray with no {w} and {WORDS[(7 * i) % len(WORDS)]}")
  return out


def train_spiece(vocab_size: int = 256) -> bytes:
  """A small unigram sentencepiece model, deterministic, trained offline."""
  # sentencepiece and transformers load only when a folder is written.
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_siglip_sentences()), model_writer=buf,
      vocab_size=vocab_size, model_type="unigram", hard_vocab_limit=False,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
      character_coverage=1.0, minloglevel=2, seed_sentencepiece_size=10000,
      shuffle_input_sentence=False)
  return buf.getvalue()


def write_siglip_tokenizer(path: str, max_length: int) -> Dict[str, int]:
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model = train_spiece()
  with open(os.path.join(path, "spiece.model"), "wb") as f:
    f.write(model)
  size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
  _write_json(os.path.join(path, "special_tokens_map.json"), {
      "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"})
  _write_json(os.path.join(path, "tokenizer_config.json"), {
      "tokenizer_class": "SiglipTokenizer", "eos_token": "</s>",
      "pad_token": "</s>", "unk_token": "<unk>",
      "model_max_length": max_length, "do_lower_case": True})
  return {"bos": None, "eos": 1, "pad": 1, "vocab_size": size}


# ---- Weights and configs ----------------------------------------------------

def tower_configs(family: str, v: Dict[str, int], vocab_size: int,
                  eos: int) -> Tuple[VisionConfig, TextConfig]:
  clip = family == "clip"
  act = "quick_gelu" if clip else "gelu_pytorch_tanh"
  eps = 1e-5 if clip else 1e-6
  vision = VisionConfig(
      family=family, hidden_size=v["width"], num_layers=v["layers"],
      num_heads=v["heads"], mlp_dim=v["mlp"], patch_size=v["patch"],
      image_size=v["image"], act=act, eps=eps,
      projection_dim=v["proj"] if clip else 0, use_head=True)
  text = TextConfig(
      family=family, vocab_size=vocab_size, hidden_size=v["text_width"],
      num_layers=v["text_layers"], num_heads=v["text_heads"],
      mlp_dim=v["text_mlp"], max_length=v["text_len"], act=act, eps=eps,
      projection_dim=v["proj"] if clip else v["width"], eos_token_id=eos)
  return vision, text


def _init_leaf(rng: np.random.Generator, path: Tuple[str, ...],
               shape: Tuple[int, ...]) -> np.ndarray:
  """A ViT-style random value for one param, chosen by its name."""
  name = path[-1]
  if name == "scale":  # LayerNorm.
    return np.ones(shape, np.float32)
  if name == "bias":
    return np.zeros(shape, np.float32)
  if name == "kernel":  # Dense (in, out) or conv (kh, kw, in, out).
    fan_in = int(np.prod(shape[:-1]))
    return rng.normal(0.0, fan_in ** -0.5, shape).astype(np.float32)
  # Embeddings, class token, position tables, SigLIP probe.
  return rng.normal(0.0, 0.02, shape).astype(np.float32)


def init_params(vision: VisionConfig, text: TextConfig, seed: int) -> dict:
  """Random float32 params in our layout, deterministic by seed.

  The structure comes from the towers themselves (traced, not compiled);
  the values from numpy's PCG64, identical on every platform.
  """
  key = jax.random.PRNGKey(0)
  px = jnp.zeros((1, vision.image_size, vision.image_size, 3), jnp.float32)
  ids = jnp.zeros((1, text.max_length), jnp.int32)
  shapes = {
      "vision": jax.eval_shape(VisionTower(vision).init, key, px)["params"],
      "text": jax.eval_shape(TextTower(text).init, key, ids)["params"],
  }
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: _init_leaf(rng, tuple(k.key for k in path), s.shape),
      shapes)
  if vision.family == "clip":
    params["logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)
  else:
    params["logit_scale"] = np.asarray([np.log(10.0)], np.float32)
    params["logit_bias"] = np.asarray([-10.0], np.float32)
  return params


def _hf_config(family: str, v: Dict[str, int], vision: VisionConfig,
               text: TextConfig, tok: Dict[str, int]):
  """transformers' config object for these towers (it writes config.json)."""
  import transformers  # pylint: disable=g-import-not-at-top
  text_cfg = dict(
      vocab_size=text.vocab_size, hidden_size=text.hidden_size,
      intermediate_size=text.mlp_dim, num_hidden_layers=text.num_layers,
      num_attention_heads=text.num_heads,
      max_position_embeddings=text.max_length, hidden_act=text.act,
      layer_norm_eps=text.eps, eos_token_id=tok["eos"],
      pad_token_id=tok["pad"])
  vision_cfg = dict(
      hidden_size=vision.hidden_size, intermediate_size=vision.mlp_dim,
      num_hidden_layers=vision.num_layers,
      num_attention_heads=vision.num_heads, image_size=vision.image_size,
      patch_size=vision.patch_size, hidden_act=vision.act,
      layer_norm_eps=vision.eps, num_channels=3)
  if family == "clip":
    text_cfg.update(bos_token_id=tok["bos"], projection_dim=v["proj"])
    vision_cfg.update(projection_dim=v["proj"])
    cfg = transformers.CLIPConfig(text_config=text_cfg,
                                  vision_config=vision_cfg,
                                  projection_dim=v["proj"])
  else:
    text_cfg.update(projection_size=text.projection_dim, bos_token_id=None)
    vision_cfg.update(vision_use_head=True)
    cfg = transformers.SiglipConfig(text_config=text_cfg,
                                    vision_config=vision_cfg)
  cfg.architectures = ["CLIPModel" if family == "clip" else "SiglipModel"]
  return cfg


def preprocessor_config(family: str, image: int) -> dict:
  mean, std = FAMILY_MEAN_STD[family]
  if family == "clip":
    return {"image_processor_type": "CLIPImageProcessor",
            "do_resize": True, "size": {"shortest_edge": image},
            "do_center_crop": True,
            "crop_size": {"height": image, "width": image},
            "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(mean),
            "image_std": list(std), "do_convert_rgb": True, "resample": 3}
  return {"image_processor_type": "SiglipImageProcessor",
          "do_resize": True, "size": {"height": image, "width": image},
          "do_rescale": True, "rescale_factor": 1 / 255,
          "do_normalize": True, "image_mean": list(mean),
          "image_std": list(std), "resample": 3}


def _write_json(file: str, data):
  # Sorted keys and a final newline, as transformers writes its files and
  # as the shipped test-bed folders hold them: regenerating must give the
  # same bytes.
  with open(file, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")


def _progress(spec: str, steps: int) -> Callable[[int, dict], None]:
  """A `pretrain` log callback: steps done, loss and time left."""
  start = []

  def log(step: int, terms: dict) -> None:
    now = time.monotonic()
    if not start:  # Step 0 includes compilation: time the rest from here.
      start.append(now)
    done = step + 1
    eta = ((now - start[0]) / step * (steps - done)) if step else float("nan")
    logging.info("Pre-training test-bed expert %s: step %d/%d, loss %.4f, "
                 "ETA %s", spec, done, steps, sum(terms.values()),
                 "..." if step == 0 else f"{eta:.0f} s")
  return log


def pretraining_record(spec: str, seed: int) -> dict:
  """What decides a pre-trained folder's weights: spec, seed and recipe.

  `pretraining.json` holds this plus where and when it was made.
  """
  _, v = parse_spec(spec)
  return {"spec": spec, "seed": seed, "steps": v["pretrain"],
          **pretrain.recipe(v["pretrain_shapes"])}


def _made_by() -> dict:
  return {"platform": f"{jax.default_backend()} "
                      f"({jax.devices()[0].device_kind}), {machine.cpu_model()}, "
                      f"{platform.machine()} {platform.system()}",
          "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "date": datetime.date.today().isoformat()}


def write(path: str, spec: str, seed: int = 0) -> str:
  """Writes a complete random HF folder for `spec` at `path`; returns path.

  Files are built in a sibling temporary folder and moved into place, so a
  crash never leaves a half-written checkpoint that looks complete.
  """
  family, v = parse_spec(spec)
  path = os.path.abspath(os.path.expanduser(str(path)))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
  try:
    if family == "clip":
      tok = write_clip_tokenizer(tmp, v["text_len"])
    else:
      tok = write_siglip_tokenizer(tmp, v["text_len"])
    vision, text = tower_configs(family, v, tok["vocab_size"], tok["eos"])
    params = init_params(vision, text, seed)
    if v["pretrain"]:
      params["vision"], final = pretrain.pretrain(
          vision, params["vision"], v["pretrain"], seed,
          log=_progress(spec, v["pretrain"]), shapes=v["pretrain_shapes"])
      _write_json(os.path.join(tmp, "pretraining.json"), {
          **pretraining_record(spec, seed), **_made_by(),
          "final_losses": final})
    tensors = names.from_params(params, hf_clip.all_entries(vision, text))
    save_file(tensors, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})
    _write_json(os.path.join(tmp, "preprocessor_config.json"),
                preprocessor_config(family, v["image"]))
    with tokenizers.quiet_transformers():
      _hf_config(family, v, vision, text, tok).save_pretrained(tmp)
    if not os.path.exists(path):
      os.rename(tmp, path)
    else:
      for name in sorted(os.listdir(tmp)):
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return path
