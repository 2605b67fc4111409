"""LLaVA: visual instruction tuning of an LM that reads a frozen CLIP tower's patch
features through a projector, on shapes-world conversations.

  python -m mmjax.train --config=configs/llava.py --workdir=/tmp/llava

runs stage 2 (the projector and the LM trained on conversations under the vicuna_v1
template) from stage 1 (`configs/llava.py:stage1`: the projector alone trained on
captions under the plain template), trained on first use and cached under $MMJAX_CACHE
like the frozen backbones, which are those of the Flamingo recipe: the vision tower of
configs/clip.py and the LM of configs/lm.py. The held-out answer accuracy is printed at
the end (`mmjax.evaluate.instruct`).

Variants (`--config=configs/llava.py:<variant>`):
  tiny           stage 2, full fine-tuning of the LM (the embedded default).
  lora           stage 2 with LoRA on every linear map of the LM (rank 8, alpha 16) and
                 the projector trained in full; the LM's own weights stay frozen.
  stage1         stage 1.
  llava-1.6-7b   LLaVA-1.6 (LLaVA-NeXT) Vicuna-7B: llava-1.5-7b's shapes with anyres
                 images (a 336px base view and up to 4 tiles of LLaVA-1.6's grid, at most
                 2928 image tokens an image); for `mmjax.summary` and FLOP counts.
  llava-1.5-7b, llava-1.5-13b
                 the paper's shapes (Liu et al. 2024): CLIP ViT-L/14 at 336px read at its
                 penultimate layer (576 patches), mlp2x_gelu, Vicuna-7B or 13B; for
                 `mmjax.summary`, FLOP counts and fit checks. A converted checkpoint
                 (`python -m mmjax.convert --hf_dir=llava-hf/llava-1.5-7b-hf`) runs as is.
"""

import ml_collections

from mmjax.cli import UserError
from mmjax.configs import flamingo

TINY_VISION = dict(flamingo.VARIANTS["tiny"]["vision"], output_dim=None)
CLIP_L_336 = dict(image_size=336, patch_size=14, width=1024, depth=24, num_heads=16,
                  mlp_dim=4096, activation="quick_gelu", output_dim=None)


def _vicuna(width: int, depth: int, heads: int, mlp_dim: int) -> dict:
  # llava-hf's vocabulary: LLaMA's 32000, the image token 32000 and the pad 32001, padded
  # to a multiple of 64.
  return dict(vocab_size=32064, width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim,
              activation="silu", gated_mlp=True, norm="rmsnorm", norm_eps=1e-5,
              use_bias=False, position="rope", max_len=4096, tie_embeddings=False)


