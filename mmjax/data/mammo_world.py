"""Mammography world: embedded full-resolution mammograms, detector boxes and histories.

The embedded data of the multi-instance family with clinical text (MMBCD). Each case is
one view of one breast: a large grey image (`image_size`, default 1024 px; any even size,
2048 included) of a breast on a black background, the chest wall on the image's right
for a right breast and on its left for a left one. The tissue is smooth multi-scale
noise (fat and patchy glandular tissue, denser towards the centre), fibres and ducts
streaming from the nipple towards the chest wall, sometimes the pectoral muscle in the
upper corner. Every image holds benign structures: round well-circumscribed masses,
clusters of calcification specks, lymph nodes with a lucent hilum. A malignant case adds
one small lesion (a core of 20 to 40 px at 1024 px, irregular, denser, with spicules)
placed in the tissue. Physical sizes do not change with `image_size`: a case drawn at
2048 px is the same case at twice the resolution, with the same boxes.

A simulated detector stands in for the reference's offline FocalNet-DINO: rows
`(cx, cy, w, h, score)` normalised to [0, 1] in no particular order (YOLO's layout, as a
`<stem>_preds.txt` holds them), 40 to 200 px at 1024 px. It finds the lesion with
probability `recall` (a jittered box, a high-ish score), boxes most benign structures
and some random tissue (scores that overlap the lesion's, so the lesion is often not the
top box) and sometimes repeats a box nearby (what NMS is for). With `broken_rate`, some
outputs are empty and some rows broken (outside the image, zero width, NaN score), for
the robustness of the code that reads them.

Clinical histories are short template sentences (age, complaint and side, family
history, prior biopsy, a note on earlier imaging) whose words correlate with the label
imperfectly. A few leak-like words ("suspicious", "spiculated", "birads 5", put before the
note's finding) appear in malignant training histories far more often than in the
held-out splits, where they barely differ between the classes: what the reference's
tf-idf keyword masking of training texts counters. Only the leak words leak (the note
around them reads the same in both classes), histories are lower case and leak words
never end a sentence, so the reference's exact, whitespace-token deletion removes them
(a bare "5" stays, as it would there). Some histories are empty. The model reads them
inside the reference's prompt, "Indication: {text}" (`mmjax.data.regions.RegionSpec`).
The text tower's tokenizer (BERT-style WordPiece over `words()`, the histories' whole
vocabulary and the prompt's) ships in `TOKENIZER_DIR`; to rebuild it:

  python -m mmjax.data.mammo_world --output=mmjax/data/assets/mammo_world

Rendering takes about 20-25 ms per 1024 px image on one core (numpy, float32): the tissue is
drawn at half resolution over the rectangle that holds the breast (noise pyramids of
bilinear doublings, fibres looked up in a table along rays) and doubled; structures are
drawn in local patches at full resolution.

Splits, each its own stream of a pure function of (seed, split, index): "train",
"validation" (calibration: temperature scaling) and "test"; the last two are held out.
"""

import dataclasses
import functools
import math
import pathlib

import numpy as np

from mmjax.data.tokenizer import (tokenizer_command, word_level_tokenizer,
                                  write_word_level_tokenizer)

SPLITS = ("train", "validation", "test")
HELD_OUT = ("validation", "test")
SIDES = ("right", "left")
TOKENIZER_DIR = pathlib.Path(__file__).parent / "assets" / "mammo_world"
REFERENCE_SIZE = 1024  # pixel sizes below are at this image size; they scale with it
MIN_BOX, MAX_BOX = 40 / REFERENCE_SIZE, 200 / REFERENCE_SIZE  # detector box sides


def split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"Unknown mammography-world split {split!r}; expected one of {SPLITS}.")
  return SPLITS.index(split)


def _rng(seed: int, *stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, *stream])


# ---------------------------------------------------------------------------------- histories

