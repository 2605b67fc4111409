"""BLIP-2 (`model_type: blip-2`), from Hugging Face's Blip2 classes, as mmjax's `Blip2`
(`task: "blip2"`):
  Blip2ForConditionalGeneration -> a stage-2 `Blip2` with `lm` (a decoder-only LM: OPT)
    or `t5` (FLAN-T5);
  Blip2ForImageTextRetrieval (the stage-1 Q-Former with its text embeddings and the ITC
  and ITM heads) -> a stage-1 `Blip2` without `lm`.
Which one a directory holds follows from its config's `architectures` (or, without it, from
its tensors: `language_model.*`). transformers' retrieval model has neither BLIP-2's
captioning head (`text_head`, ITG) nor its contrastive temperature: the stage-1 parameters
are those of `Blip2.contrastive` and `Blip2.matching`, with `temp` at `Blip2Config.temp`.
The parts convert on their own too: the vision tower (`vision_model.*`, or a
`Blip2VisionModel` directory: `convert_blip2_vision`) and the Q-Former (`qformer.*`:
`qformer_params`).

The vision tower is EVA's ViT-g in mmjax's `ViT` with EVA's options
(`mmjax.models.vit.EVA_VIT_G`): a patch bias, no `ln_pre`, no key bias, and
`post_layernorm` (LAVIS's `ln_vision`) on all tokens, class token first. Hugging Face fuses
q, k and v into one `qkv` Linear whose bias is laid out `[q_bias, k_bias, v_bias]`; LAVIS
has no key bias (it is fixed at zero), and neither has the ViT, so a checkpoint whose key
bias is not zero is refused by name. Hugging Face computes `post_layernorm` with the
blocks' `layer_norm_eps` (1e-6), which the conversion keeps, so that the converted tower
computes what transformers computes; LAVIS's `ln_vision` used torch's default 1e-5 (set
`ViTConfig.post_norm_eps` to follow LAVIS).

The Q-Former's layers are BERT's (`mmjax.convert.bert`'s sub-blocks) named
`attention.attention.*` for `attention.self.*`; its `layernorm` is the embedding LayerNorm
that mmjax's `QFormer` applies to `[queries; text]` (`embed_norm`), and the top-level
`query_tokens` are its `queries`.

Prompts: mmjax prepends the projected queries to the LM's input. transformers scatters
them into the `num_query_tokens` `<image>` placeholders (`image_token_index`) that
Blip2Processor puts before the text (before its BOS), and older transformers (no
`image_token_index`) prepended them: the same function, given the text after the
placeholders (for T5, in the encoder's input). The LM converts through `mmjax.convert.lm`
or `mmjax.convert.t5` (`text_config`, and the `language_model.*` tensors). transformers
computes FLAN-T5's feed-forward with the activation its `feed_forward_proj` names, as the
conversion does; LAVIS overrode it with exact GELU (`dense_act_fn="gelu"`).
"""

import dataclasses
import pathlib
from typing import Any

import numpy as np

from mmjax.convert import bert, clip, common, lm, opt, t5
from mmjax.models.blip2 import Blip2, Blip2Config
from mmjax.models.qformer import QFormer, QFormerConfig
from mmjax.models.vit import ViT, ViTConfig

# transformers' Blip2VisionConfig defaults: transformers 4.x wrote only the fields that
# differ from them (the hub's Salesforce/blip2-* configs list almost none).
VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                       num_attention_heads=16, image_size=224, patch_size=14,
                       hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)


VISION_IGNORED_FIELDS = {
    "attention_dropout": common.DROPOUT, "dropout": common.DROPOUT,
    "projection_dim": "written by older transformers; BLIP-2's vision tower has no "
                      "projection (the Q-Former reads its tokens)"}


def _square(f: common.Fields, name: str) -> int:
  """An int, or a square `[n, n]`, field; refused by name otherwise."""
  value = f.get(name, VISION_DEFAULTS[name])
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise common.ConversionError(f"{f.family} with {f.path}{name}={value!r} is not "
                                   "supported: the ViT takes square images and patches.")
    value = value[0]
  return int(value)


