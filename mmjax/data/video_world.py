"""Video world: embedded BAIR-like clips of a robot arm pushing objects across a table.

The embedded data of the video VQ-VAE family. Each clip (`frames` frames, default 16, of
`resolution` px, default 64) looks down on a textured table (a procedural wood grain,
weave or mottled texture under a per-clip colour, lighting gradient, spot and tint) with
one to three objects on it (the shapes of `mmjax.data.shapes_world`, varied colours).
A two-link arm enters from an edge (its shoulder on or just beyond the top, left or right
edge), its elbow bent one way for the whole clip, and ends in a gripper (a palm bar and
two fingers that open and close). The gripper follows a smooth random path (a Catmull-Rom
spline through waypoints, most of them just beyond an object so that the arm sweeps
through it); the arm's pose is its inverse kinematics. The arm casts a soft shadow.

Objects move only when the arm touches them: at every sub-step (`SUBSTEPS` per frame)
an object (a disc of its radius) overlapping a link or the gripper is pushed out along
the contact normal, and stays within the table. `Motion.touched` records which objects
were pushed on the way to each frame, `Motion.centres` where they are.

Ground truth: per-frame masks of the arm (uint8 0/1, `"t h w"`; nothing occludes the
arm, so a mask is the arm's whole silhouette, its shadow excluded). Segmenting the arm
needs more than a pixel's colour: in a share of the clips the arm takes the colour of an
object, or of the table, or a grey like the table's, and lighting varies per clip; what
tells the arm apart over a clip is that it moves (the table never does, objects only
when pushed).

Every clip is a pure function of (seed, split, index); the splits "train", "validation"
and "test" are separate random streams. Drawing is vectorised numpy (float32, channels
first, one capsule at a time over all frames): about 4.5 ms of CPU per 64 px clip of 16
frames (3 ms at 32 px, 16 ms at 128 px; `benchmark`, on a busy 2-core machine), of which
about 1 ms is the scene and 1 ms the pushes. `frame(split, index)`, one labelled frame of
clip `index` (which frame is drawn from the index), draws only that frame: about 2 ms.
"""

import colorsys
import dataclasses
import time

import numpy as np

from mmjax.data.shapes_world import SHAPES, inside_shape

SPLITS = ("train", "validation", "test")
HELD_OUT = ("validation", "test")
SUBSTEPS = 3  # physics steps per frame: the arm cannot pass through an object between frames
TEXTURES = ("grain", "weave", "mottled")
EDGES = ("top", "left", "right")
# How the arm is coloured, and how often: a metal grey, an object's colour, the table's
# colour, any colour. The middle two defeat a per-pixel colour rule.
ARM_COLOURINGS = {"grey": 0.35, "object": 0.25, "table": 0.15, "any": 0.25}
_CLIP, _FRAME = 0, 1  # random streams per (seed, split)


def split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"Unknown video-world split {split!r}; expected one of {SPLITS}.")
  return SPLITS.index(split)


def _rng(seed: int, *stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, *stream])


def _hsv(h: float, s: float, v: float) -> np.ndarray:
  return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255


@dataclasses.dataclass(frozen=True)
class Scene:
  """A clip's fixed appearance and plan (pixel units, `(y, x)` coordinates).

  `waypoints "k 2"`: the gripper's path passes through them in order.
  """

  table: np.ndarray        # float32 "3 h w": the table's texture, colour and pixel noise
  light: np.ndarray        # float32 "h w": the lighting field (objects and arm get it too)
  shapes: tuple[str, ...]  # per object
  radii: np.ndarray        # float32 "n"
  colours: np.ndarray      # float32 "n 3"
  start: np.ndarray        # float32 "n 2": the objects' first centres
  base: np.ndarray         # float32 "2": the arm's shoulder
  links: tuple[float, float]
  bend: float              # +1 or -1: the side the elbow bends to
  widths: np.ndarray       # float32 "5": half-widths of upper arm, forearm, palm, fingers
  gripper: tuple[float, float]  # (palm half-length, finger length)
  arm_colour: np.ndarray   # float32 "3"
  arm_colouring: str       # a key of ARM_COLOURINGS
  waypoints: np.ndarray    # float32 "k 2"
  flicker: np.ndarray      # float32 "t": per-frame brightness


@dataclasses.dataclass(frozen=True)
class Motion:
  """Per-frame geometry of a clip.

  `segments "t 5 2 2"`: the arm as capsules (segment ends, half-widths `Scene.widths`):
  upper arm, forearm, palm, two fingers. `centres "t n 2"`: the objects after frame t's
  pushes; `touched "t n"`: pushed on the way to frame t (frame 0: at the first pose).
  """

  segments: np.ndarray
  centres: np.ndarray
  touched: np.ndarray


