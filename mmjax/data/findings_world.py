"""Findings world: embedded chest-radiograph-like images, reports and CheXpert-style labels.

The embedded data of the contrastive-with-knowledge family (MedCLIP). Grey images of a
chest (body, two lung fields, ribs, mediastinum, heart) in which ten findings each leave
a visual signature of their own size, place and texture: some large and diffuse
(cardiomegaly, edema, effusion), some small (nodule, fracture, a device's lead). A
finding is positive, negative or uncertain (a faint signature: what a reader would call
"possible"); several co-occur, and prevalences are high, so that many images of a batch
share findings: the false negatives of InfoNCE that MedCLIP's semantic matching removes.

Labels are float32 vectors over `LABELS` ("no finding" then `FINDINGS`), as CheXpert's
labeller writes them: 1 positive, 0 negative, -1 uncertain, NaN unmentioned. An image's
vector is what its report says (every positive and uncertain finding is mentioned, some
negatives are); "no finding" is 1 when nothing but a support device is positive or
uncertain, NaN otherwise. Each report sentence has its own vector: only the findings it
names are set.

Parts ("splits") of one world, each its own stream of a pure function of (seed, split,
index): "paired" (image, report), "images" (image pool), "texts" (sentence pool),
"classification" (held out: positive for exactly one of `ZERO_SHOT_CLASSES`, like
CheXpert 5x200) and "retrieval" (held out: image, report).

Zero-shot prompts: `CLASS_PROMPT_WORDS[class]` holds "severity", "subtype" and "location"
word lists, structured as GLoRIA's CHEXPERT_CLASS_PROMPTS (which MedCLIP uses);
`mmjax.evaluate.zeroshot.compose_prompts` draws from their product with a seeded generator.

The text tower's tokenizer (BERT-style WordPiece over the world's whole vocabulary) ships
in `TOKENIZER_DIR`; to rebuild it:

  python -m mmjax.data.findings_world --output=mmjax/data/assets/findings_world
"""

import dataclasses
import functools
import pathlib
from collections.abc import Sequence

import numpy as np

from mmjax.data.tokenizer import (tokenizer_command, word_level_tokenizer,
                                  write_word_level_tokenizer)

TOKENIZER_DIR = pathlib.Path(__file__).parent / "assets" / "findings_world"

NO_FINDING = "no finding"
SUPPORT_DEVICE = "support device"
FINDINGS = ("cardiomegaly", "pleural effusion", "edema", "consolidation", "atelectasis",
            "pneumothorax", "nodule", "mass", "fracture", SUPPORT_DEVICE)
LABELS = (NO_FINDING, *FINDINGS)  # the columns of every label vector
ZERO_SHOT_CLASSES = ("atelectasis", "cardiomegaly", "consolidation", "edema",
                     "pleural effusion")  # CheXpert 5x200's five
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
SPLITS = ("paired", "images", "texts", "classification", "retrieval")
SIDES = ("right", "left")  # the patient's: "right" is on the image's left

# Per finding: P(positive), P(uncertain); negative otherwise.
PREVALENCE = {"cardiomegaly": (0.30, 0.06), "pleural effusion": (0.25, 0.06),
              "edema": (0.20, 0.06), "consolidation": (0.20, 0.08),
              "atelectasis": (0.25, 0.08), "pneumothorax": (0.10, 0.04),
              "nodule": (0.12, 0.05), "mass": (0.06, 0.03), "fracture": (0.08, 0.03),
              SUPPORT_DEVICE: (0.25, 0.0)}
MENTION_NEGATIVE = 0.3  # the chance a report names a negative finding
UNCERTAIN_STRENGTH = 0.4  # an uncertain finding's signature, relative to a positive one

# Words. SEVERITY is indexed by the severity level a positive finding is drawn with (its
# signature grows with it); SUBTYPE holds a finding's names (a support device's subtype
# decides what is drawn); LOCATION's "{side}" is the side the finding is drawn on.
SEVERITY = {"cardiomegaly": ("mild", "moderate", "severe"),
            "pleural effusion": ("small", "moderate", "large"),
            "edema": ("mild", "moderate", "severe"),
            "consolidation": ("patchy", "moderate", "extensive"),
            "atelectasis": ("minimal", "mild", "moderate"),
            "pneumothorax": ("small", "moderate", "large"),
            "nodule": ("tiny", "small"),
            "mass": ("small", "large"),
            "fracture": ("nondisplaced", "displaced"),
            SUPPORT_DEVICE: ("",)}