def vision_config(f: common.Fields) -> ViTConfig:
  """The `ViTConfig` of a Hugging Face `Blip2VisionConfig` (`vision_config`): EVA's layout,
  returning all tokens, class token first, after `post_layernorm`, without projection."""
  def d(name):
    return f.get(name, VISION_DEFAULTS[name])

  f.require("num_channels", (3,), 3, "Blip2VisionModel embeds 3-channel images")
  f.get("qkv_bias")  # read by `vision_params`: without it, q and v biases are zeros
  return ViTConfig(
      image_size=_square(f, "image_size"), patch_size=_square(f, "patch_size"),
      width=d("hidden_size"), depth=d("num_hidden_layers"),
      num_heads=d("num_attention_heads"), mlp_dim=d("intermediate_size"),
      activation=common.activation(f, "hidden_act", VISION_DEFAULTS["hidden_act"]),
      norm_eps=d("layer_norm_eps"), output_dim=None, token_norm=True, keep_class_token=True,
      patch_bias=True, pre_norm=False, key_bias=False)


def vision_params(read: common.Reader, cfg: ViTConfig, qkv_bias: bool = True) -> dict:
  """`ViT` parameters from a `Blip2VisionModel`'s tensors (read relative to its prefix,
  e.g. `vision_model.`). `qkv_bias=False` (the config's `qkv_bias`): the checkpoint has
  no q and v biases, and the ViT gets zero ones, which compute the same."""
  d, h, n = cfg.width, cfg.num_heads, cfg.num_patches + 1
  k, m = d // h, cfg.mlp_dim or 4 * d
  params = {
      "patch_embed": clip.patch_embed(read, "embeddings.patch_embedding", cfg),
      "cls_token": read("embeddings.class_embedding", (1, 1, d)).reshape(d),
      "positions": read("embeddings.position_embedding", (1, n, d)).reshape(n, d),
      "post_norm": common.norm(read, "post_layernorm", d)}
  key_biases = []
  for i in range(cfg.depth):
    p = f"encoder.layers.{i}."
    weight = read(p + "self_attn.qkv.weight", (3 * d, d))  # torch Linear: q, k, v rows
    bias = read(p + "self_attn.qkv.bias", (3 * d,)) if qkv_bias else np.zeros(3 * d, np.float32)
    if np.any(bias[d:2 * d]):
      key_biases.append(f"{read.prefix}{p}self_attn.qkv.bias")
    query, _, value = (common.dense(weight[j * d:(j + 1) * d].T, bias[j * d:(j + 1) * d],
                                    (d,), (h, k)) for j in range(3))

    def lin(name, in_shape, out_shape, p=p):
      return common.linear(read, p + name, in_shape, out_shape, bias=True)

    params[f"layers_{i}"] = {
        "attn_norm": common.norm(read, p + "layer_norm1", d),
        "attn": {"query": query, "key": common.dense(weight[d:2 * d].T, None, (d,), (h, k)),
                 "value": value, "out": lin("self_attn.projection", (h, k), (d,))},
        "mlp_norm": common.norm(read, p + "layer_norm2", d),
        "mlp": {"up": lin("mlp.fc1", (d,), (m,)), "down": lin("mlp.fc2", (m,), (d,))}}
  if key_biases:
    raise common.ConversionError(
        f"The key part (elements {d}:{2 * d}) of {key_biases} is not zero: BLIP-2's ViT (EVA) "
        "has no key bias, and neither has mmjax's (ViTConfig.key_bias=False), so these "
        "weights cannot be converted exactly.")
  return params


def check_vision(params: dict, cfg: ViTConfig) -> None:
  """Refuses `params` unless they are the tree `ViT(cfg).init` builds."""
  import jax.numpy as jnp
  common.check_tree(params, ViT(cfg), jnp.zeros((1, cfg.image_size, cfg.image_size,
                                                 cfg.channels)))


def convert_blip2_vision(hf_dir: str | pathlib.Path) -> tuple[ViTConfig, dict[str, Any]]:
  """`(ViTConfig, parameters)` of a Hugging Face `Blip2VisionModel` directory
  (`model_type: blip_2_vision_model`)."""
  hf = common.read_hf_config(hf_dir)
  f = common.Fields(hf, "BLIP-2 vision tower")
  f.require("model_type", ("blip_2_vision_model",))
  cfg = vision_config(f)
  f.finish(VISION_IGNORED_FIELDS)
  read = common.Reader(common.read_hf_weights(hf_dir), ("vision_model.", ""))
  params = vision_params(read, cfg, f.get("qkv_bias", VISION_DEFAULTS["qkv_bias"]))
  read.finish()
  check_vision(params, cfg)
  return cfg, params


