"""open_clip folders, as the Hugging Face hub ships them (BiomedCLIP too).

`open_clip_config.json` (`{"model_cfg": {embed_dim, vision_cfg, text_cfg,
quick_gelu, custom_text, ...}, "preprocess_cfg": {"mean", "std", ...}}`),
`open_clip_model.safetensors` (a pickled `open_clip_pytorch_model.bin`
alone is refused: `python -m medbridge_jax.experts.convert` turns it into
safetensors) and tokenizer files.

Image towers: open_clip's own `VisionTransformer` (`visual.conv1`,
`visual.transformer.resblocks.N` with fused `in_proj`, `visual.proj`
applied as `x @ proj`) or a timm ViT trunk (`vision_cfg.timm_model_name`,
`visual.trunk.*`, `visual.head.proj`). Text towers: open_clip's own
(CLIP's causal transformer, pooled at the end token) or a Hugging Face
BERT (`text_cfg.hf_model_name`, `experts/bert.py`). Options we do not run
are refused by name. No tokenizer file: a vision-only expert.
"""

import dataclasses
import os
import re
from typing import Any, List, Mapping, Tuple

from medbridge_jax import jsonfile
from medbridge_jax.errors import UserError
from medbridge_jax.experts import bert
from medbridge_jax.experts import names
from medbridge_jax.experts import preprocessing
from medbridge_jax.experts import tensors
from medbridge_jax.experts import tokenizers
from medbridge_jax.experts.formats import Checkpoint
from medbridge_jax.experts.names import Entry
from medbridge_jax.experts.text import TextConfig, TextTower
from medbridge_jax.experts.vit import VisionConfig

NAME = "open_clip"
CONFIG = "open_clip_config.json"
SINGLE = "open_clip_model.safetensors"
INDEX = "open_clip_model.safetensors.index.json"
PICKLE = "open_clip_pytorch_model.bin"
EXPECTS = f"{CONFIG} and {SINGLE}"
FILES = (CONFIG, SINGLE, PICKLE, "tokenizer.json", "tokenizer_config.json",
         "vocab.json", "merges.txt")
MODEL_TYPES = ()
# open_clip's OPENAI_DATASET_MEAN / _STD, its default preprocessing.
DEFAULT_MEAN_STD = preprocessing.FAMILY_MEAN_STD["clip"]

# Options of open_clip's vision / text configs that change the numbers and
# that we do not run: (key, the values we accept). Training-only options
# (patch dropout, drop path, output_tokens, ...) are ignored.
CUSTOM_BLOCK = (("block_type", (None, "default")), ("qk_norm", (False,)),
                ("scaled_cosine_attn", (False,)), ("scale_heads", (False,)),
                ("scale_attn_inner", (False,)), ("scale_attn", (False,)),
                ("scale_fc", (False,)), ("act_kwargs", (None, {})))
VISION_FIXED = CUSTOM_BLOCK + (
    ("attentional_pool", (False, None)), ("pos_embed_type", ("learnable",)),
    ("pool_type", ("tok", "avg")))
TEXT_FIXED = CUSTOM_BLOCK + (
    ("embed_cls", (False,)), ("no_causal_mask", (False,)),
    ("pool_type", ("argmax", "eos")), ("proj_type", ("linear", None)),
    ("proj_bias", (False,)))
TIMM_FIXED = (("timm_pool", ("", "token", "avg")),
              ("timm_proj", ("linear", "none")),
              ("timm_proj_bias", (False,)))

# timm's plain ViTs: (width, depth, heads); mlp ratio 4, qkv bias, class
# token, no pre-norm, LayerNorm eps 1e-6, GELU (timm's vision_transformer).
TIMM_VITS = {"tiny": (192, 12, 3), "small": (384, 12, 6),
             "base": (768, 12, 12), "large": (1024, 24, 16),
             "huge": (1280, 32, 16)}
BERT_PREFIX, BERT_PROJ = "text.transformer.", "text.proj."
TIMM_NAME = re.compile(r"^(?:timm/)?vit_(tiny|small|base|large|huge)_patch"
                       r"(\d+)_(\d+)(?:\.\w+)?$")


