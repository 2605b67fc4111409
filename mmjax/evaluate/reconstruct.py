"""Held-out reconstruction of a VQ-VAE run: the "reconstruct" task.

Every clip of `config.data.eval_datasets.test` (or the first `config.evaluate.episodes`)
is encoded to codes and decoded in inference mode (BatchNorm's running statistics, the
codebook as trained) and scored: the mean squared error in VideoGPT's [-0.5, 0.5] pixel
space and over the data variance (its training loss), the PSNR of the reconstruction
clipped to [0, 1], the codebook's perplexity over every latent position of the split
(exp of the entropy of code usage; a batch's perplexity depends on its size, the split's
does not) and the codes used at least once. Clips the pipeline cannot read are skipped
and counted by reason ("skipped/<reason>").
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.cli import UserError
from mmjax.data import video as video_lib
from mmjax.data.pipeline import dataset_from_config
from mmjax.data.sequences import CorruptRecord
from mmjax.models.vqvae import preprocess

TASK = "reconstruct"


def _source(config):
  datasets = config.data.get("eval_datasets") or {}
  if "test" not in datasets:
    raise UserError("The reconstruct evaluation needs config.data.eval_datasets.test "
                    f"(held-out clips); the config has {sorted(datasets)}.")
  return dataset_from_config({"name": "test", **datasets["test"]}).source


def clip_count(config) -> int:
  limit = config.evaluate.get("episodes", -1)
  source = _source(config)
  return len(source) if limit < 0 else min(limit, len(source))


def evaluate(config, params, model_state=None, *,
             step: Callable[[int, str], None] = lambda n, label: None
             ) -> tuple[dict[str, float], list[dict]]:
  """`(scores, predictions)` of a VQ-VAE run on its held-out clips; a prediction is a
  clip's id, its squared error and the distinct codes it used."""
  from mmjax.tasks import vqvae as vqvae_task  # noqa: PLC0415 (tasks import evaluate)

  source = _source(config)
  model = vqvae_task.build_model(config)
  spec = video_lib.spec_of(config)
  batch_size = config.evaluate.get("batch_size", 16)
  n_codes = model.config.n_codes

  @jax.jit
  def forward(video):
    out, _ = vqvae_task.forward(model, {"params": params, **(model_state or {})}, video)
    x = preprocess(video)
    error = jnp.mean(jnp.square(out["recon"] - x), axis=(1, 2, 3, 4))
    clipped = jnp.mean(jnp.square(jnp.clip(out["recon"], -0.5, 0.5) - x), axis=(1, 2, 3, 4))
    return error, clipped, out["encodings"]

  errors, clipped_errors, ids, usage, skipped, per_clip_codes = [], [], [], 0, {}, []
  clips: list[np.ndarray] = []

  def flush():
    nonlocal usage
    rows = clips + [clips[-1]] * (batch_size - len(clips))  # one compiled shape
    error, clipped, codes = forward(np.stack(rows))
    codes = np.asarray(codes)[:len(clips)]
    errors.extend(np.asarray(error)[:len(clips)].tolist())
    clipped_errors.extend(np.asarray(clipped)[:len(clips)].tolist())
    usage = usage + np.bincount(codes.reshape(-1), minlength=n_codes)
    per_clip_codes.extend(len(np.unique(c)) for c in codes)
    step(len(clips), TASK)
    clips.clear()

  for index in range(clip_count(config)):
    try:
      document = source[index]
      example, _ = video_lib.build_video(document, spec, "video", config.seed, index)
    except CorruptRecord as error:
      skipped[error.reason] = skipped.get(error.reason, 0) + 1
      continue
    except OSError:  # an unreadable clip file is counted, not fatal
      skipped["unreadable"] = skipped.get("unreadable", 0) + 1
      continue
    ids.append(str(document.get("id", index)))
    clips.append(example["video"])
    if len(clips) == batch_size:
      flush()
  if clips:
    flush()
  if not errors:
    raise UserError(f"No clip of config.data.eval_datasets.test could be read "
                    f"(skipped: {skipped}).")
  errors, clipped_errors = np.asarray(errors), np.asarray(clipped_errors)
  p = usage / usage.sum()
  entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
  scores = {"mse": float(errors.mean()),
            "recon_loss": float(errors.mean() / model.config.data_variance),
            # pixels in [0, 1]: PSNR = -10 log10(mse), per clip, averaged
            "psnr": float(np.mean(-10 * np.log10(np.maximum(clipped_errors, 1e-12)))),
            "perplexity": float(np.exp(entropy)), "codes_used": float(np.sum(usage > 0)),
            "codes_per_clip": float(np.mean(per_clip_codes)), "clips": float(len(errors))}
  for reason, k in skipped.items():
    scores[f"skipped/{reason}"] = float(k)
  predictions = [{"id": i, "mse": round(float(e), 6), "codes": int(c)}
                 for i, e, c in zip(ids, errors, per_clip_codes, strict=True)]
  return scores, predictions
