"""Our Flax CLIP / SigLIP equal transformers' PyTorch models (float32).

Tiny random models are built with transformers, saved with save_pretrained,
loaded with `experts.load`, and compared on image features, every hidden
state, text features and zero-shot logits: max abs difference <= 1e-4.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

# pylint: disable=g-import-not-at-top,wrong-import-order
import hf_fixtures
from medbridge_jax import experts
from medbridge_jax.experts import zero_shot
# pylint: enable=g-import-not-at-top,wrong-import-order

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


_BUILT = {}


@pytest.fixture(scope="module", params=CONFIGS, ids=[c[0] for c in CONFIGS])
def pair(request, tmp_path_factory):
  """(expert, pixels, ids, mask, our outputs, HF outputs), built once per
  configuration (pytest would rebuild for indirect parametrization)."""
  name = request.param[0]
  if name not in _BUILT:
    _BUILT[name] = _build(request.param, tmp_path_factory)
  return _BUILT[name]


def _build(config, tmp_path_factory):
  """Our side runs as one jitted program: XLA compiles dominate the time."""
  name, family, kwargs, size = config
  path = str(tmp_path_factory.mktemp(name))
  make = (hf_fixtures.clip_folder if family == "clip"
          else hf_fixtures.siglip_folder)
  path, model = make(path, **kwargs)
  expert = experts.load(path)
  pixels = np.random.RandomState(0).randn(2, size[0], size[1], 3).astype(
      np.float32)
  # The zero-shot prompts double as the text-parity inputs (with padding).
  ids, mask = expert.tokenize(zero_shot.prompts(LABELS))

  def run(params, pixels, ids, mask):
    img, img_hidden = expert.vision.apply(
        {"params": params["vision"]}, pixels, output_hidden_states=True)
    txt, txt_hidden = expert.text.apply(
        {"params": params["text"]}, ids, mask, output_hidden_states=True)
    txt_nomask, _ = expert.text.apply({"params": params["text"]}, ids)
    return dict(img=img, img_hidden=img_hidden, txt=txt,
                txt_hidden=txt_hidden, txt_nomask=txt_nomask)

  ours = jax.tree.map(np.asarray,
                      jax.jit(run)(expert.params, pixels, ids, mask))
  t_px = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
  t_ids = torch.from_numpy(ids.astype(np.int64))
  t_mask = torch.from_numpy(mask.astype(np.int64))
  pooled = lambda out: getattr(out, "pooler_output", out).numpy()
  with torch.no_grad():
    theirs = dict(
        img=pooled(model.get_image_features(
            pixel_values=t_px, interpolate_pos_encoding=True)),
        img_hidden=[h.numpy() for h in model.vision_model(
            pixel_values=t_px, interpolate_pos_encoding=True,
            output_hidden_states=True).hidden_states],
        txt=pooled(model.get_text_features(input_ids=t_ids,
                                           attention_mask=t_mask)),
        txt_hidden=[h.numpy() for h in model.text_model(
            input_ids=t_ids, attention_mask=t_mask,
            output_hidden_states=True).hidden_states],
        txt_nomask=pooled(model.get_text_features(input_ids=t_ids)),
        # encode_text uses the mask for CLIP, not for SigLIP (trained
        # without one).
        logits=model(input_ids=t_ids, pixel_values=t_px,
                     attention_mask=t_mask if family == "clip" else None,
                     interpolate_pos_encoding=True
                     ).logits_per_image.numpy())
  return expert, pixels, ids, mask, ours, theirs


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_image_features_and_hidden_states(pair):
  expert, _, _, _, ours, theirs = pair
  assert ours["img"].shape == theirs["img"].shape
  assert _max_diff(ours["img"], theirs["img"]) <= TOL
  n = expert.vision.num_layers + 1
  assert len(ours["img_hidden"]) == len(theirs["img_hidden"]) == n
  for i, (a, b) in enumerate(zip(ours["img_hidden"], theirs["img_hidden"])):
    assert _max_diff(a, b) <= TOL, f"hidden state {i}"


def test_text_features_and_hidden_states(pair):
  expert, _, ids, mask, ours, theirs = pair
  assert ids.shape == (2 * len(LABELS), expert.max_length) == mask.shape
  assert (mask.sum(axis=1) < expert.max_length).all()  # Padding happened.
  assert _max_diff(ours["txt"], theirs["txt"]) <= TOL
  assert _max_diff(ours["txt_nomask"], theirs["txt_nomask"]) <= TOL
  n = expert.text.num_layers + 1
  assert len(ours["txt_hidden"]) == len(theirs["txt_hidden"]) == n
  keep = mask.astype(bool)  # Padded positions may differ; they are unused.
  for i, (a, b) in enumerate(zip(ours["txt_hidden"], theirs["txt_hidden"])):
    assert _max_diff(a[keep], b[keep]) <= TOL, f"hidden state {i}"


def test_zero_shot_logits(pair):
  expert, pixels, _, _, ours, theirs = pair
  txt = ours["txt"] if expert.family == "clip" else ours["txt_nomask"]
  embeds = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  embeds = embeds.reshape(len(LABELS), 2, -1)
  ref = theirs["logits"].reshape(len(pixels), len(LABELS), 2)
  got = zero_shot.logits(ours["img"], embeds, expert)
  assert _max_diff(got, ref) <= TOL * float(expert.logit_scale)
  ref_probs = torch.softmax(torch.from_numpy(ref), -1)[..., 0].numpy()
  probs = zero_shot.probabilities(ours["img"], embeds, expert)
  assert _max_diff(probs, ref_probs) <= TOL


@pytest.mark.parametrize("pair", [CONFIGS[2], CONFIGS[5]], indirect=True,
                         ids=[CONFIGS[2][0], CONFIGS[5][0]])
def test_expert_api(pair):
  """Expert.image_features / prompt_embeddings / probabilities, the public
  path, agree with the checked tower outputs (two configs: compiles cost)."""
  expert, pixels, _, _, ours, theirs = pair
  feats = expert.image_features(pixels)
  assert _max_diff(feats, theirs["img"]) <= TOL
  embeds = zero_shot.prompt_embeddings(expert, LABELS)
  assert embeds.shape == (len(LABELS), 2, feats.shape[-1])
  ref = theirs["logits"].reshape(len(pixels), len(LABELS), 2)
  ref_probs = torch.softmax(torch.from_numpy(ref), -1)[..., 0].numpy()
  probs = zero_shot.probabilities(feats, embeds, expert)
  assert probs.shape == (len(pixels), len(LABELS))
  assert _max_diff(probs, ref_probs) <= TOL
  del ours


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