@dataclasses.dataclass(frozen=True)
class Layout:
  """What open_clip_config.json describes (the text tower is parsed only
  when it is read: a vision-only expert never needs it)."""
  vision: VisionConfig
  timm: bool  # The image tower is a timm trunk (`visual.trunk.*`).
  hf_text: bool  # The text tower is a Hugging Face model (BERT).
  text_prefix: str  # "" for CLIP, "text." for CustomTextCLIP.
  text_cfg: Mapping[str, Any]
  quick_gelu: bool
  embed_dim: int
  file: str  # open_clip_config.json's path, for messages.

  @property
  def context_length(self) -> int:
    return _int(self.text_cfg, "context_length", 77, "text_cfg", self.file)


def detect(path: str, files) -> bool:
  del path
  return CONFIG in files


def _read_config(path: str) -> Tuple[dict, str]:
  file = os.path.join(path, CONFIG)
  raw = jsonfile.read(file, CONFIG)
  if not isinstance(raw.get("model_cfg"), dict):
    raise UserError(f"{file} has no 'model_cfg' object (open_clip's hub "
                    f"layout: {{'model_cfg': ..., 'preprocess_cfg': ...}})")
  return raw, file


def _sub(cfg: Mapping, key: str, file: str) -> dict:
  value = cfg.get(key, {})
  if not isinstance(value, dict):
    raise UserError(f"model_cfg.{key} in {file} must be an object")
  return value


def _check_fixed(cfg: Mapping, fixed, where: str, file: str):
  for key, allowed in fixed:
    if key in cfg and cfg[key] not in allowed:
      raise UserError(
          f"{where}.{key}={cfg[key]!r} in {file} is not supported (we run "
          f"{' or '.join(repr(a) for a in allowed)})")


def _int(cfg: Mapping, key: str, default, where: str, file: str) -> int:
  value = cfg.get(key, default)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise UserError(f"{where}.{key} in {file} must be a positive integer; "
                    f"got {value!r}")
  return value


def _side(cfg: Mapping, key: str, default, where: str, file: str) -> int:
  value = cfg.get(key, default)
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise UserError(f"{where}.{key}={value} in {file}: only square images "
                      f"and patches are supported")
    value = value[0]
  return _int({key: value}, key, None, where, file)


def _eps(cfg: Mapping, default: float, where: str, file: str) -> float:
  """LayerNorm epsilon from `norm_kwargs` (open_clip's LayerNorm: 1e-5)."""
  kwargs = cfg.get("norm_kwargs") or {}
  extra = sorted(set(kwargs) - {"eps"})
  if extra:
    raise UserError(f"{where}.norm_kwargs.{extra[0]} in {file} is not "
                    f"supported (only eps)")
  return float(kwargs.get("eps", default))


def _native_vision(v: Mapping, quick_gelu: bool, embed_dim: int,
                   file: str) -> VisionConfig:
  """open_clip's VisionTransformer (CLIPVisionCfg defaults)."""
  w = "vision_cfg"
  if isinstance(v.get("layers"), (list, tuple)):
    raise UserError(f"{w}.layers={v['layers']} in {file} describes a "
                    f"ModifiedResNet image tower; only ViTs are supported")
  _check_fixed(v, VISION_FIXED, w, file)
  width = _int(v, "width", 768, w, file)
  head_width = _int(v, "head_width", 64, w, file)
  if width % head_width:
    raise UserError(f"{w}.width {width} is not a multiple of head_width "
                    f"{head_width} in {file}")
  pool = v.get("pool_type", "tok")
  if pool == "avg" and v.get("final_ln_after_pool", False):
    raise UserError(f"{w}.final_ln_after_pool with pool_type 'avg' in "
                    f"{file} is not supported")
  # With the class token, LayerNorm before or after taking it is the same.
  return VisionConfig(
      family="open_clip", hidden_size=width,
      num_layers=_int(v, "layers", 12, w, file),
      num_heads=width // head_width,
      mlp_dim=int(width * float(v.get("mlp_ratio", 4.0))),
      patch_size=_side(v, "patch_size", 16, w, file),
      image_size=_side(v, "image_size", 224, w, file),
      act="quick_gelu" if quick_gelu else "gelu",
      eps=_eps(v, 1e-5, w, file), projection_dim=embed_dim,
      class_token=True, pre_norm=not v.get("no_ln_pre", False),
      patch_bias=False, pooling="class" if pool == "tok" else "mean",
      layer_scale=v.get("ls_init_value") is not None,
      position_interpolation="bicubic_antialias")


