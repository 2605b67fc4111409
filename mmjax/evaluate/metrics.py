"""Evaluation metrics: captioning (CIDEr-D, BLEU), VQA accuracy, classification, retrieval.

Each function implements a published reference definition, named in its docstring, so that
its numbers can be compared with those of the papers and toolkits that use it:

- Captioning: CIDEr-D and BLEU-1..4 as the COCO caption evaluation toolkit (`pycocoevalcap`)
  computes them, on captions tokenised by its Stanford PTB tokenizer (Java) when Java is
  present, or by a pure-Python imitation of it otherwise (`CaptionScores.tokenizer` says
  which; scores made with the imitation may differ in rare cases, see `simple_tokenize`).
- VQA: the VQAv2 accuracy of the official evaluation script (answer normalisation, then the
  mean over the ten leave-one-out subsets of the human answers), and OpenFlamingo's variant.
- Classification: top-k accuracy, binary ROC-AUC and F1; calibration: the reliability
  diagram, expected calibration error and temperature scaling (Guo et al., 2017).
- Retrieval: image-to-text and text-to-image recall@k with several captions per image.

All scores are fractions in [0, 1] (CIDEr: in the toolkit's units, usually 0..~3); papers and
OpenFlamingo report them multiplied by 100.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from typing import Literal

import numpy as np

from mmjax.cli import UserError

# The keys of images or questions: any hashable id.
Key = Hashable

# ------------------------------------------------------------------------------------------
# Generation post-processing (OpenFlamingo's, so that few-shot numbers are comparable)
# ------------------------------------------------------------------------------------------


def postprocess_caption_generation(text: str) -> str:
  """A generated caption cut where the model starts a next "Output:" demo, quotes removed.

  OpenFlamingo's captioning post-processing: `text.split("Output", 1)[0]` with every `"`
  deleted.
  """
  return text.split("Output", 1)[0].replace('"', "")


def postprocess_vqa_generation(text: str) -> str:
  """A generated VQA answer cut where the model starts a next question, and at ", ".

  OpenFlamingo's VQA post-processing: the text before the first "Question", "Answer" or
  "Short" (the words of its prompt `Question:{q} Short answer:{a}`), then the part before
  the first ", ".
  """
  return re.split("Question|Answer|Short", text, maxsplit=1)[0].split(", ", 1)[0]


# ------------------------------------------------------------------------------------------
# Caption tokenisation
# ------------------------------------------------------------------------------------------

# The tokens the COCO toolkit drops after PTB tokenisation. Its list spells the bracket
# tokens in upper case ("-LRB-") while the tokenizer runs with `-lowerCase`, so brackets
# survive as "-lrb-", "-rrb-", ...; the imitation keeps them too, as the reference does.
_PTB_DROPPED = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
     "--", "...", ";"])
_PTB_JAR = "stanford-corenlp-3.4.1.jar"
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-",
                 "}": "-rcb-"}
# Words PTB splits although they are one word on the page.
_PTB_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                    "wanna": ["wan", "na"], "lemme": ["lem", "me"], "gimme": ["gim", "me"],
                    "y'all": ["y'", "all"]}
_PTB_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ll|'ve|'m|'d)")
_PTB_TOKEN = re.compile(
    r"""(?P<address>\w[\w.]*@\w+(?:\.\w+)+|[#@][^\W\d_]\w*)  # a@b.com, #tag, @user
      | (?P<abbreviation>\b(?:(?:[^\W\d_]\.)+|(?:mr|mrs|ms|dr|st|jr|sr|prof|mt|ft|vs|etc|inc
                                                |co|ltd)\.)(?![^\W_]))
      | (?P<word>\w+(?:(?:[-./']|(?<=\d)[:,](?=\d))\w+)*)  # isn't, black-and-white, 1,000, 3.5
      | (?P<archaic>'t(?=(?:is|was)\b))                     # 'tis -> 't is
      | (?P<decade>'\d+s\b)                                 # '90s
      | (?P<ellipsis>\.\.\.+|\u2026)
      | (?P<dashes>--+)
      | (?P<marks>[!?]{2,})                                 # ?! and !!! stay whole
      | (?P<other>\S)""", re.VERBOSE)
_UNICODE_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "`", "\u201c": '"', "\u201d": '"'})


def simple_tokenize(caption: str) -> str:
  """A caption tokenised as the COCO toolkit's PTB tokenizer does it, without Java.

  An imitation of Stanford PTBTokenizer 3.4.1 (`-preserveLines -lowerCase`) followed by the
  toolkit's removal of punctuation tokens: lower case; clitics split off ("isn't" -> "is
  n't", "dog's" -> "dog 's", "cannot" -> "can not"); punctuation split off words, except
  inside numbers (3.5, 1,000, 3:30), hyphenated words, "and/or" and the periods of
  abbreviations (u.s., p.m., mr.); brackets become "-lrb-" and the like, which the toolkit
  keeps; then the tokens `'' ' `` ` . ? ! , : - -- ... ;` are dropped.

  It gives PTB's tokens on ordinary captions (the tests compare them), but not on every
  string: PTB keeps emoticons whole, drops emoji, splits "10:30am" and knows more
  abbreviations ("no. 5"); a sentence-final single letter ("vitamin c.") keeps its period
  here.

  Returns:
    The tokens joined by single spaces.
  """
  line = " ".join(caption.splitlines()).lower().translate(_UNICODE_QUOTES)
  tokens = []
  for match in _PTB_TOKEN.finditer(line):
    kind, text = match.lastgroup, match.group()
    if kind == "word":
      clitic = _PTB_CLITIC.fullmatch(text)
      tokens.extend(_PTB_SPLIT_WORDS.get(text) or (clitic.groups() if clitic else [text]))
    elif kind == "ellipsis":
      tokens.append("...")
    elif kind == "other":
      tokens.append(_PTB_BRACKETS.get(text, "''" if text == '"' else text))
    else:
      tokens.append(text)
  return " ".join(token for token in tokens if token not in _PTB_DROPPED)


def _ptb_jar() -> str | None:
  """The path of the Stanford tokenizer that `pycocoevalcap` ships, if it is installed."""
  try:
    spec = importlib.util.find_spec("pycocoevalcap.tokenizer")
  except ImportError:
    return None
  for folder in (spec.submodule_search_locations or []) if spec else []:
    if os.path.isfile(os.path.join(folder, _PTB_JAR)):
      return os.path.join(folder, _PTB_JAR)
  return None


def ptb_available() -> bool:
  """Whether the reference PTB tokenizer can run: `java` on PATH and `pycocoevalcap`."""
  return shutil.which("java") is not None and _ptb_jar() is not None


def ptb_tokenize(captions: Sequence[str]) -> list[str]:
  """Captions tokenised by the COCO toolkit's Stanford PTB tokenizer (needs Java).

  The toolkit's tokenisation: one line per caption (line breaks inside a caption become
  spaces), `edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`, then the tokens
  `'' ' `` ` . ? ! , : - -- ... ;` are dropped. All captions go through one Java process.

  Returns:
    One string of space-separated tokens per caption.

  Raises:
    UserError: when Java or `pycocoevalcap` is missing, or the tokenizer fails.
  """
  jar = _ptb_jar()
  if shutil.which("java") is None or jar is None:
    raise UserError(
        "The PTB caption tokenizer needs `java` on PATH and the `pycocoevalcap` package "
        f"(java: {shutil.which('java')}, pycocoevalcap's tokenizer: {jar}). Install them, "
        "or pass tokenizer='simple' (its scores may differ slightly from the published ones).")
  lines = [" ".join(caption.splitlines()) for caption in captions]
  with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
    f.write("\n".join(lines))
  try:
    done = subprocess.run(
        ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
         "-lowerCase", f.name], capture_output=True, check=False)
  finally:
    os.remove(f.name)
  out = done.stdout.decode("utf-8").split("\n")
  if done.returncode != 0 or len(out) < len(lines) or any(out[len(lines):]):
    raise UserError(
        f"The PTB tokenizer ({jar}) failed on {len(lines)} captions (exit status "
        f"{done.returncode}, {len(out)} lines out): {done.stderr.decode(errors='replace')}")
  return [" ".join(t for t in line.split() if t not in _PTB_DROPPED) for line in out[:len(lines)]]


# ------------------------------------------------------------------------------------------
# CIDEr-D and BLEU
# ------------------------------------------------------------------------------------------


def _ngram_counts(sentence: str, n: int) -> collections.Counter:
  """The counts of the 1- to n-grams (tuples of words) of a whitespace-tokenised sentence."""
  words = sentence.split()
  return collections.Counter(
      tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(candidates: Mapping[Key, str], references: Mapping[Key, Sequence[str]], *,
            n: int = 4, sigma: float = 6.0) -> tuple[float, dict[Key, float]]:
  """CIDEr-D of tokenised captions, as the COCO caption toolkit computes it.

  Vedantam et al. 2015 with the toolkit's choices (`pycocoevalcap/cider`, the "CIDEr" that
  COCO and OpenFlamingo report): for every candidate c with references r_1..r_m,

    CIDEr-D(c) = 10 / m * sum_j mean_{k=1..n} exp(-(l_c - l_j)^2 / (2 sigma^2))
                 * sum_g min(w_c(g), w_j(g)) w_j(g) / (|w_c^k| |w_j^k|)

  where g ranges over the k-grams of c, w(g) = tf(g) * (log N - log max(1, df(g))), N is
  the number of candidates, df(g) the number of candidates whose references contain g, and
  |w^k| the norm of the k-gram weights. The document frequencies come from the references
  evaluated here, so a score depends on the set it is computed on. The length l is the word
  count (the toolkit counts bigrams, one fewer, which gives the same differences whenever
  both captions have words; with an empty one the similarity is 0 either way).

  Args:
    candidates: one tokenised caption per key (tokens separated by spaces).
    references: the tokenised reference captions of each key, at least one each.
    n: the longest n-gram.
    sigma: the width of the Gaussian length penalty.

  Returns:
    The mean over candidates, and each candidate's score.
  """
  keys = list(candidates)
  cand = [_ngram_counts(candidates[key], n) for key in keys]
  refs = [[_ngram_counts(ref, n) for ref in references[key]] for key in keys]
  doc_freq = collections.Counter(g for counts in refs for g in set().union(*counts))
  log_n = math.log(float(len(keys)))

  def tfidf(counts):
    vec, norm = [{} for _ in range(n)], [0.0] * n
    for g, tf in counts.items():
      vec[len(g) - 1][g] = w = tf * (log_n - math.log(max(1.0, doc_freq[g])))
      norm[len(g) - 1] += w * w
    words = sum(tf for g, tf in counts.items() if len(g) == 1)
    return vec, [math.sqrt(x) for x in norm], words

  scores = {}
  for key, c_counts, r_counts in zip(keys, cand, refs):
    c_vec, c_norm, c_len = tfidf(c_counts)
    total = [0.0] * n
    for counts in r_counts:
      r_vec, r_norm, r_len = tfidf(counts)
      penalty = math.exp(-float(c_len - r_len) ** 2 / (2 * sigma**2))
      for k in range(n):
        sim = sum((min(w, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0)
                   for g, w in c_vec[k].items()), 0.0)
        if c_norm[k] != 0 and r_norm[k] != 0:
          sim /= c_norm[k] * r_norm[k]
        total[k] += sim * penalty
    scores[key] = sum(total) / n / len(r_counts) * 10.0
  return float(np.mean(list(scores.values()))), scores


def bleu(candidates: Mapping[Key, str], references: Mapping[Key, Sequence[str]], *,
         n: int = 4) -> list[float]:
  """Corpus BLEU-1..n of tokenised captions, as the COCO caption toolkit computes it.

  Papineni et al. 2002 at corpus level (`pycocoevalcap/bleu`, option "closest"): the k-gram
  matches of every candidate, clipped by the most of that k-gram in any one reference, are
  summed over the corpus, as are the candidate k-gram counts; BLEU-k is the geometric mean of
  the precisions p_1..p_k times the brevity penalty exp(1 - R / C) when C < R, where C is
  the total candidate length and R the sum of each candidate's closest reference length
  (the shorter on a tie). The precisions are (matches + 1e-15) / (count + 1e-9) and the
  length ratio (C + 1e-15) / (R + 1e-9), the toolkit's guards, so that the scores match it
  to the last digit and an empty corpus scores 0.

  Returns:
    [BLEU-1, ..., BLEU-n].
  """
  test_len = ref_len = 0
  matches, counts = np.zeros(n), np.zeros(n)
  for key, candidate in candidates.items():
    c_counts, length = _ngram_counts(candidate, n), len(candidate.split())
    ref_lengths = [len(ref.split()) for ref in references[key]]
    max_ref = collections.Counter()
    for ref in references[key]:
      max_ref |= _ngram_counts(ref, n)
    test_len += length
    ref_len += min(ref_lengths, key=lambda l: (abs(l - length), l))
    counts += [max(0, length - k) for k in range(n)]
    for g, c in c_counts.items():
      matches[len(g) - 1] += min(c, max_ref[g])
  scores, product = [], 1.0
  for k in range(n):
    product *= (float(matches[k]) + 1e-15) / (float(counts[k]) + 1e-9)
    scores.append(product ** (1.0 / (k + 1)))
  ratio = (test_len + 1e-15) / (ref_len + 1e-9)
  penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
  return [s * penalty for s in scores]


@dataclasses.dataclass(frozen=True)
class CaptionScores:
  """Captioning scores of a set of predictions.

  Attributes:
    cider: CIDEr-D in the toolkit's units (OpenFlamingo and papers report 100x this).
    bleu: BLEU-1..4, fractions.
    tokenizer: "ptb" (the reference Java tokenizer) or "simple" (its imitation, whose
      scores may differ slightly from published ones).
    cider_per_item: each prediction's CIDEr-D, by key.
  """
  cider: float
  bleu: tuple[float, float, float, float]
  tokenizer: Literal["ptb", "simple"]
  cider_per_item: dict[Key, float]

  def as_dict(self) -> dict[str, float | str]:
    """The scores by name: "CIDEr", "BLEU-1".."BLEU-4" and "tokenizer"."""
    return {"CIDEr": self.cider, **{f"BLEU-{k + 1}": b for k, b in enumerate(self.bleu)},
            "tokenizer": self.tokenizer}


def caption_scores(predictions: Mapping[Key, str], references: Mapping[Key, Sequence[str]],
                   *, tokenizer: Literal["auto", "ptb", "simple"] = "auto") -> CaptionScores:
  """CIDEr-D and BLEU-1..4 of captions against their references, as COCO evaluation does.

  The pipeline of the COCO caption toolkit (`pycocoevalcap` `COCOEvalCap`, which
  OpenFlamingo calls): predictions and references are tokenised (`ptb_tokenize`, or
  `simple_tokenize` without Java), then scored by `cider_d` and `bleu`.

  Args:
    predictions: the generated caption of each image, by image key.
    references: the reference captions of each image, the same keys, at least one each.
    tokenizer: "ptb" needs Java and `pycocoevalcap`; "simple" is the pure-Python imitation;
      "auto" is "ptb" when it can run and "simple" otherwise (see `CaptionScores.tokenizer`).

  Raises:
    UserError: when the keys differ, an image has no reference, or "ptb" cannot run.
  """
  if predictions.keys() != references.keys():
    missing = [k for k in references if k not in predictions][:5]
    extra = [k for k in predictions if k not in references][:5]
    raise UserError(
        f"Captioning: {len(predictions)} predictions for {len(references)} referenced "
        f"images; the keys must be the same (without a prediction: {missing}, without "
        f"references: {extra}, first 5 of each).")
  if not predictions:
    raise UserError("Captioning: no predictions to score.")
  empty = [k for k, refs in references.items() if not refs or isinstance(refs, str)][:5]
  if empty:
    raise UserError(f"Captioning: each image needs a list of reference captions; these have "
                    f"none or a bare string: {empty} (first 5).")
  if tokenizer not in ("auto", "ptb", "simple"):
    raise UserError(f"Captioning: tokenizer={tokenizer!r}; choose 'auto', 'ptb' or 'simple'.")
  used = "ptb" if tokenizer == "ptb" or tokenizer == "auto" and ptb_available() else "simple"
  keys = list(predictions)
  texts = [predictions[k] for k in keys] + [r for k in keys for r in references[k]]
  tokens = iter(ptb_tokenize(texts) if used == "ptb" else map(simple_tokenize, texts))
  cand = {k: next(tokens) for k in keys}
  refs = {k: [next(tokens) for _ in references[k]] for k in keys}
  cider, per_item = cider_d(cand, refs)
  return CaptionScores(cider=cider, bleu=tuple(bleu(cand, refs)), tokenizer=used,
                       cider_per_item=per_item)


# ------------------------------------------------------------------------------------------
# VQA accuracy
# ------------------------------------------------------------------------------------------

# The tables of the official VQAv2 evaluation script (GT-Vision-Lab/VQA, vqaEval.py).
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                    "<", "@", "`", ",", "?", "!")
_VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
                     "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
                     "nine": "9", "ten": "10"}
_VQA_ARTICLES = frozenset(["a", "an", "the"])
# Contractions written without their apostrophe, as annotators type them. The table is the
# official one entry for entry, including its oddities: keys with a capital I never match
# (answers are lower-cased first), and "somebody'd" maps to "somebodyd".
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_VQA_COMMA_IN_NUMBER = re.compile(r"\d,\d")
# The official pattern, "(?!<=\d)(\.)(?!\d)", means to keep decimal points; its first group
# is a lookahead, not a lookbehind, so it only keeps a period followed by a digit.
_VQA_PERIOD = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (32) where re.sub takes its count.
_VQA_PERIOD_COUNT = 32


def _vqa_punctuation(answer: str) -> str:
  """The official `processPunctuation`: punctuation removed or replaced by a space.

  Each mark of `_VQA_PUNCTUATION` is deleted everywhere when, anywhere in the original
  answer, that mark touches a space or a comma sits between two digits ("1,000"), and is
  replaced by a space everywhere otherwise ("black/white" -> "black white"). Then periods
  not followed by a digit are deleted (the first 32 of them), so "3.5" keeps its period.
  """
  number_comma = _VQA_COMMA_IN_NUMBER.search(answer) is not None
  out = answer
  for mark in _VQA_PUNCTUATION:
    touches_space = mark + " " in answer or " " + mark in answer
    out = out.replace(mark, "" if touches_space or number_comma else " ")
  return _VQA_PERIOD.sub("", out, count=_VQA_PERIOD_COUNT)


def _vqa_digits_articles(answer: str) -> str:
  """The official `processDigitArticle`: lower case, number words to digits, articles
  dropped, contractions given their apostrophe, words joined by single spaces."""
  words = [_VQA_NUMBER_WORDS.get(w, w) for w in answer.lower().split()]
  return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def _vqa_whitespace(answer: str) -> str:
  return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(answer: str) -> str:
  """An answer normalised as the official VQAv2 evaluation normalises answers.

  Line breaks and tabs become spaces and the ends are stripped; punctuation is removed or
  replaced by a space (`_vqa_punctuation`: "yes!" -> "yes", "1,000" -> "1000", "3.5" kept);
  then lower case, "none"/"zero".."ten" -> "0".."10", "a"/"an"/"the" dropped, and
  apostrophe-less contractions restored ("dont" -> "don't", "whats" -> "what's").
  """
  return _vqa_digits_articles(_vqa_punctuation(_vqa_whitespace(answer)))


def vqa_accuracy(prediction: str, answers: Sequence[str], *,
                 protocol: Literal["vqav2", "openflamingo"] = "vqav2") -> float:
  """The VQA accuracy of one predicted answer against the human answers (usually 10).

  acc = mean over the leave-one-out subsets of the human answers (each drops one of them) of
  min(1, #answers in the subset equal to the prediction / 3). With 10 answers of which m
  match: m=1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.

  Before comparing, line breaks and tabs become spaces and the ends are stripped, and then
  answers are normalised (`normalize_vqa_answer`) as the protocol says:
    "vqav2": the official VQAv2 script (GT-Vision-Lab/VQA, `vqaEval.py`, 2021): the
      prediction and the human answers only when the human answers are not all the same
      (so "Yes" scores 0 against ten "yes": the released answers are already normalised,
      and a prediction is expected to be too);
    "openflamingo": OpenFlamingo's copy of that script: always, both.

  Returns:
    The accuracy in [0, 1].

  Raises:
    UserError: with fewer than 2 human answers (leave-one-out needs at least 2) or an
      unknown protocol.
  """
  if len(answers) < 2 or isinstance(answers, str):
    raise UserError(
        f"VQA accuracy needs a list of at least 2 human answers (leave-one-out); got "
        f"{answers!r}. For single-answer data, compare normalize_vqa_answer() outputs.")
  if protocol not in ("vqav2", "openflamingo"):
    raise UserError(f"VQA accuracy: protocol={protocol!r}; choose 'vqav2' or 'openflamingo'.")
  truth, prediction = [_vqa_whitespace(a) for a in answers], _vqa_whitespace(prediction)
  if protocol == "openflamingo" or len(set(truth)) > 1:
    truth = [normalize_vqa_answer(a) for a in truth]
    prediction = normalize_vqa_answer(prediction)
  matches = [t == prediction for t in truth]
  total = sum(matches)
  return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


def vqa_scores(predictions: Mapping[Key, str], answers: Mapping[Key, Sequence[str]], *,
               protocol: Literal["vqav2", "openflamingo"] = "vqav2") -> float:
  """The mean `vqa_accuracy` over questions, in [0, 1] (the VQAv2 "overall" is 100x this).

  Args:
    predictions: the predicted answer of each question, by question key.
    answers: the human answers of each question, the same keys.
    protocol: how the human answers are normalised, see `vqa_accuracy`.

  Raises:
    UserError: when the keys differ or there are none.
  """
  if predictions.keys() != answers.keys() or not predictions:
    missing = [k for k in answers if k not in predictions][:5]
    extra = [k for k in predictions if k not in answers][:5]
    raise UserError(
        f"VQA: {len(predictions)} predictions for {len(answers)} answered questions; the "
        f"keys must be the same and not empty (without a prediction: {missing}, without "
        f"answers: {extra}, first 5 of each).")
  return float(np.mean([vqa_accuracy(predictions[k], answers[k], protocol=protocol)
                        for k in predictions]))


# ------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------


def _check_scores(scores: np.ndarray, what: str) -> None:
  if np.isnan(scores).any():
    raise UserError(f"{what}: {int(np.isnan(scores).sum())} scores are NaN; a NaN would "
                    "rank arbitrarily. Check the model's outputs.")


def top_k_hits(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> np.ndarray:
  """bool `"n"`: whether each example's label is among its k best-scored classes.

  Ties count against the label: an example is a hit when fewer than k other classes score
  at least as high as its label, so constant scores give no hit.

  Args:
    scores: "n c", a score per example and class (higher is better; log-probs, logits).
    labels: "n", the index of each example's class.
    k: how many of the best classes count.
  """
  scores, labels = np.asarray(scores), np.asarray(labels)
  if scores.ndim != 2 or labels.shape != scores.shape[:1] or not 0 < len(labels):
    raise UserError(f"top_k_accuracy: scores must be 'n c' and labels 'n' with n > 0; got "
                    f"{scores.shape} and {labels.shape}.")
  if not (np.issubdtype(labels.dtype, np.integer) and 0 <= labels.min()
          and labels.max() < scores.shape[1]) or k < 1:
    raise UserError(f"top_k_accuracy: labels must be class indices in [0, {scores.shape[1]}) "
                    f"and k >= 1; got labels in [{labels.min()}, {labels.max()}], k={k}.")
  _check_scores(scores, "top_k_accuracy")
  label_scores = np.take_along_axis(scores, labels[:, None], axis=1)
  rivals = (scores >= label_scores).sum(axis=1) - 1
  return rivals < k


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
  """The fraction of examples whose label is among their k best-scored classes
  (`top_k_hits`: ties count against the label, so constant scores give 0, not 1).

  Args:
    scores: "n c", a score per example and class (higher is better; log-probs, logits).
    labels: "n", the index of each example's class.
    k: how many of the best classes count.

  Returns:
    The accuracy in [0, 1].
  """
  return float(np.mean(top_k_hits(scores, labels, k)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """The 1-based ranks of values, tied values getting the mean of their ranks."""
  order = np.argsort(values, kind="stable")
  ranks = np.empty(len(values))
  sorted_values = values[order]
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  ends = np.r_[starts[1:], len(values)]
  for start, end in zip(starts, ends):
    ranks[order[start:end]] = (start + end + 1) / 2
  return ranks


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """The area under the ROC curve of binary scores, ties counted as half.

  The Mann-Whitney form: the probability that a random positive scores higher than a random
  negative, plus half the probability of a tie; (sum of the positives' average ranks -
  P (P + 1) / 2) / (P N). This equals the trapezoidal area under the ROC curve (what
  `sklearn.metrics.roc_auc_score` computes, and OpenFlamingo reports for HatefulMemes).

  Args:
    scores: "n", the score of the positive class (higher means more likely positive).
    labels: "n", 1 (or True) for positives, 0 for negatives; both must occur.

  Returns:
    The AUC in [0, 1].
  """
  scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
  if scores.ndim != 1 or labels.shape != scores.shape:
    raise UserError(f"roc_auc: scores and labels must both be 'n'; got {scores.shape} and "
                    f"{labels.shape}.")
  if not np.isin(labels, (0, 1)).all():
    raise UserError(f"roc_auc: labels must be 0 or 1; got {np.unique(labels)[:10]}.")
  positive = labels.astype(bool)
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if n_pos == 0 or n_neg == 0:
    raise UserError(f"roc_auc: needs both classes; got {n_pos} positives and {n_neg} "
                    "negatives. Evaluate on more examples.")
  _check_scores(scores, "roc_auc")
  rank_sum = _average_ranks(scores)[positive].sum()
  return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def f1_score(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Binary F1 of the positive class (1): `2 TP / (2 TP + FP + FN)`; 0 when there is no
  positive among the predictions or the labels (scikit-learn's `zero_division=0`)."""
  predictions, labels = np.asarray(predictions).astype(bool), np.asarray(labels).astype(bool)
  if predictions.shape != labels.shape or predictions.ndim != 1:
    raise UserError(f"f1_score: predictions and labels must both be 'n'; got "
                    f"{predictions.shape} and {labels.shape}.")
  tp = int(np.sum(predictions & labels))
  wrong = int(np.sum(predictions != labels))
  return 2 * tp / (2 * tp + wrong) if tp else 0.0


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10
                ) -> dict[str, np.ndarray]:
  """The reliability diagram's bins of a classifier's top-label confidence (Guo et al.,
  2017): `bins` equal-width bins of `(0, 1]` (a confidence of exactly `k / bins` falls in
  bin k - 1), each with its example `count`, mean `confidence` and `accuracy` (NaN when
  empty).

  Args:
    probabilities: `"n c"` class probabilities (rows summing to 1).
    labels: `"n"` class indices.
  """
  probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels)
  if probabilities.ndim != 2 or labels.shape != probabilities.shape[:1] or bins < 1:
    raise UserError(f"reliability: probabilities must be 'n c', labels 'n' and bins >= 1; "
                    f"got {probabilities.shape}, {labels.shape}, {bins}.")
  _check_scores(probabilities, "reliability")
  confidence = probabilities.max(axis=1)
  correct = probabilities.argmax(axis=1) == labels
  index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
  count = np.bincount(index, minlength=bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = lambda values: np.bincount(index, values, minlength=bins) / count
    return {"count": count, "confidence": mean(confidence),
            "accuracy": mean(correct.astype(np.float64)),
            "edges": np.linspace(0.0, 1.0, bins + 1)}


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = 10) -> float:
  """ECE (Guo et al., 2017): the count-weighted mean over `reliability` bins of
  `|accuracy - confidence|` of the top-label confidence."""
  diagram = reliability(probabilities, labels, bins)
  filled = diagram["count"] > 0
  gap = np.abs(diagram["accuracy"][filled] - diagram["confidence"][filled])
  return float(np.sum(diagram["count"][filled] * gap) / np.sum(diagram["count"]))


def log_softmax(logits: np.ndarray) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray,
                            temperature: float = 1.0) -> float:
  """The mean cross-entropy of `softmax(logits / temperature)` against `labels`."""
  log_p = log_softmax(np.asarray(logits, np.float64) / temperature)
  return float(-np.mean(np.take_along_axis(log_p, np.asarray(labels)[:, None], axis=1)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
  """Temperature scaling (Guo et al., 2017): the one `T` in `bounds` minimising the
  held-out negative log-likelihood of `softmax(logits / T)`, found on `log T` by bounded
  scalar minimisation (the NLL is convex in `1 / T`). Accuracy is unchanged by `T`."""
  from scipy import optimize  # noqa: PLC0415 (only calibration needs it)
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1] or not len(labels):
    raise UserError(f"fit_temperature: logits must be 'n c' and labels 'n' with n > 0; "
                    f"got {logits.shape} and {labels.shape}.")
  _check_scores(logits, "fit_temperature")
  result = optimize.minimize_scalar(
      lambda log_t: negative_log_likelihood(logits, labels, math.exp(log_t)),
      bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
      options={"xatol": 1e-6})
  return float(math.exp(result.x))


# ------------------------------------------------------------------------------------------
# Retrieval
# ------------------------------------------------------------------------------------------


def retrieval_ranks(similarity: np.ndarray, text_to_image: np.ndarray,
                    matches: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`(image_rank "i", text_rank "t")`, 0-based ranks of the right answers, with several
  captions per image.

  An image's rank is that of its best-scored right text: the number of wrong texts that
  score at least as high as it. A text's rank is that of its best-scored right image: the
  number of wrong images that score at least as high. Ties count against the right
  answer, so constant similarities rank it last.

  Args:
    similarity: "i t", the similarity of each image to each text.
    text_to_image: "t", the index of each text's image.
    matches: "i t" bool, which texts are right for which image where that is more than
      each text's own image (a caption shared by several images); it must include each
      text's own image. Default: only that one. Every image needs a right text.
  """
  similarity, text_to_image = np.asarray(similarity), np.asarray(text_to_image)
  n_images, n_texts = similarity.shape if similarity.ndim == 2 else (0, 0)
  if similarity.ndim != 2 or text_to_image.shape != (n_texts,) or n_texts == 0:
    raise UserError(f"retrieval_recall: similarity must be 'i t' and text_to_image 't' with "
                    f"t > 0; got {similarity.shape} and {text_to_image.shape}.")
  if not (np.issubdtype(text_to_image.dtype, np.integer) and 0 <= text_to_image.min()
          and text_to_image.max() < n_images):
    raise UserError(f"retrieval_recall: text_to_image must hold image indices in "
                    f"[0, {n_images}); got [{text_to_image.min()}, {text_to_image.max()}].")
  own = np.zeros((n_images, n_texts), dtype=bool)
  own[text_to_image, np.arange(n_texts)] = True
  if matches is None:
    matches = own
  else:
    matches = np.asarray(matches, dtype=bool)
    if matches.shape != own.shape or (own & ~matches).any():
      raise UserError(f"retrieval_recall: matches must be 'i t' {own.shape} and include each "
                      f"text's own image; got {matches.shape}.")
  if not matches.any(axis=1).all():
    raise UserError(f"retrieval_recall: images {np.flatnonzero(~matches.any(axis=1))[:10]} "
                    "have no text; every image needs at least one caption.")
  _check_scores(similarity, "retrieval_recall")
  best_text = np.where(matches, similarity, -np.inf).max(axis=1, keepdims=True)
  image_rank = ((similarity >= best_text) & ~matches).sum(axis=1)
  best_image = np.where(matches, similarity, -np.inf).max(axis=0, keepdims=True)
  text_rank = ((similarity >= best_image) & ~matches).sum(axis=0)
  return image_rank, text_rank


def retrieval_recall(similarity: np.ndarray, text_to_image: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10),
                     matches: np.ndarray | None = None) -> dict[str, float]:
  """Image-to-text and text-to-image recall@k, with several captions per image.

  Image to text: an image is a hit at k when any of its captions is among the k texts most
  similar to it. Text to image: a text is a hit at k when its image (any right image, with
  `matches`) is among the k images most similar to it. Ties count against the hit: the
  rank of the right answer is the number of wrong candidates that score at least as high
  (`retrieval_ranks`), so constant similarities give no hits (unless k covers every wrong
  candidate). Recall is the fraction of hits over images, or over texts.

  Args:
    similarity: "i t", the similarity of each image to each text.
    text_to_image: "t", the index of each text's image; every image needs a text.
    ks: the k of each recall.
    matches: "i t" bool, right texts of each image beyond its own (`retrieval_ranks`).

  Returns:
    {"image_to_text/R@k": ..., "text_to_image/R@k": ...} for each k, in [0, 1].
  """
  if min(ks, default=1) < 1:
    raise UserError(f"retrieval_recall: every k must be >= 1; got {tuple(ks)}.")
  image_rank, text_rank = retrieval_ranks(similarity, text_to_image, matches)
  recalls = {}
  for k in ks:
    recalls[f"image_to_text/R@{k}"] = float(np.mean(image_rank < k))
    recalls[f"text_to_image/R@{k}"] = float(np.mean(text_rank < k))
  return recalls


# ------------------------------------------------------------------------------------------
# Binary segmentation masks
# ------------------------------------------------------------------------------------------


def _masks(predicted: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  predicted, target = np.asarray(predicted).astype(bool), np.asarray(target).astype(bool)
  if predicted.shape != target.shape or predicted.ndim < 2:
    raise UserError(f"Segmentation metrics: predicted and target masks must both be "
                    f"'n h w'; got {predicted.shape} and {target.shape}.")
  return predicted.reshape(len(predicted), -1), target.reshape(len(target), -1)


def mask_overlaps(predicted: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
  """Per image of boolean masks `"n h w"`: `intersection`, `union`, `predicted` and
  `target` pixel counts, each `"n"` int64."""
  p, t = _masks(predicted, target)
  return {"intersection": np.sum(p & t, axis=1), "union": np.sum(p | t, axis=1),
          "predicted": np.sum(p, axis=1), "target": np.sum(t, axis=1)}


def mask_iou(predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Per-image IoU (Jaccard index) `|P & T| / |P | T|` of boolean masks `"n h w"`, `"n"`;
  1 for an image whose union is empty (nothing predicted where there is nothing)."""
  o = mask_overlaps(predicted, target)
  return np.where(o["union"] > 0, o["intersection"] / np.maximum(o["union"], 1), 1.0)


def mask_dice(predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Per-image Dice (F1) `2 |P & T| / (|P| + |T|)` of boolean masks `"n h w"`, `"n"`; 1 for
  an image whose union is empty."""
  o = mask_overlaps(predicted, target)
  total = o["predicted"] + o["target"]
  return np.where(total > 0, 2 * o["intersection"] / np.maximum(total, 1), 1.0)


def segmentation_scores(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
  """Scores of boolean masks `"n h w"` against their targets:

  iou, iou_se: the mean per-image IoU (`mask_iou`, 1 where the union is empty) and its
    standard error over images (sample standard deviation / sqrt(n); 0 for one image);
  dataset_iou: the summed intersections over the summed unions (1 if every union is
    empty): large masks weigh more;
  dice, dice_se: the mean per-image Dice (`mask_dice`) and its standard error;
  pixel_accuracy: the fraction of all pixels classified right;
  empty_union: how many images have neither a target nor a predicted pixel (their IoU
    and Dice are the 1 above); empty_target: how many have no target pixel;
  images: n.
  """
  o = mask_overlaps(predicted, target)
  iou, dice = mask_iou(predicted, target), mask_dice(predicted, target)
  p, t = _masks(predicted, target)
  n = len(iou)
  se = lambda v: float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
  union = int(o["union"].sum())
  return {"iou": float(iou.mean()), "iou_se": se(iou),
          "dataset_iou": float(o["intersection"].sum() / union) if union else 1.0,
          "dice": float(dice.mean()), "dice_se": se(dice),
          "pixel_accuracy": float(np.mean(p == t)),
          "empty_union": float(np.sum(o["union"] == 0)),
          "empty_target": float(np.sum(o["target"] == 0)), "images": float(n)}