# ---------------------------------------------------------------------------------------
# Q-Former.
# ---------------------------------------------------------------------------------------
# transformers' Blip2QFormerConfig defaults (transformers 4.x wrote only the differences).
QFORMER_DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
                    "max_position_embeddings": 512, "layer_norm_eps": 1e-12,
                    "cross_attention_frequency": 2, "use_qformer_text_input": False}
QFORMER_IGNORED_FIELDS = {
    "hidden_dropout_prob": common.DROPOUT, "attention_probs_dropout_prob": common.DROPOUT,
    "classifier_dropout": common.DROPOUT,
    "pad_token_id": "the padding id of the text embeddings (which padding positions' "
                    "gradients it zeroes), read as Blip2Config.pad_token_id"}


def qformer_config(f: common.Fields, num_queries: int, encoder_width: int | None = None
                   ) -> tuple[QFormerConfig, bool]:
  """`(QFormerConfig, text)` of a Hugging Face `Blip2QFormerConfig` (`qformer_config`), its
  queries reading features `encoder_width` wide (default: its `encoder_hidden_size`);
  `text` says whether the checkpoint has the text feed-forwards
  (`use_qformer_text_input`)."""
  def get(name):
    return f.get(name, QFORMER_DEFAULTS[name])

  f.require("position_embedding_type", ("absolute",), "absolute",
            "only learned absolute positions are")
  width = f.get("encoder_hidden_size", 1408) if encoder_width is None else f.require(
      "encoder_hidden_size", (encoder_width,), encoder_width,
      "the queries cross-attend to the vision tower's tokens")
  cfg = QFormerConfig(
      vocab_size=get("vocab_size"), width=get("hidden_size"), depth=get("num_hidden_layers"),
      num_heads=get("num_attention_heads"), mlp_dim=get("intermediate_size"),
      max_len=get("max_position_embeddings"), num_queries=num_queries,
      cross_attention_freq=get("cross_attention_frequency"), encoder_width=width,
      activation=common.activation(f, "hidden_act", QFORMER_DEFAULTS["hidden_act"]),
      norm_eps=get("layer_norm_eps"))
  return cfg, bool(get("use_qformer_text_input"))


def qformer_params(read: common.Reader, cfg: QFormerConfig, text: bool) -> dict:
  """`QFormer` parameters, but for `queries` (`query_tokens`, outside `Blip2QFormerModel`)
  and the text embeddings (`embeddings.*`, outside too), from a `Blip2QFormerModel`'s
  tensors (read relative to its prefix, e.g. `qformer.`); with `text`, the text
  feed-forwards (`intermediate`, `output`)."""
  d, h, e = cfg.width, cfg.num_heads, cfg.encoder_width
  m = cfg.mlp_dim or 4 * d
  params = {"embed_norm": common.norm(read, "layernorm", d)}
  for i in range(cfg.depth):
    p = f"encoder.layer.{i}."
    layer = params[f"layers_{i}"] = {}
    layer["attn"], layer["attn_norm"] = bert.attention_block(read, p + "attention", d, h,
                                                             inner="attention")
    if cfg.cross_attends(i):
      layer["xattn"], layer["xattn_norm"] = bert.attention_block(
          read, p + "crossattention", d, h, kv_width=e, inner="attention")
    layer["mlp_query"], layer["mlp_query_norm"] = bert.feed_forward_block(
        read, p + "intermediate_query", p + "output_query", d, m)
    if text:
      layer["mlp"], layer["mlp_norm"] = bert.feed_forward_block(
          read, p + "intermediate", p + "output", d, m)
  return params


def check_qformer(params: dict, cfg: QFormerConfig, text: bool) -> None:
  """Refuses `params` unless they are the tree `QFormer(cfg).init` builds (running the
  queries, and the text too when `text`)."""
  import jax.numpy as jnp
  tokens = jnp.zeros((1, 1), jnp.int32) if text else None
  common.check_tree(params, QFormer(cfg), jnp.zeros((1, 1, cfg.encoder_width)), tokens)


