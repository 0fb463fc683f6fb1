"""Learnable prompt pairs (CoOp / DualCoOp) on tiny random CLIP and SigLIP.

The experts are written as Hugging Face folders and loaded as real
checkpoints are: CLIP with a character-level byte BPE, SigLIP with a
sentencepiece model. The reference throughout is the zero-shot path
(`zero_shot.prompt_embeddings` over `Expert.encode_text`), which runs the
text tower from token ids.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbridge_jax import experts as experts_lib
from medbridge_jax import methods
from medbridge_jax.errors import UserError
from medbridge_jax.experts import random_experts
from medbridge_jax.experts import zero_shot
from medbridge_jax.model import coop
from medbridge_jax.model import partition

LABELS = ("effusion", "nodule", "pneumothorax")
SPECS = {
    "clip": "clip:width=32,layers=1,heads=2,patch=8,image=16,text_layers=2,"
            "text_len=48",
    "siglip": "siglip:width=32,layers=1,heads=2,patch=8,image=16,"
              "text_layers=2,text_len=16",
}
# The templates' words before {label} as each tokenizer gives them back
# (SigLIP's drops punctuation and lower-cases).
CONTEXT_TEXT = {
    "clip": ("a chest x-ray showing", "a chest x-ray with no"),
    "siglip": ("a chest xray showing", "a chest xray with no"),
}
# Other words for the positive context; one with as many tokens is used.
ALTERNATIVES = ("a chest x-ray picture", "a frontal x-ray showing",
                "a lung x-ray showing", "the chest x-ray showing",
                "a chest radiograph showing", "a chest image showing",
                "an x-ray showing", "a chest x-ray with", "a photo showing")


@pytest.fixture(scope="module", params=sorted(SPECS))
def expert(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(request.param))
  random_experts.write(path, SPECS[request.param], seed=3)
  e = experts_lib.load(path)
  assert e.family == request.param
  # Initialised layer norms and biases are exact ones and zeros: noise
  # on every parameter, so that no swapped or skipped piece goes unseen.
  leaves, tree = jax.tree_util.tree_flatten(e.params["text"])
  keys = jax.random.split(jax.random.key(11), len(leaves))
  noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in
           zip(leaves, keys)]
  text = jax.tree_util.tree_unflatten(tree, noisy)
  return dataclasses.replace(e, params={**e.params, "text": text})


def learner_and_params(expert, class_specific=False):
  spec = coop.prepare(expert, LABELS)
  learner = coop.PromptLearner(spec, class_specific=class_specific)
  return learner, coop.init_params(learner, expert)


def run(learner, params):
  return jax.jit(lambda p: learner.apply({"params": p}))(params)


def image_features(expert, n=6):
  side = expert.image_size
  x = jax.random.uniform(jax.random.key(7), (n, side, side, 1))
  return expert.image_features(expert.normalize_pixels(x))


def test_encode_embeddings_is_the_tower_from_ids(expert):
  tower, params = expert.text, {"params": expert.params["text"]}
  ids, mask = expert.tokenize([zero_shot.POSITIVE.format(label=l)
                               for l in LABELS])
  embeds = tower.apply(params, ids, method="embed_tokens")
  np.testing.assert_array_equal(
      embeds, np.asarray(expert.params["text"]["token_embedding"])[ids])
  for m in (mask, None):
    want, _ = tower.apply(params, ids, m)
    got = tower.apply(params, embeds, ids, m, method="encode_embeddings")
    np.testing.assert_array_equal(got, want)
  # The embeddings, not the ids, are what is encoded. (Not a constant
  # shift: the layer norms remove that.)
  moved = embeds.at[:, 1].add(
      0.5 * jax.random.normal(jax.random.key(2), embeds.shape[-1:]))
  got = tower.apply(params, moved, ids, mask, method="encode_embeddings")
  assert np.all(np.abs(np.asarray(got - want)).max(-1) > 1e-4)
  with pytest.raises(ValueError, match="do not match"):
    tower.apply(params, embeds[:, :-1], ids, method="encode_embeddings")


def test_context_span_and_initial_value(expert):
  spec = coop.prepare(expert, LABELS)
  tok = expert.tokenizer
  table = np.asarray(expert.params["text"]["token_embedding"])
  # CLIP prompts start with the start-of-text token, SigLIP's with a word.
  lead = 1 if expert.family == "clip" else 0
  assert spec.starts == (lead, lead)
  assert spec.ids.shape == (2, len(LABELS), expert.max_length)
  assert (spec.mask is None) == (expert.family == "siglip")
  for k in range(2):
    n = spec.context_lengths[k]
    for l, label in enumerate(LABELS):
      row = spec.ids[k, l]
      # (CLIP decodes x-ray as "x - ray": compare without spaces.)
      assert tok.decode(row[lead:lead + n]).replace(" ", "") == CONTEXT_TEXT[
          expert.family][k].replace(" ", "")
      rest = tok.decode(row[lead + n:], skip_special_tokens=True).strip()
      assert rest == label
      np.testing.assert_array_equal(spec.contexts[k],
                                    table[row[lead:lead + n]])
  # Hashable and comparable by value, as a linen attribute must be.
  again = coop.prepare(expert, LABELS)
  assert again == spec and hash(again) == hash(spec)
  assert coop.prepare(expert, LABELS[:2]) != spec


def test_templates_without_context_are_user_errors(expert):
  with pytest.raises(UserError, match="no words before"):
    coop.prepare(expert, LABELS, positive="{label}")
  with pytest.raises(UserError, match="no words before"):
    coop.prepare(expert, LABELS, negative="   {label} absent")
  # "a" runs into the label ("anodule"): CLIP's pre-split makes it one
  # word, the sentencepiece model segments "anodule" as "an" + ...
  with pytest.raises(UserError, match="tokenise differently"):
    coop.prepare(expert, LABELS, positive="a chest x-ray with a{label}")
  with pytest.raises(UserError, match="has no"):
    coop.prepare(expert, LABELS, positive="a chest x-ray")


@pytest.mark.parametrize("class_specific", [False, True])
def test_initial_context_is_the_zero_shot_classifier(expert, class_specific):
  learner, params = learner_and_params(expert, class_specific)
  n_pos, n_neg = learner.spec.context_lengths
  d = expert.text.config.hidden_size
  lead = (len(LABELS),) if class_specific else ()
  assert params["positive_context"].shape == lead + (n_pos, d)
  assert params["negative_context"].shape == lead + (n_neg, d)
  assert params["text_tower"] is expert.params["text"]
  prompts = run(learner, params)
  want = zero_shot.prompt_embeddings(expert, list(LABELS))
  assert prompts.shape == want.shape == (len(LABELS), 2,
                                         expert.text.config.projection_dim)
  np.testing.assert_allclose(prompts, want, atol=1e-5, rtol=0)
  feats = image_features(expert)
  np.testing.assert_allclose(zero_shot.logits(feats, prompts, expert),
                             zero_shot.logits(feats, want, expert),
                             atol=1e-5, rtol=0)
  np.testing.assert_allclose(
      jax.nn.sigmoid(coop.label_logits(feats, prompts, expert)),
      zero_shot.probabilities(feats, want, expert), atol=1e-6)


def alternative(expert, n):
  """Another prefix of n tokens, as (text, ids)."""
  for text in ALTERNATIVES:
    ids = expert.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) == n:
      return text, ids
  pytest.fail(f"no alternative prefix of {n} tokens")


@pytest.mark.parametrize("class_specific", [False, True])
def test_a_context_of_other_words_is_those_words_prompt(expert,
                                                        class_specific):
  """Setting the context to another phrase's token embeddings gives that
  phrase's zero-shot prompt features: the context goes exactly where the
  template's words were, and only there."""
  learner, params = learner_and_params(expert, class_specific)
  n = learner.spec.context_lengths[0]
  text, ids = alternative(expert, n)
  words = np.asarray(expert.params["text"]["token_embedding"])[ids]
  ctx = np.array(params["positive_context"])
  if class_specific:
    ctx[0] = words  # Only the first label's positive prompt changes.
  else:
    ctx = words
  got = run(learner, {**params, "positive_context": jnp.asarray(ctx)})
  old = zero_shot.prompt_embeddings(expert, list(LABELS))
  new = zero_shot.prompt_embeddings(expert, list(LABELS),
                                    positive=text + " {label}")
  assert np.abs(np.asarray(new - old)[:, 0]).max() > 1e-3
  changed = [0] if class_specific else list(range(len(LABELS)))
  kept = [l for l in range(len(LABELS)) if l not in changed]
  np.testing.assert_allclose(got[changed, 0], new[changed, 0], atol=1e-5)
  np.testing.assert_allclose(got[kept, 0], old[kept, 0], atol=1e-5)
  np.testing.assert_allclose(got[:, 1], old[:, 1], atol=1e-5)


