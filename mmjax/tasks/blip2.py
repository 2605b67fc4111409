"""BLIP-2 training, both stages, on image-text pairs.

Stage 1 (a model without `lm`) trains the Q-Former with the unweighted sum of
  ITC  contrastive loss between each image's best-matching query and the text's [CLS]
       (`losses.query_text_similarity` over a learned temperature), both directions,
       label smoothing 0.1. The batch is the global one inside the jitted step, so every
       other pair on every device is a negative and the gradient is the exact one of the
       global loss;
  ITM  image-text matching on the positives and, for each image and each text, one hard
       negative drawn (without gradient) from the softmax of its contrastive
       similarities with the positive excluded: 3 x batch pairs, 2-way cross-entropy;
  ITG  captioning: the text after [DEC], each token predicting the next with the
       queries in view, label smoothing 0.1;
each logged on its own (`loss/itc`, `loss/itm`, `loss/itg`).
Stage 2 trains the queries' projection into the frozen LM: with a decoder-only `lm`, the
next-token loss on the text after the projected queries; with a `t5`, the prefix-LM split
the authors describe: each text is cut at a point drawn uniformly from its second token
to its middle, the queries and the part before go into the encoder, the decoder
predicts the rest (`prefix_lm_split`).
"""

import jax
import jax.numpy as jnp

from mmjax import losses
from mmjax.models.blip2 import Blip2, Blip2Config
from mmjax.models.qformer import query_mlp_from_text
from mmjax.tasks import data_fits_model, model_config

MODEL_CONFIG = Blip2Config
LABEL_SMOOTHING = 0.1  # ITC and ITG, as BLIP-2's stage 1


def check_config(config) -> list[str]:
  """Problems of a BLIP-2 recipe's config beyond its fields' own (`mmjax.config`)."""
  found, model = [], config.model
  text = "lm" if model.get("lm") else "t5" if model.get("t5") else "qformer"
  found += data_fits_model(config, "pair", text=text, vision="vision")
  if text == "qformer":
    if config.optim.accum_steps != 1:
      found.append(f"config.optim.accum_steps={config.optim.accum_steps}: stage 1's "
                   "contrastive loss and hard negatives need the whole batch at once; set "
                   "it to 1 and choose config.data.batch_size directly")
    if config.data.batch_size < 2:
      found.append(f"config.data.batch_size={config.data.batch_size}: stage 1's image-text "
                   "matching draws each negative from the other pairs of the batch; use 2 "
                   "or more")
  if "evaluate" in config and tuple(config.evaluate.shots) != (0,):
    found.append(f"config.evaluate.shots={tuple(config.evaluate.shots)}: BLIP-2 answers "
                 "zero-shot (one image, no demonstrations); set it to (0,)")
  if model.vision.width != model.qformer.encoder_width:
    found.append(f"config.model.qformer.encoder_width={model.qformer.encoder_width} differs "
                 f"from config.model.vision.width={model.vision.width}, the width of the "
                 "features its cross-attention reads")
  return found


def build_model(config) -> Blip2:
  return Blip2(model_config(Blip2Config, config))


def init_inputs(config):
  size = config.model.vision["image_size"]
  return (jnp.zeros((1, size, size, 3), jnp.uint8),
          jnp.ones((1, config.data.seq_len), jnp.int32)), {}


def initial_params(params: dict) -> dict:
  """Stage 1 starts the query feed-forwards as copies of the text ones."""
  if "text_head" not in params:  # stage 2: the Q-Former comes trained
    return params
  return dict(params, qformer=query_mlp_from_text(params["qformer"]))


