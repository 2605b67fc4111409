"""The evaluation metrics against their reference definitions: the COCO caption toolkit
(`pycocoevalcap`, run here as the reference), the official VQAv2 rules (hand-computed cases),
and naive loops for classification and retrieval."""

import contextlib
import io
import itertools
import math
import shutil

import numpy as np
import pytest

from mmjax.cli import UserError
from mmjax.evaluate import metrics

# Six images with five references each, as COCO captions come: mixed case, final periods,
# commas, possessives, contractions, quotes, brackets, hyphens, numbers, doubled spaces.
REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.",
        "A surfer in a black wetsuit rides a large wave!",
        "a person on a surf board catching a wave",
        "The man's surfboard cuts through the ocean's spray.",
        "Surfer (in black) riding the waves -- isn't it great?"],
    2: ["Two dogs playing with a frisbee in the grass.",
        "A pair of dogs fight over a red, plastic frisbee",
        "Two brown-and-white dogs run across a field.",
        'The dogs are playing "catch" on the lawn',
        "Dogs don't stop playing; they're chasing a disc."],
    3: ["A kitchen with stainless steel appliances and wood cabinets.",
        "A clean, modern kitchen; with an oven and a fridge.",
        "There is a refrigerator next to the stove in this kitchen",
        "The kitchen's counters are made of granite...",
        "KITCHEN WITH A STOVE, A SINK AND 2 WINDOWS"],
    4: ["A plate of food with broccoli, rice and chicken.",
        "A white plate topped with meat and vegetables.",
        "Dinner: chicken, broccoli & 1,000 grains of rice",
        "Someone's healthy meal sits on the table.",
        "a plate that has food on it"],
    5: ["A red double-decker bus driving down a city street.",
        "The bus is parked at the stop at 3:30 p.m.",
        "A large red bus on the road in the U.K.",
        "A tour bus [red] is going down the street.",
        "People waiting as a red bus drives by."],
    6: ["A giraffe standing next to a tree in a zoo.",
        "A tall giraffe eats leaves from a tree",
        "The giraffe's neck stretches up to the branches.",
        "A giraffe that is standing in the dirt.",
        "There's a giraffe and a tree; nothing else."],
}
PREDICTIONS = {
    1: "A man riding a wave on a surfboard.",
    2: "Two dogs are playing with a frisbee.",
    3: "A kitchen with a stove and a refrigerator.",
    4: "A plate of food with broccoli and rice",
    5: "A red bus driving down a street.",
    6: "A cat sitting on a couch.",
}

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="the reference PTB tokenizer needs Java")