def bce_loss(learner, feats, targets, expert, label_weights):
  def loss(trainable, frozen):
    params = partition.merge(trainable, frozen)
    logits = coop.label_logits(feats, learner.apply({"params": params}),
                               expert)
    each = (jnp.maximum(logits, 0) - logits * targets
            + jnp.log1p(jnp.exp(-jnp.abs(logits))))
    return jnp.sum(each * label_weights)
  return loss


@pytest.mark.parametrize("class_specific", [False, True])
def test_gradients_reach_the_context_only(expert, class_specific):
  learner, params = learner_and_params(expert, class_specific)
  # The rules training uses, on the learner where the model nests it.
  trainable, frozen = (part["expert_0"]["prompts"] for part in partition.split(
      {"expert_0": {"prompts": params}}, methods.BASELINE_RULES))
  assert set(trainable) == {"positive_context", "negative_context"}
  assert set(frozen) == {"text_tower"}
  feats = image_features(expert)
  targets = (jax.random.uniform(jax.random.key(1), (6, len(LABELS)))
             > 0.5).astype(jnp.float32)
  first_only = jnp.asarray([1.0] + [0.0] * (len(LABELS) - 1))
  loss = bce_loss(learner, feats, targets, expert, first_only)
  value, grads = jax.jit(jax.value_and_grad(loss))(trainable, frozen)
  loss = jax.jit(loss)
  assert jax.tree_util.tree_structure(grads) == (
      jax.tree_util.tree_structure(trainable))
  for name in trainable:
    g = np.asarray(grads[name])
    assert np.all(np.isfinite(g))
    if class_specific:
      # A loss on the first label reaches that label's context only.
      assert np.abs(g[0]).max() > 0
      np.testing.assert_array_equal(g[1:], 0.0)
    else:
      assert np.abs(g).max() > 0
  # The gradient is the loss's slope: central difference along it.
  step = 1e-2 / float(np.sqrt(sum(np.sum(np.square(g))
                                  for g in jax.tree_util.tree_leaves(grads))))
  move = lambda s: jax.tree_util.tree_map(lambda p, g: p + s * step * g,
                                          trainable, grads)
  slope = (loss(move(1), frozen) - loss(move(-1), frozen)) / (2 * step)
  norm2 = sum(float(jnp.sum(g * g)) for g in jax.tree_util.tree_leaves(grads))
  np.testing.assert_allclose(float(slope), norm2, rtol=2e-2)
  assert np.isfinite(float(value))


def test_partition_rules_cover_a_nested_learner(expert):
  """The rules training uses match the learner where the model nests it."""
  _, params = learner_and_params(expert)
  nested = {"expert_0": {"prompts": params}}
  actions = partition.decide(nested, methods.BASELINE_RULES)
  assert actions["expert_0/prompts/positive_context"] == "train"
  assert actions["expert_0/prompts/negative_context"] == "train"
  tower = [a for p, a in actions.items() if "/text_tower/" in p]
  assert len(tower) == len(jax.tree_util.tree_leaves(expert.params["text"]))
  assert set(tower) == {"frozen"}
