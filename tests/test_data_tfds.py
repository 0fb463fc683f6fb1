"""Prepared ArrayRecord shards give the raw folder's labels and pixels."""

import os

import grain
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import test_data_mimic as mimic_fixture
import test_data_vindr as vindr_fixture
from medbridge_jax.data import dicom
from medbridge_jax.data import images
from medbridge_jax.data import registry
from medbridge_jax.data import synthetic
from medbridge_jax.data import tfds_builders
from medbridge_jax.errors import UserError


D, E = "0" * 31 + "d", "0" * 31 + "e"  # two more training images


def _vindr_root(tmp_path):
  root = str(tmp_path / "vindr")
  vindr_fixture._write(
      root, "annotations/image_labels_train.csv", vindr_fixture.TRAIN + [
          vindr_fixture._row(i, f"R{r}", [r]) for i in (D, E) for r in (1, 2)])
  vindr_fixture._write(root, "annotations/image_labels_test.csv",
                       vindr_fixture.TEST)
  rng = np.random.default_rng(0)
  for k, rel in enumerate((f"train/{vindr_fixture.A}.dicom",
                           f"train/{vindr_fixture.B}.dicom",
                           f"train/{D}.dicom", f"train/{E}.dicom",
                           f"test/{vindr_fixture.C}.dicom")):
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    dicom.write_dicom(
        os.path.join(root, rel),
        rng.integers(0, 4096, (48, 36 + 4 * k)).astype(np.uint16),
        bits_stored=12, window=(2048, 3000) if k else None,
        photometric="MONOCHROME1" if k != 1 else "MONOCHROME2")
  return root


def _mimic_root(tmp_path):
  root = tmp_path / "mimic"
  root.mkdir()
  mimic_fixture._fixture(root)
  rng = np.random.default_rng(1)
  for split in ("train", "valid", "test"):
    for rel in registry.read_index("mimic", str(root), split).paths:
      os.makedirs(os.path.dirname(root / rel), exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (50, 40), dtype=np.uint8)).save(
          root / rel, quality=90)
  return str(root)


def _assert_same(source, index, size):
  """Record i of the source is row i of the index, pixels included."""
  assert len(source) == len(index)
  for i in range(len(index)):
    record = source[i]
    assert record["path"].decode() == index.paths[i]
    assert record["patient"].decode() == index.patients[i]
    assert record["study"].decode() == index.studies[i]
    np.testing.assert_array_equal(record["labels"], index.labels[i])
    want = images.read_image(os.path.join(index.root, index.paths[i]), size)
    assert record["image"].shape == (size, size, 1)
    np.testing.assert_array_equal(record["image"][..., 0], want)


def _assert_same_index(got, want):
  assert (got.dataset, got.split) == (want.dataset, want.split)
  assert got.paths == want.paths and got.patients == want.patients
  assert got.studies == want.studies and got.label_names == want.label_names
  np.testing.assert_array_equal(got.labels, want.labels)


def test_vindr_dicom_shards_match_raw_folder(tmp_path):
  root = _vindr_root(tmp_path)
  data_dir = str(tmp_path / "tfds")
  b = tfds_builders.prepare("vindr", root, data_dir, 40, rule="any")
  assert set(b.info.splits) == {"train", "valid", "test"}
  assert b.info.metadata["label_names"] == list(
      registry.read_index("vindr", root, "train").label_names)
  assert b.info.metadata["reader_options"] == {"rule": "any"}
  for split in ("train", "valid", "test"):
    index = registry.read_index("vindr", root, split, rule="any")
    source = tfds_builders.data_source("vindr", data_dir, split, 40,
                                       rule="any")
    # grain reads the same records through the tfds data source.
    _assert_same(grain.MapDataset.source(source), index, 40)
    # The index stored with the shards needs neither label files nor images.
    _assert_same_index(tfds_builders.prepared_index(
        "vindr", data_dir, split, 40, rule="any"), index)
  # Another rule is another config, prepared separately.
  with pytest.raises(UserError, match="not prepared"):
    tfds_builders.data_source("vindr", data_dir, "train", 40)