# complaint: ((P | benign, P | malignant), phrasings)
COMPLAINTS = {
    "lump": ((0.25, 0.45), ("palpable lump in the {side} breast",
                            "lump in the {side} breast for {months} months",
                            "{side} breast lump")),
    "pain": ((0.30, 0.12), ("pain in the {side} breast", "{side} breast pain for {months} months",
                            "{side} mastalgia")),
    "discharge": ((0.12, 0.13), ("{side} nipple discharge", "discharge from the {side} nipple")),
    "retraction": ((0.03, 0.10), ("{side} nipple retraction",
                                  "skin thickening over the {side} breast")),
    "screening": ((0.30, 0.20), ("routine screening", "screening mammogram with no complaints",
                                 "annual screening")),
}
OPENINGS = ("{age} year old female", "{age} year old woman", "female aged {age}")
FAMILY = ((0.15, 0.35), ("family history of breast cancer", "mother had breast cancer",
                         "sister treated for breast cancer"))
NO_FAMILY = (0.4, "no family history of breast cancer")  # said of a share of the others
BIOPSY = ((0.12, 0.18), ("prior biopsy of the {side} breast was benign",
                         "history of fibroadenoma excision"))
AGE = ((47.0, 11.0), (56.0, 10.0))  # (mean, sd) | benign, malignant
# Every history holds a note "{what} {where}"; a leak puts a LEAK_PHRASES word before
# `what`, so the note's other words are the same in both classes and the leak words alone
# carry the leak.
NOTES = (("density", "asymmetry", "change"),
         ("on outside mammogram", "on clinical examination", "on prior ultrasound"))
LEAK_PHRASES = ("suspicious", "spiculated", "birads 5")
LEAK_WORDS = ("suspicious", "spiculated", "birads")
PUNCTUATION = (".", ",", ":")


@dataclasses.dataclass(frozen=True)
class Case:
  """What is known of a case without its image: label, imaged side, history."""

  label: int  # 0 benign or normal, 1 malignant
  side: str  # "right" or "left"
  age: int
  complaint: str  # a key of COMPLAINTS
  history: str  # may be ""


def _pick(rng: np.random.Generator, options) -> str:
  return options[rng.integers(len(options))]


def draw_case(rng: np.random.Generator, malignant_fraction: float, leak: float,
              leak_benign: float, missing_text: float) -> Case:
  """One case; the label is the stream's first draw (`MammoWorld.labels` reads only it)."""
  label = int(rng.random() < malignant_fraction)
  side = SIDES[rng.integers(2)]
  mean, sd = AGE[label]
  age = int(np.clip(round(rng.normal(mean, sd)), 28, 85))
  names = tuple(COMPLAINTS)
  complaint = names[rng.choice(len(names), p=[COMPLAINTS[n][0][label] for n in names])]
  words = {"side": side, "age": age, "months": int(rng.integers(1, 13))}
  sentences = [f"{_pick(rng, OPENINGS)}, {_pick(rng, COMPLAINTS[complaint][1])}".format(**words)]
  if rng.random() < FAMILY[0][label]:
    sentences.append(_pick(rng, FAMILY[1]))
  elif rng.random() < NO_FAMILY[0]:
    sentences.append(NO_FAMILY[1])
  if rng.random() < BIOPSY[0][label]:
    sentences.append(_pick(rng, BIOPSY[1]).format(**words))
  note = f"{_pick(rng, NOTES[0])} {_pick(rng, NOTES[1])}"
  if rng.random() < (leak if label else leak_benign):
    note = f"{_pick(rng, LEAK_PHRASES)} {note}"
  sentences.append(note)
  rest = sentences[1:]
  sentences = sentences[:1] + [rest[i] for i in rng.permutation(len(rest))]
  history = "" if rng.random() < missing_text else ". ".join(sentences) + "."
  return Case(label, side, age, complaint, history)


# --------------------------------------------------------------------------------------- layout

