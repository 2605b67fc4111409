"""Flamingo: frozen ViT + Perceiver Resampler + frozen LM with gated cross-attention.

Variants (`--config=configs/flamingo.py:<variant>`):
  tiny   the embedded default: 64px images, a 4-layer LM; runs on a laptop CPU.
  base   width 768, 12 LM layers, a ViT-B/16: the CPU benchmark size.

Inspect a variant (parameter counts, a compiled forward pass and generation):
  python -m mmjax.summary --config=configs/flamingo.py:base
"""

import ml_collections

from mmjax.data.tokenizer import BOS_ID as BOS
from mmjax.data.tokenizer import ENDOFCHUNK_ID as ENDOFCHUNK
from mmjax.data.tokenizer import EOS_ID as EOS
from mmjax.data.tokenizer import MEDIA_ID as MEDIA
from mmjax.data.tokenizer import PAD_ID as PAD

VARIANTS = {
    "tiny": dict(
        vision=dict(image_size=64, patch_size=8, width=128, depth=4, num_heads=4,
                    output_dim=128, activation="quick_gelu"),
        resampler=dict(depth=2, num_heads=4, head_dim=32, num_latents=16),
        lm=dict(vocab_size=1024, width=256, depth=4, num_heads=4, max_len=256),
        xattn=dict(every=1, num_heads=4, head_dim=32),
    ),
    "base": dict(
        vision=dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12,
                    output_dim=512, activation="quick_gelu"),
        resampler=dict(depth=6, num_heads=8, head_dim=64, num_latents=64),
        lm=dict(vocab_size=32000, width=768, depth=12, num_heads=12, max_len=1024),
        xattn=dict(every=1, num_heads=8, head_dim=64),
    ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown flamingo variant {variant!r}; choose from {sorted(VARIANTS)}.")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.model = dict(
      **VARIANTS[variant], media_token_id=MEDIA, endofchunk_token_id=ENDOFCHUNK,
      vision_feature_layer=-1)
  # Parameters that train (a regex on '/'-joined paths); everything else stays frozen.
  config.trainable = r"^(resampler|lm/xattn_\d+)/"
  config.tokens = dict(pad=PAD, eos=EOS, bos=BOS)
  config.summary = dict(batch_size=2, num_images=2, seq_len=64, max_new_tokens=16)
  return config
