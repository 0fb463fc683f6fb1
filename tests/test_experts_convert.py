"""`python -m medbridge_jax.experts.convert`: pickled CLIP checkpoints
become open_clip folders that load into experts equal to the source model.

The sources are tiny noised open_clip models in OpenAI's layout (the same
tensor names as OpenAI's CLIP and CheXzero's state dicts) saved with
torch.save, as TorchScript, and as an open_clip hub folder's `.bin`.
"""

import json
import os

import jax
import numpy as np
import pytest

from medbridge_jax import experts
from medbridge_jax.errors import UserError
from medbridge_jax.experts import convert
from medbridge_jax.experts import loader
from medbridge_jax.experts import zero_shot
from medbridge_jax.experts.formats import open_clip as reader

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

# pylint: disable=g-import-not-at-top,wrong-import-order
import open_clip_fixtures as fixtures
from parity import assert_close
# pylint: enable=g-import-not-at-top,wrong-import-order

# OpenAI's CLIP ViT layout at a tiny size; OpenAI's heads are 64 wide.
CONTEXT, VOCAB = 40, 514
OPENAI = {
    "embed_dim": 24, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128,
                   "patch_size": 8},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB,
                 "width": 64, "heads": 1, "layers": 3}}
MEAN, STD = (0.398, 0.398, 0.398), (0.327, 0.327, 0.327)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """(a torch.save'd OpenAI-style state dict, a CLIP tokenizer folder, the
  model)."""
  root = tmp_path_factory.mktemp("source")
  model = fixtures.build(OPENAI, seed=4)
  file = str(root / "best_64_5e-05_original_22000_0.864.pt")
  torch.save(model.state_dict(), file)
  tok = str(root / "tokenizer")
  assert fixtures.clip_tokenizer(tok, CONTEXT) == VOCAB
  return file, tok, model


def _leaves(found):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_leaves_with_path(found.params)}


