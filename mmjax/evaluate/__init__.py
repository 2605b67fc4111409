"""Evaluation: few-shot protocols, metrics and benchmark formats, one home for every model.

  python -m mmjax.evaluate --workdir=DIR [--tasks=naming,vqa,captioning] [--shots=0,4,8]
      [--trials=3] [--episodes=256] [--demos=rices]

evaluates the newest verified checkpoint of a training run (or a converted checkpoint)
with the config it was trained with, prints the table (mean over trials, ± the standard
error over test examples) and writes `DIR/eval-<step>-<UTC time>.json` with every
prediction beside the scores; the evaluation at the end of training writes
`DIR/eval.json` and the same scalars to TensorBoard.

Modules, one per concern:
  protocol    shots, trials and seeds, query sets, demonstrations per test example,
              zero-shot as two text-only demonstrations, aggregates.
  prompts     prompt formats by name (OpenFlamingo's, the shapes world's).
  metrics     CIDEr-D and BLEU, VQA accuracy with its answer normalisation, top-k
              accuracy, ROC AUC, retrieval recall.
  scoring     a model's generated answers, and class names ranked by log-likelihood
              with the prompt's keys and values computed once.
  tasks       `FewShotTask` (a benchmark's examples, prompts and scoring) and `Item`.
  benchmarks  readers of COCO (Karpathy split), VQAv2 / OK-VQA, ImageNet-style folders
              and Hateful Memes.
  rices       demonstrations retrieved by the image similarity of a CLIP image tower.
  shapes      the embedded default's tasks: in-context naming, VQA and captioning.
  zeroshot    dual encoders (CLIP, SigLIP): zero-shot classification from class names
              and prompt templates, and image-text retrieval.
  run         `evaluate()`, the table and the report.

A new task is a module that builds a `FewShotTask` (or any object with `name`, `mode`,
`cells(protocol)` and `score(cell, outputs)`) and a name in `run.make_tasks`.
"""

from mmjax.evaluate.prompts import answer_text, chunk_text, encode_prompts, few_shot_text
from mmjax.evaluate.run import Results, Stopped, evaluate, format_table, report
from mmjax.evaluate.workdir import evaluate_workdir

__all__ = ["Results", "Stopped", "answer_text", "chunk_text", "encode_prompts", "evaluate",
           "evaluate_workdir", "few_shot_text", "format_table", "report"]
