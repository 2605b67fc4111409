"""Shapes world: the embedded default data, generated procedurally and deterministically.

Small RGB images of objects with a shape, colour, size, position and count; their
captions; question/answer pairs; interleaved documents of several image-text chunks; and
a naming task that can only be solved in context. Nothing is downloaded: item `i` of a
split is a pure function of `(seed, split, i)`.

Compositional hold-out: some (shape, colour) pairs never occur in the "train" split and
are the only pairs of the "eval" split, so captioning and VQA evaluation measure
generalisation rather than recall.

In-context naming: each episode binds made-up names, drawn afresh from a pool of four per
colour, to the colours it shows ("this is a red dax.") in its support examples; the query
shows a new image of one of those colours and asks for its name ("this is a" -> "red
dax."). The binding exists only inside the episode, so naming the query needs the colour
perceived in its image and the name retrieved from the prompt: accuracy above a guess
from the colour's pool needs in-context learning.
"""

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 45, 45), "green": (45, 175, 65), "blue": (55, 85, 225),
    "yellow": (235, 215, 40), "purple": (150, 65, 195), "orange": (245, 140, 30),
}
SIZES = {"small": 0.10, "large": 0.18}  # object radius as a fraction of the image side
COUNT_WORDS = ("zero", "one", "two", "three")
REGIONS = (("top left", "top", "top right"), ("left", "centre", "right"),
           ("bottom left", "bottom", "bottom right"))

# Classification: one class per (size, colour, shape), named as captions name it.
CLASSES = tuple(f"{size} {colour} {shape}" for size in SIZES for colour in COLOURS
                for shape in SHAPES)

MEDIA_TOKEN = "<image>"
ENDOFCHUNK_TOKEN = "<|endofchunk|>"

# Held out of training: every shape keeps some colours, every colour some shapes.
HELDOUT_PAIRS = frozenset((s, c) for i, s in enumerate(SHAPES)
                          for j, c in enumerate(COLOURS) if (2 * i + j) % 5 == 0)
SPLITS = ("train", "eval")

# Made-up names: one word (and one token of the embedded tokenizer) each, never a word
# of the captions or questions. Each colour has its own pool of four; an episode binds
# one name of its pool to each colour it shows, at random. Knowing the colour narrows the
# name to four (a guess is right one time in four); which one, only the prompt says.
NAMES = ("dax", "wug", "fep", "zib", "toma", "blick", "kiki", "modi", "tupa", "lorp",
         "gazz", "mib", "pilk", "sarp", "vek", "yoll", "zup", "bix", "dorf", "jaff", "kell",
         "nup", "quib", "howt")
NAME_POOLS = {colour: NAMES[4 * i:4 * i + 4] for i, colour in enumerate(COLOURS)}


@dataclasses.dataclass(frozen=True)
class Scene:
  """`count` copies of one (shape, colour, size) object.

  `centres` are pixel `(y, x)`; `region` is where the first object sits on a 3x3 grid
  (what captions say when count == 1).
  """

  shape: str
  colour: str
  size: str
  count: int
  centres: tuple[tuple[int, int], ...]
  region: str


