"""Contrastive image-text pretraining on shapes-world image-caption pairs: CLIP (the
frozen vision encoder of the Flamingo recipe), SigLIP, and LiT.

  python -m mmjax.train --config=configs/clip.py[:variant] --workdir=/tmp/clip

Variants are `<shape>`, `<method>` or `<method>-<shape>`:
  shape: a variant of configs/flamingo.py, whose vision tower this trains (default tiny),
    or a paper's towers (`PAPER_SHAPES`: b16, l14; with siglip, b16 is SigLIP's B/16).
  method:
    clip    symmetric InfoNCE, learned temperature from 0.07, the log scale clamped to
            [0, ln 100] after every step (open_clip's training).
    siglip  the sigmoid loss, temperature and bias starting where SigLIP's training
            recipe starts them (scale 10, bias -10; not open_clip's class defaults).
    lit     locked-image tuning: the image tower (with its projection) comes from the
            same-shaped CLIP run and stays frozen; the text tower trains from scratch.
"""

import ml_collections

from mmjax.cli import UserError
from mmjax.configs import flamingo

METHODS = ("clip", "siglip", "lit")


def parse_variant(arg: str | None) -> tuple[str, str | None]:
  """`(method, shape)` of a variant name (shape None: the default)."""
  method, _, shape = (arg or "").partition("-")
  if method in METHODS:
    return method, shape or None
  if arg is not None and arg not in flamingo.VARIANTS and arg not in PAPER_SHAPES:
    raise UserError(f"Unknown clip variant {arg!r}; choose from "
                    f"{sorted(flamingo.VARIANTS) + sorted(PAPER_SHAPES)} "
                    f"(the shapes), a method of {METHODS}, or <method>-<shape> "
                    "(--config=configs/clip.py:<variant>).")
  return "clip", arg


def _clip_shape(patch: int, width: int, depth: int, heads: int, embed: int,
                text_width: int) -> dict:
  """OpenAI CLIP's ViT towers (the paper's Table 20) with its 12-layer text transformer."""
  return dict(
      vision=dict(image_size=224, patch_size=patch, width=width, depth=depth,
                  num_heads=heads, output_dim=embed, activation="quick_gelu"),
      text=dict(vocab_size=49408, width=text_width, depth=12, num_heads=text_width // 64,
                max_len=77, activation="quick_gelu"),
      embed_dim=embed, text_pool="argmax")


# The papers' towers, `<method>-<shape>` (`clip-b16` is CLIP ViT-B/16, `siglip-b16` SigLIP's
# B/16 at 224, `lit-l14` LiT on CLIP's L/14): for summaries, FLOPs and TPU fit checks, with
# a converted checkpoint's tokenizer for training.
PAPER_SHAPES = {
    "b16": _clip_shape(16, 768, 12, 12, 512, 512),
    "l14": _clip_shape(14, 1024, 24, 16, 768, 768),
}
SIGLIP_B16 = dict(
    vision=dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12,
                output_dim=None, activation="gelu_tanh", norm_eps=1e-6, class_token=False,
                pooling="map", patch_bias=True, pre_norm=False, token_norm=True,
                pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5)),
    text=dict(vocab_size=32000, width=768, depth=12, num_heads=12, max_len=64,
              activation="gelu_tanh", norm_eps=1e-6, causal=False),
    embed_dim=768, text_pool="final", text_head_bias=True)
PAPER_BATCH = 32768  # CLIP's and SigLIP's B/16 batch


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  method, shape = parse_variant(arg)
  if shape in PAPER_SHAPES:
    variant, paper = shape, (SIGLIP_B16 if (method, shape) == ("siglip", "b16")
                             else PAPER_SHAPES[shape])
    vision = dict(paper["vision"])
  else:
    variant, shapes = flamingo.variant_shapes(shape, "clip")
    vision, paper = dict(shapes["vision"]), None
  config = ml_collections.ConfigDict()
  config.task = "clip"
  config.variant = variant if method == "clip" else f"{method}-{variant}"
  config.seed = 0
  # Devices: a (data, fsdp, tensor) mesh, -1 filling with the remaining devices, and the
  # sharding preset ("data_parallel", "fsdp", "fsdp_tensor"; see mmjax.sharding).
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = "fsdp"
  # "bfloat16": mixed precision, float32 parameters and optimizer state (mmjax.tasks).
  config.compute_dtype = "float32"
  # Rematerialise every layer: "none", "minimal", "save_qkv_proj", "full" (mmjax.layers.stack).
  config.remat = "none"
  # Each layer stack as one scanned layer: compiles once whatever the depth.
  config.scan_layers = variant in flamingo.PAPER_VARIANTS or paper is not None
  config.model = dict(
      vision=vision,
      text=dict(vocab_size=flamingo.VOCAB_SIZE, width=128, depth=2, num_heads=4, max_len=32,
                activation="quick_gelu"),
      embed_dim=vision["output_dim"], pad_id=flamingo.PAD)
  if paper is not None:
    config.model.update(paper)
  config.trainable = r".*"
  config.clamp_logit_scale = method != "siglip"  # SigLIP's recipe leaves it free
  if method == "siglip":
    config.model.update(loss="sigmoid", init_temperature=0.1, init_bias=-10.0)
  if method == "lit":
    # The image tower is the same-shaped CLIP run's, trained once and cached.
    config.init = dict(image=dict(recipe="clip", variant=variant, steps=-1, workdir="",
                                  source="image"))
    config.trainable = r"^(text|text_head|log_scale)(/|$)"
  pairs = dict(kind="shapes_world_pairs", image_size=vision["image_size"])
  # Mappings of dataset names to entries: `--config.data.datasets.pairs.weight=2`.
  config.data = dict(
      seq_len=24, batch_size=64, image_size=vision["image_size"], mode="pair",
      datasets=dict(pairs=dict(source=dict(pairs, split="train"), weight=1.0,
                               loss_weight=1.0)),
      eval_datasets=dict(pairs_eval=dict(source=dict(pairs, split="eval", size=4096),
                                         weight=1.0, loss_weight=1.0)))
  config.optim = dict(lr=1e-3, warmup_steps=50, final_lr_fraction=0.1, b1=0.9, b2=0.98,
                      eps=1e-6, weight_decay=0.1, decay_pattern=r"kernel$",
                      clip_norm=1.0, accum_steps=1)
  if paper is not None:
    config.data.update(seq_len=paper["text"]["max_len"], batch_size=PAPER_BATCH)
    for source in (config.data.datasets.pairs.source,
                   config.data.eval_datasets.pairs_eval.source):
      source.image_size = vision["image_size"]
  config.summary = dict(batch_size=2, seq_len=config.data.seq_len)  # mmjax.summary
  config.train = dict(steps=300, log_every=50, eval_every=150, eval_batches=4,
                      checkpoint_every=150, keep_checkpoints=2, nonfinite="abort")
  # Zero-shot evaluation (mmjax.evaluate.zeroshot), at the end of training and by
  # `python -m mmjax.evaluate`: `episodes` held-out shapes-world images (zeroshot, 60
  # classes) and image-caption pairs (retrieval), or with `data_dir` its imagenet/ and
  # coco/ (-1: the whole test split). `templates`: a set or file ("": the data's own);
  # `prompt`: one template instead, e.g. "a photo of a {}.".
  config.evaluate = dict(tasks=("zeroshot", "retrieval"), shots=(0,), episodes=1000,
                         trials=1, batch_size=256, templates="", prompt="", data_dir="",
                         seed=0)
  return config