@dataclasses.dataclass(frozen=True)
class Structure:
  """Something drawn in the breast, in normalised image coordinates (x across, y down)."""

  kind: str  # "mass", "calcifications", "node" (benign) or "lesion" (malignant)
  x: float
  y: float
  radius: float  # the body's radius (a cluster's: its spread)
  extent: float  # half the side of the square that holds all of it (spicules included)


@dataclasses.dataclass(frozen=True)
class Layout:
  """A breast's geometry and structures, in normalised coordinates."""

  side: str
  depth: float  # how far the nipple reaches from the chest wall
  half_height: float
  centre_y: float
  density: float  # shifts the share of glandular tissue
  pectoral: tuple[float, float] | None  # (width at the top, height along the wall)
  structures: tuple[Structure, ...]

  @property
  def wall(self) -> float:
    return 1.0 if self.side == "right" else 0.0

  @property
  def toward(self) -> float:  # the direction from the chest wall to the nipple, along x
    return -1.0 if self.side == "right" else 1.0

  def point(self, rho: float, theta: float) -> tuple[float, float]:
    """The point at relative radius `rho` and angle `theta` (0 towards the nipple)."""
    return (self.wall + self.toward * self.depth * rho * math.cos(theta),
            self.centre_y + self.half_height * rho * math.sin(theta))

  def in_pectoral(self, x: float, y: float, margin: float = 0.0) -> bool:
    if self.pectoral is None:
      return False
    width, height = self.pectoral
    return abs(x - self.wall) < width * (1 - y / height) + margin

  @property
  def lesion(self) -> Structure | None:
    return next((s for s in self.structures if s.kind == "lesion"), None)


def _px(pixels: float) -> float:
  """A size in pixels at REFERENCE_SIZE, as a fraction of the image side."""
  return pixels / REFERENCE_SIZE


def draw_layout(rng: np.random.Generator, case: Case) -> Layout:
  """Breast geometry, benign structures and (malignant cases) the lesion, none of them
  overlapping; everything away from the skin line and the pectoral muscle."""
  pectoral = ((float(rng.uniform(0.12, 0.22)), float(rng.uniform(0.35, 0.55)))
              if rng.random() < 0.6 else None)
  layout = Layout(case.side, float(rng.uniform(0.62, 0.85)), float(rng.uniform(0.36, 0.45)),
                  float(rng.uniform(0.46, 0.54)), float(rng.uniform(-0.5, 0.5)), pectoral, ())
  wanted: list[tuple[str, float, float]] = []  # (kind, radius, extent)
  if case.label:
    radius = _px(rng.uniform(10, 20))
    wanted.append(("lesion", radius, radius * rng.uniform(2.0, 2.6)))
  for _ in range(rng.integers(1, 3)):
    radius = _px(rng.uniform(14, 36))
    wanted.append(("mass", radius, radius * 1.1))
  for _ in range(rng.integers(1, 4)):
    radius = _px(rng.uniform(8, 24))
    wanted.append(("calcifications", radius, radius + _px(3)))
  for _ in range(rng.integers(1, 3)):
    radius = _px(rng.uniform(9, 16))
    wanted.append(("node", radius, radius * 1.1))
  placed: list[Structure] = []
  for kind, radius, extent in wanted:
    rho_range, theta_range = ((0.55, 0.85), (-1.4, -0.9)) if kind == "node" else \
        ((0.2, 0.75), (-1.2, 1.2))
    for _ in range(200):
      x, y = layout.point(rng.uniform(*rho_range), rng.uniform(*theta_range))
      if (abs(x - layout.wall) > 0.1 and extent < y < 1 - extent
          and not layout.in_pectoral(x, y, extent)
          and all(math.hypot(x - s.x, y - s.y) > extent + s.extent for s in placed)):
        placed.append(Structure(kind, float(x), float(y), float(radius), float(extent)))
        break
    else:
      if kind == "lesion":  # never: the breast always has room for it
        raise RuntimeError("Cannot place the lesion in the breast.")
  return dataclasses.replace(layout, structures=tuple(placed))


