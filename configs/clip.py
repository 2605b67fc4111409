"""Contrastive image-text pretraining on shapes-world image-caption pairs: CLIP (the
frozen vision encoder of the Flamingo recipe), SigLIP, and LiT.

  python -m mmjax.train --config=configs/clip.py[:variant] --workdir=/tmp/clip

Variants are `<shape>`, `<method>` or `<method>-<shape>`:
  shape: a variant of configs/flamingo.py, whose vision tower this trains (default tiny).
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
  if arg is not None and arg not in flamingo.VARIANTS:
    raise UserError(f"Unknown clip variant {arg!r}; choose from {sorted(flamingo.VARIANTS)} "
                    f"(the shapes), a method of {METHODS}, or <method>-<shape> "
                    "(--config=configs/clip.py:<variant>).")
  return "clip", arg



def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  method, shape = parse_variant(arg)
  variant, shapes = flamingo.variant_shapes(shape, "clip")
  vision = dict(shapes["vision"])
  config = ml_collections.ConfigDict()
  config.task = "clip"
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
  config.scan_layers = variant in flamingo.PAPER_VARIANTS
  config.model = dict(
      vision=vision,
      text=dict(vocab_size=flamingo.VOCAB_SIZE, width=128, depth=2, num_heads=4, max_len=32,
                activation="quick_gelu"),
      embed_dim=vision["output_dim"], pad_id=flamingo.PAD)
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
  config.train = dict(steps=300, log_every=50, eval_every=150, eval_batches=4,
                      checkpoint_every=150, keep_checkpoints=2, nonfinite="abort")
  return config
