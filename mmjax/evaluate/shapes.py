"""The embedded default's evaluation tasks, on held-out shapes-world data.

  naming      in-context naming (`NamingTask`): each episode binds made-up names to
              `ways` colours ("this is a red dax."), its support images' colours drawn
              independently, so that more shots show more of the bindings (k shots are
              the first k support examples of each episode); the model
              completes the query's "this is a" with a colour and a name. `accuracy`: the
              name is right, which needs the query's colour perceived and its name
              retrieved from the prompt; `colour`: the colour is right; `chance`: the
              accuracy of answering a random name seen in the support; `ceiling`: the
              share of queries whose colour the support shows at all.
  vqa         questions about held-out (shape, colour) pairs, demonstrations from the
              training split: VQA accuracy.
  captioning  captions of held-out pairs: CIDEr and BLEU.

Zero-shot naming has no demonstrations at all (the names exist only in the episode's
support); zero-shot VQA and captioning have two text-only ones, as for any benchmark.
"""

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from mmjax.data import shapes_world as sw
from mmjax.evaluate import protocol as protocol_lib
from mmjax.evaluate.prompts import FORMATS, few_shot_text
from mmjax.evaluate.scoring import Prompt
from mmjax.evaluate.tasks import Cell, FewShotTask, Item

NAMING_EPISODE_STRIDE = 1_000_000  # trial t's episodes start at index t * stride


@dataclasses.dataclass(frozen=True)
class NamingTask:
  """In-context naming episodes (see the module docstring)."""

  world: sw.ShapesWorld
  ways: int = 4
  with_colour: bool = False  # end prompts with the query's colour (a text-only LM's task)
  name: str = "naming"
  mode: str = "generate"
  max_new_tokens: int = 6

  def episode(self, index: int, max_shots: int) -> sw.NamingEpisode:
    return self.world.naming_episode("eval", index, shots=max_shots, ways=self.ways)

  def prompt(self, episode: sw.NamingEpisode, shots: int) -> tuple[Prompt, sw.NamingEpisode]:
    """The episode's query after the first `shots` of its support examples, and the
    episode cut to them."""
    ep = dataclasses.replace(episode, support_images=episode.support_images[:shots],
                             support_names=episode.support_names[:shots])
    query = sw.naming_text() + (f" {ep.query_colour}" if self.with_colour else "")
    text = few_shot_text([sw.naming_text(c, n) for c, n in zip(
        ep.support_colours, ep.support_names, strict=True)], query)
    return Prompt(text, np.concatenate([ep.support_images, ep.query_image[None]])), ep

  def cells(self, protocol: protocol_lib.Protocol) -> list[Cell]:
    """Each trial's episodes are shared by its shot counts: k shots are the first k
    support examples of the episode, so that each query is asked with nested supports
    and the differences between shot counts are those of the examples added."""
    cells = []
    for seed in protocol.seeds():
      ids = [seed * NAMING_EPISODE_STRIDE + i for i in range(protocol.num_samples)]
      episodes = [self.episode(i, max(protocol.shots)) for i in ids]
      for shots in protocol.shots:
        prompts, cut = zip(*(self.prompt(ep, shots) for ep in episodes), strict=True)
        cells.append(Cell(seed, shots, [str(i) for i in ids], list(prompts), list(cut)))
    return cells

  def score(self, cell: Cell, outputs) -> tuple[dict[str, float], dict[str, list]]:
    words = [o.split() for o in outputs]
    correct = [float(w[-1:] == [e.answer]) for w, e in zip(words, cell.targets, strict=True)]
    colour = [float(w[:1] == [e.query_colour]) for w, e in zip(words, cell.targets,
                                                               strict=True)]
    chance, shown = [], []
    for e in cell.targets:
      seen = set(e.support_names)
      chance.append(1 / len(seen) if e.answer in seen else 0.0)
      shown.append(float(e.answer in seen))
    scores = {"accuracy": float(np.mean(correct)), "chance": float(np.mean(chance)),
              "ceiling": float(np.mean(shown))}
    if not self.with_colour:
      scores["colour"] = float(np.mean(colour))
    return scores, {"prediction": list(outputs), "answer": [e.answer for e in cell.targets],
                    "accuracy": correct}


def _example_item(world: sw.ShapesWorld, split: str, index: int, kind: str) -> Item:
  e = world.example(split, index)
  if kind == "vqa":
    return Item(f"{split}-{index}", lambda: e.image, {"question": e.question}, e.answer,
                [e.answer] * 10)
  return Item(f"{split}-{index}", lambda: e.image, {}, e.caption, [e.caption])


@dataclasses.dataclass(frozen=True)
class _Items(Sequence):
  """The first `size` examples of a split as items, each drawn when first indexed: the
  protocol reads only the ones it samples."""

  world: sw.ShapesWorld
  split: str
  size: int
  kind: str

  def __len__(self) -> int:
    return self.size

  @functools.lru_cache(maxsize=None)
  def __getitem__(self, index: int) -> Item:
    if not 0 <= index < self.size:
      raise IndexError(index)
    return _example_item(self.world, self.split, int(index), self.kind)


def example_task(world: sw.ShapesWorld, kind: str, protocol: protocol_lib.Protocol
                 ) -> FewShotTask:
  """Shapes-world VQA or captioning: demonstrations from the training split, queries from
  the held-out pairs of the eval split."""
  support = max(protocol.query_set_size, max(protocol.shots))
  return FewShotTask(kind, kind, _Items(world, "train", support, kind),
                     _Items(world, "eval", max(protocol.num_samples, 1), kind),
                     FORMATS[f"shapes_{kind}"],
                     max_new_tokens=16 if kind == "captioning" else 4)
