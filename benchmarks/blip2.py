"""mmjax against transformers' BLIP-2 on the same weights, same batch, same machine.

  python -m benchmarks.blip2 --size=default     # configs/blip2.py "tiny" shapes
  python -m benchmarks.blip2 --size=base        # ViT-B/16, a BERT-base Q-Former, OPT-125M

The references are transformers' Blip2ForConditionalGeneration (with an OPT LM) and
Blip2ForImageTextRetrieval, built from random configs of the chosen size and saved;
mmjax runs the same weights through `mmjax.convert.blip2.convert_blip2`. Measured,
alternating the two systems in each of --rounds rounds (`side_by_side.alternate`):

  stage2_train_step  frozen ViT and OPT; the Q-Former, the queries, `lm_proj` and
               `ln_vision` train with AdamW and gradient clipping at the recipe's norm.
               mmjax: the real `mmjax.train` step of a configs/blip2.py recipe whose model
               is the converted one (LM over the queries and the text before each target,
               logits on the text). PyTorch: the model's forward with `labels` (its loss:
               the LM over the queries and the whole text, logits on every position; the
               same targets, the text after its BOS), `loss.backward()`, the same
               optimizer on the same parameters.
  stage1_train_step  frozen ViT; the Q-Former with its text embeddings, the heads and
               `ln_vision` train, AdamW and clipping as above. mmjax: the real train step
               of the stage-1 recipe: ITC (one pass of [queries; text] under the unimodal
               mask), ITM (a bidirectional pass over 3 x batch pairs, negatives drawn from
               the similarities) and ITG (a causal pass and the text head over the
               vocabulary; its weights are random, transformers' retrieval model has none).
               PyTorch: transformers' retrieval model has no training loss, so ITC and ITM
               are computed here from its own modules, called as its forward calls them
               (the forward itself would encode the images again on every call): the
               ViT once; ITC from a query-only and a text-only pass (`use_image_text_
               matching_head=False`), each image's best query's cosine similarity over a
               learned temperature, label smoothing 0.1 both ways; ITM from a pass over
               the same 3 x batch pairs as mmjax's shapes (`...=True`), each image's and
               each text's negative the next row's; no ITG.
               mmjax does more work per step here; tokens/s count the same text tokens
               for both, and each system's MFU counts the FLOPs of what it computes.

Both use every core (torch.set_num_threads(os.cpu_count()); OMP_WAIT_POLICY=PASSIVE unless
the environment sets it, see below). One JSON line per
(measurement, system) goes to benchmarks/results/blip2.jsonl, with the ratio mmjax/PyTorch
of tokens/s on the mmjax lines; MFU is model FLOPs (`mmjax.flops`) over the float32
matmul rate measured in the same run (the best of three measurements).
"""

import os

# PyTorch's OpenMP threads spin while they wait; on a machine whose cores other work also
# takes, a step then waits for a descheduled spinner and runs many times slower (10-100x
# on two shared cores). Passive waiting keeps it at its speed. Set before anything loads
# torch (tensorboardX does, through mmjax.train); XLA does not use OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import harness
from benchmarks.side_by_side import MmjaxStep, alternate, record_systems
from mmjax import flops
from mmjax.checkpoints import flat_params, per_layer
from mmjax.convert.blip2 import convert_blip2
from mmjax.models.blip2 import TextHead
from mmjax.tasks.blip2 import LABEL_SMOOTHING

SIZES = {
    # configs/blip2.py "tiny": its ViT and Q-Former; an OPT of its LM's shape; its batches.
    "default": {
        "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
        "qformer": {"vocab_size": 513, "hidden_size": 128, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "intermediate_size": 512,
                    "max_position_embeddings": 32, "cross_attention_frequency": 2},
        "opt": {"vocab_size": 512, "hidden_size": 256, "num_hidden_layers": 4,
                "num_attention_heads": 4, "ffn_dim": 1024},
        "num_queries": 16, "embed_dim": 128, "seq_len": 24, "stage1_batch": 32,
        "stage2_batch": 16},
    # ViT-B/16 at 224px, BLIP-2's BERT-base Q-Former (32 queries), OPT-125M.
    "base": {
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
        "qformer": {"vocab_size": 30523, "hidden_size": 768, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "intermediate_size": 3072,
                    "max_position_embeddings": 512, "cross_attention_frequency": 2},
        "opt": {"vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12,
                "num_attention_heads": 12, "ffn_dim": 3072},
        "num_queries": 32, "embed_dim": 256, "seq_len": 32, "stage1_batch": 16,
        "stage2_batch": 8},
}