VARIANTS = {
    "tiny": dict(vision=TINY_VISION, lm=flamingo.VARIANTS["tiny"]["lm"],
                 image_token_id=flamingo.MEDIA, pad_token_id=flamingo.PAD),
    "llava-1.5-7b": dict(vision=CLIP_L_336, lm=_vicuna(4096, 32, 32, 11008),
                         image_token_id=32000, pad_token_id=32001),
    "llava-1.5-13b": dict(vision=CLIP_L_336, lm=_vicuna(5120, 40, 40, 13824),
                          image_token_id=32000, pad_token_id=32001),
}
VARIANTS["stage1"] = VARIANTS["lora"] = VARIANTS["tiny"]
# LLaVA-1.6's anyres grid (its `image_grid_pinpoints`, (width, height)).
LLAVA_16_GRID = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
VARIANTS["llava-1.6-7b"] = dict(VARIANTS["llava-1.5-7b"], anyres_grid=LLAVA_16_GRID)
PAPER_VARIANTS = ("llava-1.5-7b", "llava-1.5-13b", "llava-1.6-7b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise UserError(f"Unknown llava variant {variant!r}; choose from {sorted(VARIANTS)} "
                    "(--config=configs/llava.py:<variant>).")
  model = VARIANTS[variant]
  stage = 1 if variant == "stage1" else 2
  paper = variant in PAPER_VARIANTS
  vision = model["vision"]
  image_size = vision["image_size"]
  image_tokens = (image_size // vision["patch_size"]) ** 2  # patches; "default" drops CLS
  config = ml_collections.ConfigDict()
  config.task = "llava"
  config.variant = variant
  config.seed = 0
  # Devices, sharding, precision, remat and scan as in configs/flamingo.py.
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = "fsdp"
  config.compute_dtype = "bfloat16" if paper else "float32"
  config.remat = "full" if paper else "none"
  config.scan_layers = paper
  config.tokenizer = ""
  config.model = dict(model, projector="mlp2x_gelu", vision_feature_layer=-2,
                      vision_feature_select="default")
  # Parameters that train (a regex on '/'-joined paths): the vision tower never does.
  config.trainable = r"^projector/" if stage == 1 else r"^(projector|lm)/"
  # Pretrained parts, keyed by the parameter subtree they fill (see configs/flamingo.py).
  # The ViT's last block and final norm are unused (features come from the penultimate
  # layer's output) and its projection head too: they are dropped.
  if paper:
    converted = dict(steps=0, workdir="", source="")
    config.init = dict(vision=converted, lm=converted)
  else:
    config.init = dict(
        vision=dict(recipe="clip", variant="tiny", steps=-1, workdir="", source="image",
                    drop=rf"^(head|post_norm|layers_{vision['depth'] - 1})/"),
        lm=dict(recipe="lm", variant="tiny", steps=-1, workdir="", source=""))
    if stage == 2:
      config.init.projector = dict(recipe="llava", variant="stage1", steps=-1, workdir="",
                                   source="projector")
  if variant == "lora":
    # LoRA on every linear map of the LM's layers (LLaVA's `find_all_linear_names`: all
    # but the output head), the projector trained in full (`modules_to_save`).
    config.peft = dict(lora=dict(rank=8, alpha=16, dropout=0.05,
                                 targets=r"lm/layers_\d+/(attn|mlp)/\w+"),
                       modules_to_save=(r"^projector/",))
  conversations = dict(kind="shapes_world_conversations", image_size=image_size,
                       captions=stage == 1)
  # LLaVA-1.5's recipe: stage 1 plain template, stage 2 vicuna_v1 (its system prompt would
  # be most of each embedded sequence: none here, `system=None` restores it).
  config.data = dict(
      seq_len=2048 if paper else 160, batch_size=16, image_size=image_size, max_images=1,
      mode="conversation", template="plain" if stage == 1 else "vicuna_v1",
      system="", image_tokens=image_tokens,
      datasets=dict(conversations=dict(source=dict(conversations, split="train"),
                                       weight=1.0, loss_weight=1.0)),
      eval_datasets=dict(conversations_eval=dict(
          source=dict(conversations, split="eval", size=4096), weight=1.0, loss_weight=1.0)))
  # LLaVA-1.5: stage 1 lr 1e-3, stage 2 2e-5 (LoRA 2e-4), cosine after 3% warmup, no weight
  # decay. The embedded stage 2 trains a small LM for few steps: 3e-4 (LoRA 1e-3).
  lr = 1e-3 if stage == 1 else (1e-3 if variant == "lora" else 3e-4)
  config.optim = dict(lr=lr, warmup_steps=20, final_lr_fraction=0.0, b1=0.9, b2=0.999,
                      eps=1e-8, weight_decay=0.0, decay_pattern=r"kernel$",
                      clip_norm=1.0, accum_steps=1)
  config.train = dict(steps=150 if stage == 1 else 400, log_every=50, eval_every=200,
                      eval_batches=4, checkpoint_every=200, keep_checkpoints=2,
                      nonfinite="abort", few_shot_every=0)
  if stage == 2:
    # Held-out answer accuracy (mmjax.evaluate.instruct), greedy as LLaVA evaluates.
    config.evaluate = dict(tasks=("instruct",), shots=(0,), episodes=256, batch_size=32,
                           max_new_tokens=12, seed=0)
  config.tokens = dict(pad=flamingo.PAD, eos=flamingo.EOS, bos=flamingo.BOS)
  config.summary = dict(batch_size=2, num_images=1, seq_len=config.data.seq_len,
                        max_new_tokens=16)
  if "anyres_grid" in model:  # <image> expands to each image's own count of tokens
    config.data.grid_pinpoints = model["anyres_grid"]
    config.data.seq_len = config.summary.seq_len = 4096  # LLaVA-1.6's context
    config.trainable = r"^(projector|lm)/|^image_newline$"  # stage 2 trains the newline too
  return config
