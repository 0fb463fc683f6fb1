"""SigLIP shapes of So400m, SigLIP 2 and MedSigLIP equal transformers'.

so400m-patch14-384 has an image side that is not a multiple of its patch
(384 / 14: a 27 x 27 grid, 6 pixels dropped) and a head dim that is not a
power of two (1152 / 16 = 72); SigLIP 2's fixed-resolution folders are
model_type "siglip" with Gemma's tokenizer (tokenizer.json +
tokenizer_config.json, no spiece.model). Tiny random SiglipModels with
those traits are built with transformers, loaded with `experts.load` and
compared with get_image_features / get_text_features and every hidden
state, at the native side and at interpolated ones.
"""

import os
import string

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

# pylint: disable=g-import-not-at-top,wrong-import-order
import hf_fixtures
from parity import assert_close
from medbridge_jax import experts
from medbridge_jax.errors import UserError
# pylint: enable=g-import-not-at-top,wrong-import-order

TEXTS = ("a chest x-ray", "no finding", "pleural effusion at the left base")

# (id, fixture kwargs, input (height, width) sides: native first).
CONFIGS = [
    # Patch 14, image 46: a 3 x 3 grid and 4 dropped pixels; head dim 9.
    ("so400m_shape", dict(patch=14, image=46, hidden=36, heads=4,
                          text_hidden=36, text_heads=4, mlp=50, seed=4),
     ((46, 46), (60, 74), (33, 33))),
    ("siglip2_gemma", dict(patch=14, image=46, hidden=36, heads=4,
                           text_hidden=36, text_heads=4, text_len=16,
                           seed=5),
     ((46, 46), (71, 47))),
]


# ---- A SigLIP 2 tokenizer folder --------------------------------------------

VOCAB = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581"]
         + list(string.ascii_lowercase + string.digits + "-.,")
         + ["\u2581a", "\u2581c", "ch", "st", "est"])
MERGES = [("\u2581", "a"), ("\u2581", "c"), ("c", "h"), ("s", "t"),
          ("e", "st")]


def _gemma_tokenizer(path, max_length):
  """Replaces the folder's sentencepiece tokenizer by a tiny Gemma one,
  as SigLIP 2 ships it (no bos, eos appended), with Gemma's left padding
  as its default: Expert.tokenize must still pad on the right."""
  import transformers  # pylint: disable=g-import-not-at-top
  for f in ("spiece.model", "tokenizer_config.json",
            "special_tokens_map.json"):
    if os.path.exists(os.path.join(path, f)):
      os.remove(os.path.join(path, f))
  tok = transformers.GemmaTokenizer(
      vocab={t: i for i, t in enumerate(VOCAB)}, merges=MERGES,
      add_bos_token=False, add_eos_token=True, model_max_length=max_length,
      padding_side="left")
  tok.save_pretrained(path)


_BUILT = {}


@pytest.fixture(scope="module", params=CONFIGS, ids=[c[0] for c in CONFIGS])
def pair(request, tmp_path_factory):
  name = request.param[0]
  if name not in _BUILT:
    _BUILT[name] = _build(request.param, tmp_path_factory)
  return _BUILT[name]