def loss_terms(model: Blip2, params, batch, rng):
  cfg: Blip2Config = model.config
  tokens = batch["tokens"]
  valid = tokens != cfg.pad_token_id
  apply = lambda method, *args: model.apply({"params": params}, *args, method=method)
  if cfg.lm is not None:
    logits = model.apply({"params": params}, batch["image"], tokens[:, :-1])
    total, count = losses.next_token_loss(logits, tokens[:, 1:], valid[:, 1:])
    return total, count, {}
  if cfg.t5 is not None:
    inputs, input_valid, targets, target_valid = prefix_lm_split(tokens, valid, rng,
                                                                 cfg.pad_token_id)
    decoder_tokens = jnp.concatenate([jnp.full_like(targets[:, :1], cfg.t5.decoder_start_id),
                                      targets[:, :-1]], axis=1)
    logits = model.apply({"params": params}, batch["image"], inputs, input_valid,
                         decoder_tokens=decoder_tokens)
    total, count = losses.next_token_loss(logits, targets, target_valid)
    return total, count, {}
  image = apply(Blip2.image_features, batch["image"])
  itc, similarity = contrastive_loss(*apply(Blip2.contrastive, image, tokens, valid))
  itm = matching_loss(lambda i, t, v: apply(Blip2.matching, i, t, v), image, tokens, valid,
                      similarity, rng)
  logits = apply(Blip2.captioning, image, tokens, valid)
  ce = losses.cross_entropy(logits[:, :-1], tokens[:, 1:], LABEL_SMOOTHING)
  itg = losses.safe_mean(jnp.sum(jnp.where(valid[:, 1:], ce, 0.0)), jnp.sum(valid[:, 1:]))
  batch_size = jnp.float32(tokens.shape[0])
  # A (sum, count) pair whose ratio is the loss: the three terms' sum.
  return ((itc + itm + itg) * batch_size, batch_size,
          {"itc": itc, "itm": itm, "itg": itg})


def contrastive_loss(image: jax.Array, text: jax.Array, temp: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """ITC from `image "b q k"` and `text "b k"` embeddings: `(loss, similarity "b b")`,
  the similarities over the temperature, image rows and text columns."""
  similarity = losses.query_text_similarity(image, text) / temp
  labels = jnp.arange(similarity.shape[0])
  loss = (jnp.mean(losses.cross_entropy(similarity, labels, LABEL_SMOOTHING))
          + jnp.mean(losses.cross_entropy(similarity.T, labels, LABEL_SMOOTHING))) / 2
  return loss, similarity


def hard_negatives(similarity: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For each image a text, and for each text an image, other than its own, drawn with
  probability softmax(similarity) over the others; no gradient flows through the draw.

  Args:
    similarity: `"b b"` image rows, text columns.
  Returns:
    `(negative text of each image "b", negative image of each text "b")`, indices.
  """
  b = similarity.shape[0]
  if b < 2:
    raise ValueError("BLIP-2's image-text matching draws each negative from the other "
                     "pairs of the batch, and a batch of 1 has none: use a global batch of "
                     "2 or more (config.data.batch_size).")
  logits = jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, jax.lax.stop_gradient(similarity))
  text_rng, image_rng = jax.random.split(rng)
  return (jax.random.categorical(text_rng, logits, axis=1),
          jax.random.categorical(image_rng, logits.T, axis=1))


def matching_loss(matching, image: jax.Array, tokens: jax.Array, valid: jax.Array,
                  similarity: jax.Array, rng: jax.Array) -> jax.Array:
  """ITM: 2-way cross-entropy of `matching(image, tokens, valid) -> "n 2"` on the
  positive pairs, each text with a hard negative image and each image with a hard
  negative text (labels 1, 0, 0)."""
  b = tokens.shape[0]
  negative_text, negative_image = hard_negatives(similarity, rng)
  logits = matching(jnp.concatenate([image, image[negative_image], image]),
                    jnp.concatenate([tokens, tokens, tokens[negative_text]]),
                    jnp.concatenate([valid, valid, valid[negative_text]]))
  labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
  return jnp.mean(losses.cross_entropy(logits, labels))


def prefix_lm_split(tokens: jax.Array, valid: jax.Array, rng: jax.Array, pad_id: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Cuts each text `tokens "b t"` (real where `valid`, a prefix of each row) at a point
  drawn uniformly from 1 to half its length (at least 1).

  Returns:
    `(inputs, input_valid, targets, target_valid)`, all `"b t"`: the tokens before the
    cut (the rest masked), and those from it on, moved to the start of the row and
    padded with `pad_id`.
  """
  t = tokens.shape[1]
  lengths = jnp.sum(valid, axis=1)
  cut = 1 + jnp.floor(jax.random.uniform(rng, lengths.shape)
                      * jnp.maximum(lengths // 2, 1)).astype(jnp.int32)
  positions = jnp.arange(t)
  input_valid = valid & (positions < cut[:, None])
  source = cut[:, None] + positions
  target_valid = source < lengths[:, None]
  targets = jnp.where(target_valid, jnp.take_along_axis(tokens, jnp.minimum(source, t - 1),
                                                        axis=1), pad_id)
  return tokens, input_valid, targets, target_valid