# ------------------------------------------------------------------------------------ rendering

def upsample2(a: np.ndarray) -> np.ndarray:
  """`"h w" -> "2h 2w"` bilinear (pixel centres kept; edges repeated), float32."""
  padded = np.pad(a, 1, mode="edge").astype(np.float32)
  centre = padded[1:-1]
  out = np.empty((2 * a.shape[0], 2 * a.shape[1]), np.float32)
  for row, near in ((0, padded[:-2]), (1, padded[2:])):
    rows = 0.75 * centre + 0.25 * near
    out[row::2, 0::2] = 0.75 * rows[:, 1:-1] + 0.25 * rows[:, :-2]
    out[row::2, 1::2] = 0.75 * rows[:, 1:-1] + 0.25 * rows[:, 2:]
  return out


def fractal_noise(rng: np.random.Generator, size: int, coarsest: int = 4,
                  persistence: float = 0.6, finest: float = 0.06) -> np.ndarray:
  """float32 `"size size"` smooth multi-scale noise (about unit spread): white noise on a
  `coarsest`-cell grid, doubled in resolution (bilinear) with finer, weaker noise added
  at each step, `persistence` the amplitude ratio between steps; steps whose amplitude
  would be below `finest` only double (the detector grain is finer still)."""
  levels = max(0, math.ceil(math.log2(size / coarsest)))
  cells = math.ceil(size / 2 ** levels)
  noise = rng.standard_normal((cells, cells), dtype=np.float32)
  amplitude, total = 1.0, 1.0
  for _ in range(levels):
    noise = upsample2(noise)
    amplitude *= persistence
    if amplitude >= finest:
      total += amplitude ** 2
      noise += amplitude * rng.standard_normal(noise.shape, dtype=np.float32)
  return noise[:size, :size] / np.float32(math.sqrt(total))


def _smooth_1d(rng: np.random.Generator, size: int, knots: int) -> np.ndarray:
  """float32 `"size"`: white noise at `knots` points, linearly interpolated."""
  return np.interp(np.linspace(0, knots - 1, size), np.arange(knots),
                   rng.standard_normal(knots)).astype(np.float32)


def _fibres(rng: np.random.Generator, slope: np.ndarray, distance: np.ndarray) -> np.ndarray:
  """Streaks along rays from the nipple (`slope`: the ray's tangent, in [-4, 4]; distance
  about [0, 1.3]): noise fine across rays, smooth along them, broken into segments."""
  bins, steps, rows = 2048, 20, 64
  along = rng.standard_normal((steps, bins), dtype=np.float32)
  along = 0.5 * (along + np.roll(along, 1, axis=1))
  knots = np.linspace(0, steps - 1, rows)
  low = np.floor(knots).astype(int)
  high, frac = np.minimum(low + 1, steps - 1), (knots - low).astype(np.float32)[:, None]
  table = (1 - frac) * along[low] + frac * along[high]  # "rows bins"
  a = np.clip((slope + 4) * (bins / 8), 0, bins - 1).astype(np.int32)
  d = np.clip(distance * (rows / 1.3), 0, rows - 1).astype(np.int32)
  streaks = np.maximum(table - 0.2, 0) ** 2
  return np.take(streaks.ravel(), d * bins + a)


def _span(lo: float, hi: float, size: int) -> slice:
  """The pixels (of `size`) whose centres may lie in [lo, hi] (normalised)."""
  return slice(max(0, int(lo * size) - 1), min(size, int(math.ceil(hi * size)) + 1))