def reference_model(size: dict, stage: int, path: str):
  """A random transformers BLIP-2 of `size` for `stage` (2: Blip2ForConditionalGeneration
  with OPT, 1: Blip2ForImageTextRetrieval), saved to `path`: `(torch model, mmjax
  Blip2Config, mmjax params)`, the same weights in both. The LM's last token is the
  `<image>` placeholder transformers puts the queries in."""
  import torch
  import transformers
  torch.manual_seed(0)
  opt = size["opt"]
  config = transformers.Blip2Config(
      vision_config=size["vision"],
      qformer_config={**size["qformer"], "encoder_hidden_size": size["vision"]["hidden_size"],
                      "use_qformer_text_input": stage == 1},
      text_config={**opt, "model_type": "opt", "word_embed_proj_dim": opt["hidden_size"],
                   "max_position_embeddings": 2048, "pad_token_id": 1, "bos_token_id": 2,
                   "eos_token_id": 2},
      num_query_tokens=size["num_queries"], image_text_hidden_size=size["embed_dim"],
      image_token_index=opt["vocab_size"] - 1)
  cls = (transformers.Blip2ForConditionalGeneration if stage == 2
         else transformers.Blip2ForImageTextRetrieval)
  model = cls(config)
  model.save_pretrained(path)
  cfg, params = convert_blip2(path)
  return model, cfg, params


def example_batch(size: dict, stage: int, vocab: int, rng: np.random.Generator) -> dict:
  """`stage`'s batch as the recipe's pipeline gives it: normalised float images
  `"b h w c"` (the ViT takes float images as normalised) and unpadded text `"b t"`,
  BOS (stage 2) or [CLS] (stage 1) first, no `<image>` placeholder inside."""
  b = size[f"stage{stage}_batch"]
  side = size["vision"]["image_size"]
  tokens = rng.integers(3, vocab - 1, size=(b, size["seq_len"]))
  tokens[:, 0] = 2 if stage == 2 else 1
  return {"image": rng.normal(size=(b, side, side, 3)).astype(np.float32),
          "tokens": tokens.astype(np.int32), "loss_weight": np.ones((b,), np.float32),
          "dataset_id": np.zeros((b,), np.int32)}


def recipe(cfg, size: dict, stage: int):
  """The configs/blip2.py recipe of `stage` with `cfg` as its model, on `size`'s batches,
  nothing pretrained to load (the converted parameters are put in place instead)."""
  from mmjax.configs import blip2 as blip2_config
  config = blip2_config.get_config("tiny" if stage == 2 else "stage1")
  config.model = dataclasses.asdict(cfg)
  config.init = {}
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  config.data.batch_size = size[f"stage{stage}_batch"]
  config.data.seq_len = size["seq_len"]
  config.data.image_size = cfg.vision.image_size
  for dataset in config.data.datasets.values():
    dataset.source.image_size = cfg.vision.image_size
  config.optim.warmup_steps = 0
  return config


def with_text_head(cfg, params: dict) -> dict:
  """Stage-1 parameters with a random ITG text head, which transformers' retrieval model
  does not have."""
  q = cfg.qformer
  embedding = params["qformer"]["embed"]["embedding"]
  head = TextHead(q.activation, q.norm_eps).init(jax.random.key(0), np.zeros((1, 1, q.width),
                                                                              np.float32),
                                                 embedding)["params"]
  return {**params, "text_head": jax.tree_util.tree_map(np.asarray, nn.unbox(head))}


