"""Tiny open_clip checkpoints for tests, in the hub's folder layout (needs
torch and open_clip).

`folder(path, model_cfg, ...)` builds `open_clip.CLIP` (or
`CustomTextCLIP` for `custom_text` / a Hugging Face text model) offline,
puts noise on every parameter (initialised models have exact zeros and
ones: LayerNorms, biases, layer scales, which would hide mapping
mistakes), and writes `open_clip_config.json`, `open_clip_model.safetensors`
and tokenizer files. Returns (path, torch model in eval mode).
"""

import json
import os

from medbridge_jax.experts import random_experts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Not CLIP's defaults, so a reader that ignores preprocess_cfg shows.
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
# LayerNorm weights and layer-scale gammas get noise around one.
AROUND_ONE = ("ln_1.weight", "ln_2.weight", "ln_pre.weight",
              "ln_post.weight", "ln_final.weight", "norm1.weight",
              "norm2.weight", "trunk.norm.weight", "LayerNorm.weight",
              ".gamma")
BERT_WORDS = ("a", "chest", "x", "-", "ray", "showing", "with", "no",
              "atelectasis", "pleural", "effusion", "finding", "edema")


def randomize(model, seed: int):
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      scale = 0.2 if p.ndim <= 1 else 1.0 / max(p.shape[-1], 1) ** 0.5
      noise = torch.randn(p.shape, generator=g) * scale
      if name.endswith(AROUND_ONE):
        noise = noise + 1.0
      if name == "logit_scale":
        noise = torch.full(p.shape, 2.3)
      p.copy_(noise)
  return model.eval()


def build(model_cfg: dict, seed: int = 0):
  """The open_clip model `model_cfg` describes, noised, in eval mode."""
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  cfg = dict(model_cfg)
  custom = cfg.pop("custom_text", False) or bool(
      cfg["text_cfg"].get("hf_model_name"))
  torch.manual_seed(seed)
  cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
  return randomize(cls(**cfg), seed)


def write_bert(path: str, *, vocab_size: int = 64, width: int = 32,
               layers: int = 2, heads: int = 4, mlp: int = 37,
               positions: int = 40):
  """A tiny BERT config.json (what `hf_model_name` names) at `path`."""
  import transformers  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
      num_attention_heads=heads, intermediate_size=mlp,
      max_position_embeddings=positions, pad_token_id=0).save_pretrained(path)
  return path


def write_bert_tokenizer(path: str, max_length: int) -> int:
  """A WordPiece vocab.txt + tokenizer_config.json, as BiomedCLIP's folder
  ships them; returns the vocabulary size."""
  letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
  vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(BERT_WORDS)
           + [l for l in letters if l not in BERT_WORDS]
           + ["##" + l for l in letters])
  with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(vocab) + "\n")
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True,
               "model_max_length": max_length}, f)
  return len(vocab)


def save(path: str, model, model_cfg: dict, preprocess=True):
  """open_clip's hub files for `model` (weights and config) at `path`."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  save_file(state, os.path.join(path, "open_clip_model.safetensors"))
  body = {"model_cfg": model_cfg}
  if preprocess:
    body["preprocess_cfg"] = {"mean": list(MEAN), "std": list(STD),
                              "interpolation": "bicubic"}
  with open(os.path.join(path, "open_clip_config.json"), "w") as f:
    json.dump(body, f, indent=2)


def clip_tokenizer(path: str, context_length: int) -> int:
  """CLIP BPE files (the hub's HF tokenizer files); returns the vocabulary
  size (its end token has the largest id, as in OpenAI's)."""
  os.makedirs(path, exist_ok=True)
  return random_experts.write_clip_tokenizer(path, context_length)[
      "vocab_size"]


def folder(path: str, model_cfg: dict, seed: int = 0, tokenizer=True):
  """A whole hub folder; `model_cfg` text_cfg's vocab_size is filled in
  from the tokenizer written. Returns (path, model, model_cfg)."""
  model_cfg = json.loads(json.dumps(model_cfg))
  text = model_cfg["text_cfg"]
  os.makedirs(path, exist_ok=True)
  if text.get("hf_model_name"):
    n = write_bert_tokenizer(path, text["context_length"])
  else:
    n = clip_tokenizer(path, text["context_length"])
    text["vocab_size"] = n
  if not tokenizer:
    for f in os.listdir(path):
      os.remove(os.path.join(path, f))
  model = build(model_cfg, seed)
  save(path, model, model_cfg)
  return path, model, model_cfg