def _build(config, tmp_path_factory):
  """(config, expert, ids, our outputs, HF outputs); our side is one
  jitted program (image sides and text together)."""
  name, kwargs, sides = config
  path, model = hf_fixtures.siglip_folder(
      str(tmp_path_factory.mktemp(name)), **kwargs)
  if name == "siglip2_gemma":
    _gemma_tokenizer(path, kwargs["text_len"])
  expert = experts.load(path)
  rng = np.random.RandomState(2)
  pixels = [rng.randn(2, h, w, 3).astype(np.float32) for h, w in sides]
  ids, _ = expert.tokenize(TEXTS)

  def run(params, pixels, ids):
    images = [expert.vision.apply({"params": params["vision"]}, x,
                                  output_hidden_states=True) for x in pixels]
    text = expert.text.apply({"params": params["text"]}, ids, None,
                             output_hidden_states=True)
    return images, text

  ours = jax.tree.map(np.asarray, jax.jit(run)(expert.params, pixels, ids))
  pooled = lambda out: getattr(out, "pooler_output", out).numpy()
  theirs = {"images": []}
  with torch.no_grad():
    for x in pixels:
      t_px = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
      theirs["images"].append((
          pooled(model.get_image_features(pixel_values=t_px,
                                          interpolate_pos_encoding=True)),
          [h.numpy() for h in model.vision_model(
              pixel_values=t_px, interpolate_pos_encoding=True,
              output_hidden_states=True).hidden_states]))
    t_ids = torch.from_numpy(ids.astype(np.int64))
    theirs["text"] = (
        pooled(model.get_text_features(input_ids=t_ids)),
        [h.numpy() for h in model.text_model(
            input_ids=t_ids, output_hidden_states=True).hidden_states])
  return config, expert, ids, ours, theirs


def test_image_features_and_hidden_states(pair):
  config, expert, _, ours, theirs = pair
  assert expert.vision.config.grid == 3  # 46 // 14: the remainder dropped.
  assert expert.vision.config.hidden_size // expert.vision.config.num_heads \
      == 9
  for side, (feats, hidden), (ref, ref_hidden) in zip(
      config[2], ours[0], theirs["images"]):
    assert_close(feats, ref, f"image features at {side}")
    assert len(hidden) == len(ref_hidden) == expert.vision.num_layers + 1
    for i, (a, b) in enumerate(zip(hidden, ref_hidden)):
      assert_close(a, b, f"image hidden state {i} at {side}")


def test_text_features_and_hidden_states(pair):
  _, expert, ids, ours, theirs = pair
  feats, hidden = ours[1]
  ref, ref_hidden = theirs["text"]
  assert ids.shape == (len(TEXTS), expert.max_length)
  assert_close(feats, ref, "text features")
  assert len(hidden) == len(ref_hidden) == expert.text.num_layers + 1
  for i, (a, b) in enumerate(zip(hidden, ref_hidden)):
    assert_close(a, b, f"text hidden state {i}")


@pytest.mark.parametrize("pair", [CONFIGS[1]], indirect=True,
                         ids=[CONFIGS[1][0]])
def test_siglip2_gemma_tokenizer(pair):
  """A SigLIP 2 folder (model_type "siglip", Gemma tokenizer files only)
  loads with its own tokenizer, and encode_text (the public path) gives
  the reference's text features."""
  _, expert, ids, _, theirs = pair
  files = set(os.listdir(expert.path))
  assert "spiece.model" not in files
  assert {"tokenizer.json", "tokenizer_config.json"} <= files
  assert expert.has_text and expert.family == "siglip"
  assert type(expert.tokenizer).__name__ == "GemmaTokenizer"
  assert expert.max_length == 16
  # By hand from VOCAB and MERGES: no bos, eos appended, right padding
  # with <pad> (id 0).
  want = ["a", "\u2581c", "h", "est", "\u2581", "x", "-", "r", "a", "y"]
  index = {t: i for i, t in enumerate(VOCAB)}
  expected = [index[t] for t in want] + [index["<eos>"]]
  expected += [index["<pad>"]] * (16 - len(expected))
  np.testing.assert_array_equal(ids[0], expected)
  assert_close(expert.encode_text(TEXTS), theirs["text"][0],
               "encode_text")


def test_naflex_siglip2_folder_is_refused(tmp_path):
  """A NaFlex folder (model_type "siglip2") is not read as SigLIP."""
  (tmp_path / "config.json").write_text('{"model_type": "siglip2"}')
  with pytest.raises(UserError,
                     match="siglip2.* NaFlex variant.*fixed-resolution"):
    experts.load(str(tmp_path))