SUBTYPE = {"cardiomegaly": ("cardiomegaly", "enlarged heart", "enlarged cardiac silhouette"),
           "pleural effusion": ("pleural effusion", "effusion", "pleural fluid"),
           "edema": ("pulmonary edema", "interstitial edema", "vascular congestion"),
           "consolidation": ("consolidation", "airspace opacity", "airspace disease"),
           "atelectasis": ("atelectasis", "plate like atelectasis", "subsegmental atelectasis"),
           "pneumothorax": ("pneumothorax", "apical pneumothorax"),
           "nodule": ("nodule", "pulmonary nodule", "nodular opacity"),
           "mass": ("mass", "pulmonary mass", "masslike opacity"),
           "fracture": ("rib fracture", "fracture of a lateral rib"),
           SUPPORT_DEVICE: ("pacemaker", "central line", "endotracheal tube")}
LOCATION = {"cardiomegaly": ("",),
            "pleural effusion": ("at the {side} base", "in the {side} costophrenic angle"),
            "edema": ("in both lungs", "bilaterally", "in the perihilar regions"),
            "consolidation": ("in the {side} lower lobe", "at the {side} base"),
            "atelectasis": ("at the {side} base", "in the {side} lower lung"),
            "pneumothorax": ("at the {side} apex", "in the {side} upper chest"),
            "nodule": ("in the {side} upper lobe", "in the {side} upper lung"),
            "mass": ("in the {side} mid lung", "in the {side} hilum"),
            "fracture": ("on the {side}", "of the {side} chest wall"),
            SUPPORT_DEVICE: ("in place", "in standard position", "")}
SIDED = frozenset(f for f, places in LOCATION.items() if "{side}" in places[0])
NEGATIVE_NAME = {f: SUBTYPE[f][0] for f in FINDINGS} | {SUPPORT_DEVICE: "support device"}
COUNT_NOUNS = frozenset({"pleural effusion", "pneumothorax", "nodule", "mass", "fracture",
                         SUPPORT_DEVICE})  # named with an article

POSITIVE_TEMPLATES = ("there is {article}{what}", "{what}", "findings consistent with {what}",
                      "{what} is seen")
UNCERTAIN_TEMPLATES = ("possible {what}", "{what} cannot be excluded",
                       "findings may represent {what}", "questionable {what}")
NEGATIVE_TEMPLATES = ("no {name}", "no evidence of {name}", "there is no {name}")
NEGATIVE_PAIR_TEMPLATE = "no {a} or {b}"  # two negatives in one sentence
NO_FINDING_SENTENCES = ("no acute cardiopulmonary process", "the lungs are clear",
                        "no acute cardiopulmonary abnormality", "normal chest radiograph",
                        "heart size is normal and the lungs are clear")


def _side_words(place: str) -> tuple[str, ...]:
  return tuple(place.format(side=s) for s in SIDES) if "{side}" in place else (place,)


# Zero-shot prompt words per class, GLoRIA's structure: prompts are the product
# "severity subtype location" (empty words dropped).
CLASS_PROMPT_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    f: {"severity": tuple(dict.fromkeys(("", *SEVERITY[f]))),
        "subtype": SUBTYPE[f],
        "location": tuple(w for p in LOCATION[f] for w in _side_words(p))}
    for f in FINDINGS}
CLASS_PROMPT_WORDS[NO_FINDING] = {"severity": ("",), "subtype": NO_FINDING_SENTENCES,
                                  "location": ("",)}


def _join(*words: str) -> str:
  return " ".join(w for w in words if w)


# ------------------------------------------------------------------------------------ studies

@dataclasses.dataclass(frozen=True)
class State:
  """One finding of one study: its truth, how it looks and whether the report names it."""

  value: float  # POSITIVE, NEGATIVE or UNCERTAIN
  severity: int = 0  # index into SEVERITY[finding]
  subtype: int = 0  # index into SUBTYPE[finding]
  side: str = "right"
  place: int = 0  # index into LOCATION[finding]
  mentioned: bool = True