def _tissue(layout: Layout, size: int, rng: np.random.Generator) -> np.ndarray:
  """float32 `"size size"` in [0, 1]: the breast without its structures, computed only
  over the rectangle that holds it (and the pectoral muscle's)."""
  coords = (np.arange(size, dtype=np.float32) + 0.5) / size
  field = fractal_noise(rng, size)
  wobble = np.clip(0.015 * (_smooth_1d(rng, size, 7)[None, :]
                           + _smooth_1d(rng, size, 7)[:, None]), -0.05, 0.05)
  reach = layout.depth * 1.06 + 0.01  # rho >= 1 - 0.05 holds the breast
  cols = _span(*sorted((layout.wall, layout.wall + layout.toward * reach)), size)
  rows = _span(layout.centre_y - layout.half_height * 1.06 - 0.01,
               layout.centre_y + layout.half_height * 1.06 + 0.01, size)
  x, y, noise = coords[None, cols], coords[rows, None], field[rows, cols]
  dx = (x - layout.wall) / layout.depth
  dy = (y - layout.centre_y) / layout.half_height
  rho = np.sqrt(dx * dx + dy * dy) + wobble[rows, cols]
  inside = np.clip(1 - rho, 0, 1)
  mask = np.minimum(inside * (size * 0.5), 1)  # a 2-pixel edge
  thickness = 1 - 0.85 * (1 - np.minimum(inside * 8, 1)) ** 2
  gland = np.clip(0.5 + 0.7 * noise + layout.density + 1.2 * (0.5 - rho), 0, 1)
  gland = gland * gland * (3 - 2 * gland)  # smoothstep: patches with soft edges
  nipple_x = layout.wall + layout.toward * layout.depth
  along, across = layout.toward * (nipple_x - x), y - layout.centre_y
  slope = across / (np.abs(along) + 0.05)
  fibres = _fibres(rng, slope, np.sqrt(along * along + across * across))
  value = 0.28 + 0.30 * gland + 0.05 * fibres * (0.3 + gland) + 0.03 * noise
  image = np.zeros((size, size), np.float32)
  image[rows, cols] = mask * thickness * value
  if layout.pectoral is not None:
    width, height = layout.pectoral
    rows = _span(0, height, size)
    cols = _span(*sorted((layout.wall, layout.wall + layout.toward * width)), size)
    x, y = coords[None, cols], coords[rows, None]
    muscle = np.clip((width * (1 - y / height) - np.abs(x - layout.wall)) * size * 0.5, 0, 1)
    view = image[rows, cols]
    np.maximum(view, (0.6 + 0.05 * field[rows, cols]) * muscle, out=view)
  return image


def _patch(image: np.ndarray, structure: Structure):
  """`(view, dx, dy)`: the image pixels around `structure` and their offsets from its
  centre in pixels (`"1 w"`, `"h 1"`)."""
  size = image.shape[0]
  cx, cy, half = structure.x * size, structure.y * size, structure.extent * size + 2
  x0, x1 = max(0, int(cx - half)), min(size, int(math.ceil(cx + half)))
  y0, y1 = max(0, int(cy - half)), min(size, int(math.ceil(cy + half)))
  dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
  dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
  return image[y0:y1, x0:x1], dx, dy


def _edge(d: np.ndarray, softness: float) -> np.ndarray:
  """1 inside `d < 1`, 0 outside, linear over a relative width `softness`."""
  return np.clip((1 - d) / softness + 0.5, 0, 1)


