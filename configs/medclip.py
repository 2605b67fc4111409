"""MedCLIP: decoupled image-text contrastive learning with the semantic matching loss, on
the embedded findings world (radiograph-like images, CheXpert-style finding labels,
template reports).

  python -m mmjax.train --config=configs/medclip.py[:variant] --workdir=/tmp/medclip

Variants are `<method>`, `<shape>` or `<method>-<shape>`:
  method:
    semantic  MedCLIP: the semantic matching loss (soft targets from the label similarity
              of every image with every text) on the paired studies (one sentence of
              each report, as MedCLIP draws them) mixed with decoupled data: images of
              an unpaired pool with sentences drawn independently from an unpaired text
              pool, and some images given a prompt sentence drawn by their labels.
    infonce   the baseline: CLIP's symmetric InfoNCE on the paired studies and their
              whole reports only (unpaired data has no use without labels).
  shape: tiny (default: a 4-stage bottleneck ResNet 8 wide and a 2-layer BERT at 64
    px, minutes on a CPU) or `paper` (ResNet-50 and Bio_ClinicalBERT's BERT-base at 224
    px, MedCLIP's batch of 100 and its learning rate: for summaries, FLOPs and fit checks,
    and for converted checkpoints).

The paired set's size is a config value: `--config.data.datasets.paired.source.fraction=0.1`
keeps its first tenth (README, "MedCLIP"). Zero-shot classification (5 findings, each
class's prompts composed from its severity x subtype x location words, scored by the mean
over them) and report retrieval on held-out studies end every run
(`mmjax.evaluate.zeroshot`).
"""

import ml_collections

from mmjax.cli import UserError
from mmjax.data import findings_world

METHODS = ("semantic", "infonce")
SHAPES = ("tiny", "paper")


def parse_variant(arg: str | None) -> tuple[str, str]:
  """`(method, shape)` of a variant name."""
  method, _, shape = (arg or "").partition("-")
  if method in SHAPES and not shape:
    method, shape = "", method
  method, shape = method or "semantic", shape or "tiny"
  if method not in METHODS or shape not in SHAPES:
    raise UserError(f"Unknown medclip variant {arg!r}; choose a method of {METHODS}, a "
                    f"shape of {SHAPES}, or <method>-<shape> "
                    "(--config=configs/medclip.py:<variant>).")
  return method, shape


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  method, shape = parse_variant(arg)
  paper = shape == "paper"
  config = ml_collections.ConfigDict()
  config.task = "medclip"
  config.variant = method if shape == "tiny" else f"{method}-{shape}"
  config.seed = 0
  # Devices: a (data, fsdp, tensor) mesh, -1 filling with the remaining devices, and the
  # sharding preset ("data_parallel", "fsdp", "fsdp_tensor"; see mmjax.sharding).
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = "fsdp"
  # "bfloat16": mixed precision, float32 parameters and optimizer state (mmjax.tasks).
  config.compute_dtype = "float32"
  config.remat = "none"
  config.scan_layers = paper
  # The findings world's word-level BERT vocabulary ([CLS] ... [SEP], [PAD] 0); a real
  # run gives Bio_ClinicalBERT's tokenizer directory here.
  config.tokenizer = str(findings_world.TOKENIZER_DIR)
  config.tokens = dict(pad=0, bos=2, eos=3)  # [PAD], [CLS], [SEP]
  image_size = 224 if paper else 64
  # Single-channel radiographs, repeated to 3 channels, normalised with MedCLIP's grey
  # mean and std.
  grey = dict(pixel_mean=(0.5862785803,) * 3, pixel_std=(0.2795008897,) * 3)
  if paper:  # ResNet-50 and Bio_ClinicalBERT (BERT-base, its cased vocabulary)
    vision = dict(depths=(3, 4, 6, 3), width=64, image_size=224, output_dim=512, **grey)
    text = dict(vocab_size=28996, width=768, depth=12, num_heads=12, mlp_dim=3072,
                max_len=512, pooler=False)  # MedCLIP never uses BERT's pooler
    embed_dim, seq_len = 512, 77
  else:
    vision = dict(depths=(1, 1, 1, 1), width=8, image_size=image_size, output_dim=64, **grey)
    # The findings world's 117 words and the 2 tokens every tokenizer here gains.
    text = dict(vocab_size=128, width=64, depth=2, num_heads=2, mlp_dim=128, max_len=80,
                pooler=False)
    embed_dim, seq_len = 64, 72  # whole reports: 52 tokens at the 95th percentile, 72 at most
  config.model = dict(vision=vision, text=text, embed_dim=embed_dim, text_pool="medclip",
                      loss="semantic" if method == "semantic" else "infonce",
                      label_similarity="dot")
  config.trainable = r".*"
  config.clamp_logit_scale = True  # MedCLIP clamps its log scale to [0, ln 100]

  world = dict(kind="findings_world", image_size=image_size, seed=0)
  if method == "semantic":
    datasets = dict(
        paired=dict(source=dict(world, part="paired", fraction=1.0, text="sentence"),
                    weight=0.3),
        decoupled=dict(source=dict(world, part="decoupled", prompt_fraction=0.2),
                       weight=0.7))
  else:
    datasets = dict(paired=dict(source=dict(world, part="paired", fraction=1.0,
                                            text="report"), weight=1.0))
  config.data = dict(
      seq_len=seq_len, batch_size=100 if paper else 64, image_size=image_size, mode="pair",
      datasets=datasets,
      eval_datasets=dict(retrieval=dict(source=dict(world, part="retrieval", size=512),
                                        weight=1.0)))
  config.optim = dict(lr=2e-5 if paper else 2e-3, warmup_steps=20, final_lr_fraction=0.1,
                      b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, decay_pattern=r"kernel$",
                      clip_norm=1.0, accum_steps=1)
  config.summary = dict(batch_size=2, seq_len=seq_len)  # mmjax.summary
  config.train = dict(steps=200, log_every=25, eval_every=100, eval_batches=4,
                      checkpoint_every=100, keep_checkpoints=2, nonfinite="abort")
  # Held-out findings-world studies: `episodes` images of the zero-shot classes (each
  # positive for exactly one) and image-report pairs for retrieval; `prompts_per_class`
  # composed prompts per class (MedCLIP's pretraining evaluation draws 10), scored by
  # their "mean" logit (MedCLIP's ensemble) or "max".
  config.evaluate = dict(tasks=("zeroshot", "retrieval"), shots=(0,), episodes=500,
                         trials=1, batch_size=250, prompts_per_class=10,
                         prompt_scoring="mean", data_dir="", seed=0)
  return config