def _assert_same_params(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def test_openai_state_dict_loads_as_the_reference(source, tmp_path):
  file, tok, model = source
  dst = str(tmp_path / "chexzero")
  lines = []
  written = convert.convert(file, dst, MEAN, STD, tok, log=lines.append)
  assert {reader.SINGLE, reader.CONFIG, "vocab.json",
          "merges.txt"} <= set(written) == set(os.listdir(dst))
  assert any("vocab.json" in l for l in lines)
  cfg = json.loads(open(os.path.join(dst, reader.CONFIG)).read())
  # The architecture read from the shapes is the one the model was built
  # with (heads: OpenAI's 64 channels each).
  assert cfg["model_cfg"] == OPENAI
  assert cfg["preprocess_cfg"] == {"mean": list(MEAN), "std": list(STD)}

  expert = experts.load(dst)
  assert expert.image_mean == MEAN and expert.image_std == STD
  pixels = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
  ids, mask = expert.tokenize(zero_shot.prompts(["edema", "atelectasis"]))
  with torch.no_grad():
    ref_img = model.encode_image(torch.from_numpy(
        np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))).numpy()
    ref_txt = model.encode_text(torch.from_numpy(
        np.where(mask.astype(bool), ids, 0).astype(np.int64))).numpy()
  assert_close(expert.image_features(pixels), ref_img, "image features")
  assert_close(expert.text_features(ids, mask), ref_txt, "text features")
  assert float(expert.logit_scale) == pytest.approx(
      float(model.logit_scale.detach().exp()), rel=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_gives_the_same_weights(source, tmp_path):
  """OpenAI's releases are TorchScript archives: read with torch.jit.load,
  the scripted model's buffers (attn_mask) left out."""
  file, tok, model = source
  scripted = str(tmp_path / "ViT-B-32.pt")
  torch.jit.script(model).save(scripted)
  convert.convert(file, str(tmp_path / "plain"), MEAN, STD, tok,
                  log=lambda _: None)
  convert.convert(scripted, str(tmp_path / "jit"), MEAN, STD, tok,
                  log=lambda _: None)
  _assert_same_params(loader.read(str(tmp_path / "plain")),
                      loader.read(str(tmp_path / "jit")))


def test_a_source_without_mean_std_needs_them(source, tmp_path):
  file, tok, _ = source
  dst = tmp_path / "out"
  with pytest.raises(UserError, match="--mean=a,b,c --std=a,b,c"):
    convert.convert(file, str(dst), None, None, tok)
  assert not dst.exists()
  with pytest.raises(UserError, match="together"):
    convert.convert(file, str(dst), MEAN, None, tok)


def test_open_clip_bin_folder(tmp_path):
  """An open_clip hub folder with only the pickle: config, mean/std and
  tokenizer come from the folder; training checkpoints' wrappers too."""
  cfg = dict(OPENAI, quick_gelu=False, custom_text=True)
  ref_path, model, _ = fixtures.folder(str(tmp_path / "ref"), cfg)
  state = model.state_dict()
  wrapped = {"epoch": 3, "state_dict": {"module." + k: v
                                        for k, v in state.items()}}
  for name, body in (("hub", state), ("wrapped", wrapped)):
    src = tmp_path / name
    src.mkdir()
    for f in os.listdir(ref_path):
      if f != reader.SINGLE:
        (src / f).write_bytes((tmp_path / "ref" / f).read_bytes())
    torch.save(body, src / reader.PICKLE)
    with pytest.raises(UserError, match="convert"):
      loader.read(str(src))  # The loader never unpickles.
    convert.convert(str(src), str(tmp_path / f"{name}_out"),
                    log=lambda _: None)
    got = loader.read(str(tmp_path / f"{name}_out"))
    assert got.image_mean == fixtures.MEAN and got.text is not None
    _assert_same_params(loader.read(ref_path), got)


def test_bad_inputs_leave_no_folder(source, tmp_path):
  file, tok, _ = source
  dst = tmp_path / "out"
  with pytest.raises(UserError, match="tokenizer folder not found"):
    convert.convert(file, str(dst), MEAN, STD, str(tmp_path / "nowhere"))
  # OpenAI's heads are 64 wide: a 32-wide tower is no OpenAI state dict.
  narrow = dict(OPENAI, vision_cfg=dict(OPENAI["vision_cfg"], width=32,
                                        head_width=8))
  other = str(tmp_path / "narrow.pt")
  torch.save(fixtures.build(narrow).state_dict(), other)
  with pytest.raises(UserError, match="image width 32 is not a multiple"):
    convert.convert(other, str(dst), MEAN, STD, tok)
  assert sorted(os.listdir(tmp_path)) == ["narrow.pt"]


class _NotATensor:
  pass


def test_pickles_with_code_objects_are_refused(tmp_path):
  file = tmp_path / "evil.pt"
  torch.save({"visual.conv1.weight": _NotATensor()}, file)
  with pytest.raises(UserError, match="cannot read"):
    convert.convert(str(file), str(tmp_path / "out"), MEAN, STD)


def test_resnet_towers_are_refused():
  shapes = {"visual.layer1.0.conv1.weight": (64, 64, 1, 1),
            "visual.conv1.weight": (32, 3, 3, 3)}
  with pytest.raises(UserError, match="ResNet"):
    convert.openai_model_cfg(shapes, "RN50.pt")


def test_command_line(source, tmp_path, capsys):
  file, _, _ = source
  with pytest.raises(SystemExit) as e:
    convert.main([file, str(tmp_path / "a")])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("medbridge_jax.experts.convert: error: ")
  assert "--mean" in err
  convert.main([file, str(tmp_path / "b"), "--mean=0.4", "--std=0.3,0.3,0.3"])
  out = capsys.readouterr().out
  assert "vision-only" in out and "--tokenizer" in out
  found = loader.read(str(tmp_path / "b"))
  assert found.text is None and found.image_mean == (0.4, 0.4, 0.4)