def _reference_pipeline(predictions, references):
  """The COCO caption toolkit's own pipeline: PTBTokenizer, then Cider and Bleu."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  tokenizer = PTBTokenizer()
  gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
  res = tokenizer.tokenize({k: [{"caption": c}] for k, c in predictions.items()})
  cider, _ = Cider().compute_score(gts, res)
  with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its counts
    bleu, _ = Bleu(4).compute_score(gts, res)
  return gts, res, cider, bleu


# ------------------------------------------------------------------------------------------
# Captioning
# ------------------------------------------------------------------------------------------


@needs_java
def test_caption_scores_match_the_coco_toolkit():
  pytest.importorskip("pycocoevalcap")
  _, _, cider, bleu = _reference_pipeline(PREDICTIONS, REFERENCES)
  scores = metrics.caption_scores(PREDICTIONS, REFERENCES, tokenizer="ptb")
  assert scores.tokenizer == "ptb"
  assert scores.cider == pytest.approx(cider, rel=1e-12)
  assert scores.bleu == pytest.approx(bleu, rel=1e-12)
  assert 0.3 < scores.cider < 3 and 0 < scores.bleu[3] < scores.bleu[0] < 1
  assert scores.as_dict() == {"CIDEr": scores.cider, "BLEU-1": scores.bleu[0],
                              "BLEU-2": scores.bleu[1], "BLEU-3": scores.bleu[2],
                              "BLEU-4": scores.bleu[3], "tokenizer": "ptb"}


@needs_java
def test_simple_tokenizer_gives_ptb_tokens():
  pytest.importorskip("pycocoevalcap")
  gts, res, _, _ = _reference_pipeline(PREDICTIONS, REFERENCES)
  extra = ["It's 5 p.m. in the U.S. -- isn't it?", "A cat (black) [on] {a} mat",
           "Won't can't cannot gonna dogs' toys 1/2 and/or 3.5", "\u201cQuoted\u201d caf\u00e9",
           "", "a@b.com #tag w/ 50% $5 at&t", "Wait\u2026 what?! e.g. mr. x"]
  captions = [c for k in REFERENCES for c in REFERENCES[k] + [PREDICTIONS[k]]] + extra
  ptb = metrics.ptb_tokenize(captions)
  assert [metrics.simple_tokenize(c) for c in captions] == ptb
  # ptb_tokenize is the toolkit's tokenisation, caption for caption.
  assert ptb[:len(captions) - len(extra)] == [
      t for k in REFERENCES for t in gts[k] + res[k]]
  assert ptb[len(captions) - len(extra):len(captions) - len(extra) + 2] == [
      "it 's 5 p.m. in the u.s. is n't it", "a cat -lrb- black -rrb- -lsb- on -rsb- -lcb- a "
      "-rcb- mat"]


def test_simple_tokenizer_rules():
  assert metrics.simple_tokenize("A Dog's toy, isn't it?") == "a dog 's toy is n't it"
  assert metrics.simple_tokenize("Two  dogs\nplaying.") == "two dogs playing"
  assert metrics.simple_tokenize("1,000 people at 3:30 p.m.") == "1,000 people at 3:30 p.m."
  assert metrics.simple_tokenize('a "red" (big) bus') == "a red -lrb- big -rrb- bus"


def test_caption_scores_simple_tokenizer_is_labelled():
  scores = metrics.caption_scores(PREDICTIONS, REFERENCES, tokenizer="simple")
  assert scores.tokenizer == "simple"
  tokens = {k: metrics.simple_tokenize(c) for k, c in PREDICTIONS.items()}
  refs = {k: [metrics.simple_tokenize(c) for c in v] for k, v in REFERENCES.items()}
  assert scores.cider == metrics.cider_d(tokens, refs)[0]
  assert scores.cider_per_item[1] > scores.cider_per_item[6]  # a cat is not a giraffe


def test_auto_tokenizer_falls_back_without_java(monkeypatch):
  monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
  assert not metrics.ptb_available()
  assert metrics.caption_scores(PREDICTIONS, REFERENCES).tokenizer == "simple"
  with pytest.raises(UserError, match="needs `java` on PATH"):
    metrics.caption_scores(PREDICTIONS, REFERENCES, tokenizer="ptb")


def test_scorers_match_the_coco_toolkit_on_tokenised_text():
  """CIDEr-D and BLEU alone, without Java: the same tokens into both implementations."""
  pytest.importorskip("pycocoevalcap")
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  refs = {k: [metrics.simple_tokenize(c) for c in v] for k, v in REFERENCES.items()}
  rng = np.random.default_rng(0)
  vocab = sorted({w for v in refs.values() for r in v for w in r.split()})
  for trial in range(3):
    # Candidates of varied length, a repeated word, one empty and one equal to a reference.
    cands = {k: " ".join(rng.choice(vocab, size=rng.integers(1, 12))) for k in refs}
    # Repeated n-grams that the references also hold, so the clipping min(w_c, w_r) bites.
    cands[2], cands[3] = "", refs[3][trial]
    cands[4] = "a plate of food a plate of food plate plate with with"
    cider, per_item = metrics.cider_d(cands, refs)
    ref_cider, ref_per_item = Cider().compute_score(refs, {k: [c] for k, c in cands.items()})
    assert cider == pytest.approx(ref_cider, rel=1e-12)
    assert list(per_item.values()) == pytest.approx(list(ref_per_item), rel=1e-12, abs=1e-15)
    with contextlib.redirect_stdout(io.StringIO()):
      ref_bleu, _ = Bleu(4).compute_score(refs, {k: [c] for k, c in cands.items()})
    assert metrics.bleu(cands, refs) == pytest.approx(ref_bleu, rel=1e-12)


def test_cider_hand_computed():
  # One image: every n-gram is in every document, so every idf weight log(1/1) is 0.
  assert metrics.cider_d({0: "a dog"}, {0: ["a dog"]}) == (0.0, {0: 0.0})
  # Candidates equal to all their references and sharing no n-gram with the other image:
  # each k-gram cosine is 1 where the sentence has k-grams and 0 where it has none (no
  # trigrams in "a b"), so 10 * mean_k = 10 for 4+ words and 10 * 2/4 = 5 for 2 words.
  _, per_item = metrics.cider_d({0: "a b c d", 1: "e f"},
                                {0: ["a b c d"] * 3, 1: ["e f", "e f"]})
  assert per_item == pytest.approx({0: 10.0, 1: 5.0}, rel=1e-12)
  # The Gaussian length penalty: with sigma = 6 the score is the one without a penalty
  # (sigma -> infinity) times exp(-delta^2 / 72), delta = 1 bigram - 6 bigrams.
  cands, refs = {0: "a b", 1: "x y"}, {0: ["a b c d e f g"], 1: ["x y"]}
  wide = metrics.cider_d(cands, refs, sigma=1e9)[1][0]
  assert metrics.cider_d(cands, refs)[1][0] == pytest.approx(
      wide * math.exp(-25 / 72), rel=1e-12)


def test_bleu_hand_computed():
  # "the cat" against "the cat sat on the mat": p1 = p2 = 1, brevity exp(1 - 6/2).
  b = metrics.bleu({0: "the cat"}, {0: ["the cat sat on the mat"]})
  assert b[:2] == pytest.approx([math.exp(-2)] * 2, rel=1e-6)
  # No trigram: the toolkit's guards make p3 = 1e-15 / 1e-9, not 0.
  assert b[2] == pytest.approx((1e-6) ** (1 / 3) * math.exp(-2), rel=1e-6)
  # The closest reference length (3, not 6) sets the brevity penalty; none here.
  b = metrics.bleu({0: "the cat sat"}, {0: ["the cat sat on the mat", "a cat sat"]})
  assert b[0] == pytest.approx(1.0, rel=1e-6) and b[1] == pytest.approx(1.0, rel=1e-6)
  # Equally close references (3 and 5 words for 4): the shorter counts, so no penalty.
  b = metrics.bleu({0: "the cat sat down"}, {0: ["the cat sat", "the cat sat down now"]})
  assert b[0] == pytest.approx(1.0, rel=1e-6)
  # Clipping: "the the the" has one "the" in the reference.
  assert metrics.bleu({0: "the the the"}, {0: ["the cat"]})[0] == pytest.approx(1 / 3)


def test_caption_scores_errors():
  with pytest.raises(UserError, match="keys must be the same"):
    metrics.caption_scores({1: "a"}, {1: ["a"], 2: ["b"]}, tokenizer="simple")
  with pytest.raises(UserError, match="list of reference captions"):
    metrics.caption_scores({1: "a"}, {1: "a dog"}, tokenizer="simple")
  with pytest.raises(UserError, match="tokenizer='bert'"):
    metrics.caption_scores({1: "a"}, {1: ["a"]}, tokenizer="bert")


def test_postprocessing():
  assert metrics.postprocess_caption_generation('A "dog" on a couch.\nOutput: a cat') == (
      "A dog on a couch.\n")
  assert metrics.postprocess_vqa_generation("yes Question: is it?") == "yes "
  assert metrics.postprocess_vqa_generation("two Short answer: 3") == "two "
  assert metrics.postprocess_vqa_generation("red, white, blue Answer") == "red"
  assert metrics.postprocess_vqa_generation("red,white") == "red,white"


# ------------------------------------------------------------------------------------------
# VQA
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, normalised", [
    ("\tyes\n", "yes"),                         # tabs, line breaks and ends
    ("yes!", "yes"),                            # a mark that touches no space -> a space
    ("black/white", "black white"),
    ("t-shirt", "t shirt"),
    ("t-shirt - red", "tshirt red"),            # "-" touches a space: every "-" removed
    ("1,000", "1000"),                          # a comma between digits: all marks removed
    ("1,000 t-shirts", "1000 tshirts"),
    ("red,white", "red white"),
    ("3.5", "3.5"),                             # a period before a digit stays
    ("3.5.", "3.5"),
    ("e.g.", "eg"),
    ("yes" + "." * 40, "yes" + "." * 8),        # the official script removes 32 periods
    ("Two", "2"), ("none", "0"), ("ten", "10"), ("eleven", "eleven"),  # number words
    ("The Dog", "dog"), ("a an the", ""),       # articles
    ("dont", "don't"), ("whats", "what's"), ("Im", "im"),  # contractions ("Im" never matches)
    ("it's", "it's"), ("somebody'd", "somebodyd"),
])
def test_normalize_vqa_answer(answer, normalised):
  assert metrics.normalize_vqa_answer(answer) == normalised


@pytest.mark.parametrize("matches, accuracy", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9),
                                               (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matches, accuracy):
  answers = ["yes"] * matches + ["no", "maybe"] * 5
  assert metrics.vqa_accuracy("yes", answers[:10]) == pytest.approx(accuracy)
  assert metrics.vqa_accuracy("Yes.", answers[:10], protocol="openflamingo") == (
      pytest.approx(accuracy))
  # The definition: the mean over the 10 leave-one-out subsets of min(1, matches / 3).
  subsets = [answers[:i] + answers[i + 1:10] for i in range(10)]
  assert accuracy == pytest.approx(np.mean([min(1, s.count("yes") / 3) for s in subsets]))


def test_vqa_protocols():
  # VQAv2: when the human answers agree, nothing is normalised (only whitespace stripped).
  assert metrics.vqa_accuracy("two", ["2"] * 10) == 0.0
  assert metrics.vqa_accuracy("Yes", ["yes"] * 10) == 0.0
  assert metrics.vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
  # ... when they differ, the prediction and the answers are normalised alike.
  assert metrics.vqa_accuracy("two", ["2"] * 9 + ["3"]) == 1.0
  assert metrics.vqa_accuracy("Yes!", ["yes"] * 3 + ["No"] * 7) == pytest.approx(0.9)
  assert metrics.vqa_accuracy("no", ["yes"] * 3 + ["No."] * 7) == 1.0
  # OpenFlamingo: always normalised.
  assert metrics.vqa_accuracy("two", ["2"] * 10, protocol="openflamingo") == 1.0
  assert metrics.vqa_accuracy("Yes", ["yes"] * 10, protocol="openflamingo") == 1.0


def test_vqa_scores():
  preds = {"q1": "2", "q2": "dog", "q3": "blue"}
  answers = {"q1": ["2"] * 10, "q2": ["dog"] + ["cat"] * 9, "q3": ["red"] * 10}
  assert metrics.vqa_scores(preds, answers) == pytest.approx((1.0 + 0.3 + 0.0) / 3)
  with pytest.raises(UserError, match="keys must be the same"):
    metrics.vqa_scores(preds, {"q1": ["2"] * 10})
  with pytest.raises(UserError, match="at least 2 human answers"):
    metrics.vqa_accuracy("yes", ["yes"])
  with pytest.raises(UserError, match="protocol='lavis'"):
    metrics.vqa_accuracy("yes", ["yes"] * 10, protocol="lavis")


# ------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------


def test_top_k_accuracy_against_a_loop():
  rng = np.random.default_rng(0)
  scores, labels = rng.normal(size=(50, 7)), rng.integers(0, 7, size=50)
  for k in (1, 3, 7):
    naive = np.mean([labels[i] in np.argsort(-scores[i])[:k] for i in range(50)])
    assert metrics.top_k_accuracy(scores, labels, k) == naive
  # Ties count against the label.
  assert metrics.top_k_accuracy(np.zeros((4, 5)), np.arange(4), 4) == 0.0
  assert metrics.top_k_accuracy(np.zeros((4, 5)), np.arange(4), 5) == 1.0
  with pytest.raises(UserError, match="NaN"):
    metrics.top_k_accuracy(np.full((2, 3), np.nan), np.zeros(2, int))
  with pytest.raises(UserError, match="class indices"):
    metrics.top_k_accuracy(np.zeros((2, 3)), np.array([0, 3]))


def test_roc_auc():
  # The example of sklearn.metrics.roc_auc_score's documentation.
  assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
  rng = np.random.default_rng(0)
  for _ in range(5):
    scores, labels = rng.integers(0, 6, size=40).astype(float), rng.integers(0, 2, size=40)
    pos, neg = scores[labels == 1], scores[labels == 0]
    naive = np.mean([(p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg)])
    assert metrics.roc_auc(scores, labels) == pytest.approx(naive, rel=1e-12)
  assert metrics.roc_auc([1, 2, 3], [0, 1, 1]) == 1.0
  assert metrics.roc_auc([5, 5, 5], [0, 1, 1]) == 0.5
  with pytest.raises(UserError, match="needs both classes"):
    metrics.roc_auc([0.1, 0.2], [1, 1])


# ------------------------------------------------------------------------------------------
# Retrieval
# ------------------------------------------------------------------------------------------


def test_retrieval_recall_against_a_loop():
  rng = np.random.default_rng(0)
  n_images, per_image = 12, 3
  text_to_image = rng.permutation(np.repeat(np.arange(n_images), per_image))
  # Similar to its own captions more often than chance, so recalls are neither 0 nor 1.
  sim = rng.normal(size=(n_images, len(text_to_image)))
  sim[text_to_image, np.arange(len(text_to_image))] += 0.8
  got = metrics.retrieval_recall(sim, text_to_image, ks=(1, 5, 10))
  for k in (1, 5, 10):
    i2t = np.mean([any(text_to_image[j] == i for j in np.argsort(-sim[i])[:k])
                   for i in range(n_images)])
    t2i = np.mean([text_to_image[j] in np.argsort(-sim[:, j])[:k]
                   for j in range(len(text_to_image))])
    assert got[f"image_to_text/R@{k}"] == i2t
    assert got[f"text_to_image/R@{k}"] == t2i
  for direction in ("image_to_text", "text_to_image"):
    assert 0 < got[f"{direction}/R@1"] < got[f"{direction}/R@5"] < got[f"{direction}/R@10"] < 1
  assert set(got) == {f"{d}/R@{k}" for d in ("image_to_text", "text_to_image")
                      for k in (1, 5, 10)}


def test_retrieval_recall_ties_and_errors():
  got = metrics.retrieval_recall(np.zeros((3, 6)), np.array([0, 0, 1, 1, 2, 2]), ks=(1, 2, 4))
  assert got == {"image_to_text/R@1": 0.0, "text_to_image/R@1": 0.0,
                 "image_to_text/R@2": 0.0, "text_to_image/R@2": 0.0,
                 "image_to_text/R@4": 0.0, "text_to_image/R@4": 1.0}
  with pytest.raises(UserError, match="have no text"):
    metrics.retrieval_recall(np.zeros((3, 2)), np.array([0, 1]))
  with pytest.raises(UserError, match="image indices"):
    metrics.retrieval_recall(np.zeros((2, 2)), np.array([0, 2]))



def test_f1_and_calibration_against_scikit_learn_and_hand_values():
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  predictions, labels = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
  assert metrics.f1_score(predictions, labels) == pytest.approx(
      sklearn_metrics.f1_score(labels, predictions))
  assert metrics.f1_score(np.zeros(4), np.zeros(4)) == 0.0
  # Two bins by hand: confidences 0.6 (2 examples, 1 right) and 0.9 (2, both right).
  probabilities = np.array([[0.6, 0.4], [0.4, 0.6], [0.9, 0.1], [0.1, 0.9]])
  diagram = metrics.reliability(probabilities, np.array([0, 0, 0, 1]), bins=10)
  assert list(diagram["count"][[5, 8]]) == [2, 2] and diagram["count"].sum() == 4
  assert metrics.expected_calibration_error(probabilities, np.array([0, 0, 0, 1]),
                                            bins=10) == pytest.approx((2 * 0.1 + 2 * 0.1) / 4)


def test_temperature_scaling_recovers_the_temperature_that_made_the_labels():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4000, 3)) * 4
  true_t = 2.5
  p = np.exp(metrics.log_softmax(logits / true_t))
  labels = np.array([rng.choice(3, p=row) for row in p])
  t = metrics.fit_temperature(logits, labels)
  assert t == pytest.approx(true_t, rel=0.1)
  assert (metrics.negative_log_likelihood(logits, labels, t)
          < metrics.negative_log_likelihood(logits, labels, 1.0))
  before = metrics.expected_calibration_error(np.exp(metrics.log_softmax(logits)), labels)
  after = metrics.expected_calibration_error(np.exp(metrics.log_softmax(logits / t)), labels)
  assert after < before / 3
