"""OpenFlamingo (`--openflamingo=checkpoint.pt`): its checkpoint (perceiver, gated blocks,
the LM's input embeddings with the added tokens, and whatever else it trained), a CLIP
vision tower (open_clip / OpenAI weights, or a Hugging Face CLIP directory) and the
Hugging Face LM it was built on, as a whole Flamingo (`task: "flamingo"`).

What the checkpoint holds wins over the LM directory's tensors of the same name; copies
of one tensor (OpenFlamingo's module aliases, a tied output layer, a full state dict's
vision tower) must agree, or the conversion is refused naming them.
"""

import dataclasses
import pathlib

import numpy as np

from mmjax.convert import clip, common, lm as lm_family
from mmjax.convert.open_clip import open_clip_vision
from mmjax.models.flamingo import FlamingoConfig
from mmjax.models.perceiver import ResamplerConfig
from mmjax.models.vit import ViTConfig
from mmjax.models.xattn import XAttnConfig

HINT = ("Check that it is OpenFlamingo's checkpoint.pt (or a training checkpoint of it) for "
        "the --vision tower and --hf_dir LM it was built on.")
# Tensors of the vision source that the vision tower does not use.
IGNORED_VISION_TENSORS = {
    r"text_model\..*|text_projection\.weight|visual_projection\.weight|logit_scale":
        "a CLIPModel's text tower and projections: Flamingo reads the vision tower's patch "
        "tokens only",
    r"vision_model\.embeddings\.position_ids": "a buffer of arange(positions)",
}
# Fields of an HF CLIP directory's config that the vision tower does not use.
IGNORED_VISION_FIELDS = {
    "projection_dim": "the pooled embedding's projection, which Flamingo does not use",
    "logit_scale_init_value": "CLIPModel's contrastive temperature, which Flamingo does not "
                              "use",
    "text_config": "the text tower, which Flamingo does not use",
    "text_config_dict": "the text tower, which Flamingo does not use",
    **{k: v for k, v in clip.IGNORED_FIELDS.items() if k.startswith("vision_config.")},
    "dropout": common.DROPOUT, "attention_dropout": common.DROPOUT,
}


