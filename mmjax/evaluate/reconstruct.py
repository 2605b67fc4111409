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
from mmjax.evaluate import held_out
from mmjax.models.vqvae import preprocess

TASK = "reconstruct"


def _source(config):
  return held_out.source(config, "test", "held-out clips")


def count(config) -> int:
  """How many clips `evaluate` reads: the test split's, capped at `config.evaluate.episodes`
  unless it is -1."""
  return held_out.limit(config, _source(config))


def evaluate(config, params, model_state=None, *,
             step: Callable[[int, str], None] = lambda n, label: None
             ) -> tuple[dict[str, float], list[dict]]:
  """`(scores, predictions)` of a VQ-VAE run on its held-out clips; a prediction is a
  clip's id, its squared error and the distinct codes it used."""
  from mmjax.tasks import vqvae as vqvae_task  # noqa: PLC0415 (tasks import evaluate)

  source = _source(config)
  model = vqvae_task.build_model(config)
  spec = video_lib.spec_of(config)
  n_codes = model.config.n_codes
  ids, skipped = [], {}

  @jax.jit
  def forward(batch):
    out, _ = vqvae_task.forward(model, {"params": params, **(model_state or {})},
                                batch["video"])
    x = preprocess(batch["video"])
    mse = lambda y: jnp.mean(jnp.square(y - x), axis=(1, 2, 3, 4))
    return mse(out["recon"]), mse(jnp.clip(out["recon"], -0.5, 0.5)), out["encodings"]

  def examples():
    build = lambda document, index: video_lib.build_video(document, spec, "video",
                                                          config.seed, index)[0]
    for index, document, example in held_out.built(config, source, build, skipped):
      ids.append(str(document.get("id", index)))
      yield example

  outputs = held_out.batched(forward, examples(), config.evaluate.get("batch_size", 16),
                             step=lambda n: step(n, TASK))
  if not ids:
    raise UserError(f"No clip of config.data.eval_datasets.test could be read "
                    f"(skipped: {skipped}).")
  errors = np.concatenate([e for e, _, _ in outputs])
  clipped = np.concatenate([c for _, c, _ in outputs])
  codes = np.concatenate([c for _, _, c in outputs])
  usage = np.bincount(codes.reshape(-1), minlength=n_codes)
  per_clip = [len(np.unique(c)) for c in codes]
  p = usage[usage > 0] / usage.sum()
  scores = {"mse": float(errors.mean()),
            "recon_loss": float(errors.mean() / model.config.data_variance),
            # pixels in [0, 1]: PSNR = -10 log10(mse), per clip, averaged
            "psnr": float(np.mean(-10 * np.log10(np.maximum(clipped, 1e-12)))),
            "perplexity": float(np.exp(-np.sum(p * np.log(p)))),
            "codes_used": float(np.sum(usage > 0)), "codes_per_clip": float(np.mean(per_clip)),
            "clips": float(len(errors))}
  scores.update({f"skipped/{reason}": float(k) for reason, k in skipped.items()})
  predictions = [{"id": i, "mse": round(float(e), 6), "codes": int(c)}
                 for i, e, c in zip(ids, errors, per_clip, strict=True)]
  return scores, predictions
