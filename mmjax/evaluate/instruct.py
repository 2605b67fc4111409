"""Held-out answer accuracy of an instruction-tuned model (LLaVA) on shapes-world
conversations: the "instruct" task.

Each short answer of the first `episodes` conversations of the held-out split (the
(shape, colour) pairs training never shows) is asked with the conversation's earlier
turns (and their reference answers) before it, under the run's template, and generated
greedily; it is right when it equals the reference after lower-casing and stripping
spaces and a final period. Detailed descriptions are not scored (no single right
wording). Reported overall and per kind of question (`accuracy/<kind>`), with the
standard error over questions.
"""

import dataclasses

import jax
import numpy as np

from mmjax import peft
from mmjax.data import conversation
from mmjax.data.pipeline import ShapesWorldConversations
from mmjax.data.sequences import right_pad
from mmjax.data.tokenizer import make_tokenizer

TASK = "instruct"


@dataclasses.dataclass(frozen=True)
class Question:
  id: str
  image: np.ndarray  # "m h w c"
  turns: tuple[tuple[str, str], ...]  # ending with the question
  answer: str
  kind: str


def questions(config, count: int) -> list[Question]:
  """The scored questions of the first `count` held-out conversations."""
  source = ShapesWorldConversations(split="eval", image_size=config.data.image_size)
  out = []
  for index in range(count):
    record = source[index]
    turns = conversation.turns_of(record["conversations"])
    for k, kind in enumerate(record["kinds"]):
      if kind != "detail":
        out.append(Question(f"{record['id']}/{k}", record["images"],
                            tuple(turns[:2 * k + 1]), turns[2 * k + 1][1], kind))
  return out


def normalise(text: str) -> str:
  return text.strip().lower().rstrip(".").strip()


def evaluate(config, params, items: list[Question], *, batch_size: int | None = None,
             step=lambda n, label: None) -> tuple[dict, list[dict]]:
  """`(scores, predictions)` of the model `params` of a LLaVA run of `config` on the
  `questions`; `step(n, label)` is called after each batch of `n`."""
  from mmjax.models import llava  # noqa: PLC0415 (models import the evaluate package)
  from mmjax.tasks import llava as llava_task  # noqa: PLC0415

  e = config.evaluate
  tokenizer = make_tokenizer(config)
  fmt = conversation.format_of(config)
  model = peft.from_config(config, llava_task.build_model(config))
  batch_size = batch_size or e.get("batch_size", 32)
  prompts = [fmt.prompt(q.turns, tokenizer) for q in items]
  length = max(len(p) for p in prompts)
  outputs = []
  for start in range(0, len(items), batch_size):
    batch = list(range(start, min(start + batch_size, len(items))))
    rows = batch + [batch[-1]] * (batch_size - len(batch))  # one compiled shape
    tokens = np.stack([right_pad(prompts[i], length, tokenizer.pad_id) for i in rows])
    lengths = np.array([len(prompts[i]) for i in rows], np.int32)
    images = np.stack([items[i].image for i in rows])
    generated = llava.generate(model, params, images, tokens, lengths, jax.random.key(0),
                               max_new_tokens=e.get("max_new_tokens", 12),
                               stop_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
    new, new_lengths = np.asarray(generated.tokens), np.asarray(generated.lengths)
    for j in range(len(batch)):
      outputs.append(tokenizer.decode(
          [t for t in new[j, :new_lengths[j]] if t != tokenizer.eos_id]))
    step(len(batch), TASK)
  correct = np.array([normalise(o) == normalise(q.answer) for o, q in zip(
      outputs, items, strict=True)], np.float64)
  kinds = np.array([q.kind for q in items])
  scores = {"accuracy": float(correct.mean())}
  if len(correct) > 1:
    scores["accuracy_se"] = float(correct.std(ddof=1) / np.sqrt(len(correct)))
  for kind in sorted(set(kinds)):
    scores[f"accuracy/{kind}"] = float(correct[kinds == kind].mean())
  predictions = [{"id": q.id, "kind": q.kind, "question": q.turns[-1][1], "answer": q.answer,
                  "prediction": o, "correct": bool(c)}
                 for q, o, c in zip(items, outputs, correct, strict=True)]
  return scores, predictions
