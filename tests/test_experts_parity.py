"""Our Flax CLIP / SigLIP equal transformers' PyTorch models (float32).

Tiny random models are built with transformers, saved with save_pretrained,
loaded with `experts.load`, and compared on image features, every hidden
state, text features and zero-shot logits: max abs difference <= 1e-4.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hf_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-order
from medbridge_jax import experts  # pylint: disable=g-import-not-at-top
from medbridge_jax.experts import zero_shot  # pylint: disable=g-import-not-at-top

TOL = 1e-4
LABELS = ("atelectasis", "pleural effusion", "no finding")

# (id, family, fixture kwargs, input (height, width)).
CONFIGS = [
    ("clip_p8_i32", "clip", dict(patch=8, image=32), (32, 32)),
    ("clip_p4_i24_l3_gelu", "clip",
     dict(patch=4, image=24, layers=3, hidden=48, heads=6, proj=16,
          text_layers=1, act="gelu"), (24, 24)),
    ("clip_p16_i64_interp", "clip",
     dict(patch=16, image=64, hidden=64, heads=8, text_len=40, seed=1),
     (96, 80)),
    ("siglip_p8_i32", "siglip", dict(patch=8, image=32), (32, 32)),
    ("siglip_p4_i16_l3", "siglip",
     dict(patch=4, image=16, layers=3, hidden=48, heads=6, text_len=16,
          act="gelu"), (16, 16)),
    ("siglip_p8_i48_interp", "siglip",
     dict(patch=8, image=48, hidden=40, heads=5, seed=2), (64, 40)),
]


@pytest.fixture(scope="module", params=CONFIGS, ids=[c[0] for c in CONFIGS])
def pair(request, tmp_path_factory):
  name, family, kwargs, size = request.param
  path = str(tmp_path_factory.mktemp(name))
  make = hf_fixtures.clip_folder if family == "clip" else hf_fixtures.siglip_folder
  path, model = make(path, **kwargs)
  rng = np.random.RandomState(0)
  pixels = rng.randn(2, size[0], size[1], 3).astype(np.float32)
  return experts.load(path), model, pixels


def _max_diff(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours) - theirs.detach().numpy())))


def _torch_pixels(pixels):
  return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))


def _jit_apply(tower, **kwargs):
  return jax.jit(lambda p, *a: tower.apply({"params": p}, *a, **kwargs))


def test_image_features_and_hidden_states(pair):
  expert, model, pixels = pair
  with torch.no_grad():
    ref = model.vision_model(
        pixel_values=_torch_pixels(pixels), interpolate_pos_encoding=True,
        output_hidden_states=True)
    ref_feats = model.get_image_features(pixel_values=_torch_pixels(pixels),
                                         interpolate_pos_encoding=True)
  ref_feats = getattr(ref_feats, "pooler_output", ref_feats)
  # Expert.image_features itself is checked by test_zero_shot_logits.
  ours, hidden = _jit_apply(expert.vision, output_hidden_states=True)(
      expert.params["vision"], pixels)
  assert ours.shape == tuple(ref_feats.shape)
  assert _max_diff(ours, ref_feats) <= TOL
  assert len(hidden) == len(ref.hidden_states) == expert.vision.num_layers + 1
  for i, (a, b) in enumerate(zip(hidden, ref.hidden_states)):
    assert _max_diff(a, b) <= TOL, f"hidden state {i}"


def test_text_features_and_hidden_states(pair):
  expert, model, _ = pair
  # Six texts: the same shape as the zero-shot prompts, so jit reuses.
  texts = ["a chest x-ray showing pleural effusion", "no finding",
           "cardiomegaly and edema, both lungs", "atelectasis", "x", ""]
  ids, mask = expert.tokenize(texts)
  assert ids.shape == (6, expert.max_length) == mask.shape
  assert (mask.sum(axis=1) < expert.max_length).all()  # Padding happened.
  t_ids = torch.from_numpy(ids.astype(np.int64))
  t_mask = torch.from_numpy(mask.astype(np.int64))
  with torch.no_grad():
    ref = model.get_text_features(input_ids=t_ids, attention_mask=t_mask)
    ref_nomask = model.get_text_features(input_ids=t_ids)
    ref_hidden = model.text_model(input_ids=t_ids, attention_mask=t_mask,
                                  output_hidden_states=True).hidden_states
  ref = getattr(ref, "pooler_output", ref)
  ref_nomask = getattr(ref_nomask, "pooler_output", ref_nomask)
  assert _max_diff(expert.text_features(ids), ref_nomask) <= TOL
  ours, hidden = _jit_apply(expert.text, output_hidden_states=True)(
      expert.params["text"], ids, mask)
  assert _max_diff(ours, ref) <= TOL
  assert len(hidden) == len(ref_hidden) == expert.text.num_layers + 1
  keep = mask.astype(bool)  # Padded positions may differ; they are unused.
  for i, (a, b) in enumerate(zip(hidden, ref_hidden)):
    diff = np.abs(np.asarray(a)[keep] - b.detach().numpy()[keep])
    assert diff.max() <= TOL, f"hidden state {i}"


def test_zero_shot_logits(pair):
  expert, model, pixels = pair
  prompts = zero_shot.prompts(LABELS)
  ids, mask = expert.tokenize(prompts)
  t_mask = torch.from_numpy(mask.astype(np.int64))
  # encode_text uses the mask for CLIP, not for SigLIP (trained without).
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                pixel_values=_torch_pixels(pixels),
                attention_mask=t_mask if expert.family == "clip" else None,
                interpolate_pos_encoding=True)
  ref = out.logits_per_image.numpy().reshape(len(pixels), len(LABELS), 2)
  embeds = zero_shot.prompt_embeddings(expert, LABELS)
  feats = expert.image_features(pixels)
  with torch.no_grad():
    ref_feats = model.get_image_features(pixel_values=_torch_pixels(pixels),
                                         interpolate_pos_encoding=True)
  assert _max_diff(feats, getattr(ref_feats, "pooler_output", ref_feats)) <= TOL
  ours = zero_shot.logits(feats, embeds, expert)
  assert np.max(np.abs(np.asarray(ours) - ref)) <= TOL * 10 * max(
      1.0, float(expert.logit_scale))
  ref_probs = torch.softmax(torch.from_numpy(ref), -1)[..., 0].numpy()
  probs = zero_shot.probabilities(feats, embeds, expert)
  assert np.max(np.abs(np.asarray(probs) - ref_probs)) <= TOL


def test_sharded_safetensors_from_transformers(tmp_path):
  path, model = hf_fixtures.clip_folder(str(tmp_path / "one"), seed=3)
  sharded = tmp_path / "sharded"
  model.save_pretrained(str(sharded), max_shard_size="20KB")
  files = sorted(p.name for p in sharded.iterdir())
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  for f in ("vocab.json", "merges.txt", "tokenizer_config.json",
            "special_tokens_map.json", "preprocessor_config.json"):
    (sharded / f).write_bytes((tmp_path / "one" / f).read_bytes())
  a, b = experts.load(path), experts.load(str(sharded))
  leaves = lambda e: {jax.tree_util.keystr(k): np.asarray(v) for k, v in
                      jax.tree_util.tree_leaves_with_path(e.params)}
  la, lb = leaves(a), leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_array_equal(la[k], lb[k])
