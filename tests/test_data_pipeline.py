"""grain pipelines: label alignment, determinism, resume, padding, hosts."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from medbridge_jax import sharding
from medbridge_jax.data import index as index_lib
from medbridge_jax.data import labels
from medbridge_jax.data import pipeline
from medbridge_jax.errors import UserError

N = np.nan
SIZE = 16
ROWS = 10


def _value(row):
  return 10 * row + 5  # each image is flat at a value that names its row


@pytest.fixture
def index(tmp_path):
  paths = []
  for r in range(ROWS):
    rel = f"p{r // 2}/img{r}.png"
    os.makedirs(os.path.join(tmp_path, f"p{r // 2}"), exist_ok=True)
    Image.fromarray(np.full((SIZE, SIZE), _value(r), np.uint8)).save(
        os.path.join(tmp_path, rel))
    paths.append(rel)
  rng = np.random.default_rng(0)
  raw = rng.choice(np.array([1, 0, -1, N], np.float32), size=(ROWS, 3))
  return index_lib.Index(
      dataset="toy", split="train", root=str(tmp_path), paths=tuple(paths),
      patients=tuple(f"p{r // 2}" for r in range(ROWS)),
      studies=tuple(f"p{r // 2}/s{r}" for r in range(ROWS)),
      label_names=("A", "B", "C"), labels=raw)


def _rows_of(images):
  """Row numbers from flat images (no augmentation)."""
  values = images.reshape(len(images), -1)
  assert (values == values[:, :1]).all()
  return (values[:, 0].astype(int) - 5) // 10


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_align_images_and_labels(index):
  it = pipeline.train_batches(index, batch_size=4, seed=0, image_size=SIZE,
                              augment=False, uncertain_policy="ones",
                              blank_policy="ignore", shard=(0, 1))
  batches = _take(it, 5)
  want_t, want_m = labels.targets(index.labels, "ones", "ignore")
  rows = []
  for b in batches:
    assert b["image"].dtype == np.uint8 and b["image"].shape == (4, SIZE, SIZE)
    assert b["targets"].dtype == np.float32 and b["targets"].shape == (4, 3)
    assert set(b) == {"image", "targets", "mask"}
    r = _rows_of(b["image"])
    np.testing.assert_array_equal(b["targets"], want_t[r])
    np.testing.assert_array_equal(b["mask"], want_m[r])
    rows.extend(r.tolist())
  # Two epochs, each a permutation of all rows, in different orders.
  assert sorted(rows[:ROWS]) == list(range(ROWS))
  assert sorted(rows[ROWS:]) == list(range(ROWS))
  assert rows[:ROWS] != rows[ROWS:] and rows[:ROWS] != list(range(ROWS))


def test_available_columns_are_masked(index):
  it = pipeline.train_batches(index, batch_size=5, seed=0, image_size=SIZE,
                              augment=False, available=np.array([1, 0, 1]),
                              shard=(0, 1))
  assert (next(it)["mask"][:, 1] == 0).all()


def test_train_is_deterministic_and_resumes_exactly(index):
  kw = dict(batch_size=3, image_size=SIZE, shard=(0, 1))
  a = pipeline.train_batches(index, seed=7, **kw)
  first = _take(a, 2)
  state = a.get_state()
  json.dumps(state)  # checkpointable as JSON
  rest = _take(a, 4)
  b = pipeline.train_batches(index, seed=7, **kw)
  for x, y in zip(first, _take(b, 2)):
    np.testing.assert_array_equal(x["image"], y["image"])
  c = pipeline.train_batches(index, seed=7, **kw)
  c.set_state(state)
  for x, y in zip(rest, _take(c, 4)):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  d = pipeline.train_batches(index, seed=8, **kw)
  assert any((x["image"] != y["image"]).any()
             for x, y in zip(first, _take(d, 2)))


def test_augmentation_is_small(tmp_path):
  y, x = np.mgrid[0:64, 0:64]
  image = (40 + 2 * x + y).astype(np.uint8)
  aug = pipeline.Augment()
  outs = [aug(image, np.random.default_rng(s)) for s in range(8)]
  diffs = [np.abs(o.astype(int) - image)[8:-8, 8:-8].mean() for o in outs]
  assert all(0 < d < 25 for d in diffs), diffs
  assert len({o.tobytes() for o in outs}) == 8


def test_eval_pads_the_last_batch(index):
  ev = pipeline.eval_batches(index, batch_size=4, image_size=SIZE,
                             shard=(0, 1))
  assert len(ev) == 3
  batches = list(ev)
  assert len(batches) == 3
  np.testing.assert_array_equal(batches[2]["row"], [8, 9, -1, -1])
  np.testing.assert_array_equal(batches[2]["valid"], [1, 1, 0, 0])
  assert (batches[2]["mask"][2:] == 0).all()
  assert (batches[2]["image"][2:] == 0).all()
  rows = np.concatenate([b["row"] for b in batches])
  np.testing.assert_array_equal(rows[:ROWS], np.arange(ROWS))
  images = np.concatenate([b["image"] for b in batches])[:ROWS]
  np.testing.assert_array_equal(_rows_of(images), np.arange(ROWS))
  t, m = labels.targets(index.labels, "ignore", "zeros")
  np.testing.assert_array_equal(
      np.concatenate([b["targets"] for b in batches])[:ROWS], t)
  assert len(list(ev)) == 3  # another pass


def test_hosts_read_disjoint_shards_and_agree_on_batch_count(index):
  seen = []
  for p in range(3):
    ev = pipeline.eval_batches(index, batch_size=2, image_size=SIZE,
                               shard=(p, 3))
    batches = list(ev)
    assert len(batches) == len(ev) == 2  # ceil(ceil(10 / 3) / 2)
    for b in batches:
      seen.extend(b["row"][b["valid"] == 1].tolist())
  assert sorted(seen) == list(range(ROWS))
  train_rows = []
  for p in range(2):
    it = pipeline.train_batches(index, batch_size=5, seed=1, image_size=SIZE,
                                augment=False, shard=(p, 2))
    train_rows.append(set(_rows_of(next(it)["image"]).tolist()))
  assert not train_rows[0] & train_rows[1]
  assert train_rows[0] | train_rows[1] == set(range(ROWS))


def test_bad_image_error_names_the_file(index):
  os.remove(os.path.join(index.root, index.paths[3]))
  it = pipeline.train_batches(index, batch_size=ROWS, seed=0, image_size=SIZE,
                              shard=(0, 1))
  with pytest.raises(UserError, match="img3.png: image file not found"):
    next(it)
  with pytest.raises(UserError, match="img3.png"):
    list(pipeline.eval_batches(index, batch_size=4, image_size=SIZE,
                               shard=(0, 1)))


def test_bad_image_skip_drops_the_row_and_counts_it(index):
  with open(os.path.join(index.root, index.paths[6]), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n broken")
  it = pipeline.train_batches(index, batch_size=3, seed=0, image_size=SIZE,
                              augment=False, on_bad_image="skip", shard=(0, 1))
  rows = np.concatenate([_rows_of(b["image"]) for b in _take(it, 6)])
  assert 6 not in rows and len(set(rows.tolist())) == ROWS - 1
  assert it.skipped == 2  # once per epoch
  assert "img6.png" in it.skipped_paths[0]
  state = it.get_state()
  it2 = pipeline.train_batches(index, batch_size=3, seed=0, image_size=SIZE,
                               augment=False, on_bad_image="skip",
                               shard=(0, 1))
  it2.set_state(state)
  assert it2.skipped == 2
  ev = pipeline.eval_batches(index, batch_size=4, image_size=SIZE,
                             on_bad_image="skip", shard=(0, 1))
  batches = list(ev)
  assert len(batches) == 3 and ev.skipped == 1
  valid_rows = np.concatenate([b["row"][b["valid"] == 1] for b in batches])
  np.testing.assert_array_equal(valid_rows, [0, 1, 2, 3, 4, 5, 7, 8, 9])


def test_worker_processes_give_the_same_batches(index):
  os.remove(os.path.join(index.root, index.paths[2]))
  kw = dict(batch_size=3, seed=5, image_size=SIZE, on_bad_image="skip",
            shard=(0, 1))
  want = _take(pipeline.train_batches(index, **kw), 4)
  it = pipeline.train_batches(index, num_workers=2, **kw)
  try:
    got = _take(it, 4)
    assert it.skipped >= 1  # counted in this process
  finally:
    it.close()
  for x, y in zip(want, got):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_to_global_shards_rows_over_the_data_axis(index):
  assert jax.device_count() == 8
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  ev = pipeline.eval_batches(index, batch_size=8, image_size=SIZE,
                             shard=(0, 1))
  batch = next(iter(ev))
  g = sharding.to_global(batch, mesh)
  assert g["image"].shape == (8, SIZE, SIZE) and g["image"].dtype == np.uint8
  assert g["targets"].sharding.spec == jax.sharding.PartitionSpec("data")
  shards = g["image"].addressable_shards
  assert len(shards) == 8 and all(s.data.shape == (1, SIZE, SIZE)
                                  for s in shards)
  for key in batch:
    np.testing.assert_array_equal(np.asarray(g[key]), batch[key])
  with pytest.raises(UserError, match="divisible"):
    sharding.to_global({"x": np.zeros((6, 2))}, mesh)


def test_argument_errors(index):
  assert sharding.host_batch_size(32, 4) == 8
  with pytest.raises(UserError, match="not divisible"):
    sharding.host_batch_size(30, 4)
  with pytest.raises(UserError, match="on_bad_image"):
    pipeline.train_batches(index, batch_size=2, seed=0, image_size=SIZE,
                           on_bad_image="ignore", shard=(0, 1))
  with pytest.raises(UserError, match="maybe"):
    pipeline.eval_batches(index, batch_size=2, image_size=SIZE,
                          uncertain_policy="maybe", shard=(0, 1))


def _prepared(index):
  """Records as tfds_builders writes them: record i is index row i."""
  from medbridge_jax.data import images  # pylint: disable=g-import-not-at-top
  return [{"image": images.read_image(os.path.join(index.root, p), SIZE)[
      ..., None], "labels": index.labels[i]} for i, p in enumerate(index.paths)]


def test_prepared_records_give_the_same_batches(index):
  prepared = _prepared(index)
  for p in index.paths:  # the files are not read any more
    os.remove(os.path.join(index.root, p))
  kw = dict(batch_size=4, image_size=SIZE, shard=(0, 1))
  raw_index = index
  got = list(pipeline.eval_batches(raw_index, prepared=prepared, **kw))
  rows = np.concatenate([b["row"] for b in got])[:ROWS]
  images = np.concatenate([b["image"] for b in got])[:ROWS]
  np.testing.assert_array_equal(_rows_of(images), rows)
  it = pipeline.train_batches(index, seed=0, augment=False, prepared=prepared,
                              **kw)
  b = next(it)
  t, _ = labels.targets(index.labels, "ignore", "zeros")
  np.testing.assert_array_equal(b["targets"], t[_rows_of(b["image"])])


def test_prepared_records_that_disagree_with_the_index_are_refused(index):
  prepared = _prepared(index)
  prepared[4] = dict(prepared[4], labels=np.full(3, 1.0, np.float32))
  assert not np.array_equal(index.labels[4], prepared[4]["labels"],
                            equal_nan=True)
  ev = pipeline.eval_batches(index, batch_size=4, image_size=SIZE,
                             on_bad_image="skip", prepared=prepared,
                             shard=(0, 1))
  with pytest.raises(UserError, match="prepared record 4 has labels"):
    list(ev)
  with pytest.raises(UserError, match="prepared shards hold 9 records"):
    pipeline.eval_batches(index, batch_size=4, image_size=SIZE,
                          prepared=prepared[:9], shard=(0, 1))
