"""MMBCD: malignancy from a mammogram's detector regions at full resolution and the
clinical history attending over them, on the embedded mammography world (large grey
images, a simulated detector's boxes, template histories).

  python -m mmjax.train --config=configs/mmbcd.py[:variant] --workdir=/tmp/mmbcd

Variants are `<method>`, `<shape>` or `<method>-<shape>`; the methods are the paper's
ablation, each adding one part:
  vision       the regions alone: top-K detector regions cropped at full resolution, each
               through the ViT, max-pooled, then the head.
  concat       + the history: its RoBERTa embedding concatenated with the pooled regions.
  attention    + the history attending over the regions (MMBCD; the default).
  masking      + tf-idf keyword masking of the history in training (each occurrence of
               the corpus's top keywords deleted at `rate`, drawn per case and epoch: the
               paper's description; `--config.data.keyword_mask.mode=fixed` is the code's
               fixed set drawn once).
  whole_image  the baseline: the whole image resized to the tower's input, vision only.
shapes:
  tiny   (default) a 4-layer ViT on 32 px crops and a 2-layer text tower, 1024 px images:
         minutes on a CPU.
  large  the tiny model on the 2048 px world.
  paper  DINO ViT-S/8 at 224 px (blocks 0-8 frozen) and RoBERTa-base (all but its last 2
         layers frozen), 8 regions, histories of up to 90 tokens, batch 16, Adam at 5e-6:
         for summaries, FLOPs and fit checks, and for converted towers (README, "MMBCD").

Held-out accuracy, F1, ROC AUC and calibration (expected calibration error, before and
after temperature scaling fitted on the validation split) end every run
(`mmjax.evaluate.classify`).
"""

import ml_collections

from mmjax.configs import method_and_shape
from mmjax.data import mammo_world

METHODS = ("vision", "concat", "attention", "masking", "masking_fixed", "whole_image")
SHAPES = ("tiny", "large", "paper")


def parse_variant(arg: str | None) -> tuple[str, str]:
  """`(method, shape)` of a variant name."""
  return method_and_shape(arg, "mmbcd", METHODS, SHAPES, "attention")


