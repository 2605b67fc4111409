"""Small, model-agnostic building blocks. Every parameter carries logical axis names.

Logical axis names used for parameters (mapped to mesh axes by config rules):
  embed     model width                       mlp       feed-forward hidden width
  heads     query heads                       kv_heads  key/value heads (grouped-query)
  head_dim  per-head width                    vocab     vocabulary
  latents   learned resampler latents         length    positions in a learned position table
  patch     flattened patch pixels (ViT stem)
  layers    the stacking axis of scanned layers (`scan`)
Activations use: batch, length, embed, heads, kv_heads, head_dim, mlp, vocab.
"""

from mmjax.layers.attention import Attention, padding_mask
from mmjax.layers.dense import Dense
from mmjax.layers.embeddings import LearnedPositions, RopeScaling, apply_rope, rope_frequencies
from mmjax.layers.mlp import Mlp
from mmjax.layers.norms import Norm
from mmjax.layers.stack import REMAT_POLICIES, remat, scan, stack

__all__ = ["REMAT_POLICIES", "Attention", "Dense", "LearnedPositions", "Mlp", "Norm", "RopeScaling",
           "apply_rope", "padding_mask", "remat", "rope_frequencies", "scan", "stack"]
