"""The BERT text tower equals transformers' BertModel and open_clip's
HFTextEncoder (float32, tiny random models, every parameter noised).

All our towers run in one jitted program (XLA compiles dominate the time);
the references run in PyTorch eval mode.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from medbridge_jax.errors import UserError
from medbridge_jax.experts import bert
from medbridge_jax.experts import names

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

# pylint: disable=g-import-not-at-top,wrong-import-order
from parity import assert_close
# pylint: enable=g-import-not-at-top,wrong-import-order

VOCAB, WIDTH, HEADS, MLP, LAYERS, POSITIONS, TYPES = 50, 32, 4, 37, 2, 24, 3
EMBED = 24  # open_clip's joint embedding width.
LENGTHS = (12, 9, 5, 1)  # Tokens before the padding, per row.


def _hf_config(**kwargs):
  return transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, intermediate_size=MLP,
      max_position_embeddings=POSITIONS, type_vocab_size=TYPES,
      pad_token_id=0, **kwargs)


def _randomize(model, seed):
  """Noise on every parameter (HF's init leaves LayerNorms at 1/0 and
  biases at 0, which would hide mapping mistakes)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      scale = 0.2 if p.ndim <= 1 else 1.0 / p.shape[-1] ** 0.5
      noise = torch.randn(p.shape, generator=g) * scale
      if name.endswith("LayerNorm.weight"):
        noise = noise + 1.0
      p.copy_(noise)
  return model.eval()


def _numpy_state(model, prefix=""):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
          if k.startswith(prefix)}


def _ids():
  """(B, T) ids: [CLS]-like first token, random words, then pad (0)."""
  rng = np.random.RandomState(0)
  t = max(LENGTHS)
  ids = rng.randint(1, VOCAB, size=(len(LENGTHS), t)).astype(np.int32)
  for row, n in enumerate(LENGTHS):
    ids[row, n:] = 0
  ids[:, 0] = 2
  return ids


def _open_clip_model(folder, proj, pooler, seed):
  model = open_clip.CustomTextCLIP(
      embed_dim=EMBED,
      vision_cfg=dict(width=32, layers=1, head_width=16, patch_size=8,
                      image_size=32),
      text_cfg=dict(hf_model_name=folder, hf_proj_type=proj,
                    hf_pooler_type=pooler, hf_model_pretrained=False))
  return _randomize(model, seed)