# -------------------------------------------------------------------------------- drawing

def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
  """Bilinear `"g g"` -> `"size size"` (corners aligned)."""
  coords = np.linspace(0, grid.shape[0] - 1, size, dtype=np.float32)
  low = np.minimum(coords.astype(np.int64), grid.shape[0] - 2)
  frac = coords - low
  rows = grid[low] * (1 - frac)[:, None] + grid[low + 1] * frac[:, None]
  return rows[:, low] * (1 - frac) + rows[:, low + 1] * frac


def _texture(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
  """float32 `"size size"` around 0 (roughly [-1, 1])."""
  ys, xs = np.mgrid[:size, :size].astype(np.float32) / size
  if kind == "grain":  # warped stripes along a random direction
    angle = rng.uniform(0, np.pi)
    along = np.cos(angle) * ys + np.sin(angle) * xs
    warp = _upsample(rng.random((5, 5), np.float32), size)
    return np.sin(2 * np.pi * (rng.uniform(5, 12) * along + 1.5 * warp)).astype(np.float32)
  if kind == "weave":
    period = rng.uniform(3, 7) / 64  # a few pixels at 64 px
    return (np.sign(np.sin(np.pi * ys / period)) * np.sign(np.sin(np.pi * xs / period))
            * 0.6 + _upsample(rng.random((6, 6), np.float32), size) - 0.5).astype(np.float32)
  return (_upsample(rng.random((4, 4), np.float32), size)
          + 0.5 * _upsample(rng.random((9, 9), np.float32), size) - 0.75) * 1.5


def _arm_depth(ys: np.ndarray, xs: np.ndarray, segments: np.ndarray,
               widths: np.ndarray) -> np.ndarray:
  """float32 `"t h w"`: each pixel's squared distance to the nearest capsule of
  `segments "t s 2 2"` in units of that capsule's half-width `widths "s"` (< 1 inside);
  `ys "h 1"`, `xs "1 w"` are the pixel coordinates. One capsule at a time, in place:
  `"t s h w"` temporaries would be several times slower."""
  a = segments[:, :, 0].astype(np.float32)
  ab = segments[:, :, 1].astype(np.float32) - a
  inv = 1 / np.maximum((ab ** 2).sum(-1), 1e-6)  # "t s"
  along = np.empty((len(a), ys.shape[0], xs.shape[1]), np.float32)
  error, best = np.empty_like(along), np.full_like(along, np.inf)
  for j in range(a.shape[1]):
    ay, ax = a[:, j, 0, None, None], a[:, j, 1, None, None]
    aby, abx = ab[:, j, 0, None, None], ab[:, j, 1, None, None]
    dy, dx = ys - ay, xs - ax  # "t h 1", "t 1 w"
    np.add(dy * (aby * inv[:, j, None, None]), dx * (abx * inv[:, j, None, None]), out=along)
    np.clip(along, 0, 1, out=along)  # the nearest point's place along the segment
    np.multiply(along, aby, out=error)
    np.subtract(dy, error, out=error)
    np.square(error, out=error)
    along *= abx
    np.subtract(dx, along, out=along)
    np.square(along, out=along)
    error += along
    error *= 1 / float(widths[j]) ** 2
    np.minimum(best, error, out=best)
  return best


def _segments(base: np.ndarray, tips: np.ndarray, scene_links: tuple[float, float],
              bend: float, gripper: tuple[float, float], opening: np.ndarray) -> np.ndarray:
  """The arm's capsules `"p 5 2 2"` for gripper positions `tips "p 2"` (two-link inverse
  kinematics from `base`; an out-of-reach tip is brought within reach)."""
  l1, l2 = scene_links
  reach = tips - base
  distance = np.linalg.norm(reach, axis=-1, keepdims=True)
  direction = reach / np.maximum(distance, 1e-6)
  distance = np.clip(distance, abs(l1 - l2) + 1e-3, (l1 + l2) * 0.999)
  wrist = base + direction * distance
  cos = np.clip((l1 ** 2 + distance ** 2 - l2 ** 2) / (2 * l1 * distance), -1, 1)
  angle = bend * np.arccos(cos)
  c, s = np.cos(angle), np.sin(angle)
  upper = np.concatenate([c * direction[:, :1] - s * direction[:, 1:],
                          s * direction[:, :1] + c * direction[:, 1:]], -1)
  elbow = base + l1 * upper
  heading = (wrist - elbow) / l2
  across = np.stack([-heading[:, 1], heading[:, 0]], -1)
  palm, finger = gripper
  open_ = palm * opening[:, None] * across
  forward = finger * heading
  base_ = np.broadcast_to(base, wrist.shape)
  return np.stack([np.stack(pair, 1) for pair in (
      (base_, elbow), (elbow, wrist), (wrist - palm * across, wrist + palm * across),
      (wrist + open_, wrist + open_ + forward), (wrist - open_, wrist - open_ + forward))], 1)


def _catmull_rom(points: np.ndarray, steps: int) -> np.ndarray:
  """`"k 2"` -> `"steps 2"`: a smooth curve through the points, in order."""
  padded = np.concatenate([points[:1], points, points[-1:]])
  u = np.linspace(0, len(points) - 1, steps)
  i = np.minimum(u.astype(np.int64), len(points) - 2)
  s = (u - i)[:, None]
  p0, p1, p2, p3 = padded[i], padded[i + 1], padded[i + 2], padded[i + 3]
  return 0.5 * (2 * p1 + (p2 - p0) * s + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s ** 2
                + (3 * p1 - p0 - 3 * p2 + p3) * s ** 3)


def _push(centres: list, a: list, ab: list, scale: list, reach: list,
          bounds: tuple[list, list]) -> list[bool]:
  """One step's contacts, in place on `centres` (per object `[y, x]`): an object
  overlapping a capsule (ends `a`, `a + ab`, `scale = 1 / |ab|^2`; contact within
  `reach[object][capsule]`) is pushed out of the deepest one along its normal, twice, and
  kept within `bounds` (low, high per object). Returns which objects were pushed.
  Plain Python floats: a few objects and capsules, numpy scalars would be slower."""
  pushed = [False] * len(centres)
  for k, centre in enumerate(centres):
    for _ in range(2):
      y, x = centre
      depth, normal = 0.0, (0.0, 0.0)
      for (ay, ax), (aby, abx), inv, contact in zip(a, ab, scale, reach[k]):
        ry, rx = y - ay, x - ax
        t = min(max((ry * aby + rx * abx) * inv, 0.0), 1.0)
        ey, ex = ry - t * aby, rx - t * abx
        distance = (ey * ey + ex * ex) ** 0.5
        if contact - distance > depth:
          depth = contact - distance
          normal = (ey / distance, ex / distance) if distance > 1e-6 else (1.0, 0.0)
      if depth <= 0:
        break
      pushed[k] = True
      low, high = bounds[0][k], bounds[1][k]
      centre[0] = min(max(y + normal[0] * depth, low), high)
      centre[1] = min(max(x + normal[1] * depth, low), high)
  return pushed


# ---------------------------------------------------------------------------------- world

@dataclasses.dataclass(frozen=True)
class VideoWorld:
  """Deterministic generator: clip `index` of `split` is a pure function of
  (seed, split, index).

  Attributes:
    frames: frames per clip.
    resolution: the side of a frame in pixels (at least 32); sizes scale with it.
    max_objects: objects per clip are 1 to this many.
  """

  seed: int = 0
  frames: int = 16
  resolution: int = 64
  max_objects: int = 3

  def __post_init__(self):
    if self.frames < 2 or self.resolution < 32 or not 1 <= self.max_objects <= 3:
      raise ValueError(f"The video world needs frames >= 2, resolution >= 32 and "
                       f"max_objects in [1, 3]; got frames={self.frames}, resolution="
                       f"{self.resolution}, max_objects={self.max_objects}.")

  # ------------------------------------------------------------------ the scene and motion
  def scene(self, split: str, index: int) -> Scene:
    rng = _rng(self.seed, split_id(split), _CLIP, index)
    size = self.resolution
    r = float(size)
    # The table: colour, texture, lighting.
    table_colour = _hsv(rng.random(), rng.uniform(0.05, 0.5), rng.uniform(0.35, 0.8))
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    grain = _texture(rng, kind, size) * rng.uniform(0.06, 0.2)
    ys, xs = np.mgrid[:size, :size].astype(np.float32) / size
    gy, gx = rng.uniform(-0.35, 0.35, 2)
    sy, sx = rng.uniform(0, 1, 2)
    spot = np.exp(-((ys - sy) ** 2 + (xs - sx) ** 2) / (2 * rng.uniform(0.1, 0.3) ** 2))
    light = (rng.uniform(0.75, 1.1) + gy * (ys - 0.5) + gx * (xs - 0.5)
             + rng.uniform(0, 0.35) * spot).astype(np.float32)
    tint = rng.uniform(0.9, 1.1, 3).astype(np.float32)
    noise = rng.normal(0, 4, (3, size, size)).astype(np.float32)
    table = ((table_colour * tint)[:, None, None] * (1 + grain) + noise).astype(np.float32)
    # Objects: shapes, colours, places that do not overlap.
    count = int(rng.integers(1, self.max_objects + 1))
    shapes = tuple(SHAPES[i] for i in rng.integers(len(SHAPES), size=count))
    radii = rng.uniform(0.07, 0.12, count).astype(np.float32) * r
    colours = np.stack([_hsv(rng.random(), rng.uniform(0, 0.15) if rng.random() < 0.2
                             else rng.uniform(0.3, 1.0), rng.uniform(0.35, 1.0))
                        for _ in range(count)]) * tint
    start = []
    for k in range(count):
      for _ in range(1000):
        c = rng.uniform(0.18, 0.82, 2) * r
        if all(np.linalg.norm(c - o) > radii[k] + radii[j] + 0.04 * r
               for j, o in enumerate(start)):
          break
      start.append(c)
    start = np.asarray(start, np.float32)
    # The arm: shoulder on an edge, link lengths, widths, colour.
    edge = EDGES[rng.choice(3, p=[0.6, 0.2, 0.2])]
    along, out = rng.uniform(0.2, 0.8) * r, -rng.uniform(0, 0.08) * r
    base = {"top": (out, along), "left": (along, out), "right": (along, r - 1 - out)}[edge]
    base = np.asarray(base, np.float32)
    links = (float(rng.uniform(0.5, 0.62) * r), float(rng.uniform(0.45, 0.58) * r))
    upper_w = rng.uniform(0.05, 0.07) * r
    widths = np.asarray([upper_w, upper_w * rng.uniform(0.7, 0.85)] + [0.022 * r] * 3,
                        np.float32)
    gripper = (float(rng.uniform(0.07, 0.09) * r), float(rng.uniform(0.07, 0.1) * r))
    colouring = list(ARM_COLOURINGS)[rng.choice(len(ARM_COLOURINGS),
                                                p=list(ARM_COLOURINGS.values()))]
    jitter = rng.normal(0, 8, 3)
    arm_colour = {"grey": lambda: np.full(3, rng.uniform(60, 210)) * tint,
                  "object": lambda: colours[rng.integers(count)],
                  "table": lambda: table_colour * tint,
                  "any": lambda: _hsv(rng.random(), rng.uniform(0.2, 1), rng.uniform(0.3, 1))
                  * tint}[colouring]()
    arm_colour = np.clip(arm_colour + jitter, 0, 255).astype(np.float32)
    # The gripper's path: a start, then mostly just beyond an object, seen from before.
    points = [rng.uniform(0.15, 0.85, 2) * r]
    for _ in range(int(rng.integers(2, 4))):
      if rng.random() < 0.75:
        k = int(rng.integers(count))
        heading = start[k] - points[-1]
        heading /= max(np.linalg.norm(heading), 1e-3)
        target = start[k] + heading * (radii[k] + rng.uniform(0.05, 0.2) * r)
        points.append(np.clip(target, 0.08 * r, 0.92 * r))
      else:
        points.append(rng.uniform(0.12, 0.88, 2) * r)
    flicker = (1 + rng.normal(0, 0.015, self.frames)).astype(np.float32)
    return Scene(table, light, shapes, radii, colours.astype(np.float32), start, base, links,
                 float(rng.choice((-1.0, 1.0))), widths, gripper, arm_colour, colouring,
                 np.asarray(points, np.float32), flicker)

  def motion(self, scene: Scene) -> Motion:
    """The arm's poses and the objects' pushes, frame by frame (`SUBSTEPS` per frame).

    The steps without contact are found for all steps at once; only the steps from a
    contact to the next step without one are resolved one by one.
    """
    steps = self.frames * SUBSTEPS
    tips = _catmull_rom(scene.waypoints, steps)
    phase = float(scene.waypoints[0].sum() % (2 * np.pi))
    opening = 0.75 + 0.25 * np.sin(np.linspace(0, 3 * np.pi, steps) + phase)
    segments = _segments(scene.base, tips, scene.links, scene.bend, scene.gripper, opening)
    a = segments[:, :, 0]
    ab = segments[:, :, 1] - a
    scale = 1 / np.maximum((ab ** 2).sum(-1), 1e-6)  # "p s"
    reach = scene.widths[None, :] + scene.radii[:, None]  # "n s": contact distance
    bounds = (scene.radii.tolist(), (float(self.resolution) - 1 - scene.radii).tolist())
    lists = a.tolist(), ab.tolist(), scale.tolist(), reach.tolist()
    centres = scene.start.astype(np.float64)
    history = np.empty((steps, len(centres), 2))
    pushed = np.zeros((steps, len(centres)), bool)
    step = 0
    while step < steps:
      rel = centres[None, :, None] - a[step:, None]  # "p n s 2"
      along = np.clip((rel * ab[step:, None]).sum(-1) * scale[step:, None], 0, 1)
      away = rel - along[..., None] * ab[step:, None]
      contact = ((away ** 2).sum(-1) < reach ** 2).any((1, 2))
      first = step + (int(contact.argmax()) if contact.any() else steps - step)
      history[step:first] = centres
      step, moving = first, centres.tolist()
      while step < steps:  # resolve one step at a time while the arm is in contact
        pushed[step] = _push(moving, *(x[step] for x in lists[:3]), lists[3], bounds)
        history[step] = moving
        step += 1
        if not pushed[step - 1].any():
          break
      centres = np.asarray(moving)
    frames = slice(SUBSTEPS - 1, None, SUBSTEPS)
    touched = pushed.reshape(self.frames, SUBSTEPS, -1).any(1)
    return Motion(segments[frames].astype(np.float32), history[frames].astype(np.float32),
                  touched)

  # ----------------------------------------------------------------------------- drawing
  def render(self, scene: Scene, motion: Motion, times: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Frames `times` (default all): `(video uint8 "t h w 3", masks uint8 "t h w")`."""
    times = np.arange(self.frames) if times is None else np.asarray(times)
    size = self.resolution
    ys = np.arange(size, dtype=np.float32)[:, None]
    xs = np.arange(size, dtype=np.float32)[None, :]
    # Channels first while drawing: blends over a trailing axis of 3 are slow in numpy.
    image = np.broadcast_to(scene.table[:, None], (3, len(times), size, size)).copy()
    centres = motion.centres[times]
    for k, shape in enumerate(scene.shapes):
      inside = inside_shape(shape, ys - centres[:, k, 0, None, None],
                            xs - centres[:, k, 1, None, None], scene.radii[k])
      np.copyto(image, scene.colours[k, :, None, None, None], where=inside)
    depth = _arm_depth(ys, xs, motion.segments[times], scene.widths)
    arm = depth < 1
    offset = max(1, round(0.04 * size))  # the shadow: the silhouette, down and to the right
    shadow = np.zeros_like(arm)
    shadow[:, offset:, offset:] = depth[:, :-offset, :-offset] < 1.6
    shadow &= ~arm
    light = scene.light * scene.flicker[times, None, None]  # "t h w"
    light *= 1 - 0.28 * shadow.astype(np.float32)
    shading = 1.1 - 0.3 * depth  # rounded links: lighter along the middle
    np.copyto(image, scene.arm_colour[:, None, None, None] * shading, where=arm)
    image *= light
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8).transpose(1, 2, 3, 0).copy(), arm.astype(np.uint8)

  # ------------------------------------------------------------------------------ records
  def clip(self, split: str, index: int) -> dict:
    """`{"video": uint8 "t h w 3", "masks": uint8 "t h w" (1: arm), "id"}`."""
    scene = self.scene(split, index)
    video, masks = self.render(scene, self.motion(scene))
    return {"video": video, "masks": masks, "id": f"video-{split}-{index}"}

  def frame_index(self, split: str, index: int) -> int:
    """Which frame of clip `index` is the labelled frame `index`."""
    return int(_rng(self.seed, split_id(split), _FRAME, index).integers(self.frames))

  def frame(self, split: str, index: int) -> dict:
    """`{"image": uint8 "h w 3", "mask": uint8 "h w", "id"}`: frame `frame_index` of clip
    `index`, drawn alone."""
    t = self.frame_index(split, index)
    scene = self.scene(split, index)
    video, masks = self.render(scene, self.motion(scene), np.asarray([t]))
    return {"image": video[0], "mask": masks[0], "id": f"video-{split}-{index}-frame{t}"}


def benchmark(world: VideoWorld | None = None, clips: int = 50) -> float:
  """CPU seconds per clip (`VideoWorld.clip`), the mean over `clips` clips: process time,
  which a machine shared with other work inflates far less than wall time (the drawing is
  single-threaded numpy)."""
  world = world or VideoWorld()
  world.clip("train", 0)
  start = time.process_time()
  for i in range(clips):
    world.clip("train", i)
  return (time.process_time() - start) / clips