def _draw(image: np.ndarray, structure: Structure, rng: np.random.Generator, scale: float):
  view, dx, dy = _patch(image, structure)
  radius = structure.radius * image.shape[0]
  if structure.kind == "lesion":
    r, theta = np.sqrt(dx * dx + dy * dy), np.arctan2(dy, dx)
    harmonics = np.arange(2, 8, dtype=np.float32)[:, None, None]
    wobble = (rng.uniform(0, 0.1, 6)[:, None, None].astype(np.float32)
              * np.cos(harmonics * theta + rng.uniform(0, 2 * np.pi, 6)[:, None, None]))
    boundary = radius * (1 + wobble.sum(0))
    body = _edge(r / boundary, 0.15) * (0.8 + 0.4 * np.clip(1 - r / radius, 0, 1))
    count = int(rng.integers(6, 15))
    angles = rng.uniform(0, 2 * np.pi, count)[:, None, None]
    lengths = structure.extent * image.shape[0] * rng.uniform(0.7, 1.0, count)[:, None, None]
    widths = scale * rng.uniform(1.0, 2.2, count)[:, None, None]
    run = r * np.cos(theta - angles)
    off = r * np.sin(theta - angles)
    taper = np.clip((lengths - run) / (lengths - radius), 0, 1)
    spicules = (np.exp(-(off / widths) ** 2) * taper * (run > 0)).max(0)
    view += rng.uniform(0.22, 0.30) * np.maximum(body, 0.8 * spicules)
  elif structure.kind == "mass":
    angle, ratio = rng.uniform(0, np.pi), rng.uniform(0.75, 1.0)
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / radius
    v = (dy * np.cos(angle) - dx * np.sin(angle)) / (radius * ratio)
    d = np.sqrt(u * u + v * v)
    view += rng.uniform(0.08, 0.16) * _edge(d, 4 * scale / radius) * (0.9 + 0.1 * (d < 0.8))
  elif structure.kind == "node":
    angle, ratio = rng.uniform(0, np.pi), rng.uniform(0.55, 0.75)
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / radius
    v = (dy * np.cos(angle) - dx * np.sin(angle)) / (radius * ratio)
    outer = _edge(np.sqrt(u * u + v * v), 0.1)
    hilum = _edge(np.sqrt(((u - 0.45) / 0.5) ** 2 + (v / 0.45) ** 2), 0.3)
    view += rng.uniform(0.10, 0.16) * outer * (1 - 0.8 * hilum)
  else:  # a cluster of calcification specks
    count = int(rng.integers(3, 11))
    spread = rng.uniform(0, radius, count) * np.sqrt(rng.uniform(0, 1, count))
    where = rng.uniform(0, 2 * np.pi, count)
    sx = (spread * np.cos(where))[:, None, None]
    sy = (spread * np.sin(where))[:, None, None]
    sigma = scale * rng.uniform(0.7, 1.8, count)[:, None, None]
    specks = np.exp(-((dx - sx) ** 2 + (dy - sy) ** 2) / (2 * sigma ** 2)).max(0)
    view += rng.uniform(0.35, 0.55) * specks


