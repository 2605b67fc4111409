"""Segmenting the moving arm in single frames of the embedded video world, from the
latents of a pretrained VideoGPT VQ-VAE (`configs/vqvae.py`) or from pixels: the
ablation of "Video Prediction Models as General Visual Encoders".

  python -m mmjax.train --config=configs/segment.py[:variant] --workdir=/tmp/segment

The encoder reads one frame repeated over its 16-frame clip; a head maps its latents to
the mask's logits at full resolution. Variants are `<method>` or `<method>-<shape>`:
  noise               the control: uniform noise images with the real masks, attention-
                      stack latents, the light conv head (the paper: IoU 0)
  attention_linear    latents after the axial-attention stack (the paper's "transformer
  attention_conv      included"), frozen, with a linear probe, the light convolutional
  attention_heavy     decoder or the heavy one with skips ("Linear Layer + UNET")
  resnet_linear       latents after the 3D conv stack, before the attention blocks (the
  resnet_conv         paper's "3D ResNet"), frozen, with a linear probe, the light
  resnet_attention    decoder, or 8-head self-attention then the light decoder
  resnet_attention_ft the same, the encoder fine-tuned (the paper's best, 0.83)
  unet                the baseline: a UNet from pixels, no encoder (the paper: 0.83)
shapes: tiny (default; the encoder of `configs/vqvae.py:tiny`, pretrained once and cached)
and bair (VideoGPT's bair_stride4x2x2 encoder shape; give a converted checkpoint with
`--config.init.encoder.workdir=...`).

Training uses 250 labelled frames (the paper's hand-labelled set) with the loss of
`config.loss` (soft Dice by default; "bce" with `pos_weight`, or "jaccard"); held-out IoU,
Dice and pixel accuracy over the test frames end every run (`mmjax.evaluate.segment`).
"""

import ml_collections

from mmjax.configs import method_and_shape, vqvae

# method: (latent, head, frozen encoder, noise images)
METHODS = {
    "noise": ("attention", "conv", True, True),
    "attention_linear": ("attention", "linear", True, False),
    "attention_conv": ("attention", "conv", True, False),
    "attention_heavy": ("attention", "heavy", True, False),
    "resnet_linear": ("resnet", "linear", True, False),
    "resnet_conv": ("resnet", "conv", True, False),
    "resnet_attention": ("resnet", "attention", True, False),
    "resnet_attention_ft": ("resnet", "attention", False, False),
    "unet": (None, "unet", False, False),
}
SHAPES = ("tiny", "bair")


def parse_variant(arg: str | None) -> tuple[str, str]:
  """`(method, shape)` of a variant name."""
  return method_and_shape(arg, "segment", METHODS, SHAPES, "resnet_attention_ft")


def frames(split: str, size: int, resolution: int = 64) -> dict:
  """A source of the video world's labelled frames (one frame of a clip and its mask)."""
  return dict(kind="video_world_frames", split=split, size=size, frames=16,
              resolution=resolution, seed=0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  method, shape = parse_variant(arg)
  latent, head, frozen, noise = METHODS[method]
  config = ml_collections.ConfigDict()
  config.task = "segment"
  config.variant = method if shape == "tiny" else f"{method}-{shape}"
  config.seed = 0
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = "data_parallel"
  config.compute_dtype = "float32"
  config.remat = "none"
  encoder = vqvae.model_shape(shape) if latent else None
  resolution = 64
  config.model = dict(encoder=encoder, latent=latent or "resnet", head=head,
                      freeze_encoder=frozen, frames=16, image_size=resolution)
  # The frozen encoder's parameters stay as pretrained; the UNet has none.
  config.trainable = "^head/" if latent and frozen else ".*"
  if latent:
    config.init = dict(encoder=dict(recipe="vqvae", variant=shape, source="encoder"))
  config.loss = dict(kind="dice", pos_weight=1.0)
  config.data = dict(
      seq_len=1, batch_size=16, mode="segment",
      video=dict(frames=16, resolution=resolution, noise=noise),
      datasets=dict(labelled=dict(source=frames("train", 250, resolution), weight=1.0)),
      eval_datasets=dict(test=dict(source=frames("test", 256, resolution), weight=1.0)))
  config.optim = dict(lr=1e-3, warmup_steps=20, final_lr_fraction=0.1, b1=0.9, b2=0.999,
                      eps=1e-8, weight_decay=1e-4, decay_pattern=r"kernel$", clip_norm=1.0,
                      accum_steps=1)
  config.train = dict(steps=200, log_every=50, eval_every=100, eval_batches=4,
                      checkpoint_every=100, keep_checkpoints=2, nonfinite="abort")
  # Held-out frames of `eval_datasets.test`: IoU of the masks thresholded at logit 0 (mean
  # over frames with its standard error, and over all pixels), Dice, pixel accuracy.
  config.evaluate = dict(tasks=("segment",), shots=(0,), episodes=-1, batch_size=32, seed=0)
  config.summary = dict(batch_size=2, seq_len=1)
  return config