# ---------------------------------------------------------------------------------------
# The whole model.
# ---------------------------------------------------------------------------------------
IGNORED_FIELDS = {
    "image_token_index": "the <image> placeholders' id: mmjax prepends the queries, where "
                        "Blip2Processor puts the placeholders (see the module docstring)",
    "image_text_hidden_size": "the ITC embeddings' width, read (Blip2Config.embed_dim)",
    "use_decoder_only_language_model": "follows from text_config.model_type, which is read",
    "qformer_config.encoder_hidden_size": "the vision width, which transformers copies here "
                                          "(read)",
    **{f"vision_config.{k}": v for k, v in VISION_IGNORED_FIELDS.items()},
    **{f"qformer_config.{k}": v for k, v in QFORMER_IGNORED_FIELDS.items()},
}
IGNORED_TENSORS = {
    r"embeddings\.position_ids": "a buffer of arange(positions)",
}


def _text_config(f: common.Fields) -> dict[str, Any]:
  """`text_config` of a decoder-only LM, with OPT's defaults for the fields transformers
  4.x did not write."""
  text = dict(f.get("text_config", {}))
  kind = text.get("model_type", "opt")  # transformers' Blip2Config defaults to OPT
  if kind not in lm.LM_TYPES:
    raise common.ConversionError(f"BLIP-2 with text_config.model_type={kind!r} is not "
                                 f"supported; supported: {', '.join(lm.LM_TYPES + ('t5',))}.")
  return {**opt.DEFAULTS, **text, "model_type": "opt"} if kind == "opt" else text


def blip2_config(hf: dict[str, Any], stage: int) -> tuple[Blip2Config, dict[str, Any]]:
  """`(Blip2Config, facts)` of a Hugging Face Blip2Config, every field read or ignored on
  purpose (`IGNORED_FIELDS`): stage 2 with the LM of `text_config`, stage 1 without.
  `facts`: what conversion needs beyond the config (`qkv_bias`, `qformer_text`, `text`,
  the LM's config as a dict)."""
  f = common.Fields(hf, "BLIP-2")
  f.require("model_type", ("blip-2",))
  v = f.sub("vision_config", {})
  vision = vision_config(v)
  num_queries = f.get("num_query_tokens", 32)
  q = f.sub("qformer_config", {})
  qformer, qformer_text = qformer_config(q, num_queries, vision.width)
  facts = {"qkv_bias": v.get("qkv_bias", VISION_DEFAULTS["qkv_bias"]),
           "qformer_text": qformer_text}
  if stage == 1 and not qformer_text:
    raise common.ConversionError(
        "BLIP-2 retrieval (stage 1, no language_model.* tensors) with "
        "qformer_config.use_qformer_text_input=false is not supported: its text passes run "
        "the Q-Former's text feed-forwards, which that setting leaves out.")
  lm_cfg = t5_cfg = None
  ignored = dict(IGNORED_FIELDS)
  if stage == 2 and (f.get("text_config") or {}).get("model_type") == "t5":
    t5_cfg = t5.t5_config(f.sub("text_config"))
    ignored |= {f"text_config.{k}": v for k, v in t5.IGNORED_FIELDS.items()}
    facts["text"] = f.get("text_config")
  elif stage == 2:
    facts["text"] = _text_config(f)
    lm_cfg = lm.lm_config(facts["text"])
  else:
    ignored["text_config"] = "a retrieval (stage-1) checkpoint has no language model"
  cfg = Blip2Config(
      vision=vision, qformer=qformer, lm=lm_cfg, t5=t5_cfg,
      embed_dim=f.get("image_text_hidden_size", 256),
      # LAVIS appends [DEC] as the last token of the Q-Former's vocabulary.
      dec_token_id=qformer.vocab_size - 1, pad_token_id=q.get("pad_token_id", 0))
  f.finish(ignored)
  return cfg, facts


