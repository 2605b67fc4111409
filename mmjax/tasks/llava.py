"""LLaVA visual instruction tuning: next-token loss on the answers of conversations about
images (`mmjax.data.conversation` builds the sequences and which tokens train).

Stage 1 (feature alignment) trains the projector alone on captions under the `plain`
template; stage 2 trains the projector and the LM (or LoRA on the LM: `config.peft`) on
conversations under `vicuna_v1` or another template. The vision tower stays frozen in
both, as in LLaVA-1.5 (`config.trainable`).
"""

import jax.numpy as jnp

from mmjax import losses
from mmjax.models.llava import Llava, LlavaConfig
from mmjax.tasks import data_fits_model, model_config

MODEL_CONFIG = LlavaConfig
MODEL = Llava


def check_config(config) -> list[str]:
  """Problems of a LLaVA recipe's config beyond its fields' own (`mmjax.config`)."""
  found = data_fits_model(config, "conversation", text="lm", vision="vision")
  model = build_model(config).config
  if config.data.get("image_tokens") != model.image_tokens:
    found.append(f"config.data.image_tokens={config.data.get('image_tokens')} differs from "
                 f"the {model.image_tokens} features the model gives each image "
                 f"({model.vision.num_patches} patches, vision_feature_select="
                 f"{model.vision_feature_select!r}); set it to {model.image_tokens}")
  grid = config.data.get("grid_pinpoints")
  if model.anyres_grid != (None if grid is None else tuple(tuple(p) for p in grid)):
    found.append(f"config.data.grid_pinpoints={grid} differs from config.model.anyres_grid="
                 f"{model.anyres_grid}: image tokens are counted with the data's grid and "
                 "features packed with the model's; set both alike")
  return found


def build_model(config) -> Llava:
  return Llava(model_config(LlavaConfig, config))


def init_inputs(config):
  size = config.model.vision["image_size"]
  m = max(config.data.get("max_images", 1), 1)
  tokens = jnp.ones((1, config.data.seq_len), jnp.int32)
  if config.model.get("anyres_grid"):  # each image's base view and tiles, and its size
    views = build_model(config).config.anyres_views
    return ((jnp.zeros((1, m, views, size, size, 3), jnp.uint8), tokens),
            {"image_sizes": jnp.full((1, m, 2), size, jnp.int32)})
  images = jnp.zeros((1, m, size, size, 3), jnp.uint8)
  return (images, tokens), {}


def loss_terms(model: Llava, params, batch, rng):
  del rng  # deterministic
  logits = model.apply({"params": params}, batch["images"], batch["tokens"],
                       image_sizes=batch.get("image_sizes"))
  total, count = losses.next_token_loss(logits, batch["targets"], batch["loss_mask"],
                                        batch.get("loss_weight"))
  return total, count, {}
