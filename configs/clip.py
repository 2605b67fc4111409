"""Contrastive pretraining (CLIP) of the vision tower on shapes-world image-caption pairs:
the frozen vision encoder of the Flamingo recipe.

  python -m mmjax.train --config=configs/clip.py[:variant] --workdir=/tmp/clip

The vision tower's shape is that of the same-named variant of configs/flamingo.py.
"""

import ml_collections

from mmjax.configs import flamingo



def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, shapes = flamingo.variant_shapes(arg, "clip")
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
  # Zero-shot evaluation (mmjax.evaluate.zeroshot), at the end of training and by
  # `python -m mmjax.evaluate`: `episodes` held-out shapes-world images (zeroshot, 60
  # classes) and image-caption pairs (retrieval), or with `data_dir` its imagenet/ and
  # coco/ (-1: the whole test split). `templates`: a set or file ("": the data's own);
  # `prompt`: one template instead, e.g. "a photo of a {}.".
  config.evaluate = dict(tasks=("zeroshot", "retrieval"), shots=(0,), episodes=1000,
                         trials=1, batch_size=256, templates="", prompt="", data_dir="",
                         seed=0)
  return config
