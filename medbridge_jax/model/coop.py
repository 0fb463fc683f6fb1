"""Learnable text prompts for multi-label diagnosis (CoOp / DualCoOp).

CoOp (Zhou et al. 2022) replaces the words of a prompt template with
learnable context vectors in the text tower's token-embedding space and
trains only those, through the frozen text tower. DualCoOp (Sun et al.
2022) learns a positive and a negative context per label for multi-label
recognition. Here the two contexts are the zero-shot templates' own words
before "{label}" ("a chest x-ray showing" / "a chest x-ray with no"),
initialised from their token embeddings; the label's tokens, the end token
and the padding stay fixed. Contexts are shared by all labels (CoOp's
unified context) or, with `class_specific`, one per label.

At the initial context the prompt features are exactly the zero-shot ones
(`zero_shot.prompt_embeddings`), so training starts at the expert's
zero-shot classifier; logits follow `zero_shot.logits`.

  spec = coop.prepare(expert, labels)           # tokenise once, on the host
  learner = coop.PromptLearner(spec)            # params: positive_context,
  params = coop.init_params(learner, expert)    #   negative_context,
  prompts = learner.apply({"params": params})   #   text_tower/... (frozen)
  logits = coop.label_logits(image_features, prompts, expert)  # (B, L)
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medbridge_jax.errors import UserError
from medbridge_jax.experts import zero_shot

Array = jax.Array
KINDS = ("positive", "negative")

def _frozen(x, dtype) -> np.ndarray:
  a = np.array(x, dtype)
  a.setflags(write=False)
  return a


class PromptSpec:
  """Tokenised label prompts and the initial contexts, as a hashable linen
  attribute with a short repr (see `heads.TextDirections`).

  ids, mask: int32 (2, L, T) per kind (positive, negative), label, token;
  `mask` is None where the family is run without one (SigLIP, as
  `Expert.encode_text` does). starts[k]: position of kind k's first
  context token (the same for every label). contexts[k]: float32 (n_k, D)
  token embeddings of the template's words before "{label}".
  """

  def __init__(self, labels: Sequence[str], templates: Tuple[str, str],
               text_config: Any, ids, mask, starts: Tuple[int, int],
               contexts, text_class: Any):
    self.labels = tuple(labels)
    self.templates = tuple(templates)
    self.text_config = text_config
    # The expert's own text tower module (CLIP/SigLIP's TextTower, BERT...).
    self.text_class = text_class
    self.ids = _frozen(ids, np.int32)
    self.mask = None if mask is None else _frozen(mask, np.int32)
    self.starts = tuple(int(s) for s in starts)
    self.contexts = tuple(_frozen(c, np.float32) for c in contexts)
    arrays = (self.ids, self.mask) + self.contexts
    self._key = (self.labels, self.templates, self.text_config,
                 self.text_class, self.starts,
                 tuple(None if a is None else (a.shape, a.tobytes())
                       for a in arrays))
    self._hash = hash(self._key)

  @property
  def context_lengths(self) -> Tuple[int, int]:
    return tuple(c.shape[0] for c in self.contexts)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return isinstance(other, PromptSpec) and self._key == other._key

  def __repr__(self):
    return (f"PromptSpec(labels={len(self.labels)}, "
            f"length={self.ids.shape[-1]}, context={self.context_lengths})")


def _context_start(rows: np.ndarray, context: Sequence[int], special,
                   labels: Sequence[str], kind: str, template: str) -> int:
  """Where `context` begins in every row: after the leading special tokens,
  at one position for all labels; else a UserError naming the template."""
  n = len(context)
  starts = set()
  for row, label in zip(rows, labels):
    row = [int(t) for t in row]
    start = 0
    while start < len(row) and row[start] in special:
      start += 1
    if row[start:start + n] != list(context):
      raise UserError(
          f"coop {kind} prompt {template!r}: its words before {{label}} "
          f"tokenise differently inside the prompt for label {label!r} "
          f"(or are cut off); put a space before {{label}}")
    starts.add(start)
  if len(starts) != 1:
    raise UserError(f"coop {kind} prompt {template!r}: its context starts at "
                    f"different positions for different labels")
  return starts.pop()


def prepare(expert: Any, labels: Sequence[str],
            positive: str = zero_shot.POSITIVE,
            negative: str = zero_shot.NEGATIVE) -> PromptSpec:
  """Tokenise every label's prompt pair with the expert's tokenizer and
  take the learnable context's place and initial value from the templates'
  words before "{label}" (token embeddings from `expert.params["text"]`)."""
  texts = zero_shot.prompts(labels, positive, negative)  # Checks both.
  ids, mask = expert.tokenize(texts)  # (2L, T), pos/neg interleaved.
  num = len(labels)
  ids = ids.reshape(num, 2, -1).transpose(1, 0, 2)
  mask = mask.reshape(num, 2, -1).transpose(1, 0, 2)
  table = np.asarray(expert.params["text"]["token_embedding"], np.float32)
  tokenizer = expert.tokenizer
  special = set(int(t) for t in tokenizer.all_special_ids)
  starts, contexts = [], []
  for k, (kind, template) in enumerate(zip(KINDS, (positive, negative))):
    prefix = template.split("{label}")[0].strip()
    context = (tokenizer(prefix, add_special_tokens=False)["input_ids"]
               if prefix else [])
    if not context:
      raise UserError(f"coop {kind} prompt {template!r} has no words before "
                      f"{{label}} to learn as context")
    starts.append(_context_start(ids[k], context, special, labels, kind,
                                 template))
    contexts.append(table[np.asarray(context)])
  return PromptSpec(labels, (positive, negative), expert.text.config, ids,
                    expert.text_mask(mask), starts, contexts,
                    text_class=type(expert.text))


def _l2_normalize(x: Array) -> Array:
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class PromptLearner(nn.Module):
  """Learned prompt pairs -> (L, 2, P) L2-normalised text features.

  Params: `positive_context`, `negative_context` ((n_k, D), or (L, n_k, D)
  with `class_specific`), and the frozen `text_tower/...` (the expert's
  `params["text"]`, unchanged; `init_params` puts it there).
  """
  spec: PromptSpec
  class_specific: bool = False
  dtype: Any = jnp.float32  # Compute dtype of the text tower.
  attention_impl: Optional[str] = None

  def setup(self):
    self.text_tower = self.spec.text_class(
        self.spec.text_config, dtype=self.dtype,
        attention_impl=self.attention_impl)
    num = len(self.spec.labels)
    contexts = []
    for kind, init in zip(KINDS, self.spec.contexts):
      shape = (num,) + init.shape if self.class_specific else init.shape
      init_fn = lambda key, shape, init=init: jnp.broadcast_to(
          jnp.asarray(init), shape)
      ctx = self.param(f"{kind}_context", init_fn, shape)
      if ctx.shape != shape:
        raise ValueError(f"{kind}_context has shape {ctx.shape}; the prompt "
                         f"spec needs {shape}")
      contexts.append(jnp.broadcast_to(ctx, (num,) + init.shape))
    self.contexts = contexts  # Per kind (L, n_k, D).

  def __call__(self) -> Array:
    spec = self.spec
    embeds = []
    for k in range(len(KINDS)):
      tokens = self.text_tower.embed_tokens(jnp.asarray(spec.ids[k]))
      ctx = self.contexts[k].astype(tokens.dtype)
      s, n = spec.starts[k], ctx.shape[1]
      embeds.append(jnp.concatenate(
          [tokens[:, :s], ctx, tokens[:, s + n:]], axis=1))
    # Rows in zero_shot.prompts' order: pos(label0), neg(label0), ...
    interleave = lambda a: jnp.swapaxes(a, 0, 1).reshape(
        (-1,) + a.shape[2:])
    embeds = interleave(jnp.stack(embeds))
    ids = interleave(jnp.asarray(spec.ids))
    mask = None if spec.mask is None else interleave(jnp.asarray(spec.mask))
    features = self.text_tower.encode_embeddings(embeds, ids, mask)
    features = _l2_normalize(features)
    return features.reshape(len(spec.labels), 2, features.shape[-1])


def init_params(learner: PromptLearner, expert: Any) -> dict:
  """{"positive_context", "negative_context", "text_tower"}: the contexts at
  the templates' token embeddings and the expert's text params as loaded."""
  text = expert.params["text"]

  def init(text):
    # The contexts' initial values come from the spec; the key is unused.
    _, new = learner.apply({"params": {"text_tower": text}},
                           rngs={"params": jax.random.key(0)},
                           mutable="params")
    return new["params"]

  params = jax.jit(init)(text)
  return {**params, "text_tower": text}


def label_logits(image_features: Array, prompt_embeds: Array,
                 expert: Any) -> Array:
  """(B, L) logits: positive minus negative prompt logit
  (`zero_shot.logits`), whose sigmoid is the softmax over the pair taken
  at the positive prompt (`zero_shot.probabilities`)."""
  pair = zero_shot.logits(image_features, prompt_embeds, expert)
  return pair[..., 0] - pair[..., 1]