def trainable_pattern(vision_frozen_blocks: int, text_trained_layers: int | None,
                      text_depth: int) -> str:
  """`config.trainable` freezing the ViT's patch embedding and its first
  `vision_frozen_blocks` blocks (its class token, positions and final norm train, as in
  the reference, where they are bare parameters), and every part of the text tower but its
  last `text_trained_layers` layers (None: all of it trains)."""
  frozen = []
  if vision_frozen_blocks:
    frozen += ["vision/patch_embed/",
               "vision/layers_(" + "|".join(map(str, range(vision_frozen_blocks))) + ")/"]
  if text_trained_layers is not None:
    kept = range(text_depth - text_trained_layers)
    frozen += ["text/(embed|embed_norm|positions|token_types)/"]
    if len(kept):
      frozen += ["text/layers_(" + "|".join(map(str, kept)) + ")/"]
  return f"^(?!{'|'.join(frozen)})" if frozen else ".*"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  method, shape = parse_variant(arg)
  paper = shape == "paper"
  config = ml_collections.ConfigDict()
  config.task = "mmbcd"
  config.variant = method if shape == "tiny" else f"{method}-{shape}"
  config.seed = 0
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = "data_parallel"
  config.compute_dtype = "float32"
  config.remat = "none"
  imagenet = dict(pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225))
  dino = dict(activation="gelu", output_dim=None, pre_norm=False, patch_bias=True,
              token_norm=True, **imagenet)
  # The mammography world's word-level vocabulary ([CLS] ... [SEP], [PAD] 0); a real run
  # gives roberta-base's tokenizer directory here, with --config.tokens.pad=1
  # --config.tokens.bos=0 --config.tokens.eos=2 --config.model.pad_id=1.
  config.tokenizer = str(mammo_world.TOKENIZER_DIR)
  config.tokens = dict(pad=0, eos=3, bos=2)
  if paper:  # DINO ViT-S/8 and roberta-base, as the reference's code/model.py
    vision = dict(image_size=224, patch_size=8, width=384, depth=12, num_heads=6,
                  norm_eps=1e-6, **dino)
    text = dict(vocab_size=50265, width=768, depth=12, num_heads=12, mlp_dim=3072,
                max_len=514, type_vocab_size=1, position_offset=2, norm_eps=1e-5,
                pooler=False)
    embed_dim, seq_len = 256, 90
    config.trainable = trainable_pattern(9, 2, 12)
  else:
    vision = dict(image_size=32, patch_size=8, width=64, depth=4, num_heads=2,
                  norm_eps=1e-6, **dino)
    # The world's 134 words and tokens and the 2 every tokenizer here gains;
    # "Indication: <history>" is 40 tokens at most.
    text = dict(vocab_size=136, width=64, depth=2, num_heads=2, mlp_dim=128, max_len=64,
                type_vocab_size=1, pooler=False)
    embed_dim, seq_len = 64, 48
    config.trainable = r".*"  # no pretrained towers to keep
  fusion = {"vision": "vision", "whole_image": "vision", "concat": "concat"}.get(method,
                                                                                "attention")
  config.model = dict(vision=vision, text=text, embed_dim=embed_dim, num_classes=2,
                      fusion=fusion, head="linear", attn_dropout=0.3, mask_regions=True,
                      pad_id=config.tokens.pad, crop_window=None)

  world_size = {"tiny": 1024, "large": 2048, "paper": 1024}[shape]
  world = dict(kind="mammo_world", image_size=world_size, seed=0)
  # Regions: the detector's boxes validated, NMS at IoU 0.1, the top `num_regions`, fewer
  # padded and masked (`pad="duplicate"`: the reference's random duplicates), cropped in
  # the input pipeline (`crop="device"`: the whole image on a `canvas_size` canvas and the
  # boxes, cropped beside the towers).
  regions = dict(num_regions=8, region_size=vision["image_size"], crop="pipeline",
                 canvas_size=world_size, nms_iou=0.1, pad="mask", empty="skip",
                 whole_image=method == "whole_image")
  # Device crops resample each box from a patch around it: the world's boxes are 200 px
  # at most at 1024 px (larger ones take the whole-image path, exactly).
  config.model.crop_window = 256 * world_size // 1024
  config.data = dict(
      seq_len=seq_len, batch_size=16, mode="regions", regions=regions,
      keyword_mask=dict(mode={"masking": "random", "masking_fixed": "fixed"}.get(method, "none"),
                        top=100, rate=0.2, seed=0),
      datasets=dict(train=dict(source=dict(world, split="train", size=4000), weight=1.0,
                               balance=True)),
      eval_datasets=dict(
          validation=dict(source=dict(world, split="validation", size=256), weight=1.0),
          test=dict(source=dict(world, split="test", size=512), weight=1.0)))
  if paper:  # the reference's Adam: no schedule, no weight decay, no clipping
    config.optim = dict(lr=5e-6, warmup_steps=0, final_lr_fraction=1.0, b1=0.9, b2=0.98,
                        eps=1e-6, weight_decay=0.0, decay_pattern=r"kernel$", clip_norm=0.0,
                        accum_steps=1)
  else:
    config.optim = dict(lr=1e-3, warmup_steps=20, final_lr_fraction=0.1, b1=0.9, b2=0.98,
                        eps=1e-6, weight_decay=1e-4, decay_pattern=r"kernel$", clip_norm=1.0,
                        accum_steps=1)
  config.summary = dict(batch_size=2, seq_len=seq_len)  # mmjax.summary
  config.train = dict(steps=300, log_every=25, eval_every=100, eval_batches=4,
                      checkpoint_every=100, keep_checkpoints=2, nonfinite="abort")
  # Held-out cases: every case of `eval_datasets.test` scored (accuracy, F1, ROC AUC,
  # expected calibration error over `bins` bins) before and after temperature scaling
  # fitted on `eval_datasets.validation`.
  config.evaluate = dict(tasks=("classify",), shots=(0,), episodes=-1, batch_size=64,
                         bins=10, seed=0)
  return config
