"""The generic pre-training that gives the small random experts sight."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from medbridge_jax import default_config
from medbridge_jax import experts
from medbridge_jax.experts import from_config
from medbridge_jax.errors import UserError
from medbridge_jax.experts import pretrain
from medbridge_jax.experts import random_experts

TINY = "clip:width=32,layers=2,heads=2,patch=8,image=32"


def _tiny_tower(spec=TINY, seed=0):
  family, v = random_experts.parse_spec(spec)
  vision, text = random_experts.tower_configs(family, v, 300, 1)
  return vision, random_experts.init_params(vision, text, seed)["vision"]


def test_patches_are_in_token_order():
  # Pixel value = index of its 4x4 patch in row-major order, as the ViT
  # flattens its (grid, grid) patch embeddings into tokens.
  g, p = 3, 4
  rows, cols = np.mgrid[0:g * p, 0:g * p]
  image = (rows // p) * g + cols // p
  got = pretrain._patches(jnp.asarray(image[None], jnp.float32), p)
  assert got.shape == (1, g * g, p, p)
  np.testing.assert_array_equal(got[0].min(axis=(1, 2)), np.arange(g * g))
  np.testing.assert_array_equal(got[0].max(axis=(1, 2)), np.arange(g * g))


def test_targets_on_a_hand_made_batch():
  side, p = 16, 8
  image = np.zeros((1, side, side), np.float32)
  image[0, :8, 8:] = 0.4  # top-right patch
  image[0, 8:12, :8] = 0.8  # upper half of the bottom-left patch
  blobs = np.zeros_like(image)
  blobs[0, 10, 13] = 0.9  # bottom-right patch
  blobs[0, 2, 2] = 0.3  # too faint a coverage to count
  lines = np.zeros_like(image)
  lines[0, 3, :] = 1.0  # through both top patches
  squares = np.zeros_like(image)
  squares[0, 9:15, 1:7] = 1.0  # bottom-left patch
  t = pretrain.targets({
      "image": jnp.asarray(image), "blobs": jnp.asarray(blobs),
      "lines": jnp.asarray(lines), "squares": jnp.asarray(squares),
      "num_blobs": jnp.asarray([1]), "num_lines": jnp.asarray([0]),
      "num_squares": jnp.asarray([1])}, p)
  np.testing.assert_array_equal(t["token_blob"][0], [0, 0, 0, 1])
  np.testing.assert_array_equal(t["token_line"][0], [1, 1, 0, 0])
  np.testing.assert_array_equal(t["token_square"][0], [0, 0, 1, 0])
  values = np.asarray(t["token_values"][0])
  np.testing.assert_allclose(values[:, 0], [0, 0.4, 0.4, 0], atol=1e-6)
  # Bottom-left patch: 2x2 means (0.8, 0.8, 0, 0) around their mean 0.4.
  np.testing.assert_allclose(values[2, 1:], 4 * np.array([0.4, 0.4, -0.4,
                                                          -0.4]), atol=1e-5)
  np.testing.assert_array_equal(t["image_flags"][0], [1, 0, 1])
  thumb = np.asarray(t["image_values"][0]).reshape(4, 4)
  np.testing.assert_allclose(thumb[:2, 2:], 0.4, atol=1e-6)
  np.testing.assert_allclose(thumb[2, :2], 0.8, atol=1e-6)
  np.testing.assert_allclose(thumb[3, :2], 0.0, atol=1e-6)


@pytest.mark.parametrize("shapes,drawn", [("all", ("blob", "line")),
                                          ("heldout", ("square",))])
def test_generic_images_are_consistent_and_deterministic(shapes, drawn):
  a = pretrain.generic_images(jax.random.key(3), 64, 32, shapes)
  b = pretrain.generic_images(jax.random.key(3), 64, 32, shapes)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  image = np.asarray(a["image"])
  assert image.shape == (64, 32, 32)
  assert image.min() >= 0 and image.max() <= 1
  # A coverage map is empty exactly when the image has none of the thing;
  # each variant draws its own things only.
  for thing in pretrain.FLAGS:
    has = np.asarray(a[thing + "s"]).max(axis=(1, 2)) > 0.5
    np.testing.assert_array_equal(has, np.asarray(a[f"num_{thing}s"]) > 0)
    if thing in drawn:
      assert 0 < has.mean() < 1, thing
    else:
      assert not has.any(), thing


def _narrow_things(image, threshold=0.15, area=4):
  """Bright or dark structures no 4x4 square fits in (top-hats), of at least
  `area` pixels and `threshold` contrast: blobs, lines, not squares of 5+ px
  sides, plateaus or smooth texture. Independent of the generator's maps."""
  opened = ndimage.grey_opening(image, size=(4, 4))
  closed = ndimage.grey_closing(image, size=(4, 4))
  narrow = np.maximum(image - opened, closed - image) > threshold
  labels, n = ndimage.label(narrow)
  sizes = ndimage.sum(narrow, labels, index=range(1, n + 1)) if n else []
  return int(np.sum(np.asarray(sizes) >= area))