def region_of(centre: tuple[int, int], image_size: int) -> str:
  third = image_size / 3
  return REGIONS[min(int(centre[0] // third), 2)][min(int(centre[1] // third), 2)]


def split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"Unknown shapes-world split {split!r}; expected one of {SPLITS}.")
  return SPLITS.index(split)


def split_pairs(split: str) -> tuple[tuple[str, str], ...]:
  """The (shape, colour) pairs a split draws from."""
  split_id(split)
  pairs = itertools.product(SHAPES, COLOURS)
  return tuple(p for p in pairs if (p in HELDOUT_PAIRS) == (split == "eval"))


def _rng(seed: int, *stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, *stream])


def sample_scene(rng: np.random.Generator, image_size: int,
                 pairs: Sequence[tuple[str, str]], max_count: int = 3) -> Scene:
  """Draws a scene whose objects do not overlap."""
  shape, colour = pairs[rng.integers(len(pairs))]
  size = ("small", "large")[rng.integers(2)]
  radius = SIZES[size] * image_size
  count = int(rng.integers(1, max_count + 1)) if size == "small" else int(rng.integers(1, 3))
  centres: list[tuple[int, int]] = []
  lo, hi = radius + 1, image_size - radius - 1
  for attempt in range(10_000):  # rejection sampling, restarted when the first centres
    if attempt and attempt % 100 == 0:  # leave no room for the rest
      centres = []
    y, x = rng.uniform(lo, hi, size=2)
    if all((y - cy) ** 2 + (x - cx) ** 2 > (2.2 * radius) ** 2 for cy, cx in centres):
      centres.append((int(round(y)), int(round(x))))
    if len(centres) == count:
      break
  else:
    raise ValueError(f"Cannot place {count} {size} objects without overlap in a "
                     f"{image_size}px image; use a larger image_size.")
  return Scene(shape, colour, size, count, tuple(centres), region_of(centres[0], image_size))


def shape_mask(shape: str, centre: tuple[int, int], radius: float, image_size: int) -> np.ndarray:
  """Boolean `"h w"` mask of one object."""
  ys, xs = np.mgrid[:image_size, :image_size].astype(np.float32)
  return inside_shape(shape, ys - centre[0], xs - centre[1], radius)


def inside_shape(shape: str, dy: np.ndarray, dx: np.ndarray, radius) -> np.ndarray:
  """Boolean: whether the offsets `(dy, dx)` from a shape's centre (any arrays that
  broadcast together, and with `radius`) fall inside it."""
  if shape == "circle":
    return dy ** 2 + dx ** 2 <= radius ** 2
  if shape == "square":
    side = radius * 0.85
    return (np.abs(dy) <= side) & (np.abs(dx) <= side)
  if shape == "diamond":
    return np.abs(dy) + np.abs(dx) <= radius
  if shape == "triangle":  # apex up
    return (dy >= -radius) & (dy <= radius * 0.8) & (np.abs(dx) <= (dy + radius) * 0.6)
  if shape == "cross":
    arm = radius / 3
    return (((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
            | ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)))
  raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def render(scene: Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """`"h w 3"` uint8: a noisy dark background and the scene's objects."""
  background = rng.integers(20, 60, size=3)
  image = np.broadcast_to(background, (image_size, image_size, 3)).astype(np.float32)
  image = image + rng.normal(0, 6, size=image.shape)
  colour = np.asarray(COLOURS[scene.colour], np.float32)
  for centre in scene.centres:
    mask = shape_mask(scene.shape, centre, SIZES[scene.size] * image_size, image_size)
    image[mask] = colour + rng.normal(0, 8, size=(int(mask.sum()), 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def caption(scene: Scene) -> str:
  if scene.count == 1:
    where = "in the centre" if scene.region == "centre" else f"on the {scene.region}"
    return f"a {scene.size} {scene.colour} {scene.shape} {where}."
  plural = scene.shape + ("es" if scene.shape.endswith("s") else "s")
  return f"{COUNT_WORDS[scene.count]} {scene.size} {scene.colour} {plural}."


def describe(scene: Scene, image_size: int) -> str:
  """A detailed description: every object, where it is."""
  places = [region_of(c, image_size) for c in scene.centres]
  places = ["in the centre" if p == "centre" else f"on the {p}" for p in places]
  if scene.count == 1:
    return f"there is one {scene.size} {scene.colour} {scene.shape} {places[0]}."
  plural = scene.shape + ("es" if scene.shape.endswith("s") else "s")
  return (f"there are {COUNT_WORDS[scene.count]} {scene.size} {scene.colour} {plural}: one "
          + ", one ".join(places[:-1]) + f" and one {places[-1]}.")


def reason(scene: Scene, kind: str, rng: np.random.Generator, image_size: int
           ) -> tuple[str, str]:
  """A question needing a step beyond naming what is seen, and its short answer."""
  if kind == "presence":  # half the time about an object that is not there
    shape, colour = scene.shape, scene.colour
    if rng.integers(2):
      if rng.integers(2):
        shape = [s for s in SHAPES if s != shape][rng.integers(len(SHAPES) - 1)]
      else:
        colour = [c for c in COLOURS if c != colour][rng.integers(len(COLOURS) - 1)]
    answer = "yes" if (shape, colour) == (scene.shape, scene.colour) else "no"
    return f"is there a {colour} {shape} in the image?", answer
  if kind == "take_away":
    return (f"if one {scene.shape} were taken away, how many would be left?",
            COUNT_WORDS[scene.count - 1])
  if kind == "higher":  # the leftmost and rightmost objects, by their centres
    left, right = min(scene.centres, key=lambda c: c[1]), max(scene.centres, key=lambda c: c[1])
    return (f"which {scene.shape} is higher, the left one or the right one?",
            "the left one" if left[0] < right[0] else "the right one")
  raise ValueError(f"Unknown reasoning kind {kind!r}.")


QUESTIONS = ("colour", "shape", "count", "size")


def question_answer(scene: Scene, kind: str) -> tuple[str, str]:
  if kind == "colour":
    return f"what colour is the {scene.shape}?", scene.colour
  if kind == "shape":
    return f"what shape is the {scene.colour} object?", scene.shape
  if kind == "count":
    return "how many objects are there?", COUNT_WORDS[scene.count]
  if kind == "size":
    return f"is the {scene.shape} small or large?", scene.size
  raise ValueError(f"Unknown question kind {kind!r}; expected one of {QUESTIONS}.")


@dataclasses.dataclass(frozen=True)
class Example:
  """One image with everything that can be said about it."""

  image: np.ndarray
  scene: Scene
  caption: str
  question: str
  answer: str


@dataclasses.dataclass(frozen=True)
class NamingEpisode:
  """Support examples named in context, and a query whose answer is one of the names."""

  support_images: np.ndarray  # "k h w 3"
  support_names: tuple[str, ...]
  query_image: np.ndarray     # "h w 3"
  answer: str
  names: dict[str, str]       # colour -> made-up name, valid for this episode only

  @property
  def query_colour(self) -> str:
    return next(c for c, n in self.names.items() if n == self.answer)

  @property
  def support_colours(self) -> tuple[str, ...]:
    colour_of = {n: c for c, n in self.names.items()}
    return tuple(colour_of[n] for n in self.support_names)


def naming_text(colour: str | None = None, name: str | None = None) -> str:
  """The text of one naming chunk; the query prompt stops before the colour."""
  return "this is a" if name is None else f"this is a {colour} {name}."


@dataclasses.dataclass(frozen=True)
class ShapesWorld:
  """Deterministic generator. Every method takes the item index and derives its own RNG."""

  seed: int = 0
  image_size: int = 64

  def example(self, split: str, index: int) -> Example:
    rng = _rng(self.seed, split_id(split), 0, index)
    scene = sample_scene(rng, self.image_size, split_pairs(split))
    question, answer = question_answer(scene, QUESTIONS[rng.integers(len(QUESTIONS))])
    return Example(render(scene, self.image_size, rng), scene, caption(scene), question, answer)

  def classification(self, split: str, index: int) -> tuple[np.ndarray, int]:
    """`(image, label)`: one object of a class of `CLASSES` drawn uniformly (held-out
    pairs included: classification is not the captions' compositional hold-out), at any
    position. `split` only separates the streams of examples."""
    rng = _rng(self.seed, split_id(split), 3, index)
    label = int(rng.integers(len(CLASSES)))
    size, colour, shape = CLASSES[label].split()
    radius = SIZES[size] * self.image_size
    centre = tuple(int(round(v)) for v in rng.uniform(radius + 1, self.image_size - radius - 1,
                                                      size=2))
    scene = Scene(shape, colour, size, 1, (centre,), region_of(centre, self.image_size))
    return render(scene, self.image_size, rng), label

  def naming_episode(self, split: str, index: int, shots: int, ways: int = 2) -> NamingEpisode:
    """`shots` support images, each of a colour drawn independently from the episode's
    `ways` colours, then a query of one of those colours and any shape.

    The support shows the query's colour with probability 1 - (1 - 1/ways)^shots, so
    every further example carries information: naming accuracy can rise with shots up to
    the ceiling of retrieving the name perfectly whenever it was shown."""
    if not 1 <= ways <= len(COLOURS):
      raise ValueError(f"ways must be in [1, {len(COLOURS)}], got {ways}.")
    rng = _rng(self.seed, split_id(split), 1, index)
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), ways, replace=False)]
    names = {c: NAME_POOLS[c][rng.integers(len(NAME_POOLS[c]))] for c in colours}
    support_colours = [colours[i] for i in rng.integers(ways, size=shots)]
    query_colour = colours[rng.integers(ways)]

    def draw(colour: str, shapes: Sequence[str]) -> np.ndarray:
      shape = shapes[rng.integers(len(shapes))]
      scene = sample_scene(rng, self.image_size, [(shape, colour)], max_count=2)
      return render(scene, self.image_size, rng)

    support = [draw(c, SHAPES) for c in support_colours]
    query = draw(query_colour, SHAPES)
    empty = np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
    return NamingEpisode(np.stack(support) if support else empty,
                         tuple(names[c] for c in support_colours), query, names[query_colour],
                         names)

  def document(self, split: str, index: int, max_images: int = 4,
               naming_fraction: float = 1 / 3, max_ways: int = 4) -> dict:
    """An interleaved document: a few image-text chunks of one kind.

    Kinds: a naming episode of 1 to `max_ways` colours whose last chunk is the query
    answered (so training on documents teaches the in-context task) with probability
    `naming_fraction`, else
    captions or question/answer pairs in equal shares.
    Returns `{"images": uint8 "n h w 3", "text": str}` with one `<image>` per image and
    `<|endofchunk|>` after each chunk's text.
    """
    rng = _rng(self.seed, split_id(split), 2, index)
    num_images = int(rng.integers(1, max_images + 1))
    other = (1 - naming_fraction) / 2
    kind = ("captions", "vqa", "naming")[rng.choice(3, p=[other, other, naming_fraction])]
    if kind == "naming":
      episode = self.naming_episode(split, int(rng.integers(2 ** 31)), num_images - 1,
                                    ways=int(rng.integers(1, max_ways + 1)))
      images = np.concatenate([episode.support_images, episode.query_image[None]])
      texts = [naming_text(c, n) for c, n in zip(
          (*episode.support_colours, episode.query_colour),
          (*episode.support_names, episode.answer), strict=True)]
    else:
      examples = [self.example(split, int(rng.integers(2 ** 31))) for _ in range(num_images)]
      images = np.stack([e.image for e in examples])
      if kind == "captions":
        texts = [e.caption for e in examples]
      else:
        texts = [f"question: {e.question} answer: {e.answer}" for e in examples]
    text = "".join(f"{MEDIA_TOKEN}{t}{ENDOFCHUNK_TOKEN}" for t in texts)
    return {"images": images, "text": text}

  def conversation(self, split: str, index: int) -> dict:
    """An instruction-following record about one image, in LLaVA's format: `{"id",
    "images": uint8 "1 h w 3", "conversations": [{"from": "human" | "gpt", "value"}],
    "kinds": the kind of each answer}`. One of three kinds, as LLaVA-Instruct's:
    a multi-turn conversation (two or three questions about colour, shape, count, size
    and place), a detailed description, or a short reasoning question (is a named
    object there, counting after one is taken away, which of two is higher). Answers
    other than the description are a word or two, scored exactly (`kinds`)."""
    rng = _rng(self.seed, split_id(split), 4, index)
    scene = sample_scene(rng, self.image_size, split_pairs(split))
    image = render(scene, self.image_size, rng)
    kind = ("conversation", "detail", "reasoning")[rng.choice(3, p=[0.5, 0.2, 0.3])]
    if kind == "conversation":
      kinds = list(QUESTIONS) + (["place"] if scene.count == 1 else [])
      chosen = [kinds[i] for i in rng.permutation(len(kinds))[:int(rng.integers(2, 4))]]
      turns = [(*self._qa(scene, k), k) for k in chosen]
    elif kind == "detail":
      turns = [("describe the image in detail.", describe(scene, self.image_size), "detail")]
    else:
      reasoning = ["presence", "take_away"] + (["higher"] if scene.count >= 2 else [])
      chosen = reasoning[rng.integers(len(reasoning))]
      turns = [(*reason(scene, chosen, rng, self.image_size), chosen)]
    conversations = []
    for i, (question, answer, _) in enumerate(turns):
      conversations += [{"from": "human", "value": (MEDIA_TOKEN + "\n") * (i == 0) + question},
                        {"from": "gpt", "value": answer}]
    return {"id": f"shapes-{split}-{index}", "images": image[None],
            "conversations": conversations, "kinds": [k for *_, k in turns]}

  @staticmethod
  def _qa(scene: Scene, kind: str) -> tuple[str, str]:
    if kind == "place":
      return (f"where is the {scene.shape}?",
              "in the centre" if scene.region == "centre" else f"on the {scene.region}")
    return question_answer(scene, kind)

  def corpus(self, num_documents: int, split: str = "train") -> list[str]:
    """Text of the first documents and examples: what the tokenizer is trained on."""
    lines = []
    for i in range(num_documents):
      lines.append(self.document(split, i)["text"])
      e = self.example(split, i)
      lines.append(f"{e.caption} question: {e.question} answer: {e.answer}")
    return lines