def convert_openflamingo(checkpoint: str | pathlib.Path, *, vision: str | pathlib.Path,
                         lm_dir: str | pathlib.Path, media_token_id: int,
                         endofchunk_token_id: int, vision_activation: str = "quick_gelu"
                         ) -> tuple[FlamingoConfig, dict]:
  """`(FlamingoConfig, parameters)` of an OpenFlamingo model.

  Args:
    checkpoint: OpenFlamingo's `checkpoint.pt`: the perceiver, the gated blocks (saved
      under the LM's decoder layers) and the LM's input embeddings with the added
      `<|endofchunk|>`, `<image>` (and `<PAD>`) rows; with an HF-tied LM also its output
      layer (equal to the embedding). A training checkpoint (`model_state_dict`, DDP's
      `module.` prefix) or a full state dict (aliases, frozen layers, the vision encoder)
      works too.
    vision: the CLIP vision tower: an open_clip / OpenAI CLIP weights file (`visual.*`;
      see `open_clip_vision`; its text tower is not used) or a Hugging Face CLIP directory.
    lm_dir: the Hugging Face LM the model was built on (a family `convert_lm` reads).
    media_token_id, endofchunk_token_id: `<image>` and `<|endofchunk|>` in the tokenizer
      extended as OpenFlamingo does (`HFTokenizer(lm_dir)` gives them).
    vision_activation: of an open_clip tower ("quick_gelu" for OpenAI's weights).
  An untied output layer that the checkpoint does not hold has no rows for the added
  tokens (OpenFlamingo trains and saves only the input embeddings); they are filled with
  the mean row.
  """
  hf = common.read_hf_config(lm_dir)
  lm = lm_family.lm_config(hf)
  family = lm_family.LM_FAMILIES[hf["model_type"]]
  vision_cfg, params = _vision(vision, vision_activation)
  lm_state = common.read_hf_weights(lm_dir)
  ckpt = common.read_state_file(checkpoint)
  ckpt = ckpt.get("model_state_dict", ckpt)
  ckpt = {k.removeprefix("module.").replace("._checkpoint_wrapped_module", ""): v
          for k, v in ckpt.items()}
  params = {"vision": params}

  # Sort the checkpoint: gated blocks, the LM's tensors (under their LM names), the vision
  # encoder of a full state dict, and the rest (the perceiver).
  blocks: dict[int, dict[str, list]] = {}
  lm_copies: dict[str, list] = {}
  vision_encoder: dict[str, np.ndarray] = {}
  other = {}
  for key, value in ckpt.items():
    if key.startswith("vision_encoder."):
      vision_encoder["visual." + key[len("vision_encoder."):]] = value
      continue
    if not key.startswith("lang_encoder."):
      other[key] = value
      continue
    name = key[len("lang_encoder."):]
    head, sep, tail = name.partition(".gated_cross_attn_layer.")
    if sep:  # <decoder layers>.<i>.gated_cross_attn_layer.<param>
      blocks.setdefault(int(head.rpartition(".")[2]), {}).setdefault(tail, []).append(
          (key, value))
    elif name.startswith("gated_cross_attn_layers."):  # an alias of the same blocks
      _, i, tail = name.split(".", 2)
      blocks.setdefault(int(i), {}).setdefault(tail, []).append((key, value))
    else:
      if name.startswith("old_decoder_blocks."):  # an alias of the LM's layers
        _, i, tail = name.split(".", 2)
        name = f"{family.DECODER_LAYERS}.{i}.{tail}"
      else:  # a FlamingoLayer wraps each LM layer as its decoder_layer
        head, sep, tail = name.partition(".decoder_layer.")
        name = f"{head}.{tail}" if sep else name
      lm_copies.setdefault(name, []).append((key, value))

  if vision_encoder:
    _, theirs = _vision_from_open_clip(vision_encoder, vision_activation)
    _require_equal(params["vision"], theirs, "the checkpoint's vision_encoder", "--vision")

  lm_state = dict(lm_state)
  for name, copies in lm_copies.items():
    value = _one(copies)
    if name in lm_state or name == "lm_head.weight":
      # A tied output layer is checked against the embedding as the LM's reader reads it.
      lm_state[name] = value
    else:
      other[copies[0][0]] = value
  vocab = lm_state[family.EMBEDDING].shape[0]
  head = lm_state.get("lm_head.weight")  # (if missing, the LM's reader names it)
  if not lm.tie_embeddings and head is not None and head.shape[0] != vocab:
    from mmjax.checkpoints import extend_with_mean
    lm_state["lm_head.weight"] = extend_with_mean(lm_state["lm_head.weight"][:vocab], vocab)
  lm = dataclasses.replace(lm, vocab_size=vocab)
  params["lm"] = lm_family.lm_params(hf, lm_state, lm)

  resampler, params["resampler"] = _perceiver(other, vision_cfg.width)

  # Gated cross-attention blocks.
  if not blocks:
    raise common.ConversionError(f"{checkpoint} has no gated cross-attention blocks "
                                 "(lang_encoder.<layers>.<i>.gated_cross_attn_layer.*).")
  every = min(blocks) + 1
  d, e = lm.width, vision_cfg.width
  first = {tail: _one(copies) for tail, copies in blocks[min(blocks)].items()}
  if not {"attn.to_q.weight", "ff.1.weight"} <= set(first):
    raise common.ConversionError(
        f"The gated block in front of layer {min(blocks)} has no attn.to_q.weight or "
        f"ff.1.weight (it has {sorted(first)}). {HINT}")
  block_inner = first["attn.to_q.weight"].shape[0]
  ff_mult = first["ff.1.weight"].shape[0]
  xattn = XAttnConfig(every=every, placement="openflamingo", num_heads=block_inner // 64,
                      head_dim=64, ff_mult=ff_mult // d, activation="gelu")
  if sorted(blocks) != list(xattn.layer_indices(lm.depth)):
    raise common.ConversionError(f"Gated blocks in front of layers {sorted(blocks)}: not "
                                 f"every {every} layers of the {lm.depth}-layer LM.")
  for i, block in blocks.items():
    read = common.Reader({tail: _one(copies) for tail, copies in block.items()})
    params["lm"][f"xattn_{i}"] = {
        "attn_norm": common.norm(read, "attn.norm", d),
        "attn": _attention(read, "attn.", d, e, xattn.num_heads),
        "attn_gate": read("attn_gate", (1,)), "mlp_gate": read("ff_gate", (1,)),
        **_feed_forward(read, "ff.", d, xattn.ff_mult)}
    read.finish(hint=HINT)
  cfg = FlamingoConfig(vision=vision_cfg, resampler=resampler, lm=lm, xattn=xattn,
                       media_token_id=media_token_id, endofchunk_token_id=endofchunk_token_id)
  common.check_flamingo(params, cfg)
  return cfg, params


def _vision(vision: str | pathlib.Path, activation: str) -> tuple[ViTConfig, dict]:
  """The vision tower's config and parameters, from an HF CLIP directory or an open_clip
  weights file (whose other tensors, its text tower, are not used)."""
  if not pathlib.Path(vision).is_dir():
    return _vision_from_open_clip(common.read_state_file(vision), activation)
  f = common.Fields(common.read_hf_config(vision), "CLIP vision tower")
  if "vision_config" in f:  # a CLIPModel, not a CLIPVisionModel
    sub = clip.sub_config(f, "vision_config")
  else:
    sub = f
  cfg = dataclasses.replace(clip.vit_config(sub, None), token_norm=False)
  f.finish(IGNORED_VISION_FIELDS)
  state = common.read_hf_weights(vision)
  read = common.Reader(state, ("vision_model.",))
  params = clip.vit_params(read, cfg, None)
  read.finish(IGNORED_VISION_TENSORS)
  return cfg, params


def _vision_from_open_clip(state: dict[str, np.ndarray], activation: str
                           ) -> tuple[ViTConfig, dict]:
  cfg, hf_state = open_clip_vision(state, activation)
  read = common.Reader(hf_state)
  params = clip.vit_params(read, cfg, None)
  read.finish()
  return cfg, params


def _perceiver(state: dict[str, np.ndarray], e: int) -> tuple[ResamplerConfig, dict]:
  """OpenFlamingo's `PerceiverResampler` over `e`-wide vision tokens (64-wide heads)."""
  read = common.Reader(state)
  read.prefix = "perceiver."
  latents = read("latents")
  depth = len({k.split(".")[2] for k in state if k.startswith("perceiver.layers.")})
  inner = read("layers.0.0.to_q.weight").shape[0]
  frames = state.get("perceiver.frame_embs")
  if "perceiver.media_time_embs" in state:
    raise common.ConversionError("perceiver.media_time_embs (max_num_media) is not "
                                 "supported.")
  resampler = ResamplerConfig(
      depth=depth, num_heads=inner // 64, head_dim=64, num_latents=latents.shape[0],
      ff_mult=read("layers.0.1.1.weight").shape[0] // e, activation="gelu",
      max_frames=None if frames is None else frames.shape[0])
  perceiver = {"latents": read("latents", (resampler.num_latents, e)),
               "final_norm": common.norm(read, "norm", e)}
  if frames is not None:
    perceiver["frame_embed"] = read("frame_embs", frames.shape)
  for i in range(depth):
    perceiver[f"layers_{i}"] = {
        "latents_norm": common.norm(read, f"layers.{i}.0.norm_latents", e),
        "media_norm": common.norm(read, f"layers.{i}.0.norm_media", e),
        "attn": _attention(read, f"layers.{i}.0.", e, e, resampler.num_heads),
        **_feed_forward(read, f"layers.{i}.1.", e, resampler.ff_mult)}
  read.finish(hint=HINT)
  return resampler, perceiver


def _attention(read: common.Reader, p: str, d: int, e: int, heads: int) -> dict:
  """`to_q`, `to_kv` (keys and values stacked on the output dim) and `to_out`, bias-free,
  64-wide heads: `d`-wide queries, `e`-wide keys and values."""
  inner = heads * 64
  kv = read(p + "to_kv.weight", (2 * inner, e))
  return {"query": common.linear(read, p + "to_q", (d,), (heads, 64)),
          "key": common.dense(kv[:inner].T, None, (e,), (heads, 64)),
          "value": common.dense(kv[inner:].T, None, (e,), (heads, 64)),
          "out": common.linear(read, p + "to_out", (heads, 64), (d,))}


def _feed_forward(read: common.Reader, p: str, d: int, mult: int) -> dict:
  """OpenFlamingo's `FeedForward`: LayerNorm (`.0`), Linear (`.1`), GELU, Linear (`.3`)."""
  return {"mlp_norm": common.norm(read, p + "0", d),
          "mlp": {"up": common.linear(read, p + "1", (d,), (mult * d,)),
                  "down": common.linear(read, p + "3", (mult * d,), (d,))}}


def _one(copies: list[tuple[str, np.ndarray]]) -> np.ndarray:
  """The value of a tensor saved under several names (module aliases), which must agree."""
  key, value = copies[0]
  for other, copy in copies[1:]:
    if copy.shape != value.shape or not np.array_equal(copy, value):
      raise common.ConversionError(f"{key} and {other} are copies of one tensor (aliases of "
                                   f"one module) but differ. {HINT}")
  return value


def _require_equal(ours: dict, theirs: dict, what: str, source: str) -> None:
  from flax.traverse_util import flatten_dict
  a, b = flatten_dict(ours, sep="/"), flatten_dict(theirs, sep="/")
  differ = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b
                  or a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]))
  if differ:
    raise common.ConversionError(
        f"{what} differs from the tower in {source} ({len(differ)} parameters, e.g. "
        f"{differ[:4]}); convert with the tower the model was trained with.")
