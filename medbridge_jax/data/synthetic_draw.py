"""Drawing synthetic chest X-rays: anatomy, findings, labels, exposure, noise.

The image model behind `synthetic` (which writes the publishers' layouts).
Each image is rendered from a small anatomical model, deterministically from
(seed, variant, patient, study):

  * anatomy, shared by a patient's studies: torso and soft tissue, two lung
    fields with rounded apices and sharp costophrenic angles, mediastinum with
    trachea and spine, a heart silhouette, hemidiaphragm domes with a gastric
    bubble, posterior and anterior ribs (curved bright bands) and clavicles;
  * per study: patient position (shift, small rotation), inspiration depth,
    lung vascular texture, exposure (gain, gamma, offset) and quantum noise.

Findings come in two kinds, which `GLOBAL_LABELS` / `FOCAL_LABELS` name:

  * global, visible at the experts' 48-64 px input: Cardiomegaly (heart
    width / thoracic width 0.53-0.65 against 0.40-0.48), Pleural Effusion (a
    basal opacity with a meniscus that blunts the costophrenic angle), Edema
    (a perihilar "bat-wing" haze over both lungs);
  * focal, a few pixels of the 256 px image: Lung Lesion (one to three
    nodules, sharp disks 3-4 px across, persistent over a patient's studies)
    and Pneumothorax (a 1-1.5 px visceral pleural line near the apex and the
    lateral chest wall, with no lung markings beyond it). Their contrast is
    many times the noise at full resolution, but 4-5x average pooling smears
    them below the lung texture (checked in tests/test_data_synthetic.py).
    Two dose knobs make them easier or harder to see (dose-response
    experiments): `focal_scale` multiplies the nodules' radius and the
    pleural line's width, `focal_contrast` their contrast; 1.0 and 1.0 (the
    defaults) give the images above, bit for bit.

Labels follow CheXpert-like prevalences and co-occurrence: cardiac disease
(a patient trait) makes effusion and edema more likely, effusion makes edema
more likely. `reported_labels` writes them as a report labeler would: mostly
blank when the finding is absent, sometimes an explicit 0, uncertain (-1)
for borderline findings, rarely missed; `true_labels` gives the truth.

The "nih" variant draws a domain-shifted look: washed-out contrast, other
gamma, stronger noise, slight blur and a collimation border.
"""

import dataclasses
import math

import numpy as np
from PIL import Image

from medbridge_jax.errors import UserError

VARIANTS = ("chexpert", "nih")
# Seeds every draw, so that the variants' images are independent.
VARIANT_CODES = {"chexpert": 1, "nih": 2}
GLOBAL_LABELS = ("Cardiomegaly", "Edema", "Pleural Effusion")
FOCAL_LABELS = ("Lung Lesion", "Pneumothorax")
LABELS = GLOBAL_LABELS + FOCAL_LABELS  # CheXpert's names
_REF = 256.0  # sizes in pixels below are at this image size
# Lung markings: (feature size in pixels, weight) of smooth noise octaves.
# The 4 px octave is what hides a 3-4 px nodule once 4-5 px are averaged
# into one; it is smooth, so at full resolution the nodule's sharp edge
# still stands out (see tests/test_data_synthetic.py).
_TEXTURE_OCTAVES = ((4, 1.7), (8, 1.0), (16, 1.0))
# Largest focal_scale: a 2.1 px nodule radius becomes 34 px, a lung's width.
MAX_FOCAL_SCALE = 16.0


def check_dose(focal_scale: float, focal_contrast: float) -> None:
  """UserError unless 0 < focal_scale <= MAX_FOCAL_SCALE and
  focal_contrast >= 0 (0 draws the focal findings invisible: labels only)."""
  scale, contrast = float(focal_scale), float(focal_contrast)
  if not (math.isfinite(scale) and 0 < scale <= MAX_FOCAL_SCALE):
    raise UserError(f"data.synthetic.focal_scale={focal_scale} must be in "
                    f"(0, {MAX_FOCAL_SCALE:g}]")
  if not (math.isfinite(contrast) and contrast >= 0):
    raise UserError(f"data.synthetic.focal_contrast={focal_contrast} must be "
                    f"0 or more")


# ---------------------------------------------------------------------------
# The model: a patient's anatomy and a study's findings and exposure.