def timm_architecture(name: str, where: str) -> Tuple[int, int, int, int,
                                                       int]:
  """(width, depth, heads, patch, image side) of a timm ViT name such as
  "vit_base_patch16_224" (timm's naming; timm itself is not imported)."""
  m = TIMM_NAME.match(name)
  if not m:
    raise UserError(
        f"vision_cfg.timm_model_name={name!r} in {where} is not supported: "
        f"we read timm's plain ViTs "
        f"vit_{{{','.join(TIMM_VITS)}}}_patch{{P}}_{{S}} "
        f"(e.g. vit_base_patch16_224)")
  width, depth, heads = TIMM_VITS[m.group(1)]
  return width, depth, heads, int(m.group(2)), int(m.group(3))


def _timm_vision(v: Mapping, embed_dim: int, file: str) -> VisionConfig:
  """A timm ViT trunk as open_clip's TimmModel wraps it."""
  _check_fixed(v, TIMM_FIXED, "vision_cfg", file)
  width, depth, heads, patch, side = timm_architecture(
      str(v["timm_model_name"]), file)
  # timm builds the trunk at its name's size, whatever image_size says.
  return VisionConfig(
      family="timm_vit", hidden_size=width, num_layers=depth,
      num_heads=heads, mlp_dim=4 * width, patch_size=patch, image_size=side,
      act="gelu", eps=1e-6,
      projection_dim=embed_dim if v.get("timm_proj", "linear") == "linear"
      else 0,
      class_token=True, pre_norm=False, patch_bias=True,
      # CLIPVisionCfg's timm_pool default is "avg"; "" keeps the trunk's
      # own pooling, the class token.
      pooling="mean" if v.get("timm_pool", "avg") == "avg" else "class",
      position_interpolation="bicubic_antialias")


def _native_text(t: Mapping, quick_gelu: bool, embed_dim: int,
                 file: str) -> TextConfig:
  """open_clip's TextTransformer (CLIPTextCfg defaults)."""
  w = "text_cfg"
  _check_fixed(t, TEXT_FIXED, w, file)
  width = _int(t, "width", 512, w, file)
  heads = _int(t, "heads", 8, w, file)
  if width % heads:
    raise UserError(f"{w}.width {width} is not divisible by heads {heads} "
                    f"in {file}")
  # final_ln_after_pool: the LayerNorm is per token, so it commutes with
  # taking one token.
  return TextConfig(
      family="clip", vocab_size=_int(t, "vocab_size", 49408, w, file),
      hidden_size=width, num_layers=_int(t, "layers", 12, w, file),
      num_heads=heads, mlp_dim=int(width * float(t.get("mlp_ratio", 4.0))),
      max_length=_int(t, "context_length", 77, w, file),
      act="quick_gelu" if quick_gelu else "gelu",
      eps=_eps(t, 1e-5, w, file), projection_dim=embed_dim,
      eos_token_id=int(t.get("eos_id", 2)),
      pooling=t.get("pool_type", "argmax"),
      layer_scale=t.get("ls_init_value") is not None)


def _bert_options(t: Mapping, embed_dim: int, file: str) -> dict:
  pooler = t.get("hf_pooler_type", "mean_pooler")
  if pooler not in bert.OPEN_CLIP_POOLERS:
    raise UserError(f"text_cfg.hf_pooler_type={pooler!r} in {file} is not "
                    f"supported (we run "
                    f"{', '.join(bert.OPEN_CLIP_POOLERS)})")
  proj = t.get("hf_proj_type", "mlp")
  if proj not in ("mlp", "linear"):
    raise UserError(f"text_cfg.hf_proj_type={proj!r} in {file} is not "
                    f"supported (we run 'mlp' or 'linear')")
  return dict(pooling=bert.OPEN_CLIP_POOLERS[pooler], projection=proj,
              projection_dim=embed_dim)


def _bert_config(path: str, layout: Layout, found: Mapping,
                 where: Mapping) -> bert.BertConfig:
  """BERT's config.json where `hf_model_name` is a local folder (absolute,
  or inside the expert folder), else its shape read from the tensors."""
  t, file = layout.text_cfg, layout.file
  options = _bert_options(t, layout.embed_dim, file)
  name = str(t["hf_model_name"])
  for folder in (name, os.path.join(path, name)):
    cfg_file = os.path.join(folder, "config.json")
    if os.path.isfile(cfg_file):
      return bert.config_from_hf(jsonfile.read(cfg_file, "BERT config"),
                                 path=cfg_file, **options)
  config = bert.config_from_tensors(found, BERT_PREFIX, BERT_PROJ,
                                    pooling=options["pooling"], where=where)
  said = (options["projection"], options["projection_dim"])
  if (config.projection, config.projection_dim) != said:
    raise UserError(
        f"text_cfg.hf_proj_type {said[0]!r} into {said[1]} dimensions in "
        f"{file}, but the tensors hold {config.projection!r} into "
        f"{config.projection_dim}")
  return config