@dataclasses.dataclass(frozen=True)
class Sentence:
  text: str
  labels: np.ndarray  # float32 "l" over LABELS


@dataclasses.dataclass(frozen=True)
class Study:
  """One image's findings and the report about it."""

  states: dict[str, State]
  sentences: tuple[Sentence, ...]

  @property
  def report(self) -> str:
    return ". ".join(s.text for s in self.sentences) + "."

  @property
  def labels(self) -> np.ndarray:
    """float32 `"l"` over LABELS: what the report says (CheXpert style)."""
    return report_labels(self.states)


def no_finding(states: dict[str, State]) -> bool:
  return all(s.value == NEGATIVE for f, s in states.items() if f != SUPPORT_DEVICE)


def report_labels(states: dict[str, State]) -> np.ndarray:
  labels = np.full(len(LABELS), np.nan, np.float32)
  for finding, state in states.items():
    if state.mentioned:
      labels[LABELS.index(finding)] = state.value
  if no_finding(states):
    labels[0] = POSITIVE
  return labels


def sentence_labels(values: dict[str, float]) -> np.ndarray:
  labels = np.full(len(LABELS), np.nan, np.float32)
  for name, value in values.items():
    labels[LABELS.index(name)] = value
  return labels


def finding_phrase(finding: str, state: State, with_severity: bool = True) -> str:
  """"small pleural effusion at the left base" for a finding as `state` has it."""
  severity = SEVERITY[finding][state.severity] if with_severity else ""
  place = LOCATION[finding][state.place].format(side=state.side)
  return _join(severity, SUBTYPE[finding][state.subtype], place)


def positive_sentence(finding: str, state: State, rng: np.random.Generator) -> Sentence:
  """One sentence stating `finding` (positive) as `state` draws it."""
  what = finding_phrase(finding, state)
  article = ("an " if what[0] in "aeiou" else "a ") if finding in COUNT_NOUNS else ""
  template = POSITIVE_TEMPLATES[rng.integers(len(POSITIVE_TEMPLATES))]
  return Sentence(template.format(article=article, what=what),
                  sentence_labels({finding: POSITIVE}))


def describe(finding: str, state: State, rng: np.random.Generator) -> Sentence:
  if state.value == POSITIVE:
    return positive_sentence(finding, state, rng)
  if state.value == UNCERTAIN:
    template = UNCERTAIN_TEMPLATES[rng.integers(len(UNCERTAIN_TEMPLATES))]
    what = finding_phrase(finding, state, with_severity=bool(rng.integers(2)))
    return Sentence(template.format(what=what), sentence_labels({finding: UNCERTAIN}))
  template = NEGATIVE_TEMPLATES[rng.integers(len(NEGATIVE_TEMPLATES))]
  return Sentence(template.format(name=NEGATIVE_NAME[finding]),
                  sentence_labels({finding: NEGATIVE}))


def no_finding_sentence(rng: np.random.Generator) -> Sentence:
  return Sentence(NO_FINDING_SENTENCES[rng.integers(len(NO_FINDING_SENTENCES))],
                  sentence_labels({NO_FINDING: POSITIVE}))


def draw_state(finding: str, value: float, rng: np.random.Generator) -> State:
  return State(value, int(rng.integers(len(SEVERITY[finding]))),
               int(rng.integers(len(SUBTYPE[finding]))), SIDES[rng.integers(2)],
               int(rng.integers(len(LOCATION[finding]))),
               mentioned=value != NEGATIVE or bool(rng.random() < MENTION_NEGATIVE))


