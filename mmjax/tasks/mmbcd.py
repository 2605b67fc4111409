"""MMBCD: malignant-or-not classification of a mammogram from its detector regions and the
patient's clinical history (`mmjax.models.mmbcd`), trained with cross-entropy.

Batches come from the pipeline's "regions" mode (`mmjax.data.regions`): the crops
(`regions`) or the whole image on its canvas and the boxes (`image`, `boxes`, cropped on
the device), `region_mask`, the history's `tokens` and the `label`. The two BatchNorm1d's
statistics are the model's state, carried by the trainer; the attention's dropout draws
from the step's key. Accuracy, F1, ROC AUC and calibration are measured on held-out cases
by `mmjax.evaluate.classify`.
"""

import jax
import jax.numpy as jnp

from mmjax.models.mmbcd import MMBCD, MMBCDConfig
from mmjax.tasks import model_config

MODEL_CONFIG = MMBCDConfig
MODEL = MMBCD


def check_config(config) -> list[str]:
  """Problems of an MMBCD recipe's config beyond its fields' own (`mmjax.config`)."""
  found = []
  data, model = config.data, config.model
  if data.get("mode", "regions") != "regions":
    found.append(f"config.data.mode={data.mode!r}: the mmbcd task trains on 'regions' "
                 "examples")
  regions = data.get("regions") or {}
  size = model.vision["image_size"]
  if regions.get("region_size", size) != size:
    found.append(f"config.data.regions.region_size={regions.get('region_size')} differs from "
                 f"config.model.vision.image_size={size}; crops are made at the tower's size")
  text = model.text
  offset = text.get("position_offset", 0)
  if data.seq_len + offset > text["max_len"]:
    found.append(f"config.data.seq_len={data.seq_len} (+ the position offset {offset}) "
                 f"exceeds config.model.text.max_len={text['max_len']}")
  if model.get("pad_id", 1) != config.tokens.pad:
    found.append(f"config.model.pad_id={model.get('pad_id', 1)} differs from the "
                 f"tokenizer's pad id config.tokens.pad={config.tokens.pad}")
  return found


def build_model(config) -> MMBCD:
  return MMBCD(model_config(MMBCDConfig, config))


def init_inputs(config):
  regions = config.data.get("regions") or {}
  k = 1 if regions.get("whole_image") else regions.get("num_regions", 8)
  size = config.model.vision["image_size"]
  return ((jnp.zeros((1, k, size, size, 3), jnp.uint8),
           jnp.ones((1, config.data.seq_len), jnp.int32)),
          {"region_mask": jnp.ones((1, k), bool)})


def forward(model: MMBCD, variables: dict, batch: dict, *, train: bool = False,
            rng: jax.Array | None = None) -> tuple[dict, dict]:
  """`(outputs, updated state)` of `model` on a "regions" batch: crops, or the image and
  boxes to crop; the state is returned unchanged unless `train`."""
  state = {k: v for k, v in variables.items() if k != "params"}
  inputs = ({"regions": batch["regions"]} if "regions" in batch
            else {"image": batch["image"], "boxes": batch["boxes"]})
  kwargs = dict(tokens=batch["tokens"], region_mask=batch.get("region_mask"), train=train,
                **inputs)
  if train:
    rngs = {"dropout": rng} if rng is not None else {}
    out, state = model.apply(variables, mutable=list(state), rngs=rngs, **kwargs)
    return out, dict(state)
  return model.apply(variables, **kwargs), state


def loss_terms(model, params, batch, rng, *, model_state, train=True):
  """Cross-entropy over the batch (weighted by `loss_weight` where given), its accuracy
  as a term, and the updated BatchNorm statistics (unchanged unless `train`)."""
  out, model_state = forward(model, {"params": params, **model_state}, batch, train=train,
                             rng=rng)
  logits, labels = out["logits"], batch["label"]
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  weight = batch.get("loss_weight", jnp.ones_like(nll))
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  count = jnp.sum(weight)
  return (jnp.sum(nll * weight), count,
          {"accuracy": jnp.sum(correct * weight) / jnp.maximum(count, 1e-9)},
          dict(model_state))