def blip2_params(state: dict[str, np.ndarray], cfg: Blip2Config, facts: dict[str, Any]
                 ) -> dict:
  """mmjax `Blip2` parameters from a Blip2ForConditionalGeneration's (with `cfg.lm` or
  `cfg.t5`) or a Blip2ForImageTextRetrieval's state dict, every tensor consumed or ignored
  on purpose."""
  prefix = "language_model."
  read = common.Reader({k: v for k, v in state.items() if not k.startswith(prefix)})
  q, d = cfg.qformer, cfg.qformer.width
  read.prefix = "vision_model."
  params = {"vision": vision_params(read, cfg.vision, facts["qkv_bias"])}
  read.prefix = "qformer."
  stage1 = cfg.stage == 1
  params["qformer"] = qformer_params(read, q, text=stage1)
  read.prefix = ""
  params["qformer"]["queries"] = read("query_tokens", (1, q.num_queries, d)).reshape(
      q.num_queries, d)
  if stage1:
    params["qformer"]["embed"] = {"embedding": read("embeddings.word_embeddings.weight",
                                                    (q.vocab_size, d))}
    params["qformer"]["positions"] = {"embedding": read(
        "embeddings.position_embeddings.weight", (q.max_len, d))}
    for name, hf in (("vision_proj", "vision_projection"), ("text_proj", "text_projection")):
      params[name] = common.linear(read, hf, (d,), (cfg.embed_dim,), bias=True)
    params["itm_head"] = common.linear(read, "itm_head", (d,), (2,), bias=True)
    # No temperature in transformers' checkpoint (its ITC scores are plain cosine
    # similarities; its conversion dropped LAVIS's `temp`): Blip2Config's initial value.
    params["temp"] = np.asarray(cfg.temp, np.float32)
  else:
    params["lm_proj"] = common.linear(read, "language_projection", (d,),
                                      ((cfg.lm or cfg.t5).width,), bias=True)
    lm_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if cfg.t5 is not None:
      params["t5"] = t5.t5_params(lm_state, cfg.t5)
    else:
      params["lm"] = lm.lm_params(facts["text"], lm_state, cfg.lm)
  ignored = dict(IGNORED_TENSORS)
  if not stage1 and facts["qformer_text"]:
    ignored[r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..*"] = (
        "the Q-Former's text feed-forwards: stage 2 runs the queries alone")
  read.finish(ignored)
  return params


# transformers' class (the config's `architectures`) -> the stage it converts to.
STAGES = {"Blip2ForConditionalGeneration": 2, "Blip2ForImageTextRetrieval": 1}


def stage_of(state: dict[str, np.ndarray]) -> int:
  """2 for a checkpoint with a language model (`language_model.*`), 1 otherwise."""
  return 2 if any(k.startswith("language_model.") for k in state) else 1


def check_blip2(params: dict, cfg: Blip2Config) -> None:
  """Refuses `params` unless they are the tree `Blip2(cfg).init` builds; for stage 1, the
  tree of its contrastive and matching passes (transformers' retrieval model has no
  captioning head)."""
  import jax.numpy as jnp
  size, channels = cfg.vision.image_size, cfg.vision.channels
  images, tokens = jnp.zeros((1, size, size, channels)), jnp.zeros((1, 1), jnp.int32)
  if cfg.stage == 2:
    common.check_tree(params, Blip2(cfg), images, tokens)
    return

  def retrieval(model, images, tokens):
    image, mask = model.image_features(images), jnp.ones(tokens.shape, bool)
    return model.contrastive(image, tokens, mask), model.matching(image, tokens, mask)
  common.check_tree(params, Blip2(cfg), images, tokens, method=retrieval)


def convert_blip2(hf_dir: str | pathlib.Path) -> tuple[Blip2Config, dict[str, Any]]:
  """`(Blip2Config, parameters)` of a Hugging Face BLIP-2 directory: a
  Blip2ForConditionalGeneration (stage 2, with `lm`) or a Blip2ForImageTextRetrieval
  (stage 1)."""
  hf = common.read_hf_config(hf_dir)
  stages = {STAGES[a] for a in hf.get("architectures") or () if a in STAGES}
  if len(stages) == 1:  # the config is checked before the weights are read
    cfg, facts = blip2_config(hf, stages.pop())
    state = common.read_hf_weights(hf_dir)
  else:
    state = common.read_hf_weights(hf_dir)
    cfg, facts = blip2_config(hf, stage_of(state))
  if stage_of(state) != cfg.stage:
    raise common.ConversionError(
        f"{hf_dir}'s config says {hf.get('architectures')}, but its weights "
        f"{'have' if cfg.stage == 1 else 'have no'} language_model.* tensors.")
  if cfg.t5 is not None and cfg.t5.tie_embeddings and t5.has_own_output_layer(
      facts["text"], state, "language_model."):
    cfg = dataclasses.replace(cfg, t5=dataclasses.replace(cfg.t5, tie_embeddings=False))
  params = blip2_params(state, cfg, facts)
  check_blip2(params, cfg)
  return cfg, params