def write_report(states: dict[str, State], rng: np.random.Generator) -> tuple[Sentence, ...]:
  """Sentences about every mentioned finding, in a random order; two negatives may share
  one sentence; "no finding" studies open with a normal-study sentence."""
  mentioned = [f for f in FINDINGS if states[f].mentioned]
  sentences = []
  negatives = [f for f in mentioned if states[f].value == NEGATIVE]
  if len(negatives) >= 2 and rng.random() < 0.5:
    a, b = (negatives[i] for i in np.sort(rng.choice(len(negatives), 2, replace=False)))
    sentences.append(Sentence(NEGATIVE_PAIR_TEMPLATE.format(a=NEGATIVE_NAME[a],
                                                            b=NEGATIVE_NAME[b]),
                              sentence_labels({a: NEGATIVE, b: NEGATIVE})))
    mentioned = [f for f in mentioned if f not in (a, b)]
  sentences += [describe(f, states[f], rng) for f in mentioned]
  sentences = [sentences[i] for i in rng.permutation(len(sentences))]
  if no_finding(states):
    sentences.insert(0, no_finding_sentence(rng))
  return tuple(sentences)


def sample_states(rng: np.random.Generator, forced: dict[str, float] | None = None
                  ) -> dict[str, State]:
  """Every finding's state, drawn by `PREVALENCE` unless `forced` fixes its value; at
  least one negative is mentioned when nothing else is."""
  forced = forced or {}
  states = {}
  for finding in FINDINGS:
    positive, uncertain = PREVALENCE[finding]
    u = rng.random()
    value = POSITIVE if u < positive else UNCERTAIN if u < positive + uncertain else NEGATIVE
    states[finding] = draw_state(finding, forced.get(finding, value), rng)
  if not any(s.mentioned for f, s in states.items() if f != SUPPORT_DEVICE):
    finding = FINDINGS[rng.integers(len(FINDINGS) - 1)]
    states[finding] = dataclasses.replace(states[finding], mentioned=True)
  return states


# ---------------------------------------------------------------------------------- rendering

def _soft(d: np.ndarray, edge: float) -> np.ndarray:
  """1 inside (`d < 1`), 0 outside, with a smooth edge of relative width `edge`."""
  return 1 / (1 + np.exp(np.clip((d - 1) / edge, -30, 30)))


def _ellipse(v, u, cv, cu, rv, ru, edge=0.08):
  return _soft(((v - cv) / rv) ** 2 + ((u - cu) / ru) ** 2, edge)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """`"size size"` noise in [-1, 1], smooth over `size / cells` pixels (bilinear)."""
  coarse = rng.uniform(-1, 1, size=(cells + 1, cells + 1))
  weights = _interpolation(size, cells)
  return weights @ coarse @ weights.T


@functools.cache
def _interpolation(size: int, cells: int) -> np.ndarray:
  """`"size cells+1"` linear interpolation weights from `cells + 1` knots to `size` points."""
  return np.stack([np.interp(np.linspace(0, cells, size), np.arange(cells + 1), row)
                   for row in np.eye(cells + 1)], axis=1)


def _segment(v, u, a, b, width):
  """Soft mask of the segment from `a` to `b` (`(v, u)` points), `width` wide."""
  (av, au), (bv, bu) = a, b
  dv, du = bv - av, bu - au
  t = np.clip(((v - av) * dv + (u - au) * du) / (dv * dv + du * du), 0, 1)
  distance = np.hypot(v - av - t * dv, u - au - t * du)
  return _soft(distance / width, 0.3)


LUNG_CENTRE = {"right": 0.30, "left": 0.70}  # image columns (fractions) of the lungs
FINDING_BOX = {  # (v0, v1, u0, u1) of the side drawn on "right": where the signature is
    "cardiomegaly": (0.58, 0.74, 0.66, 0.76), "pleural effusion": (0.55, 0.78, 0.14, 0.46),
    "edema": (0.35, 0.70, 0.18, 0.82), "consolidation": (0.45, 0.70, 0.18, 0.42),
    "atelectasis": (0.56, 0.70, 0.18, 0.42), "pneumothorax": (0.16, 0.42, 0.14, 0.34),
    "nodule": (0.24, 0.40, 0.22, 0.40), "mass": (0.34, 0.56, 0.18, 0.42),
    "fracture": (0.32, 0.50, 0.10, 0.22), SUPPORT_DEVICE: (0.05, 0.55, 0.45, 0.90)}


def finding_box(finding: str, side: str, image_size: int) -> tuple[slice, slice]:
  """Pixel slices `(rows, cols)` around `finding`'s signature when drawn on `side`."""
  v0, v1, u0, u1 = FINDING_BOX[finding]
  if side == "left" and finding in SIDED:
    u0, u1 = 1 - u1, 1 - u0
  return (slice(int(v0 * image_size), int(np.ceil(v1 * image_size))),
          slice(int(u0 * image_size), int(np.ceil(u1 * image_size))))