class TorchStep:
  """A train step of transformers' BLIP-2 of `stage` on `batch` (see the module
  docstring): AdamW with the recipe's `optim` on the parameters that train."""

  def __init__(self, model, stage: int, batch: dict, optim):
    import torch
    self.torch, self.stage, self.model = torch, stage, model.train()
    model.requires_grad_(False)
    for name, p in model.named_parameters():
      vision = name.startswith("vision_model.")
      if (not vision and not name.startswith("language_model.")) or (
          vision and ".post_layernorm." in name):
        p.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tokens = torch.tensor(batch["tokens"], dtype=torch.long)
    self.pixels = torch.tensor(batch["image"].transpose(0, 3, 1, 2))
    q = model.config.num_query_tokens
    if stage == 2:
      placeholders = torch.full((len(tokens), q), model.config.image_token_index)
      # Labels over the whole input, -100 (ignored) on the placeholders and the BOS, which
      # mmjax does not predict either. (With labels for the text alone, transformers
      # slices its logits to their length, and its loss cannot `view` the slice.)
      labels = torch.cat([torch.full_like(placeholders, -100), tokens], 1)
      labels[:, q] = -100
      self.inputs = {"pixel_values": self.pixels,
                     "input_ids": torch.cat([placeholders, tokens], 1), "labels": labels}
    else:
      self.temp = torch.nn.Parameter(torch.tensor(0.07))
      trainable.append(self.temp)
      b = len(tokens)
      self.tokens, self.mask = tokens, torch.ones_like(tokens)
      negative = torch.roll(torch.arange(b), -1)
      self.itm_images = torch.cat([torch.arange(b), negative, torch.arange(b)])
      self.itm_tokens = torch.cat([tokens, tokens, tokens[negative]])
      self.itm_labels = torch.cat([torch.ones(b, dtype=torch.long),
                                   torch.zeros(2 * b, dtype=torch.long)])
    self.trainable = trainable
    self.optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=(optim.b1, optim.b2),
                                       eps=optim.eps, weight_decay=optim.weight_decay)
    self.clip_norm = optim.clip_norm

  def stage1_loss(self):
    """ITC + ITM from the retrieval model's modules, called as its forward calls them."""
    torch, model = self.torch, self.model
    functional = torch.nn.functional
    image = model.vision_model(pixel_values=self.pixels).last_hidden_state
    b, q = len(self.tokens), model.config.num_query_tokens
    queries = model.query_tokens.expand(b, -1, -1)
    query_out = model.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    text_out = model.qformer(query_embeds=model.embeddings(input_ids=self.tokens),
                             query_length=0, attention_mask=self.mask).last_hidden_state
    image_embeds = functional.normalize(model.vision_projection(query_out), dim=-1)
    text_embeds = functional.normalize(model.text_projection(text_out[:, 0]), dim=-1)
    similarity = torch.einsum("iqk,jk->ijq", image_embeds, text_embeds).amax(-1)
    similarity = similarity / self.temp.clamp(0.001, 0.5)
    labels = torch.arange(b)
    itc = (functional.cross_entropy(similarity, labels, label_smoothing=LABEL_SMOOTHING)
           + functional.cross_entropy(similarity.T, labels,
                                      label_smoothing=LABEL_SMOOTHING)) / 2
    n = len(self.itm_tokens)
    embeds = model.embeddings(input_ids=self.itm_tokens,
                              query_embeds=model.query_tokens.expand(n, -1, -1))
    mask = torch.cat([torch.ones(n, q, dtype=torch.long), torch.ones_like(self.itm_tokens)], 1)
    out = model.qformer(query_embeds=embeds, query_length=q, attention_mask=mask,
                        encoder_hidden_states=image[self.itm_images]).last_hidden_state
    itm = functional.cross_entropy(model.itm_head(out[:, :q]).mean(1), self.itm_labels)
    return itc + itm

  def __call__(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.model(**self.inputs).loss if self.stage == 2 else self.stage1_loss()
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.trainable, self.clip_norm)
    self.optimizer.step()


def run(size: dict, *, name: str, rounds: int, runs: int, stages: tuple[int, ...] = (2, 1),
        out: str | None = None) -> list[dict]:
  """Measures the train steps of `stages` at `size` (a `SIZES` entry) and records one line
  per stage and system; returns the lines."""
  import torch
  torch.set_num_threads(os.cpu_count())
  # The best of three: on a shared machine one measurement can land in a busy moment.
  peak = max(harness.matmul_peak(jnp.float32) for _ in range(3))
  lines = []
  for stage in stages:
    with tempfile.TemporaryDirectory() as path:
      model, cfg, params = reference_model(size, stage, path)
    batch = example_batch(size, stage, size["opt" if stage == 2 else "qformer"]["vocab_size"],
                          np.random.default_rng(0))
    config = recipe(cfg, size, stage)
    if stage == 1:
      params = with_text_head(cfg, params)
    ours = MmjaxStep(config, params, batch)
    theirs = TorchStep(model, stage, batch, config.optim)
    model_flops = ours.model_flops()
    if stage == 1:  # transformers computes less: no ITG, ITC in two passes
      paths = per_layer({**flat_params(ours.parts.abstract["params"]),
                         **flat_params(ours.parts.abstract["frozen"])},
                        take=lambda value, i: value)
      model_flops = {"mmjax": model_flops, "torch": flops.step_flops(flops.blip2(
          cfg, config.data.batch_size, config.data.seq_len, captioning=False,
          joint_contrastive=False), paths, config.trainable)["total"]}
    common = {"size": name, "batch": config.data.batch_size, "seq_len": config.data.seq_len,
              "num_queries": cfg.qformer.num_queries, "threads": os.cpu_count(),
              "torch": torch.__version__, "peak_flops": peak,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    timing = alternate({"mmjax": ours, "torch": theirs}, rounds, runs)
    lines += record_systems("blip2", common, f"stage{stage}_train_step", timing,
                            config.data.batch_size * config.data.seq_len, peak=peak,
                            model_flops=model_flops, out=out)
    del ours, theirs
  return lines


def main(argv):
  del argv
  f = flags.FLAGS
  run(SIZES[f.size], name=f.size, rounds=f.rounds, runs=f.runs,
      stages=tuple(int(s) for s in f.stages), out=f.out)


if __name__ == "__main__":
  # Defined here, not at import, so that the measurement functions import cleanly anywhere.
  flags.DEFINE_enum("size", "default", sorted(SIZES), "Model and batch size.")
  flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
  flags.DEFINE_integer("runs", 3, "Timed calls per system per round.")
  flags.DEFINE_list("stages", ["2", "1"], "Train steps to measure: 2, 1 or both.")
  flags.DEFINE_string("out", None, "Results file (default: benchmarks/results/blip2.jsonl).")
  app.run(main)
