"""Prompt learning on the frozen CLIP of configs/clip.py: CoOp's learned context, or
CoCoOp's image-conditional one, trained on 16 shots of each base class of the shapes
world's 60 classes (`shapes_world.CLASSES`; CoOp's base-to-new split: the first 30
labels are the base classes, the other 30 the new ones).

  python -m mmjax.train --config=configs/coop.py[:variant] --workdir=/tmp/coop

The CLIP is the run of configs/clip.py:tiny, trained on first use and cached under
$MMJAX_CACHE (see configs/flamingo.py), or the run or converted CLIP in
`--config.init.clip.workdir=DIR` (its tokenizer in `--config.tokenizer`, its shapes in
`config.model.clip`). Prompt options: `--config.model.class_position=middle` (or front),
`--config.model.class_specific=True` (CoOp's CSC), `--config.model.ctx_init="a photo of a"`,
`--config.model.n_ctx=4`; the draw of shots: `--config.data.datasets.shots.source.shots_seed=2`.
Training ends with the accuracy on held-out images of the base and the new classes and
their harmonic mean H (`mmjax.evaluate.prompt_learning`), which
`python -m mmjax.evaluate --workdir=/tmp/coop` repeats.

Variants:
  coop     the default: 16 context vectors from N(0, 0.02), shared, class name at the end.
  cocoop   4 context words initialised from "a photo of a" (8 tokens of the embedded
           tokenizer) and the meta-network; its text tower runs once per image.
"""

import ml_collections

from mmjax.cli import UserError
from mmjax.configs import clip
from mmjax.data.pipeline import shapes_world_classes
from mmjax.data.shapes_world import CLASSES

VARIANTS = ("coop", "cocoop")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "coop"
  if variant not in VARIANTS:
    raise UserError(f"Unknown coop variant {variant!r}; choose from {VARIANTS} "
                    "(--config=configs/coop.py:<variant>).")
  backbone = clip.get_config("tiny")
  cocoop = variant == "cocoop"
  image_size = backbone.model.vision.image_size
  config = ml_collections.ConfigDict()
  config.task = "coop"
  config.variant = variant
  config.seed = 1
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = "fsdp"
  config.compute_dtype = "float32"
  config.remat = "none"
  config.model = dict(
      clip=backbone.model.to_dict(),
      class_names=tuple(CLASSES[i] for i in shapes_world_classes("base")),
      n_ctx=4 if cocoop else 16, ctx_init="a photo of a" if cocoop else "",
      class_specific=False, class_position="end", meta_net=cocoop, meta_hidden=None,
      # CoCoOp's text tower runs over batch x classes prompts; 0: all images at once.
      image_chunk=0)
  # Only the context (and the meta-network) train; the CLIP stays frozen.
  config.trainable = r"^(ctx$|meta_net/)"
  config.init = dict(clip=dict(recipe="clip", variant="tiny", steps=-1, workdir="", source=""))
  shots = dict(kind="shapes_world_classes", split="train", classes="base", shots=16,
               shots_seed=1, image_size=image_size)
  held_out = dict(kind="shapes_world_classes", split="eval", classes="base", shots=0,
                  size=512, image_size=image_size)
  config.data = dict(
      seq_len=backbone.data.seq_len, batch_size=8 if cocoop else 32, image_size=image_size,
      mode="pair",
      datasets=dict(shots=dict(source=shots, weight=1.0, loss_weight=1.0)),
      eval_datasets=dict(base_eval=dict(source=held_out, weight=1.0, loss_weight=1.0)))
  # CoOp: SGD at 0.002 for 200 epochs of 16 shots; here Adam for a few epochs, which
  # the CPU affords.
  config.optim = dict(lr=2e-3, warmup_steps=10, final_lr_fraction=0.0, b1=0.9, b2=0.999,
                      eps=1e-8, weight_decay=0.0, decay_pattern=r"kernel$", clip_norm=1.0,
                      accum_steps=1)
  config.train = dict(steps=150 if cocoop else 200, log_every=25, eval_every=0,
                      eval_batches=4, checkpoint_every=100, keep_checkpoints=1,
                      nonfinite="abort")
  # Base-to-new accuracy at the end of training and by `python -m mmjax.evaluate`:
  # `episodes` held-out images of each half (base, new), drawn with `seed`.
  config.evaluate = dict(tasks=("base_to_new",), shots=(0,), episodes=600, seed=0)
  return config
