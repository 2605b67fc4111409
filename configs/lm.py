"""Language-model pretraining on shapes-world text (captions, questions, naming episodes,
with their `<image>` and `<|endofchunk|>` tokens): the frozen LM of the Flamingo recipe.

  python -m mmjax.train --config=configs/lm.py[:variant] --workdir=/tmp/lm

The LM's shape is that of the same-named variant of configs/flamingo.py.
"""

import ml_collections

from mmjax.configs import flamingo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, shapes = flamingo.variant_shapes(arg, "lm")
  config = ml_collections.ConfigDict()
  config.task = "lm"
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
  # A Hugging Face tokenizer directory, or "" for the embedded one (see configs/flamingo.py).
  config.tokenizer = ""
  config.model = dict(shapes["lm"])
  config.trainable = r".*"
  # Mappings of dataset names to entries: `--config.data.datasets.text.weight=2`. Naming
  # episodes are over-represented, with up to nine chunks (an 8-shot prompt): retrieving
  # the name bound earlier in the context is the skill the Flamingo recipe's in-context
  # naming builds on. Images are not used; `image_size=16` only makes them cheap to draw.
  config.data = dict(
      seq_len=80, batch_size=32, mode="text",
      datasets=dict(text=dict(
          source=dict(kind="shapes_world_documents", split="train", naming_fraction=0.6,
                      max_images=9, image_size=16),
          weight=1.0, loss_weight=1.0)),
      eval_datasets=dict(text_eval=dict(
          source=dict(kind="shapes_world_documents", split="eval", size=4096),
          weight=1.0, loss_weight=1.0)))
  config.optim = dict(lr=1e-3, warmup_steps=100, final_lr_fraction=0.1, b1=0.9, b2=0.98,
                      eps=1e-8, weight_decay=0.05, decay_pattern=r"kernel$|embedding$",
                      clip_norm=1.0, accum_steps=1)
  # 400 steps of the tiny variant retrieve the name a prompt binds to a colour (naming
  # accuracy near its ceiling at every shot count, printed at the end of training). With
  # names drawn from all 24 instead of a per-colour pool, 750 steps (or 550 on naming
  # documents only, at twice the learning rate) did not: the LM copied a random name seen
  # in the prompt (accuracy at `chance`).
  config.train = dict(steps=400, log_every=50, eval_every=200, eval_batches=8,
                      checkpoint_every=200, keep_checkpoints=2, nonfinite="abort",
                      few_shot_every=0)
  # Run at the end of training, and every `train.few_shot_every` steps when that is set.
  # In-context recall of names from the text of naming prompts (see mmjax.evaluate).
  config.evaluate = dict(tasks=("naming",), shots=(0, 1, 2, 4, 8), episodes=256, ways=4,
                         batch_size=64, seed=0)
  return config