def parse(path: str) -> Tuple[Layout, dict]:
  """(Layout, the raw open_clip_config.json)."""
  raw, file = _read_config(path)
  m = raw["model_cfg"]
  v, t = _sub(m, "vision_cfg", file), _sub(m, "text_cfg", file)
  embed_dim = _int(m, "embed_dim", None, "model_cfg", file)
  quick_gelu = bool(m.get("quick_gelu", False))
  if v.get("timm_model_name"):
    vision, timm = _timm_vision(v, embed_dim, file), True
  else:
    vision, timm = _native_vision(v, quick_gelu, embed_dim, file), False
  # open_clip builds a CustomTextCLIP (`text.*`) for any HF text model.
  hf_text = bool(t.get("hf_model_name"))
  custom = bool(m.get("custom_text", False)) or hf_text
  return Layout(vision=vision, timm=timm, hf_text=hf_text,
                text_prefix="text." if custom else "", text_cfg=t,
                quick_gelu=quick_gelu, embed_dim=embed_dim, file=file), raw


def _resblocks(hf: str, ours: names.Path, n: int, d: int, hidden: int,
               layer_scale: bool) -> List[Entry]:
  """open_clip's `{hf}.resblocks.N` (nn.MultiheadAttention's fused
  in_proj, mlp.c_fc / c_proj, optional ls_1 / ls_2 gammas)."""
  out = []
  for i in range(n):
    h, o = f"{hf}.resblocks.{i}", ours + (f"layers_{i}",)
    out += names.norm(h + ".ln_1", o + ("norm1",), d)
    out += names.qkv(h + ".attn.in_proj_weight", h + ".attn.in_proj_bias",
                     o + ("attn",), d)
    out += names.linear(h + ".attn.out_proj", o + ("attn", "out"), d, d)
    out += names.norm(h + ".ln_2", o + ("norm2",), d)
    out += names.mlp(h + ".mlp", o + ("mlp",), d, hidden,
                     fc=("c_fc", "c_proj"))
    if layer_scale:
      out += [Entry(h + ".ls_1.gamma", (d,), (o + ("scale1",),), "copy"),
              Entry(h + ".ls_2.gamma", (d,), (o + ("scale2",),), "copy")]
  return out


def native_vision_entries(c: VisionConfig) -> List[Entry]:
  d, p, v = c.hidden_size, c.patch_size, ("vision",)
  num_pos = c.grid * c.grid + 1
  out = [Entry("visual.conv1.weight", (d, c.num_channels, p, p),
               (v + ("patch_embed", "kernel"),), "conv"),
         Entry("visual.class_embedding", (d,), (v + ("class_embedding",),),
               "copy"),
         Entry("visual.positional_embedding", (num_pos, d),
               (v + ("position_embedding",),), "copy")]
  if c.pre_norm:
    out += names.norm("visual.ln_pre", v + ("pre_norm",), d)
  out += _resblocks("visual.transformer", v, c.num_layers, d, c.mlp_dim,
                    c.layer_scale)
  out += names.norm("visual.ln_post", v + ("post_norm",), d)
  # `pooled @ proj`: the (width, embed) matrix is already an (in, out)
  # kernel.
  out += [Entry("visual.proj", (d, c.projection_dim),
                (v + ("projection", "kernel"),), "copy")]
  return out


def timm_vision_entries(c: VisionConfig) -> List[Entry]:
  d, p, v, t = c.hidden_size, c.patch_size, ("vision",), "visual.trunk."
  num_pos = c.grid * c.grid + 1
  out = [Entry(t + "patch_embed.proj.weight", (d, c.num_channels, p, p),
               (v + ("patch_embed", "kernel"),), "conv"),
         Entry(t + "patch_embed.proj.bias", (d,),
               (v + ("patch_embed", "bias"),), "copy"),
         Entry(t + "cls_token", (1, 1, d), (v + ("class_embedding",),),
               "copy", shape=(d,)),
         Entry(t + "pos_embed", (1, num_pos, d),
               (v + ("position_embedding",),), "copy", shape=(num_pos, d))]
  for i in range(c.num_layers):
    h, o = f"{t}blocks.{i}.", v + (f"layers_{i}",)
    out += names.norm(h + "norm1", o + ("norm1",), d)
    out += names.qkv(h + "attn.qkv.weight", h + "attn.qkv.bias",
                     o + ("attn",), d)
    out += names.linear(h + "attn.proj", o + ("attn", "out"), d, d)
    out += names.norm(h + "norm2", o + ("norm2",), d)
    out += names.mlp(h + "mlp", o + ("mlp",), d, c.mlp_dim)
  out += names.norm(t + "norm", v + ("post_norm",), d)
  if c.projection_dim:
    out += names.linear("visual.head.proj", v + ("projection",), d,
                        c.projection_dim, bias=False)
  return out


