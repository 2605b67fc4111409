"""How few-shot prompts are written and how answers are read back.

A prompt is the solved demonstrations, each `<image>` + its text + `<|endofchunk|>`,
followed by `<image>` and the query's text, which stops where the answer starts. The text
of one example comes from a `PromptFormat`, named so that a published setting is
reproduced by naming it (`FORMATS`): OpenFlamingo's evaluation prompts, and the ones the
shapes-world recipes train on.
"""

import dataclasses
import string

import numpy as np

from mmjax.data import shapes_world as sw
from mmjax.data.sequences import right_pad
from mmjax.data.tokenizer import Tokenizer

IMG, EOC = sw.MEDIA_TOKEN, sw.ENDOFCHUNK_TOKEN


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """`template` is one example's text after its `<image>`, with `{answer}` last and any
  other fields before it (`{question}`, `{ocr}`); the query's text is the template up to
  `{answer}`, trailing spaces removed (the answer's leading space, where the format has
  one, is the first thing the model writes). `separator` goes between examples, after
  each `<|endofchunk|>`."""

  template: str
  separator: str = ""

  def __post_init__(self):
    fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f]
    if not fields or fields[-1] != "answer" or not self.template.endswith("{answer}"):
      raise ValueError(f"Prompt template {self.template!r} must end with '{{answer}}'.")

  def solved(self, **fields) -> str:
    return self.template.format(**fields)

  def query(self, **fields) -> str:
    return self.template.split("{answer}")[0].rstrip(" ").format(**fields)


FORMATS = {
    # OpenFlamingo's evaluation prompts (open_flamingo/eval/models/open_flamingo.py).
    "openflamingo_captioning": PromptFormat("Output:{answer}", separator="\n"),
    "openflamingo_vqa": PromptFormat("Question:{question} Short answer:{answer}"),
    "openflamingo_classification": PromptFormat("Output:{answer}"),
    "openflamingo_hateful_memes": PromptFormat(
        "is an image with: '{ocr}' written on it. Is it hateful? Answer:{answer}"),
    # BLIP-2's zero-shot prompts (LAVIS projects/blip2/eval/*_zeroshot_*_eval.yaml and
    # caption_coco_*_eval.yaml: one prompt for OPT and FLAN-T5 alike).
    "blip2_vqa": PromptFormat("Question: {question} Short answer: {answer}"),
    "blip2_captioning": PromptFormat("a photo of {answer}"),
    # The shapes-world documents' (`ShapesWorld.document`).
    "shapes_captioning": PromptFormat("{answer}"),
    "shapes_vqa": PromptFormat("question: {question} answer: {answer}"),
    "shapes_classification": PromptFormat("this is a {answer}"),
}


def prompt_format(name: str) -> PromptFormat:
  if name not in FORMATS:
    raise ValueError(f"Unknown prompt format {name!r}; choose from {sorted(FORMATS)}.")
  return FORMATS[name]


def few_shot_text(solved: list[str], query: str, separator: str = "",
                  text_only: bool = False) -> str:
  """`<image>` and `<|endofchunk|>` around each solved example's text, then `<image>` and
  the query's text: one `<image>` per image, in order. `text_only` demonstrations have
  no `<image>` (zero-shot prompting as Flamingo does it: two demonstrations whose images
  are removed, so that the model sees the format but only the query's image)."""
  media = "" if text_only else IMG
  return "".join(f"{media}{text}{EOC}{separator}" for text in solved) + IMG + query


# The shapes-world recipes' prompts, as `mmjax.inference` writes them too.
def chunk_text(task: str, question: str = "", answer: str | None = None) -> str:
  """The text after one image of a "captioning" or "vqa" prompt: a solved example's, with
  its `answer` (the caption), or else the query's, which ends where the answer starts."""
  if task not in ("captioning", "vqa"):
    raise ValueError(f"Unknown task {task!r}; expected 'captioning' or 'vqa'.")
  fmt = FORMATS[f"shapes_{task}"]
  return fmt.query(question=question) if answer is None else fmt.solved(question=question,
                                                                         answer=answer)


def encode_prompts(tokenizer: Tokenizer, texts: list[str], length: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids `"b t"` of the texts (each after BOS), right-padded to `length` or the
  longest, and their lengths `"b"`."""
  ids = [tokenizer.encode(text, bos=True) for text in texts]
  lengths = np.array([len(i) for i in ids], np.int32)
  length = max(length, int(lengths.max()))
  return np.stack([right_pad(i, length, tokenizer.pad_id) for i in ids]), lengths


def answer_text(tokenizer: Tokenizer, tokens: np.ndarray, length: int, task: str = "") -> str:
  """The generated text up to `<|endofchunk|>`; for "naming", up to the first period."""
  text = tokenizer.decode(tokens[:length]).split(EOC)[0]
  if task == "naming":
    text = text.split(".")[0]
  return text.strip()