@dataclasses.dataclass(frozen=True)
class Patient:
  """Anatomy shared by a patient's studies (lengths in image fractions)."""
  pid: int
  sex: str
  age: int
  cx: float  # body midline
  half_width: float  # thorax half-width at the costophrenic angles
  apex: float  # lung apex height
  dome: float  # right hemidiaphragm dome height (image left)
  dome_left: float  # left hemidiaphragm (image right), a little lower
  mediastinum: float  # mediastinum half-width at the top
  ctr: float  # cardiothoracic ratio (enlarged if cardiomegaly)
  heart_height: float  # heart vertical semi-axis
  cardiomegaly: bool
  tissue: float  # soft tissue brightness
  body_extra: float  # soft tissue beyond the ribs
  rib_period: float
  rib_phase: float
  rib_curve: float
  nodules: tuple  # ((x, y, radius_px_at_256, contrast), ...) anatomical


@dataclasses.dataclass(frozen=True)
class Study:
  """One radiograph: position, exposure, findings."""
  index: int  # 0-based study number of the patient
  seed: tuple  # seeds the texture and noise of the rendering
  view: str  # "PA" | "AP"
  age: int
  shift: tuple  # (dx, dy)
  angle: float  # radians
  breath: float  # diaphragm shift
  gain: float
  gamma: float
  offset: float
  noise: float
  effusion: tuple  # ((side, height), ...); side -1 image left, +1 right
  edema: float  # haze strength, 0 = none
  pneumothorax: tuple  # () or (side, depth, extent, contrast, width_px)
  show_nodules: bool
  truth: dict  # label -> severity in [0, 1], or None if absent


def draw_patient(seed: int, pid: int, variant: str = "chexpert") -> Patient:
  """Patient `pid`'s anatomy, a function of (seed, pid, variant) only."""
  rng = np.random.default_rng([seed, VARIANT_CODES[variant], pid, 0])
  u = rng.uniform
  cardiomegaly = bool(rng.random() < 0.14)
  half_width = u(0.34, 0.40)
  patient = dict(
      pid=pid, sex="Male" if rng.random() < 0.55 else "Female",
      age=int(np.clip(rng.normal(60, 16), 18, 90)),
      cx=0.5 + rng.normal(0, 0.01), half_width=half_width,
      apex=u(0.10, 0.15), dome=u(0.70, 0.76), mediastinum=u(0.05, 0.065),
      ctr=u(0.53, 0.65) if cardiomegaly else u(0.40, 0.48),
      heart_height=u(0.12, 0.145), cardiomegaly=cardiomegaly,
      tissue=u(0.40, 0.50), body_extra=u(0.05, 0.09),
      rib_period=u(0.058, 0.07), rib_phase=u(0, 1), rib_curve=u(1.0, 1.8))
  patient["dome_left"] = patient["dome"] + u(0.01, 0.03)
  nodules = []
  if rng.random() < 0.11:
    for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
      nodules.append(_nodule_site(rng, patient))
  return Patient(**patient, nodules=tuple(nodules))


def _nodule_site(rng, p) -> tuple:
  """A nodule inside a lung field, clear of the heart and the borders."""
  for _ in range(100):
    side = rng.choice([-1, 1])
    v = rng.uniform(0.15, 0.8)  # apex -> dome
    y = p["apex"] + v * (p["dome"] - p["apex"])
    med = p["mediastinum"] + 0.03 * v
    lat = p["half_width"] * math.sqrt(min(1.0, (v + 0.05) / 0.45))
    if lat - med < 0.06:
      continue
    t = rng.uniform(med + 0.025, lat - 0.025)
    x = p["cx"] + side * t
    hw = p["ctr"] * p["half_width"]
    hh = p["heart_height"] * 1.12
    hx, hy = p["cx"] + 0.4 * hw, p["dome_left"] + 0.02 - hh
    if ((x - hx) / hw) ** 2 + ((y - hy) / hh) ** 2 < 1.4:
      continue
    return (x, y, rng.uniform(1.5, 2.1), rng.uniform(0.27, 0.37))
  return (p["cx"] - 0.2, 0.4, 1.8, 0.3)


