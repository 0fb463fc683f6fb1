"""The synthetic chest X-ray generator: findings, labels, layout, caching."""

import csv
import dataclasses
import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medbridge_jax.data import chexpert
from medbridge_jax.data import registry
from medbridge_jax.data import splits
from medbridge_jax.data import synthetic
from medbridge_jax.data import synthetic_draw as draw
from medbridge_jax.errors import UserError

SIZE = 256


def _pool(a, k):
  n = a.shape[0] // k * k
  return a[:n, :n].reshape(n // k, k, n // k, k).mean(axis=(1, 3))


def _auroc(pos, neg):
  pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
  return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def _nodule_filter(img):
  """Matched filter for a sharp 3.5 px disk: disk mean minus thin ring mean."""
  yy, xx = np.mgrid[-5:6, -5:6]
  d = np.hypot(yy, xx)
  disk, ring = d <= 1.75, (d > 2.25) & (d <= 4.25)
  kernel = disk / disk.sum() - ring / ring.sum()
  return ndimage.correlate(img.astype(np.float64), kernel, mode="nearest")


def _cell_filter(img):
  """The best detector of a one-pixel spot: the pixel minus its 8 neighbours."""
  kernel = -np.ones((3, 3)) / 8
  kernel[1, 1] = 1
  return ndimage.correlate(img.astype(np.float64), kernel, mode="nearest")


def _jpeg(img01):
  buf = io.BytesIO()
  Image.fromarray(draw.to_uint8(img01), "L").save(buf, "JPEG", quality=95)
  return np.asarray(Image.open(buf), np.float32) / 255


def _nodule_pairs(variant, count=20):
  """(with nodules, same image without, lung mask) for patients with nodules."""
  out, pid = [], 0
  while len(out) < count:
    pid += 1
    patient = draw.draw_patient(0, pid, variant)
    if not patient.nodules:
      continue
    study = draw.draw_study(patient, 0, 0, variant)
    img, geo = draw.render(patient, study, SIZE, variant)
    img0, _ = draw.render(
        patient, dataclasses.replace(study, show_nodules=False), SIZE, variant)
    assert np.abs(img - img0).max() > 0.1  # the only difference: nodules
    out.append((img, img0, ndimage.binary_erosion(geo["lungs"], iterations=4)))
  return out


@pytest.mark.parametrize("variant", draw.VARIANTS)
def test_nodules_are_found_at_full_resolution_but_not_after_pooling(variant):
  """Scan the lungs with a matched filter: does an image contain a nodule?

  At 256 px the strongest response separates images with nodules from the
  same images without them; after 4x or 5x average pooling (the experts'
  64 / 51 px view) the best one-pixel-spot detector is near chance.
  """
  pairs = _nodule_pairs(variant)
  auc = {}
  for k in (1, 4, 5):
    pos, neg = [], []
    for img, img0, lung in pairs:
      if k == 1:
        m1, m0, mask = _nodule_filter(img), _nodule_filter(img0), lung
        if variant == "chexpert":  # as written to disk
          m1, m0 = _nodule_filter(_jpeg(img)), _nodule_filter(_jpeg(img0))
      else:
        m1, m0 = _cell_filter(_pool(img, k)), _cell_filter(_pool(img0, k))
        mask = _pool(lung.astype(float), k) > 0.99
      pos.append(m1[mask].max())
      neg.append(m0[mask].max())
    auc[k] = _auroc(pos, neg)
  # NIH's look (blur, more noise, compressed contrast) costs some of it.
  assert auc[1] >= (0.95 if variant == "chexpert" else 0.9), auc
  assert auc[4] <= 0.7 and auc[5] <= 0.65, auc


def test_pleural_line_contrast_drops_below_clutter_after_pooling():
  """Line contrast over pixel-level clutter: high at 256 px, gone at 64."""
  cnr = {1: [], 4: []}
  for pid in range(1, 13):
    patient = draw.draw_patient(0, pid)
    study = draw.draw_study(patient, 0, 0)
    rng = np.random.default_rng(pid)
    ptx = (int(rng.choice([-1, 1])), rng.uniform(0.018, 0.05),
           rng.uniform(0.35, 0.7), rng.uniform(0.22, 0.32),
           rng.uniform(1.0, 1.6))
    img, geo = draw.render(
        patient, dataclasses.replace(study, pneumothorax=ptx), SIZE)
    img0, _ = draw.render(
        patient, dataclasses.replace(study, pneumothorax=()), SIZE)
    assert geo["pleural_line"].sum() > 30
    for k in cnr:
      a, a0 = (img, img0) if k == 1 else (_pool(img, k), _pool(img0, k))
      line = (geo["pleural_line"] if k == 1
              else _pool(geo["pleural_line"].astype(float), k) > 0.2)
      near = ndimage.binary_dilation(line, iterations=2) & ~(
          ndimage.binary_dilation(line, iterations=1))
      lung = (geo["lungs"] if k == 1
              else _pool(geo["lungs"].astype(float), k) > 0.99)
      clutter = (a0 - ndimage.uniform_filter(a0, 3))[lung].std()
      cnr[k].append((a[line].mean() - a[near].mean()) / clutter)
  assert np.median(cnr[1]) > 6 and min(cnr[1]) > 3, cnr[1]
  assert np.median(cnr[4]) < 1.0, cnr[4]


def _changed_pixels(img, img0, k=4):
  """64 px pixels changed by more than the pixel-level clutter there."""
  a, a0 = _pool(img, k), _pool(img0, k)
  clutter = (a0 - ndimage.uniform_filter(a0, 3)).std()
  return int((np.abs(a - a0) > clutter).sum())


def test_global_findings_change_much_of_the_64px_view_focal_ones_do_not():
  patient = next(p for p in (draw.draw_patient(0, i) for i in range(1, 99))
                 if not p.cardiomegaly and p.nodules)
  study = dataclasses.replace(
      draw.draw_study(patient, 0, 0), effusion=(), edema=0.0,
      pneumothorax=(), show_nodules=False)
  base, _ = draw.render(patient, study)
  big_heart = dataclasses.replace(patient, ctr=0.6, cardiomegaly=True)
  changes = {
      "Cardiomegaly": draw.render(big_heart, study)[0],
      "Pleural Effusion": draw.render(
          patient, dataclasses.replace(study, effusion=((-1, 0.08),)))[0],
      "Edema": draw.render(
          patient, dataclasses.replace(study, edema=0.5))[0],
      "Lung Lesion": draw.render(
          patient, dataclasses.replace(study, show_nodules=True))[0],
  }
  counts = {n: _changed_pixels(img, base) for n, img in changes.items()}
  for name in draw.GLOBAL_LABELS:
    assert counts[name] >= 40, counts
  assert counts["Lung Lesion"] <= 4 * len(patient.nodules), counts


# sha256 of images made by the generator before it had the dose knobs
# (focal_scale, focal_contrast): its float32 renders at 256 px of these
# (patient, study) pairs of seed 0 (nodules and pneumothoraces among them),
# with their pleural-line masks, and every file `ensure` wrote for 6
# patients of seed 3 at 96 px.
_OLD_RENDERS = {
    "chexpert": (
        [(3, 0), (4, 2), (6, 0), (15, 1)],
        "68cb638bab44b07a13dbe1437bfb0ae9e6a4dd6721152ceaf10a0ac64cab4da5"),
    "nih": (
        [(1, 0), (2, 0), (3, 0), (4, 2)],
        "9e93fda5d9c4e54a750a5539e42603dd116a9a905eb66450fd78ef5dad2eb401"),
}
_OLD_FILES = {
    "chexpert":
        "a1d4b5aee5f98ed860ed7e2543f2cacee5495bc3b7936d939d68b7e6baa747d4",
    "nih": "45f3e739440798f9999be9c50e826d190e21587cb83db9f6c2a7968300fb4a2b",
}


def _render_hash(variant, pairs, **dose):
  h = hashlib.sha256()
  for pid, k in pairs:
    p = draw.draw_patient(0, pid, variant)
    img, geo = draw.render(p, draw.draw_study(p, 0, k, variant), SIZE,
                           variant, **dose)
    h.update(img.tobytes())
    h.update(np.asarray(geo["pleural_line"]).tobytes())
  return h.hexdigest()


def _files_hash(root):
  h = hashlib.sha256()
  for folder, _, names in sorted(os.walk(root)):
    for name in sorted(names):
      # .complete holds the generation time; the boxes are checked on their own.
      if name in (".complete", synthetic.BOX_FILE):
        continue
      path = os.path.join(folder, name)
      h.update(os.path.relpath(path, root).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


@pytest.mark.parametrize("variant", draw.VARIANTS)
def test_default_dose_gives_the_images_of_before_bit_for_bit(variant,
                                                             tmp_path):
  pairs, want = _OLD_RENDERS[variant]
  assert _render_hash(variant, pairs) == want
  assert _render_hash(variant, pairs, focal_scale=1.0,
                      focal_contrast=1.0) == want
  assert _render_hash(variant, pairs, focal_scale=1.5) != want
  root = synthetic.ensure(str(tmp_path), 6, 3, variant, 96, focal_scale=1.0,
                          focal_contrast=1.0)
  assert os.path.basename(root) == f"synthetic-{variant}-p6-s3-96px-g2"
  assert _files_hash(root) == _OLD_FILES[variant]


def _identity_exposure(study):
  """The study with exposure x -> x, so a rendered difference is the drawn
  finding itself (noise and texture are the same draws either way)."""
  return dataclasses.replace(study, gain=1.0, gamma=1.0, offset=0.0)


def _changed(img, img0):
  return int((img != img0).sum())


def test_focal_scale_and_contrast_grow_the_drawn_nodule():
  """Patient 3 of seed 0 has one nodule: radius r px, contrast c. Its drawn
  disk covers the pixels within r + 1/2 of its centre, and adds about
  c * pi * r^2 in all (the antialiased disk's area times its contrast)."""
  patient = draw.draw_patient(0, 3)
  (_, _, radius, contrast), = patient.nodules
  study = _identity_exposure(draw.draw_study(patient, 0, 0))
  img0, _ = draw.render(patient, dataclasses.replace(
      study, show_nodules=False, pneumothorax=()))
  counts = {}
  for scale, gain in ((1, 1), (2, 1), (4, 1), (1, 2), (2, 0.5)):
    img, geo = draw.render(patient, dataclasses.replace(
        study, pneumothorax=()), focal_scale=scale, focal_contrast=gain)
    (row, col, r), = geo["nodules"]
    assert r == pytest.approx(radius * scale)
    rows, cols = np.mgrid[:SIZE, :SIZE]
    disk = np.hypot(rows - row, cols - col) < r + 0.5
    changed = img != img0
    assert abs(int(changed.sum()) - int(disk.sum())) <= 2
    assert not (changed & ~disk).any()
    added = float((img - img0).sum())
    assert added == pytest.approx(contrast * gain * np.pi * r * r, rel=0.03)
    counts[scale, gain] = _changed(img, img0)
  assert counts[1, 1] < counts[2, 1] < counts[4, 1]
  assert counts[1, 1] == counts[1, 2]  # Contrast changes no extent.


def test_focal_scale_widens_the_pleural_line():
  """The line's coverage is about `width * scale` pixels across, so what
  it adds doubles with the scale; contrast multiplies it as it is."""
  patient = draw.draw_patient(0, 5)
  study = _identity_exposure(draw.draw_study(patient, 0, 0))
  ptx = (1, 0.03, 0.6, 0.3, 1.2)  # side, depth, extent, contrast, width
  study = dataclasses.replace(study, pneumothorax=ptx, show_nodules=False)
  img0, _ = draw.render(patient, dataclasses.replace(
      study, pneumothorax=ptx[:3] + (0.0,) + ptx[4:]))
  added, changed, mask = {}, {}, {}
  for scale, gain in ((1, 1), (2, 1), (1, 0.5)):
    img, geo = draw.render(patient, study, focal_scale=scale,
                           focal_contrast=gain)
    added[scale, gain] = float((img - img0).sum())
    changed[scale, gain] = _changed(img, img0)
    mask[scale, gain] = int(geo["pleural_line"].sum())
  assert mask[1, 1] > 100
  assert added[2, 1] / added[1, 1] == pytest.approx(2.0, rel=0.05)
  assert added[1, 0.5] / added[1, 1] == pytest.approx(0.5, rel=1e-3)
  assert changed[1, 1] < changed[2, 1]
  assert mask[2, 1] / mask[1, 1] == pytest.approx(2.0, rel=0.25)


def test_dose_knobs_key_the_cache_and_are_checked(tmp_path):
  names = {synthetic.cache_name(4, 2, "chexpert", 64, s, c)
           for s, c in ((1, 1), (2, 1), (1, 2), (2, 2), (1.0000001, 1))}
  assert len(names) == 5
  assert synthetic.cache_name(4, 2, "chexpert", 64, 1.0, 1.0) == (
      "synthetic-chexpert-p4-s2-64px-g2")
  assert synthetic.cache_name(4, 2, "chexpert", 64, 0.5, 1) == (
      "synthetic-chexpert-p4-s2-64px-fs0.5-g2")
  assert draw.draw_patient(0, 3).nodules  # Something to draw larger.
  default = synthetic.ensure(str(tmp_path), 3, 0, "chexpert", 64)
  big = synthetic.ensure(str(tmp_path), 3, 0, "chexpert", 64, focal_scale=4)
  assert big != default and big.endswith("-fs4.0-g2")
  assert _files_hash(big) != _files_hash(default)
  for scale, contrast, key in ((0, 1, "focal_scale"), (-1, 1, "focal_scale"),
                               (17, 1, "focal_scale"),
                               (1, -0.5, "focal_contrast"),
                               (1, float("nan"), "focal_contrast")):
    with pytest.raises(UserError, match=f"data.synthetic.{key}="):
      synthetic.ensure(str(tmp_path), 3, 2, "chexpert", 64,
                       focal_scale=scale, focal_contrast=contrast)


def test_label_groups():
  assert set(draw.GLOBAL_LABELS) == {"Cardiomegaly", "Edema",
                                          "Pleural Effusion"}
  assert set(draw.FOCAL_LABELS) == {"Lung Lesion", "Pneumothorax"}
  assert synthetic.label_names("nih") == ("Cardiomegaly", "Edema", "Effusion",
                                          "Nodule", "Pneumothorax")
  assert synthetic.LABEL_GROUPS["Nodule"] == "focal"
  assert synthetic.LABEL_GROUPS["Effusion"] == "global"
  assert set(draw.LABELS) <= set(chexpert.LABELS)


def test_prevalence_and_co_occurrence():
  truth = []
  for pid in range(1, 1501):
    patient = draw.draw_patient(3, pid)
    study = draw.draw_study(patient, 3, 0)
    truth.append([study.truth[n] is not None for n in draw.LABELS])
  truth = np.array(truth)
  prevalence = dict(zip(draw.LABELS, truth.mean(axis=0)))
  for name, (lo, hi) in {"Cardiomegaly": (0.09, 0.2), "Edema": (0.07, 0.22),
                         "Pleural Effusion": (0.15, 0.3),
                         "Lung Lesion": (0.06, 0.16),
                         "Pneumothorax": (0.05, 0.14)}.items():
    assert lo < prevalence[name] < hi, prevalence
  cardio, effusion = truth[:, 0], truth[:, 2]
  assert effusion[cardio].mean() > 2 * effusion[~cardio].mean()


def test_rendering_is_deterministic_and_seeded():
  p = draw.draw_patient(5, 7)
  a, _ = draw.render(p, draw.draw_study(p, 5, 1), 128)
  b, _ = draw.render(draw.draw_patient(5, 7), draw.draw_study(p, 5, 1), 128)
  np.testing.assert_array_equal(a, b)
  q = draw.draw_patient(6, 7)
  c, _ = draw.render(q, draw.draw_study(q, 6, 1), 128)
  assert np.abs(a - c).mean() > 0.01
  assert a.dtype == np.float32 and a.shape == (128, 128)
  assert 0 <= a.min() and a.max() <= 1


def test_studies_of_a_patient_share_anatomy():
  p = draw.draw_patient(0, 3)
  s0, s1 = draw.draw_study(p, 0, 0), draw.draw_study(p, 0, 1)
  assert s0.seed != s1.seed
  other = draw.draw_patient(0, 4)
  a = _pool(draw.render(p, s0, 128)[0], 8)
  b = _pool(draw.render(p, s1, 128)[0], 8)
  c = _pool(draw.render(other, draw.draw_study(other, 0, 0), 128)[0], 8)
  assert np.abs(a - b).mean() < np.abs(a - c).mean()


@pytest.fixture(scope="module")
def chexpert_root(tmp_path_factory):
  return synthetic.ensure(str(tmp_path_factory.mktemp("cache")), 40, seed=1,
                          variant="chexpert", image_size=128)


def test_chexpert_layout(chexpert_root):
  base = os.path.join(chexpert_root, "CheXpert-v1.0-small")
  for split in ("train", "valid"):
    with open(os.path.join(base, f"{split}.csv")) as f:
      rows = list(csv.reader(f))
    assert tuple(rows[0]) == chexpert.HEADER
    for row in rows[1:]:
      assert row[0].startswith(f"CheXpert-v1.0-small/{split}/patient")
      assert row[0].endswith("/view1_frontal.jpg")
      assert row[3] == "Frontal" and row[4] in ("AP", "PA")
      for name in chexpert.LABELS:
        value = row[chexpert.HEADER.index(name)]
        if name not in draw.LABELS and name != "No Finding":
          assert value == ""
  with open(os.path.join(base, "test_labels.csv")) as f:
    rows = list(csv.reader(f))
  assert tuple(rows[0]) == synthetic.CHEXPERT_TEST_HEADER
  assert all(r[0].startswith("test/patient") for r in rows[1:])
  train = chexpert.read(chexpert_root, "train")
  valid = chexpert.read(chexpert_root, "valid")
  test = chexpert.read(chexpert_root, "test")
  splits.check_disjoint(train, valid, test)
  assert len(set(valid.patients)) == 6  # 15% of 40
  assert len(set(test.patients)) == 4  # 10% of 40
  assert test.paths[0].startswith("CheXpert-v1.0-small/test/patient")
  assert os.path.isfile(os.path.join(chexpert_root, test.paths[0]))
  studies = {}
  for s in train.studies + valid.studies + test.studies:
    studies.setdefault(s.split("/")[0], set()).add(s)
  assert {len(v) for v in studies.values()} <= {1, 2, 3, 4}
  assert len({len(v) for v in studies.values()}) >= 2
  with Image.open(os.path.join(chexpert_root, train.paths[0])) as img:
    assert img.format == "JPEG" and img.mode == "L" and img.size == (128, 128)


def test_labels_as_written(chexpert_root):
  train = synthetic.read(chexpert_root, "train")
  valid = registry.read_index("synthetic", chexpert_root, "valid")
  assert train.dataset == "synthetic"
  assert train.label_names == draw.LABELS
  codes = set(np.unique(train.labels[~np.isnan(train.labels)]).tolist())
  assert codes == {-1.0, 0.0, 1.0} and np.isnan(train.labels).any()
  assert not np.isnan(valid.labels).any()
  assert set(np.unique(valid.labels).tolist()) == {0.0, 1.0}
  test = synthetic.read(chexpert_root, "test")
  assert set(np.unique(test.labels).tolist()) == {0.0, 1.0}
  # Written labels agree with the generator's truth.
  for split in (valid, test):
    for path, written in zip(split.paths, split.labels):
      pid = int(path.split("/patient")[1].split("/")[0])
      k = int(path.split("/study")[1].split("/")[0]) - 1
      study = draw.draw_study(draw.draw_patient(1, pid), 1, k)
      want = [study.truth[n] is not None for n in draw.LABELS]
      np.testing.assert_array_equal(written, want)


def test_ensure_reuses_and_keys_by_parameters(chexpert_root, tmp_path):
  cache = os.path.dirname(chexpert_root)
  marker = os.path.join(chexpert_root, ".complete")
  stamp = os.stat(marker).st_mtime_ns
  assert synthetic.ensure(cache, 40, 1, "chexpert", 128) == chexpert_root
  assert os.stat(marker).st_mtime_ns == stamp
  assert not [n for n in os.listdir(cache) if "partial" in n]
  other = synthetic.ensure(str(tmp_path), 4, 2, "chexpert", 64)
  assert other != chexpert_root and "p4-s2-64px-g2" in other
  with pytest.raises(UserError, match="variant"):
    synthetic.ensure(str(tmp_path), 4, 2, "mimic", 64)
  with pytest.raises(UserError, match="num_patients"):
    synthetic.ensure(str(tmp_path), 1, 2, "chexpert", 64)


def test_generation_is_deterministic(tmp_path):
  a = synthetic.ensure(str(tmp_path / "a"), 3, 4, "chexpert", 64)
  b = synthetic.ensure(str(tmp_path / "b"), 3, 4, "chexpert", 64)
  files = lambda r: sorted(os.path.relpath(os.path.join(d, f), r)
                           for d, _, fs in os.walk(r) for f in fs)
  assert files(a) == files(b)
  for rel in files(a):
    if rel != ".complete":
      with open(os.path.join(a, rel), "rb") as fa, open(
          os.path.join(b, rel), "rb") as fb:
        assert fa.read() == fb.read(), rel


def test_nih_variant_layout(tmp_path):
  root = synthetic.ensure(str(tmp_path), 12, seed=2, variant="nih",
                          image_size=64)
  with open(os.path.join(root, "Data_Entry_2017_v2020.csv")) as f:
    header = f.readline().strip()
    first = f.readline().strip().split(",")
  assert header == ("Image Index,Finding Labels,Follow-up #,Patient ID,"
                    "Patient Age,Patient Gender,View Position,"
                    "OriginalImage[Width,Height],"
                    "OriginalImagePixelSpacing[x,y]")
  assert first[0] == "00000001_000.png" and first[3] == "1"
  findings = first[1].split("|")
  assert findings == ["No Finding"] or set(findings) <= set(
      synthetic.label_names("nih"))
  test = registry.read_index("nih", root, "test")
  train_val = registry.read_index("nih", root, "train_val")
  assert not set(test.patients) & set(train_val.patients)
  assert len(set(test.patients)) == 2  # 20% of 12 patients, rounded
  assert test.paths[0].startswith("images_001/images/")
  with Image.open(os.path.join(root, test.paths[0])) as img:
    assert img.format == "PNG" and img.size == (64, 64)
  syn = synthetic.read(root, "train")
  assert syn.label_names == synthetic.label_names("nih")
  assert set(np.unique(syn.labels).tolist()) <= {0.0, 1.0}
  # Written labels agree with the generator's truth.
  for i, path in enumerate(test.paths):
    pid, k = (int(x) for x in path.split("/")[-1][:-4].split("_"))
    study = draw.draw_study(draw.draw_patient(2, pid, "nih"), 2, k, "nih")
    row = registry.read_index("synthetic", root, "test").labels[i]
    np.testing.assert_array_equal(
        row, [study.truth[n] is not None for n in draw.LABELS])


def test_read_refuses_a_folder_that_is_not_generated(tmp_path):
  with pytest.raises(UserError, match="not a generated synthetic data set"):
    synthetic.read(str(tmp_path), "train")