def native_text_entries(c: TextConfig, prefix: str) -> List[Entry]:
  d, t = c.hidden_size, ("text",)
  out = [Entry(prefix + "token_embedding.weight", (c.vocab_size, d),
               (t + ("token_embedding",),), "copy"),
         Entry(prefix + "positional_embedding", (c.max_length, d),
               (t + ("position_embedding",),), "copy")]
  out += _resblocks(prefix + "transformer", t, c.num_layers, d, c.mlp_dim,
                    c.layer_scale)
  out += names.norm(prefix + "ln_final", t + ("final_norm",), d)
  out += [Entry(prefix + "text_projection", (d, c.projection_dim),
                (t + ("projection", "kernel"),), "copy")]
  return out


def vision_entries(layout: Layout) -> List[Entry]:
  return (timm_vision_entries(layout.vision) if layout.timm
          else native_vision_entries(layout.vision))


def _scalar_entries(found: Mapping) -> List[Entry]:
  """logit_scale (and logit_bias where the model has one), () or (1,)."""
  out = []
  for name in ("logit_scale", "logit_bias"):
    if name in found or name == "logit_scale":
      shape = tuple(found[name].shape) if name in found else ()
      out.append(Entry(name, shape, ((name,),), "copy"))
  return out


def vision_config(path: str) -> VisionConfig:
  """The image tower's config, from open_clip_config.json alone."""
  return parse(path)[0].vision


def _tokenizer(path: str, layout: Layout):
  """(make_tokenizer, max_length) or None without tokenizer files."""
  n = layout.context_length
  if layout.hf_text or layout.text_cfg.get("hf_tokenizer_name"):
    return tokenizers.auto(path, n, "open_clip")
  # open_clip's own BPE, which the hub folders ship as CLIP's HF files.
  return tokenizers.for_folder(path, "clip", n)


def _mean_std(raw: Mapping, file: str):
  pp = raw.get("preprocess_cfg") or {}
  if not isinstance(pp, dict):
    raise UserError(f"preprocess_cfg in {file} must be an object")
  mean, std = DEFAULT_MEAN_STD
  return (preprocessing.triple(pp.get("mean", mean), "preprocess_cfg.mean",
                               file),
          preprocessing.triple(pp.get("std", std), "preprocess_cfg.std",
                               file))


def _text(path: str, layout: Layout, found: Mapping, where: Mapping
          ) -> Tuple[Any, List[Entry], dict]:
  """(text config, its entries, the tensors less those it leaves unused)."""
  if not layout.hf_text:
    config = _native_text(layout.text_cfg, layout.quick_gelu,
                          layout.embed_dim, layout.file)
    return config, native_text_entries(config, layout.text_prefix), found
  config = _bert_config(path, layout, found, where)
  return (config, bert.bert_entries(config, BERT_PREFIX, BERT_PROJ),
          bert.drop_unused(found, config, BERT_PREFIX))


def read(path: str) -> Checkpoint:
  """An open_clip folder's towers, params and preprocessing."""
  layout, raw = parse(path)
  mean, std = _mean_std(raw, layout.file)
  tokenizer = _tokenizer(path, layout)
  reason = None if tokenizer else f"no tokenizer files in {path}"
  keep = (lambda name: name.startswith("visual.")) if reason else None
  found, where = tensors.read(path, SINGLE, INDEX, keep)
  entries = vision_entries(layout)
  text = text_class = None
  if not reason:
    text, text_entries, found = _text(path, layout, found, where)
    entries += text_entries + _scalar_entries(found)
    text_class = bert.BertTower if layout.hf_text else TextTower
  params = names.to_params(found, entries, where, CONFIG)
  return Checkpoint(
      family=NAME, format=NAME, vision=layout.vision, params=params,
      image_mean=mean, image_std=std, text=text, text_class=text_class,
      tokenizer=tokenizer, vision_only_reason=reason,
      disk_dtype=tensors.disk_dtype(found))
