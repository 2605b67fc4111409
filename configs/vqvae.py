"""VideoGPT's 3D VQ-VAE pretrained on the embedded moving-objects video world (an arm
pushing objects across a table, 16 frames at 64 px): the video encoder the segmentation
recipes (`configs/segment.py`) read their latents from.

  python -m mmjax.train --config=configs/vqvae.py[:shape] --workdir=/tmp/vqvae

shapes:
  tiny  (default) 32 hidden channels, 2 attention residual blocks, 32-dim codes, 256 of
        them, downsampling (4, 4, 4) to a 4 x 16 x 16 latent: minutes on a CPU.
  bair  VideoGPT's released `bair_stride4x2x2` shape: 240 hidden channels, 4 blocks,
        2048 codes of 256 dims, downsampling (4, 2, 2) to 4 x 32 x 32 (the shape of a
        converted checkpoint, `python -m mmjax.convert --videogpt=...`).
  paper VideoGPT's defaults: as `bair` with downsampling (4, 4, 4) to 4 x 16 x 16.

VideoGPT's recipe: Adam at 3e-4 (0.9, 0.999), no schedule, no weight decay, no clipping;
the loss is the reconstruction's mean squared error over the data variance (0.06) plus
0.25 x the commitment loss; the codebook is initialised from the first batch's encoder
outputs and follows them by EMA (decay 0.99), codes used less than once (EMA count) are
restarted from the batch every step.
"""

import ml_collections

from mmjax.cli import UserError

SHAPES = ("tiny", "bair", "paper")


def model_shape(shape: str) -> dict:
  """`config.model` of a shape (also the encoder of `configs/segment.py`)."""
  if shape not in SHAPES:
    raise UserError(f"Unknown vqvae shape {shape!r}; choose one of {SHAPES} "
                    "(--config=configs/vqvae.py:<shape>).")
  common = dict(frames=16, resolution=64, num_heads=2, commitment=0.25, ema_decay=0.99,
                data_variance=0.06, restart=True)
  if shape == "tiny":
    return dict(embedding_dim=32, n_codes=256, n_hiddens=32, n_res_layers=2,
                downsample=(4, 4, 4), **common)
  return dict(embedding_dim=256, n_codes=2048, n_hiddens=240, n_res_layers=4,
              downsample=(4, 2, 2) if shape == "bair" else (4, 4, 4), **common)


def world(split: str, size: int, frames: int = 16, resolution: int = 64) -> dict:
  """A source of the embedded video world's clips."""
  return dict(kind="video_world", split=split, size=size, frames=frames,
              resolution=resolution, seed=0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  shape = arg or "tiny"
  config = ml_collections.ConfigDict()
  config.task = "vqvae"
  config.variant = shape
  config.seed = 0
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = "data_parallel"
  config.compute_dtype = "float32"
  config.remat = "none"
  config.model = model_shape(shape)
  config.trainable = ".*"
  frames, resolution = config.model.frames, config.model.resolution
  # seq_len counts frames: the trainer's throughput reports frames per second.
  config.data = dict(
      seq_len=frames, batch_size=8 if shape == "tiny" else 16, mode="video",
      video=dict(frames=frames, resolution=resolution, noise=False),
      datasets=dict(clips=dict(source=world("train", 20000, frames, resolution),
                               weight=1.0)),
      eval_datasets=dict(test=dict(source=world("test", 128, frames, resolution),
                                   weight=1.0)))
  config.optim = dict(lr=3e-4, warmup_steps=0, final_lr_fraction=1.0, b1=0.9, b2=0.999,
                      eps=1e-8, weight_decay=0.0, decay_pattern=r"kernel$", clip_norm=0.0,
                      accum_steps=1)
  config.train = dict(steps=600, log_every=50, eval_every=200, eval_batches=4,
                      checkpoint_every=200, keep_checkpoints=2, nonfinite="abort")
  # Held-out clips of `eval_datasets.test`: reconstruction error and PSNR, the codebook's
  # perplexity and the codes in use over the split.
  config.evaluate = dict(tasks=("reconstruct",), shots=(0,), episodes=-1, batch_size=16,
                         seed=0)
  config.summary = dict(batch_size=2, seq_len=frames)
  return config