# (name, open_clip hf_proj_type, hf_pooler_type).
OPEN_CLIP = [("mlp_cls", "mlp", "cls_last_hidden_state_pooler"),
             ("linear_mean", "linear", "mean_pooler"),
             ("linear_cls_pooler", "linear", "cls_pooler")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Our outputs and the references', from one jitted program."""
  torch.manual_seed(0)
  ids = _ids()
  keys = ids != 0
  # A given mask replaces ids != pad: hide one word inside row 0.
  mask = keys.astype(np.int32)
  mask[0, 3] = 0
  t_ids = torch.from_numpy(ids.astype(np.int64))

  # transformers' BertModel alone (with its pooler), tensor names from "".
  hf = _randomize(transformers.BertModel(_hf_config()), 1)
  with torch.no_grad():
    out = hf(input_ids=t_ids, attention_mask=torch.from_numpy(mask),
             output_hidden_states=True)
  ref = dict(hidden=[h.numpy() for h in out.hidden_states],
             pooler=out.pooler_output.numpy())
  last = ref["hidden"][-1].astype(np.float64)
  w = mask[..., None].astype(np.float64)
  ref["mean"] = (last * w).sum(1) / w.sum(1)  # open_clip's mean_pooler.
  tensors = _numpy_state(hf)
  base = bert.config_from_hf(hf.config.to_dict(), projection="none",
                             projection_dim=0, pooling="cls_pooler")
  configs = {"hf_pooler": base,
             "hf_mean": dataclasses.replace(base, pooling="mean")}
  params = {
      k: names.to_params(bert.drop_unused(tensors, c, ""),
                         bert.bert_entries(c, "", "proj."))["text"]
      for k, c in configs.items()}

  # open_clip's CustomTextCLIP with a BERT text tower (offline: the config
  # folder is the "hub model name"; random weights, not pretrained).
  folder = str(tmp_path_factory.mktemp("bert_config"))
  _hf_config().save_pretrained(folder)
  oc_tensors = {}
  for i, (name, proj, pooler) in enumerate(OPEN_CLIP):
    model = _open_clip_model(folder, proj, pooler, 10 + i)
    with torch.no_grad():
      ref[name] = model.encode_text(t_ids).numpy()
    found = _numpy_state(model, "text.")
    oc_tensors[name] = found
    c = bert.config_from_tensors(found, "text.transformer.", "text.proj.",
                                 pooling=bert.OPEN_CLIP_POOLERS[pooler],
                                 num_heads=HEADS)
    configs[name] = c
    params[name] = names.to_params(
        bert.drop_unused(found, c, "text.transformer."),
        bert.bert_entries(c, "text.transformer.", "text.proj."))["text"]

  towers = {k: bert.BertTower(c) for k, c in configs.items()}

  def run(params, ids, mask):
    def apply(k, *args, **kw):
      return towers[k].apply({"params": params[k]}, *args, **kw)
    res = {}
    res["hf_pooler"], res["hidden"] = apply("hf_pooler", ids, mask,
                                            output_hidden_states=True)
    res["hf_mean"] = apply("hf_mean", ids, mask)[0]
    for name, _, _ in OPEN_CLIP:
      res[name] = apply(name, ids)[0]
    # The CoOp path: word embeddings in, the rest from the ids.
    k = "mlp_cls"
    embeds = apply(k, ids, method="embed_tokens")
    res["embeds"] = embeds
    res["via_embeds"] = apply(k, embeds, ids, method="encode_embeddings")
    res["via_embeds_mask"] = apply(k, embeds, ids, mask,
                                   method="encode_embeddings")
    res["mlp_cls_mask"] = apply(k, ids, mask)[0]
    # Not a constant shift: the embedding LayerNorm removes that.
    moved = embeds.at[:, 1].add(
        jax.random.normal(jax.random.key(2), embeds.shape[-1:]))
    res["moved"] = apply(k, moved, ids, method="encode_embeddings")
    return res

  ours = jax.tree.map(np.asarray, jax.jit(run)(params, ids, mask))
  return dict(ours=ours, ref=ref, ids=ids, mask=mask, params=params,
              configs=configs, hf_tensors=tensors, oc_tensors=oc_tensors)


def test_hidden_states_equal_bert_model(built):
  ours, ref = built["ours"]["hidden"], built["ref"]["hidden"]
  assert len(ours) == len(ref) == LAYERS + 1
  for i, (a, b) in enumerate(zip(ours, ref)):
    assert_close(a, b, f"hidden state {i}")


def test_cls_pooler_equals_bert_pooler_output(built):
  assert_close(built["ours"]["hf_pooler"], built["ref"]["pooler"],
               "pooler_output")


def test_mean_pooling_uses_the_given_mask(built):
  assert_close(built["ours"]["hf_mean"], built["ref"]["mean"], "mean pooled")


@pytest.mark.parametrize("name", [c[0] for c in OPEN_CLIP])
def test_features_equal_open_clip_encode_text(built, name):
  """No mask given: the tower derives it from the pad id, as open_clip."""
  assert_close(built["ours"][name], built["ref"][name], name)


def test_tokenizer_mask_is_the_derived_mask(built):
  """A mask equal to ids != pad gives the mask-free features; a mask that
  hides a word changes them."""
  ours = built["ours"]
  ids = built["ids"]
  tower = bert.BertTower(built["configs"]["mlp_cls"])
  p = {"params": built["params"]["mlp_cls"]}
  with_keys = jax.jit(lambda p, i, m: tower.apply(p, i, m)[0])(
      p, ids, (ids != 0).astype(np.int32))
  np.testing.assert_allclose(with_keys, ours["mlp_cls"], rtol=0, atol=1e-6)
  assert np.abs(ours["mlp_cls_mask"][0] - ours["mlp_cls"][0]).max() > 1e-3
  np.testing.assert_array_equal(ours["mlp_cls_mask"][1:],
                                ours["mlp_cls"][1:])


def test_encode_embeddings_is_call_bit_for_bit(built):
  ours, params = built["ours"], built["params"]["mlp_cls"]
  np.testing.assert_array_equal(
      ours["embeds"], np.asarray(params["token_embedding"])[built["ids"]])
  np.testing.assert_array_equal(ours["via_embeds"], ours["mlp_cls"])
  np.testing.assert_array_equal(ours["via_embeds_mask"], ours["mlp_cls_mask"])
  # The embeddings, not the ids, are what is encoded; position 1 is
  # padding in the last row (one token), which nothing attends to.
  change = np.abs(ours["moved"] - ours["mlp_cls"]).max(-1)
  assert np.all(change[:-1] > 1e-4) and change[-1] == 0, change


def test_tower_interface_matches_text_tower(built):
  c = built["configs"]["mlp_cls"]
  tower = bert.BertTower(c)
  assert (tower.num_layers, tower.hidden_size) == (LAYERS, WIDTH)
  assert (c.family, c.max_length) == ("bert", POSITIONS)
  assert (c.projection, c.projection_dim, c.projection_hidden) == (
      "mlp", EMBED, (WIDTH + EMBED) // 2)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    tower.apply({"params": built["params"]["mlp_cls"]},
                np.ones((1, POSITIONS + 1), np.int32), method="embed_tokens")


# Names, shapes and configs (no XLA).


def test_open_clip_key_names_are_ours(built):
  """Every tensor open_clip writes is read, or dropped by name (the
  position_ids buffer is names' own ignore list)."""
  for name, proj, pooler in OPEN_CLIP:
    c = built["configs"][name]
    found = set(built["oc_tensors"][name])
    entries = {e.hf_name for e in bert.bert_entries(
        c, "text.transformer.", "text.proj.")}
    skipped = found - entries
    assert skipped <= set(bert.unused_names(c, "text.transformer.")) | {
        "text.transformer.embeddings.position_ids"}, (name, skipped)
    assert entries <= found
    assert ("text.proj.0.weight" in entries) == (proj == "mlp")
    assert ("text.transformer.pooler.dense.weight" in entries) == (
        pooler == "cls_pooler")


def test_round_trip_through_from_params(built):
  c = built["configs"]["hf_pooler"]
  entries = bert.bert_entries(c, "", "proj.")
  back = names.from_params({"text": built["params"]["hf_pooler"]}, entries)
  for k, v in back.items():
    np.testing.assert_array_equal(v, built["hf_tensors"][k])


def test_wrong_shape_tensor_is_named(built):
  c = built["configs"]["mlp_cls"]
  tensors = dict(built["oc_tensors"]["mlp_cls"])
  bad = "text.transformer.encoder.layer.1.intermediate.dense.weight"
  tensors[bad] = tensors[bad][:-1]
  with pytest.raises(UserError, match=bad.replace(".", r"\.")):
    names.to_params(tensors, bert.bert_entries(c, "text.transformer.",
                                               "text.proj."))


def test_pooler_is_dropped_only_by_name(built):
  c = built["configs"]["hf_mean"]
  tensors = built["hf_tensors"]
  entries = bert.bert_entries(c, "", "proj.")
  # Present and unused with "mean" / "cls" pooling: an error unless dropped.
  with pytest.raises(UserError, match="pooler.dense"):
    names.to_params(tensors, entries)
  names.to_params(bert.drop_unused(tensors, c, ""), entries)
  extra = dict(tensors, **{"encoder.extra.weight": np.zeros((2,),
                                                            np.float32)})
  with pytest.raises(UserError, match="encoder.extra.weight"):
    names.to_params(bert.drop_unused(extra, c, ""), entries)
  # Needed with "cls_pooler": missing is an error.
  c2 = built["configs"]["hf_pooler"]
  gone = {k: v for k, v in tensors.items() if not k.startswith("pooler.")}
  with pytest.raises(UserError, match="pooler.dense"):
    names.to_params(bert.drop_unused(gone, c2, ""),
                    bert.bert_entries(c2, "", "proj."))


def test_config_from_tensors_reads_the_shapes(built):
  want = built["configs"]["hf_pooler"]
  got = bert.config_from_tensors(built["hf_tensors"], "", "proj.",
                                 pooling="cls_pooler", num_heads=HEADS)
  assert got == want
  mlp = built["configs"]["mlp_cls"]
  assert (mlp.vocab_size, mlp.hidden_size, mlp.num_layers, mlp.mlp_dim,
          mlp.max_length, mlp.type_vocab_size, mlp.projection_bias) == (
              VOCAB, WIDTH, LAYERS, MLP, POSITIONS, TYPES, False)
  linear = built["configs"]["linear_mean"]
  assert (linear.projection, linear.projection_dim) == ("linear", EMBED)


def _fake_tensors(width, layers=(0, 1), proj=None):
  z = lambda *s: np.zeros(s, np.float32)
  t = {"t.embeddings.word_embeddings.weight": z(30, width),
       "t.embeddings.position_embeddings.weight": z(16, width),
       "t.embeddings.token_type_embeddings.weight": z(2, width)}
  for i in layers:
    t[f"t.encoder.layer.{i}.intermediate.dense.weight"] = z(4 * width, width)
  if proj:
    t.update(proj)
  return t


def test_heads_follow_bert_convention_when_not_given():
  c = bert.config_from_tensors(_fake_tensors(128), "t.", "p.")
  assert (c.num_heads, c.hidden_size, c.mlp_dim, c.num_layers) == (
      2, 128, 512, 2)
  assert (c.projection, c.projection_dim) == ("none", 128)
  assert (c.act, c.eps, c.pad_token_id) == ("gelu", 1e-12, 0)
  with pytest.raises(UserError, match="num_attention_heads"):
    bert.config_from_tensors(_fake_tensors(96), "t.", "p.")
  assert bert.config_from_tensors(_fake_tensors(96), "t.", "p.",
                                  num_heads=3).num_heads == 3


def test_config_from_tensors_errors():
  with pytest.raises(UserError, match=r"encoder\.layer\.1"):
    bert.config_from_tensors(_fake_tensors(64, layers=(0, 2)), "t.", "p.")
  with pytest.raises(UserError, match="word_embeddings"):
    bert.config_from_tensors(_fake_tensors(64), "x.", "p.")
  biased = {"p.0.weight": np.zeros((40, 64)), "p.0.bias": np.zeros(40),
            "p.2.weight": np.zeros((16, 40)), "p.2.bias": np.zeros(16)}
  c = bert.config_from_tensors(_fake_tensors(64, proj=biased), "t.", "p.")
  assert (c.projection, c.projection_hidden, c.projection_dim,
          c.projection_bias) == ("mlp", 40, 16, True)


def test_config_from_hf_errors(tmp_path):
  raw = _hf_config().to_dict()
  with pytest.raises(UserError, match="position_embedding_type"):
    bert.config_from_hf(dict(raw, position_embedding_type="relative_key"),
                        projection="mlp", projection_dim=8)
  with pytest.raises(UserError, match="roberta"):
    bert.config_from_hf(dict(raw, model_type="roberta"), projection="mlp",
                        projection_dim=8)
  with pytest.raises(UserError, match="pooling"):
    bert.config_from_hf(raw, projection="mlp", projection_dim=8,
                        pooling="max")
  with pytest.raises(UserError, match="projection_dim"):
    bert.config_from_hf(raw, projection="linear", projection_dim=0)
  with pytest.raises(UserError, match="hidden_act"):
    bert.config_from_hf(dict(raw, hidden_act="swish"), projection="none",
                        projection_dim=0)
  # A published config.json as saved (defaults filled by transformers).
  path = tmp_path / "config.json"
  _hf_config(hidden_act="gelu_new", layer_norm_eps=1e-6).to_json_file(path)
  c = bert.config_from_hf(json.loads(path.read_text()), projection="mlp",
                          projection_dim=EMBED)
  assert (c.act, c.eps, c.num_heads, c.projection_hidden) == (
      "gelu_new", 1e-6, HEADS, (WIDTH + EMBED) // 2)