def draw_study(patient: Patient, seed: int, k: int,
               variant: str = "chexpert") -> Study:
  """Study `k` of a patient: findings, position, exposure."""
  rng = np.random.default_rng(
      [seed, VARIANT_CODES[variant], patient.pid, k + 1])
  u = rng.uniform
  effusion, edema, pneumothorax = _draw_findings(rng, patient)
  nih = variant == "nih"
  return Study(
      index=k, seed=(seed, VARIANT_CODES[variant], patient.pid, k + 1, 7),
      view="AP" if rng.random() < (0.45 if edema or effusion else 0.3)
      else "PA",
      age=min(90, patient.age + k), shift=(rng.normal(0, 0.012),
                                           rng.normal(0, 0.012)),
      angle=math.radians(rng.normal(0, 1.5)), breath=rng.normal(0, 0.012),
      gain=u(0.78, 0.9) if nih else u(0.9, 1.1),
      gamma=u(1.15, 1.4) if nih else u(0.85, 1.15),
      offset=u(0.06, 0.12) if nih else u(-0.04, 0.04),
      noise=u(0.015, 0.022) if nih else u(0.01, 0.02),
      effusion=effusion, edema=edema, pneumothorax=pneumothorax,
      show_nodules=bool(patient.nodules),
      truth=_truth(patient, effusion, edema, pneumothorax))


def _draw_findings(rng, patient: Patient) -> tuple:
  """A study's (effusion, edema, pneumothorax), as `Study` holds them."""
  u = rng.uniform
  cardiac = 1.0 if patient.cardiomegaly else 0.0
  effusion = ()
  if rng.random() < 0.12 + 0.33 * cardiac:
    sides = [[-1], [1], [-1, 1]][rng.choice(3, p=[0.35, 0.25, 0.4])]
    effusion = tuple((s, u(0.035, 0.16)) for s in sides)
  edema = 0.0
  if rng.random() < 0.06 + 0.25 * cardiac + 0.12 * bool(effusion):
    edema = u(0.25, 1.0)
  pneumothorax = ()
  if rng.random() < 0.09:
    pneumothorax = (int(rng.choice([-1, 1])), u(0.018, 0.05), u(0.35, 0.7),
                    u(0.22, 0.32), u(1.0, 1.6))
  return effusion, edema, pneumothorax


def _truth(patient: Patient, effusion, edema, pneumothorax) -> dict:
  """Label -> severity in [0, 1], or None where the finding is absent."""
  return {
      "Cardiomegaly": ((patient.ctr - 0.53) / 0.12 if patient.cardiomegaly
                       else None),
      "Edema": (edema - 0.25) / 0.75 if edema else None,
      "Pleural Effusion": (max(h for _, h in effusion) - 0.035) / 0.125
                          if effusion else None,
      "Lung Lesion": 1.0 if patient.nodules else None,
      "Pneumothorax": (pneumothorax[1] - 0.018) / 0.032 if pneumothorax
                      else None,
  }


def studies(num_patients: int, seed: int, variant: str):
  """Yields (patient, study, labeler rng) for patients 1..num_patients.

  Each patient has 1-4 studies; the labeler rng (one per patient) draws
  its studies' `reported_labels`, in study order.
  """
  for pid in range(1, num_patients + 1):
    patient = draw_patient(seed, pid, variant)
    rng = np.random.default_rng([seed, VARIANT_CODES[variant], pid, 0, 1])
    for k in range(_num_studies(rng)):
      yield patient, draw_study(patient, seed, k, variant), rng


def _num_studies(rng) -> int:
  return int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))


# ---------------------------------------------------------------------------
# Rendering.


def _sigmoid(x):
  return 0.5 + 0.5 * np.tanh(0.5 * x)


def _texture(rng, size: int, cells: int) -> np.ndarray:
  """Smooth unit-variance noise with features of about size/cells pixels."""
  white = rng.standard_normal((cells, cells)).astype(np.float32)
  up = np.asarray(Image.fromarray(white, "F").resize(
      (size, size), Image.Resampling.BICUBIC))
  return (up - up.mean()) / (up.std() + 1e-6)