def test_mimic_named_config_through_tfds_data_source(tmp_path):
  root = _mimic_root(tmp_path)
  data_dir = str(tmp_path / "tfds")
  tfds_builders.prepare("mimic", root, data_dir, 256)
  for split in ("train", "valid", "test"):
    index = registry.read_index("mimic", root, split)
    source = tfds.data_source("medbridge_mimic/s256", split=split,
                              data_dir=data_dir, download=False)
    _assert_same(source, index, 256)
  # Blank labels survive the round trip as nan.
  assert np.isnan(tfds_builders.data_source(
      "mimic", data_dir, "valid", 256)[0]["labels"]).sum() == 13


def test_bad_image_error_or_skip(tmp_path):
  root = _vindr_root(tmp_path)
  bad = registry.read_index("vindr", root, "train").paths[1]
  with open(os.path.join(root, bad), "wb") as f:
    f.write(b"broken")
  with pytest.raises(UserError, match=f"{bad}: not a readable DICOM"):
    tfds_builders.prepare("vindr", root, str(tmp_path / "a"), 16)
  b = tfds_builders.prepare("vindr", root, str(tmp_path / "b"), 16,
                            on_bad_image="skip", num_workers=2)
  skipped = b.info.metadata["skipped"]
  assert sum(skipped.values(), []) == [bad]
  for split, paths in skipped.items():
    index = registry.read_index("vindr", root, split)
    keep = [i for i, p in enumerate(index.paths) if p not in paths]
    _assert_same(b.as_data_source(split), index.select(keep), 16)
    # The prepared index leaves the skipped image out too: row i, record i.
    _assert_same_index(
        tfds_builders.prepared_index("vindr", str(tmp_path / "b"), split, 16),
        index.select(keep))


def test_command_line(tmp_path, capsys):
  root = _vindr_root(tmp_path)
  status = tfds_builders.main([
      "--dataset=vindr", f"--root={root}", f"--data_dir={tmp_path}/c",
      "--image_size=16", "--workers=0", "--option", "variant=physionet"])
  out = capsys.readouterr().out
  assert status == 0 and "train: 3 images, 0 skipped" in out
  with pytest.raises(SystemExit):
    tfds_builders.main(["--dataset=vindr", f"--root={tmp_path}/none",
                        f"--data_dir={tmp_path}/c"])
  assert "does not exist" in capsys.readouterr().err


def test_a_split_with_no_good_image_is_an_error(tmp_path):
  root = _vindr_root(tmp_path)
  with open(os.path.join(root, f"test/{vindr_fixture.C}.dicom"), "wb") as f:
    f.write(b"broken")
  with pytest.raises(UserError, match="every image of vindr split 'test' is "
                     "missing or corrupt, e.g. .*not a readable DICOM"):
    tfds_builders.prepare("vindr", root, str(tmp_path / "a"), 16,
                          on_bad_image="skip")


def _rsna_root(tmp_path):
  root = tmp_path / "rsna"
  (root / "stage_2_train_images").mkdir(parents=True)
  ids = [f"{k:08x}-14fd-4e49-80ba-63a80b6bddd6" for k in range(10)]
  rows = ["patientId,x,y,width,height,Target"]
  for k, p in enumerate(ids):
    rows.append(f"{p},1,2,3,4,1" if k % 3 == 0 else f"{p},,,,,0")
    dicom.write_dicom(str(root / "stage_2_train_images" / f"{p}.dcm"),
                      np.full((20, 20), 10 * k, np.uint8))
  (root / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
  return str(root)


def test_every_other_builder_matches_its_reader(tmp_path):
  cache = str(tmp_path / "cache")
  chexpert_root = synthetic.ensure(cache, 4, 0, "chexpert", 64)
  nih_root = synthetic.ensure(cache, 4, 0, "nih", 64)
  cases = [("chexpert", chexpert_root, ("train", "valid", "test")),
           ("nih", nih_root, ("train", "valid", "test")),
           ("synthetic", chexpert_root, ("train", "valid", "test")),
           ("synthetic", nih_root, ("train", "valid", "test")),
           ("rsna", _rsna_root(tmp_path), ("train", "valid", "test"))]
  for k, (name, root, splits) in enumerate(cases):
    b = tfds_builders.prepare(name, root, str(tmp_path / f"tfds{k}"), 24)
    assert tuple(b.info.splits) == splits, name
    for split in splits:
      _assert_same(b.as_data_source(split),
                   registry.read_index(name, root, split), 24)