@pytest.mark.parametrize("side", [48, 64])
def test_heldout_images_draw_no_blobs_and_no_thin_lines(side):
  key = jax.random.key(11)
  held = pretrain.generic_images(key, 128, side, "heldout")
  t = pretrain.targets(held, 8)
  for k in ("token_blob", "token_line"):
    assert not np.asarray(t[k]).any(), k
  assert not np.asarray(t["image_flags"])[:, :2].any()
  assert np.asarray(t["token_square"]).any()
  # The independent check: first that it sees the blobs and lines of the
  # "all" images (and nothing in those without), then that it finds
  # (almost) none in the held-out ones. What it still finds there is where
  # a square meets a blurred edge.
  every = pretrain.generic_images(key, 128, side, "all")
  found = np.array([_narrow_things(im) for im in np.asarray(every["image"])])
  small = np.asarray(every["num_blobs"] + every["num_lines"]) > 0
  assert (found[small] > 0).mean() > 0.75
  assert (found[~small] > 0).mean() < 0.05
  held_found = np.array([_narrow_things(im)
                         for im in np.asarray(held["image"])])
  assert (held_found > 0).mean() < 0.1, (held_found > 0).mean()


def test_unknown_shapes_are_named():
  with pytest.raises(UserError, match="pretrain_shapes='disks'"):
    pretrain.generic_images(jax.random.key(0), 2, 16, "disks")


def _token_blob_auroc(model, variables, vision, key):
  batch = pretrain.generic_images(key, 256, vision.image_size)
  t = pretrain.targets(batch, vision.patch_size)
  out = model.apply({"params": variables},
                    pretrain.family_pixels(batch["image"], vision.family))
  return roc_auc_score(np.asarray(t["token_blob"]).ravel(),
                       np.asarray(out["token_logits"][..., 0]).ravel())


def test_pretraining_teaches_the_tower_to_find_small_blobs():
  vision, params = _tiny_tower()
  key = jax.random.key(99)  # held-out images
  model, before, _ = pretrain.train(vision, params, 0, seed=0)
  model, after, final = pretrain.train(vision, params, 400, seed=0)
  auroc_before = _token_blob_auroc(model, before, vision, key)
  auroc_after = _token_blob_auroc(model, after, vision, key)
  # 400 steps on a 2-layer tower: 0.46 -> 0.73 (the default experts reach
  # about 0.96 on chest-crop nodules after 1,500 steps; README).
  assert auroc_after > 0.65, (auroc_before, auroc_after)
  assert auroc_after > auroc_before + 0.15
  assert set(final) == {"token_flags", "token_values", "image_flags",
                        "image_values"}


def test_pretraining_is_deterministic_and_keeps_the_layout():
  vision, params = _tiny_tower()
  a, _ = pretrain.pretrain(vision, params, 3, seed=5)
  b, _ = pretrain.pretrain(vision, params, 3, seed=5)
  c, _ = pretrain.pretrain(vision, params, 3, seed=6)
  flat = lambda t: dict(jax.tree_util.tree_leaves_with_path(t))
  fa, fb, fc = flat(a), flat(b), flat(c)
  assert fa.keys() == flat(params).keys()
  for k in fa:
    assert fa[k].shape == flat(params)[k].shape
    np.testing.assert_array_equal(fa[k], fb[k])
  assert any(not np.array_equal(fa[k], fc[k]) for k in fa)


def test_written_folder_is_pretrained_vision_with_the_same_text(tmp_path):
  plain = random_experts.write(str(tmp_path / "plain"), TINY, 0)
  trained = random_experts.write(str(tmp_path / "trained"),
                                 TINY + ",pretrain=3", 0)
  with open(os.path.join(trained, "pretraining.json")) as f:
    info = json.load(f)
  assert info["steps"] == 3 and info["seed"] == 0
  assert not os.path.exists(os.path.join(plain, "pretraining.json"))
  w0 = load_file(os.path.join(plain, "model.safetensors"))
  w1 = load_file(os.path.join(trained, "model.safetensors"))
  assert w0.keys() == w1.keys()
  changed = {k for k in w0 if not np.array_equal(w0[k], w1[k])}
  # The vision tower (with CLIP's visual projection) trains; text and logit
  # scale stay as initialised.
  assert changed and all(k.startswith(("vision_model.", "visual_projection."))
                         for k in changed), changed
  assert "vision_model.embeddings.patch_embedding.weight" in changed
  # It loads through the same loader as any checkpoint.
  expert = experts.load(trained)
  images = np.random.RandomState(0).rand(2, 32, 32, 1)
  assert not np.allclose(expert.image_features(expert.normalize_pixels(images)),
                         experts.load(plain).image_features(
                             expert.normalize_pixels(images)))


def test_start_up_line_says_how_the_experts_were_made(caplog, tmp_path,
                                                     monkeypatch):
  monkeypatch.setenv("MEDBRIDGE_CACHE", str(tmp_path))
  config = default_config.get_default()
  with caplog.at_level(logging.INFO):
    from_config.announce(config)
    default_config.shrink_for_local_run(config)  # shapes, no pre-training
    from_config.announce(config)
  pretrained, plain = [r.getMessage() for r in caplog.records
                       if "No pretrained experts configured" in r.getMessage()]
  for line in (pretrained, plain):
    assert "small test-bed experts, not real weights" in line
  assert f"pretrain={default_config.PRETRAIN_STEPS}" in pretrained
  assert "generic synthetic pre-training" in pretrained
  assert "2 shipped with the package" in pretrained
  assert "written once" not in pretrained
  assert "pre-training" not in plain and "pretrain=" not in plain
  assert "shipped" not in plain
  assert f"2 written once to {tmp_path}" in plain