def render(layout: Layout, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 `"h w"`: the breast and the detector's grain drawn at half resolution and
  doubled, then its structures at full resolution."""
  half = _tissue(layout, image_size // 2, rng)
  grain = rng.random(half.shape, dtype=np.float32)
  grain -= 0.5
  half += np.where(half > 0.02, np.float32(0.06) * grain, np.float32(0))
  image = upsample2(half)
  scale = image_size / REFERENCE_SIZE
  for structure in layout.structures:
    _draw(image, structure, rng, scale)
  np.clip(image, 0, 1, out=image)
  image *= 255
  image += 0.5
  return image.astype(np.uint8)


# ------------------------------------------------------------------------------------- detector

def _box(rng: np.random.Generator, x: float, y: float, side: float, jitter: float) -> list:
  """A box of about `side` around (x, y), moved by `jitter` of its side, 40-200 px, cut to
  the image."""
  w, h = np.clip(side * np.exp(rng.normal(0, 0.15, 2)), MIN_BOX, MAX_BOX)
  cx, cy = np.array([x, y]) + rng.normal(0, jitter, 2) * (w, h)
  x0, y0 = max(0.0, cx - w / 2), max(0.0, cy - h / 2)
  x1, y1 = min(1.0, cx + w / 2), min(1.0, cy + h / 2)
  return [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]


def detect(layout: Layout, rng: np.random.Generator, recall: float, tissue_boxes: float,
           broken_rate: float = 0.0) -> np.ndarray:
  """float32 `"n 5"` rows `(cx, cy, w, h, score)`, normalised, in no particular order."""
  rows = []
  for s in layout.structures:
    if s.kind == "lesion":
      if rng.random() < recall:
        rows.append(_box(rng, s.x, s.y, 2 * s.extent * rng.uniform(0.9, 1.3), 0.08)
                    + [0.35 + 0.6 * rng.beta(3, 2)])
    elif rng.random() < 0.7:
      rows.append(_box(rng, s.x, s.y, 2 * s.extent * rng.uniform(1.1, 1.8), 0.1)
                  + [rng.uniform(0.15, 0.9)])
  for _ in range(rng.poisson(tissue_boxes)):
    x, y = layout.point(rng.uniform(0.1, 0.85), rng.uniform(-1.3, 1.3))
    side = math.exp(rng.uniform(math.log(MIN_BOX), math.log(MAX_BOX)))
    rows.append(_box(rng, x, y, side, 0.0) + [rng.uniform(0.02, 0.65)])
  for row in list(rows):  # detectors repeat themselves: what NMS removes
    if rng.random() < 0.25:
      rows.append(_box(rng, row[0], row[1], math.sqrt(row[2] * row[3]), 0.15)
                  + [row[4] * rng.uniform(0.6, 1.0)])
  boxes = np.asarray(rows, np.float32).reshape(-1, 5)[rng.permutation(len(rows))]
  if broken_rate and rng.random() < broken_rate:
    return np.zeros((0, 5), np.float32)
  for i in np.flatnonzero(rng.random(len(boxes)) < broken_rate):
    kind = rng.integers(3)
    if kind == 0:  # outside the image
      boxes[i, rng.integers(2)] = rng.choice([-1, 1]) * rng.uniform(1.1, 1.5)
    elif kind == 1:  # zero width or height
      boxes[i, 2 + rng.integers(2)] = 0
    else:
      boxes[i, 4] = np.nan
  return boxes


# ---------------------------------------------------------------------------------------- world

@dataclasses.dataclass(frozen=True)
class MammoWorld:
  """Deterministic generator: every method derives its own RNG from (seed, split, index).

  Attributes:
    image_size: the image side in pixels (even); structures keep their physical size.
    malignant_fraction: the share of malignant cases (in every split).
    recall: the detector's chance of boxing the lesion.
    tissue_boxes: the mean number of detector boxes on random tissue per image.
    broken_rate: the share of empty detector outputs, and of broken rows in the others.
    leak: the chance of a leak sentence in a malignant history, (train, held out).
    leak_benign: the same for a benign history, in every split.
    missing_text: the share of empty histories.
  """

  seed: int = 0
  image_size: int = REFERENCE_SIZE
  malignant_fraction: float = 0.28
  recall: float = 0.85
  tissue_boxes: float = 4.0
  broken_rate: float = 0.0
  leak: tuple[float, float] = (0.6, 0.06)
  leak_benign: float = 0.04
  missing_text: float = 0.03

  def __post_init__(self):
    object.__setattr__(self, "leak", tuple(self.leak))
    if self.image_size < 128 or self.image_size % 2:
      raise ValueError(f"image_size must be even and at least 128, got {self.image_size}.")
    rates = {"malignant_fraction": self.malignant_fraction, "recall": self.recall,
             "broken_rate": self.broken_rate, "leak_benign": self.leak_benign,
             "missing_text": self.missing_text, "leak[0]": self.leak[0],
             "leak[1]": self.leak[1]}
    bad = {k: v for k, v in rates.items() if not 0 <= v <= 1}
    if bad or len(self.leak) != 2 or self.tissue_boxes < 0:
      raise ValueError(f"Mammography-world rates must lie in [0, 1] (leak is a pair: train, "
                       f"held out) and tissue_boxes >= 0; got {bad or self}.")

  def case(self, split: str, index: int) -> Case:
    """Case `index` of `split` without its image: label and history."""
    rng = _rng(self.seed, split_id(split), 0, index)
    leak = self.leak[0] if split == "train" else self.leak[1]
    return draw_case(rng, self.malignant_fraction, leak, self.leak_benign, self.missing_text)

  def layout(self, split: str, index: int) -> Layout:
    """The geometry and structures of `example(split, index)`'s image, not drawn."""
    return draw_layout(_rng(self.seed, split_id(split), 1, index), self.case(split, index))

  def boxes(self, split: str, index: int, layout: Layout | None = None) -> np.ndarray:
    """The detector's rows for `example(split, index)` (float32 `"n 5"`)."""
    layout = layout or self.layout(split, index)
    return detect(layout, _rng(self.seed, split_id(split), 3, index), self.recall,
                  self.tissue_boxes, self.broken_rate)

  def example(self, split: str, index: int) -> dict:
    """An MMBCD document `{"image": uint8 "h w", "boxes": float32 "n 5", "text", "label",
    "id"}` plus `"lesion_box"`: float32 `"m 4"` (cx, cy, w, h), the lesion's box (m = 1)
    in malignant cases, none (m = 0) in the others."""
    case = self.case(split, index)
    layout = draw_layout(_rng(self.seed, split_id(split), 1, index), case)
    image = render(layout, self.image_size, _rng(self.seed, split_id(split), 2, index))
    lesion = layout.lesion
    box = (np.zeros((0, 4), np.float32) if lesion is None else
           np.asarray([[lesion.x, lesion.y, 2 * lesion.extent, 2 * lesion.extent]], np.float32))
    return {"image": image, "boxes": self.boxes(split, index, layout), "text": case.history,
            "label": case.label, "id": f"mammo-{split}-{index}", "lesion_box": box}

  def labels(self, split: str, n: int) -> tuple[int, ...]:
    """The labels of cases 0 to n - 1 of `split` (no rendering)."""
    return _labels(self.seed, split_id(split), self.malignant_fraction, n)

  def texts(self, split: str, n: int) -> list[str]:
    """The histories of cases 0 to n - 1 of `split` (no rendering)."""
    return [self.case(split, i).history for i in range(n)]


@functools.lru_cache(maxsize=64)
def _labels(seed: int, split: int, malignant_fraction: float, n: int) -> tuple[int, ...]:
  return tuple(int(_rng(seed, split, 0, i).random() < malignant_fraction) for i in range(n))


def words() -> tuple[str, ...]:
  """Every word a history (or the prompt around it) can hold, sorted: the templates'
  words, the ages and month counts `draw_case` can write, "indication"."""
  texts = [*OPENINGS, *FAMILY[1], NO_FAMILY[1], *BIOPSY[1], *LEAK_PHRASES, *NOTES[0],
           *NOTES[1], *(p for _, phrasings in COMPLAINTS.values() for p in phrasings),
           *SIDES, "indication"]
  found = {str(n) for n in (*range(28, 86), *range(1, 13))}
  for text in texts:
    found.update(w for w in text.replace(",", " ").split() if not w.startswith("{"))
  return tuple(sorted(found))


def build_tokenizer():
  """The world's word-level tokenizer (`mmjax.data.tokenizer.word_level_tokenizer`)."""
  return word_level_tokenizer(words(), PUNCTUATION)


def write_tokenizer(directory: str | pathlib.Path) -> pathlib.Path:
  """Writes the tokenizer's files ([CLS] BOS, [SEP] EOS, [PAD] 0) into `directory`."""
  return write_word_level_tokenizer(directory, build_tokenizer(), model_max_length=64)


if __name__ == "__main__":
  tokenizer_command(write_tokenizer, TOKENIZER_DIR)