def render(patient: Patient, study: Study, size: int = 256,
           variant: str = "chexpert", focal_scale: float = 1.0,
           focal_contrast: float = 1.0) -> tuple[np.ndarray, dict]:
  """Renders one radiograph.

  The smooth anatomy is computed on a half-resolution grid and upsampled
  (its edges are about two pixels wide anyway); lung texture, the focal
  findings and the noise are made at full resolution. `focal_scale`
  multiplies the nodules' radius and the pleural line's width,
  `focal_contrast` their contrast (see `check_dose`); at 1.0 they change
  nothing (x * 1.0 is x exactly in floating point).

  Returns:
    (image, geometry): float32 (size, size) in [0, 1] before quantisation,
    and where the focal findings are, in pixels: "nodules": [(row, col,
    radius)], "pleural_line": bool (size, size) mask of the pneumothorax
    line, "lungs": bool (size, size) mask of the lung fields.
  """
  rng = np.random.default_rng(list(study.seed))
  n = max(32, size // 2)
  anatomy, amplitude, lungs = _anatomy(patient, study, n)
  img = _upsample(anatomy, size)
  texture = sum(w * _texture(rng, size, max(4, size // cell))
                for cell, w in _TEXTURE_OCTAVES)
  img += _upsample(amplitude, size) * texture
  line = _pleural_line(patient, study, size, focal_scale)
  if study.pneumothorax:
    img += study.pneumothorax[3] * focal_contrast * line
  nodules = []
  if study.show_nodules:
    for nx, ny, radius, contrast in patient.nodules:
      nodules.append(_disk(img, nx, ny, radius * focal_scale * size / _REF,
                           contrast * focal_contrast, study, size))
  img = _expose(img, study, size, variant, rng)
  return np.clip(img, 0, 1), {"nodules": nodules, "pleural_line": line > 0.5,
                              "lungs": _upsample(lungs, size) > 0.5}


def _expose(img, study: Study, size: int, variant: str, rng) -> np.ndarray:
  """Exposure, blur (NIH), collimation border (NIH), quantum noise."""
  img = np.clip(img, 1e-6, 1)
  img = study.offset + study.gain * np.exp(study.gamma * np.log(img))
  if variant == "nih":
    img = _blur(img)
    border = int(rng.integers(0, max(1, size // 25)))
    if border:
      img[:border] = img[-border:] = 0.02
  # Triangular noise of standard deviation `noise` (uniforms are 4x cheaper
  # to draw than normals; the shape is irrelevant here).
  u = rng.random((2, size, size), dtype=np.float32)
  img += (study.noise * math.sqrt(6.0)) * (u[0] + u[1] - 1.0)
  return img


def _upsample(a: np.ndarray, size: int) -> np.ndarray:
  if a.shape[0] == size:
    return a.astype(np.float32)
  return np.array(Image.fromarray(a.astype(np.float32), "F").resize(
      (size, size), Image.Resampling.BILINEAR))


def _grid(patient: Patient, study: Study, size: int):
  """Anatomical (x, y) of each pixel centre: shift and rotation undone."""
  c = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
  yy, xx = c[:, None] - study.shift[1], c[None, :] - study.shift[0]
  ca, sa = math.cos(study.angle), math.sin(study.angle)
  return (ca * xx + sa * yy) + 0.5, (-sa * xx + ca * yy) + 0.5


class _Lungs:
  """The lung-field geometry on a grid."""

  def __init__(self, p: Patient, s: Study, x, y):
    self.t = np.abs(x - p.cx)  # distance from the midline
    self.side = np.where(x < p.cx, -1, 1).astype(np.int8)
    self.dome = np.where(self.side < 0, p.dome, p.dome_left) + s.breath
    self.height = self.dome - p.apex
    self.v = (y - p.apex) / self.height  # 0 at the apex, 1 at the dome
    vc = np.clip(self.v, 0, 1)
    self.med = p.mediastinum + 0.03 * vc
    self.q = np.clip((self.v + 0.05) / 0.45, 0, 1)
    self.lat = p.half_width * np.sqrt(self.q)
    frac = np.clip((self.t - self.med) / (p.half_width - self.med), 0, 1)
    self.frac = frac
    self.bottom = self.dome + 0.07 * frac * frac


def _anatomy(p: Patient, s: Study, n: int):
  """(image without texture/focal/noise, texture amplitude, lung fields) on
  an n-grid, each step painting over the previous ones."""
  x, y = _grid(p, s, n)
  g = _Lungs(p, s, x, y)
  e = 1.0 / n  # edges about one grid pixel wide
  img, amplitude, lung, body = _chest(p, s, g, y, e)
  img, centre = _mediastinum(p, g, y, e, body, img)
  img, heart = _heart(p, s, x, y, e, img)
  amplitude = amplitude * (1.0 - heart) * (1.0 - centre)
  img = _abdomen(p, s, g, x, y, e, body, img)
  img = _bones(p, g, y, e, heart, img)
  return img, amplitude, lung


def _chest(p: Patient, s: Study, g: _Lungs, y, e: float):
  """Body and lung fields with their findings: (image, texture amplitude,
  lung fields, body)."""
  t, v = g.t, g.v
  lung = (_sigmoid((t - g.med) / e) * _sigmoid((g.lat - t) / e)
          * _sigmoid((g.bottom - y) / e) * (v > -0.05))
  # Shoulders: the body widens above the apices.
  shoulder = 0.07 * _sigmoid((p.apex + 0.02 - y) / 0.03)
  body = _sigmoid((p.half_width + p.body_extra + shoulder - t) / (3 * e))
  beyond = 0.0
  if s.pneumothorax:
    pside, depth, extent = s.pneumothorax[:3]
    beyond = (_sigmoid(-(g.lat - depth - t) / e) * lung * (g.side == pside)
              * _sigmoid((extent - v) / 0.03))
  hilum = np.exp(-((t - g.med - 0.05) / 0.07) ** 2 - ((v - 0.45) / 0.2) ** 2)
  amplitude = 0.032 * (0.6 + 0.9 * hilum) * lung * (1.0 - beyond)
  img = np.float32(0.04) + (p.tissue - 0.04) * body
  air = 0.2 + 0.09 * hilum - 0.03 * beyond
  img = img + lung * (air - img)
  if s.edema:
    batwing = 0.45 + 0.55 * np.exp(-((t - g.med) / 0.12) ** 2)
    img = img + lung * (0.09 + 0.09 * s.edema) * batwing
  for eside, eh in s.effusion:
    level = g.bottom - eh * (0.45 + 0.8 * g.frac * np.sqrt(g.frac))
    fluid = _sigmoid((y - level) / 0.01) * lung * (g.side == eside)
    img = img + fluid * (0.52 - img) * 0.9
    amplitude = amplitude * (1.0 - 0.8 * fluid)
  return img, amplitude, lung, body


def _mediastinum(p: Patient, g: _Lungs, y, e: float, body, img):
  """Mediastinum, trachea, spine: (image, mediastinum coverage)."""
  t, v = g.t, g.v
  centre = _sigmoid((g.med - t) / e) * (v > -0.4) * body
  img = img + centre * (0.58 - img)
  trachea = _sigmoid((0.012 - t) / e) * _sigmoid((0.3 - v) / 0.02)
  img = img - 0.14 * trachea
  spine = _sigmoid((0.03 - t) / (2 * e))
  img = img + 0.05 * spine * (0.5 + 0.5 * np.cos(2 * np.pi * y / p.rib_period))
  return img, centre


def _heart(p: Patient, s: Study, x, y, e: float, img):
  """The heart, an ellipse resting on the left dome, 30% of it right of the
  midline: (image, heart coverage)."""
  hw = p.ctr * p.half_width
  hh = p.heart_height * (1.12 if p.cardiomegaly else 1.0)
  hx = p.cx + 0.4 * hw
  hy = p.dome_left + s.breath + 0.02 - hh
  rho = np.sqrt(((x - hx) / hw) ** 2 + ((y - hy) / hh) ** 2)
  heart = _sigmoid((1 - rho) * min(hw, hh) / e)
  return img + heart * (0.6 - img), heart


def _abdomen(p: Patient, s: Study, g: _Lungs, x, y, e: float, body, img):
  """Below the diaphragm: liver and stomach, with the gastric bubble."""
  below = (_sigmoid((y - g.bottom) / e) * body * (g.v > 0.5)
           * _sigmoid((p.half_width + 0.02 - g.t) / e))
  img = img + below * (0.6 - img)
  bubble = np.exp(-((x - p.cx - 0.15) / 0.045) ** 2
                  - ((y - p.dome_left - s.breath - 0.045) / 0.022) ** 2)
  return img - 0.2 * bubble * below


def _bones(p: Patient, g: _Lungs, y, e: float, heart, img):
  """Posterior and anterior ribs (fainter over the heart), clavicles."""
  t, v = g.t, g.v
  chest = (_sigmoid((p.half_width + 0.015 - t) / e) * _sigmoid((t - 0.03) / e)
           * _sigmoid((v + 0.2) / 0.02) * _sigmoid((1.05 - v) / 0.02))
  r = (y - p.rib_curve * (t - 0.1) ** 2) / p.rib_period + p.rib_phase
  posterior = np.exp(-((r - np.floor(r) - 0.5) / 0.2) ** 2)
  r2 = (y + 0.55 * t - 0.8 * p.rib_curve * (t - 0.25) ** 2) / (
      1.3 * p.rib_period) + 0.3 * p.rib_phase
  anterior = np.exp(-((r2 - np.floor(r2) - 0.5) / 0.15) ** 2)
  img = img + chest * (0.085 * posterior + 0.04 * anterior) * (1 - 0.6 * heart)
  clavicle = np.exp(-((y - (p.apex + 0.03 - 0.15 * (t - 0.05))) / 0.011) ** 2)
  return img + 0.1 * clavicle * _sigmoid((t - 0.04) / e) * _sigmoid(
      (p.half_width + 0.05 - t) / e)


def _pleural_line(p: Patient, s: Study, size: int,
                  scale: float = 1.0) -> np.ndarray:
  """Coverage (size, size) of the pneumothorax's visceral pleural line,
  `scale` times its drawn width.

  The line runs `depth` inside the lung's lateral border t = lat(y), from the
  apex down to `extent` of the lung height; its distance to the pixel is
  |f| / |grad f| for f = lat - depth - t, exact to first order.
  """
  line = np.zeros((size, size), np.float32)
  if not s.pneumothorax:
    return line
  pside, depth, extent, _, width = s.pneumothorax
  x, y = _grid(p, s, size)
  g = _Lungs(p, s, x, y)
  # d lat / d y, infinite at the apex (where the border is horizontal).
  dlat = (p.half_width * 0.5 / np.sqrt(np.maximum(g.q, 1e-4))
          / (0.45 * g.height)) * (g.q < 1)
  dist = np.abs(g.lat - depth - g.t) / np.sqrt(1.0 + dlat * dlat) * size
  along = _sigmoid((extent - g.v) / 0.03) * (g.side == pside)
  line = np.clip(width * scale * size / _REF / 2 + 0.5 - dist, 0, 1) * along
  line *= (g.lat > g.med + depth + 0.01) * (g.v > -0.05)
  return line.astype(np.float32)


def _blur(a: np.ndarray) -> np.ndarray:
  """Separable [1, 3, 1] / 5 blur, about a Gaussian of sigma 0.55 px: the NIH
  scanner's softer modulation transfer."""
  p = np.pad(a, 1, mode="edge")
  p = (p[:-2] + 3 * p[1:-1] + p[2:]) / 5
  return ((p[:, :-2] + 3 * p[:, 1:-1] + p[:, 2:]) / 5).astype(np.float32)


def _disk(img, nx, ny, radius, contrast, study, size):
  """Adds an antialiased sharp disk at anatomical (nx, ny); returns where."""
  row, col, rows, cols, cover = _disk_cover(nx, ny, radius, study, size)
  if cover is not None:
    img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] += contrast * cover
  return row, col, radius


def _disk_cover(nx, ny, radius, study, size):
  """(row, col) of a disk's centre in pixel-centre coordinates, the pixel
  rows and columns of the window around it, and its coverage there (None
  when the window is empty)."""
  dx, dy = study.shift
  ca, sa = math.cos(study.angle), math.sin(study.angle)
  ax, ay = nx - 0.5, ny - 0.5
  x = ca * ax - sa * ay + 0.5 + dx  # image fraction
  y = sa * ax + ca * ay + 0.5 + dy
  col, row = x * size - 0.5, y * size - 0.5  # pixel-centre coordinates
  r0, c0 = int(math.floor(row)), int(math.floor(col))
  k = int(math.ceil(radius)) + 2
  rows = np.arange(max(0, r0 - k), min(size, r0 + k + 1))
  cols = np.arange(max(0, c0 - k), min(size, c0 + k + 1))
  if not (rows.size and cols.size):
    return row, col, rows, cols, None
  d = np.sqrt((rows[:, None] - row) ** 2 + (cols[None, :] - col) ** 2)
  return row, col, rows, cols, np.clip(radius + 0.5 - d, 0, 1)


# ---------------------------------------------------------------------------
# Where the findings are: the ground truth for localisation.


def finding_boxes(patient: Patient, study: Study, size: int = 256,
                  variant: str = "chexpert", focal_scale: float = 1.0
                  ) -> list[tuple[str, int, int, int, int]]:
  """[(label, x, y, width, height)] of each drawn finding, in pixels of the
  (size, size) image (x, y: the top-left pixel's column and row), labels
  under their CheXpert names.

  A box is the bounding box of pixels on the image's own grid:
    Cardiomegaly      the heart ellipse (rho < 1), where the label is
                      positive;
    Pleural Effusion  one per side: the fluid below its level inside the
                      lung field;
    Lung Lesion       one per nodule: the pixels its disk covers (after the
                      NIH variant's one-pixel blur), the only pixels that
                      differ from the image without it;
    Pneumothorax      the region beyond the visceral pleural line (to the
                      lateral lung border, down to `extent`) with the line.
  Soft-edged regions are cut where their sigmoids cross 0.5. Edema, a haze
  over both lungs, has no box.
  """
  boxes = []
  if patient.cardiomegaly or study.effusion or study.pneumothorax:
    x, y = _grid(patient, study, size)
    g = _Lungs(patient, study, x, y)
    lung = (g.t > g.med) & (g.t < g.lat) & (y < g.bottom) & (g.v > -0.05)
    if patient.cardiomegaly:
      hw = patient.ctr * patient.half_width
      hh = patient.heart_height * 1.12
      hx = patient.cx + 0.4 * hw
      hy = patient.dome_left + study.breath + 0.02 - hh
      boxes.append(("Cardiomegaly", ((x - hx) / hw) ** 2
                    + ((y - hy) / hh) ** 2 < 1))
    for eside, eh in study.effusion:
      level = g.bottom - eh * (0.45 + 0.8 * g.frac * np.sqrt(g.frac))
      boxes.append(("Pleural Effusion",
                    (y > level) & lung & (g.side == eside)))
  masks = [(label, _mask_box(mask)) for label, mask in boxes]
  if study.show_nodules:
    blur = 1 if variant == "nih" else 0
    for nx, ny, radius, _ in patient.nodules:
      _, _, rows, cols, cover = _disk_cover(
          nx, ny, radius * focal_scale * size / _REF, study, size)
      if cover is None or not (cover > 0).any():
        continue
      r = rows[(cover > 0).any(axis=1)]
      c = cols[(cover > 0).any(axis=0)]
      r0, c0 = max(0, r[0] - blur), max(0, c[0] - blur)
      r1, c1 = min(size, r[-1] + 1 + blur), min(size, c[-1] + 1 + blur)
      masks.append(("Lung Lesion", (c0, r0, c1 - c0, r1 - r0)))
  if study.pneumothorax:
    pside, depth, extent = study.pneumothorax[:3]
    beyond = ((g.t > g.lat - depth) & lung & (g.side == pside)
              & (g.v < extent))
    line = _pleural_line(patient, study, size, focal_scale) > 0.5
    masks.append(("Pneumothorax", _mask_box(beyond | line)))
  return [(label, *box) for label, box in masks if box is not None]


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
  """(x, y, width, height) of a boolean mask's pixels, None if empty."""
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(
      mask.any(axis=0))
  if not rows.size:
    return None
  return (int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1),
          int(rows[-1] - rows[0] + 1))


def to_uint8(image01: np.ndarray) -> np.ndarray:
  return np.rint(np.clip(image01, 0, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Labels as written.


def reported_labels(study: Study, rng) -> dict:
  """Training-set codes for `LABELS`, as a report labeler gives them: 1, 0,
  -1 (uncertain) or nan (blank)."""
  out = {}
  for name in LABELS:
    severity = study.truth[name]
    r = rng.random()
    if severity is not None:
      unsure = 0.3 if severity < 0.25 else 0.05
      out[name] = -1.0 if r < unsure else (math.nan if r < unsure + 0.02
                                           else 1.0)
    else:
      out[name] = -1.0 if r < 0.02 else (0.0 if r < 0.3 else math.nan)
  return out


def true_labels(study: Study) -> dict:
  """The true codes for `LABELS`: 1 or 0."""
  return {n: 0.0 if study.truth[n] is None else 1.0 for n in LABELS}