def render(states: dict[str, State], image_size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 `"h w 3"` (grey, repeated over 3 channels as MedCLIP feeds its towers)."""
  v, u = (np.mgrid[:image_size, :image_size].astype(np.float32) + 0.5) / image_size
  shift_v, shift_u = rng.uniform(-0.015, 0.015, 2)
  v, u = v - shift_v, u - shift_u
  strength = {f: 1.0 if s.value == POSITIVE else UNCERTAIN_STRENGTH if s.value == UNCERTAIN
              else 0.0 for f, s in states.items()}

  def lung(side: str) -> np.ndarray:
    return _ellipse(v, u, 0.46, LUNG_CENTRE[side], 0.29, 0.155, 0.1)

  lungs = {s: lung(s) for s in SIDES}
  either = np.maximum(lungs["right"], lungs["left"])
  image = 0.05 + 0.40 * _ellipse(v, u, 0.55, 0.5, 0.55, 0.47, 0.05)  # body
  ribs = sum(_soft(np.abs(v - 0.2 - 0.075 * k - 0.12 * (u - 0.5) ** 2) / 0.012, 0.4)
             for k in range(7))
  markings = 0.04 * _smooth_noise(rng, image_size, 12)
  image = image - either * (0.30 - 0.08 * ribs - markings)
  image = image + 0.15 * _soft(np.abs(u - 0.5) / 0.045, 0.2) * (v > 0.1)  # spine
  heart = states["cardiomegaly"]
  grow = strength["cardiomegaly"] * (0.4 + 0.2 * heart.severity)
  image = np.maximum(image, 0.5 * _ellipse(v, u, 0.66, 0.53, 0.11, 0.12 * (1 + grow), 0.06))

  def add(finding: str, mask: np.ndarray, amount: float):
    nonlocal image
    image = image + strength[finding] * amount * mask

  if strength["pleural effusion"]:
    s = states["pleural effusion"]
    cu = LUNG_CENTRE[s.side]
    lateral = 1 if s.side == "left" else -1
    level = 0.66 - 0.06 * s.severity - 0.06 * lateral * (u - cu) / 0.155  # meniscus
    add("pleural effusion", lungs[s.side] * _soft((level - v) / 0.01 + 1, 0.5), 0.4)
  if strength["edema"]:
    s = states["edema"]
    haze = sum(_ellipse(v, u, 0.52, c + (0.05 if c < 0.5 else -0.05), 0.16, 0.11, 0.3)
               for c in LUNG_CENTRE.values())
    add("edema", haze * either * (1 + 0.5 * _smooth_noise(rng, image_size, 24)),
        0.1 + 0.05 * s.severity)
  if strength["consolidation"]:
    s = states["consolidation"]
    cu = LUNG_CENTRE[s.side] + rng.uniform(-0.03, 0.03)
    patch = _ellipse(v, u, 0.58, cu, 0.06 + 0.02 * s.severity, 0.06 + 0.015 * s.severity)
    add("consolidation", patch * (_smooth_noise(rng, image_size, 16) > -0.3) * lungs[s.side],
        0.28)
  if strength["atelectasis"]:
    s = states["atelectasis"]
    cu = LUNG_CENTRE[s.side]
    lines = sum(_segment(v, u, (0.6 + 0.03 * k, cu - 0.09), (0.62 + 0.03 * k, cu + 0.09),
                         0.012) for k in range(s.severity + 1))
    add("atelectasis", lines, 0.4)
  if strength["pneumothorax"]:
    s = states["pneumothorax"]
    lateral = 1 if s.side == "left" else -1
    cu = LUNG_CENTRE[s.side] + lateral * 0.06
    air = _ellipse(v, u, 0.24, cu, 0.12 + 0.04 * s.severity, 0.07 + 0.02 * s.severity, 0.05)
    air = air * lungs[s.side]
    image = image - strength["pneumothorax"] * air * (image - 0.03)  # dark, no markings
    add("pneumothorax", _soft(np.abs(air - 0.5) / 0.25, 0.3) * lungs[s.side], 0.12)
  if strength["nodule"]:
    s = states["nodule"]
    centre = (0.32 + rng.uniform(-0.04, 0.04), LUNG_CENTRE[s.side] + rng.uniform(-0.04, 0.04))
    radius = 0.025 + 0.01 * s.severity
    add("nodule", _ellipse(v, u, *centre, radius, radius, 0.2), 0.4)
  if strength["mass"]:
    s = states["mass"]
    radius = 0.06 + 0.025 * s.severity
    centre = (0.45 + rng.uniform(-0.02, 0.02), LUNG_CENTRE[s.side] + rng.uniform(-0.02, 0.02))
    add("mass", _ellipse(v, u, *centre, radius, radius, 0.15), 0.35)
  if strength["fracture"]:
    s = states["fracture"]
    cu = 0.16 if s.side == "right" else 0.84
    cv = 0.41 + rng.uniform(-0.04, 0.04)
    add("fracture", _segment(v, u, (cv - 0.05, cu - 0.02), (cv + 0.05, cu + 0.02), 0.012),
        0.45 + 0.15 * s.severity)
  if strength[SUPPORT_DEVICE]:
    s = states[SUPPORT_DEVICE]
    kind = SUBTYPE[SUPPORT_DEVICE][s.subtype]
    if kind == "pacemaker":
      wire = _segment(v, u, (0.2, 0.78), (0.58, 0.56), 0.008)
      box = _soft(np.maximum(np.abs(v - 0.17) / 0.035, np.abs(u - 0.8) / 0.05), 0.05)
      tube = np.maximum(wire, box)
    elif kind == "central line":
      tube = _segment(v, u, (0.08, 0.85), (0.3, 0.55), 0.008)
      tube = np.maximum(tube, _segment(v, u, (0.3, 0.55), (0.45, 0.53), 0.008))
    else:
      tube = _segment(v, u, (0.0, 0.5), (0.3, 0.5), 0.012)
    image = np.maximum(image, strength[SUPPORT_DEVICE] * 0.95 * tube)
  image = image + rng.normal(0, 0.015, image.shape)
  grey = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


# ------------------------------------------------------------------------------------- world

@dataclasses.dataclass(frozen=True)
class Example:
  """An image of one study with everything said about it."""

  image: np.ndarray  # uint8 "h w 3"
  study: Study

  @property
  def labels(self) -> np.ndarray:
    return self.study.labels


def split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"Unknown findings-world split {split!r}; expected one of {SPLITS}.")
  return SPLITS.index(split)


def _rng(seed: int, *stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, *stream])


@dataclasses.dataclass(frozen=True)
class FindingsWorld:
  """Deterministic generator: every method derives its own RNG from (seed, split, index)."""

  seed: int = 0
  image_size: int = 64

  def example(self, split: str, index: int) -> Example:
    """Study `index` of `split` ("paired", "images", "texts", "retrieval") and its image."""
    if split == "classification":
      return self.classification(index, ZERO_SHOT_CLASSES)[0]
    study = self.study(split, index)
    rng = _rng(self.seed, split_id(split), 1, index)
    return Example(render(study.states, self.image_size, rng), study)

  def study(self, split: str, index: int) -> Study:
    """The study of `example(split, index)` without drawing its image (same values)."""
    if split == "classification":
      return self.classification(index, ZERO_SHOT_CLASSES)[0].study
    rng = _rng(self.seed, split_id(split), 0, index)
    states = sample_states(rng)
    return Study(states, write_report(states, rng))

  def sentence(self, index: int) -> Sentence:
    """Item `index` of the text pool: one sentence of the "texts" split's study `index`."""
    sentences = self.study("texts", index).sentences
    rng = _rng(self.seed, split_id("texts"), 2, index)
    return sentences[rng.integers(len(sentences))]

  def classification(self, index: int, classes: Sequence[str] = ZERO_SHOT_CLASSES
                     ) -> tuple[Example, int]:
    """`(example, label)`: positive for `classes[label]` (`label = index % len(classes)`,
    so every class has the same share), negative for the other classes; the findings
    outside `classes` keep their prevalences."""
    unknown = [c for c in classes if c not in FINDINGS]
    if unknown or not classes:
      raise ValueError(f"Zero-shot classes {unknown or classes} are not findings; expected "
                       f"some of {FINDINGS}.")
    label = index % len(classes)
    rng = _rng(self.seed, split_id("classification"), 0, index)
    forced = {c: POSITIVE if i == label else NEGATIVE for i, c in enumerate(classes)}
    states = sample_states(rng, forced)
    study = Study(states, write_report(states, rng))
    return Example(render(states, self.image_size, rng), study), label

  def prompt_sentence(self, labels: np.ndarray, rng: np.random.Generator) -> Sentence:
    """MedCLIP's text for an image without a report: a sentence positive for one of the
    findings `labels` (over LABELS) marks positive, drawn uniformly; a "no finding"
    sentence when none is."""
    positives = [LABELS[i] for i in np.flatnonzero(np.asarray(labels)[1:] == POSITIVE) + 1]
    if not positives:
      return no_finding_sentence(rng)
    finding = positives[rng.integers(len(positives))]
    return positive_sentence(finding, draw_state(finding, POSITIVE, rng), rng)


@dataclasses.dataclass(frozen=True)
class ImagePool:
  """The first `size` studies of `split` as an image pool of `DecoupledPairs`: images and
  their (report's) labels, no text."""

  world: FindingsWorld
  size: int
  split: str = "images"

  @property
  def label_names(self) -> tuple[str, ...]:
    return LABELS

  def __len__(self) -> int:
    return self.size

  def image(self, index: int) -> np.ndarray:
    return self.world.example(self.split, index).image

  def labels(self, index: int) -> np.ndarray:
    return self.world.study(self.split, index).labels


@dataclasses.dataclass(frozen=True)
class SentencePool:
  """The first `size` sentences of the text pool (`FindingsWorld.sentence`), and prompt
  sentences drawn by labels (`FindingsWorld.prompt_sentence`), for `DecoupledPairs`."""

  world: FindingsWorld
  size: int

  @property
  def label_names(self) -> tuple[str, ...]:
    return LABELS

  def __len__(self) -> int:
    return self.size

  def sentence(self, index: int) -> tuple[str, np.ndarray]:
    sentence = self.world.sentence(index)
    return sentence.text, sentence.labels

  def prompt_sentence(self, labels: np.ndarray, rng: np.random.Generator
                      ) -> tuple[str, np.ndarray]:
    sentence = self.world.prompt_sentence(labels, rng)
    return sentence.text, sentence.labels


# ---------------------------------------------------------------------------------- tokenizer

PUNCTUATION = (".", ",", "-", ":", ";", "(", ")", "'")


def words() -> tuple[str, ...]:
  """Every word the world's reports and prompts use, sorted."""
  texts = [*POSITIVE_TEMPLATES, *UNCERTAIN_TEMPLATES, *NEGATIVE_TEMPLATES,
           NEGATIVE_PAIR_TEMPLATE, *NO_FINDING_SENTENCES, "a an", *NEGATIVE_NAME.values(),
           *(w for f in FINDINGS for w in (*SEVERITY[f], *SUBTYPE[f], *LOCATION[f])),
           *SIDES, *FINDINGS, NO_FINDING]
  found = set()
  for text in texts:
    for word in text.replace("{", " {").replace("}", "} ").split():
      if not word.startswith("{"):
        found.add(word.lower())
  return tuple(sorted(found - set(PUNCTUATION)))


def build_tokenizer():
  """A BERT-style WordPiece tokenizer whose vocabulary is the special tokens, punctuation
  and `words()`: every sentence of the world is whole words, never `[UNK]`."""
  return word_level_tokenizer(words(), PUNCTUATION)


def write_tokenizer(directory: str | pathlib.Path) -> pathlib.Path:
  """Writes `tokenizer.json` and `tokenizer_config.json` (CLS as BOS, SEP as EOS, PAD id
  0) into `directory`: what `mmjax.data.tokenizer.HFTokenizer` reads."""
  return write_word_level_tokenizer(directory, build_tokenizer(), model_max_length=77)


if __name__ == "__main__":
  tokenizer_command(write_tokenizer, TOKENIZER_DIR)
