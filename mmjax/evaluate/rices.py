"""Retrieval-based in-context example selection (RICES; Yang et al., 2022), as OpenFlamingo
evaluates with it: the demonstrations for a query are the `k` support examples whose
images are most similar to the query image.

Similarity is the cosine of L2-normalised CLIP image embeddings; text plays no part. The
support set's embeddings are computed once, over the whole support (training) set, and
can be kept on disk, keyed by the image encoder and the support images, so that another
evaluation with the same two reuses them. The examples are returned least similar first,
so that the most similar demonstration is the last, nearest the query.

    encoder = rices.load_clip_image_encoder("/models/clip-vit-b32")  # mmjax.convert output
    retriever = rices.Rices.for_examples(encoder, train.examples, encoder.image_size,
                                         cache_dir="/tmp/rices")
    demos = retriever.find(query_images, k=4)  # int "q 4", most similar last
"""

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn

from mmjax import checkpoints
from mmjax.cli import UserError
from mmjax.evaluate import benchmarks
from mmjax.models.two_towers import TwoTowersConfig
from mmjax.models.vit import ViT, ViTConfig
from mmjax.tasks import model_config

# uint8 images "b h w 3" -> embeddings "b d".
EncodeImages = Callable[[np.ndarray], np.ndarray]
QUERY_CHUNK = 1024  # queries scored against the whole support set at once


# ---------------------------------------------------------------------------------------
# The image tower.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ClipImageEncoder:
  """A CLIP image tower as `uint8 "b s s 3" -> float32 "b d"`, L2-normalised.

  Pixels are normalised by the ViT itself, with the statistics of its config, as in
  training; images must already be `image_size` squares (`benchmarks.load_image`).
  Batches are padded to a power of two up to `batch_size` and longer ones split, so that
  few shapes are compiled.

  Attributes:
    config: the tower's config.
    params: its parameters (the `image` subtree of a `TwoTowers`).
    batch_size: the most images encoded in one call of the model.
    key: a digest of the config and the parameters' values: what an embedding cache is
      keyed by.
  """

  config: ViTConfig
  params: Any
  batch_size: int = 64
  key: str = dataclasses.field(init=False)
  _encode: Callable = dataclasses.field(init=False, repr=False)
  _device_params: Any = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {self.batch_size}.")
    prints = checkpoints.fingerprints(self.params)
    digest = hashlib.sha256(json.dumps(
        {"config": dataclasses.asdict(self.config), "params": prints},
        sort_keys=True).encode()).hexdigest()
    object.__setattr__(self, "key", f"clip-image-{digest[:16]}")
    object.__setattr__(self, "_encode", _compiled_tower(self.config))
    object.__setattr__(self, "_device_params", jax.device_put(self.params))

  @property
  def image_size(self) -> int:
    return self.config.image_size

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """uint8 `"b s s 3"` -> float32 `"b d"`."""
    images = np.asarray(images)
    size = self.config.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, self.config.channels):
      raise ValueError(f"Expected images 'b h w c' of shape (*, {size}, {size}, "
                       f"{self.config.channels}), got {images.shape}.")
    out = []
    for start in range(0, len(images), self.batch_size):
      batch = images[start:start + self.batch_size]
      padded = min(self.batch_size, 1 << (len(batch) - 1).bit_length())
      filler = np.zeros((padded - len(batch), *batch.shape[1:]), batch.dtype)
      out.append(np.asarray(self._encode(self._device_params,
                                         np.concatenate([batch, filler])))[:len(batch)])
    width = self.config.output_dim or self.config.width
    return np.concatenate(out) if out else np.zeros((0, width), np.float32)


@functools.lru_cache(maxsize=8)
def _compiled_tower(config: ViTConfig) -> Callable:
  """`(params, uint8 images "b s s 3") -> "b d"` L2-normalised, jitted once per config."""
  model = ViT(config)

  @jax.jit
  def encode(params, images):
    pooled = model.apply({"params": params}, images)["pooled"].astype(jnp.float32)
    return pooled * jax.lax.rsqrt(jnp.sum(pooled * pooled, -1, keepdims=True) + 1e-12)

  return encode


def clip_image_encoder(config: Any, params: dict, *, batch_size: int = 64) -> ClipImageEncoder:
  """The image tower of a CLIP model as an encoder for `Rices`.

  Args:
    config: a `TwoTowersConfig`, a `ViTConfig`, or the config of a CLIP run or conversion
      (a ConfigDict or dict with `task: "clip"` and `model`, as its `config.json` holds;
      its recipe-wide dtype and layer settings apply, as in training).
    params: the model's parameters (`mmjax.checkpoints.load_params`): a `TwoTowers`'s,
      whose `image` subtree is used, or the tower's alone.
    batch_size: the most images encoded in one call of the model.
  """
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  if isinstance(config, ml_collections.ConfigDict):
    if config.get("task") != "clip" or "model" not in config:
      raise UserError(f"A RICES image encoder needs a CLIP model's config (task 'clip' with "
                      f"a 'model'); got task {config.get('task')!r}.")
    try:
      config = model_config(TwoTowersConfig, config)
    except (TypeError, ValueError) as error:
      raise UserError(f"The CLIP config does not describe a two-towers model: {error}") \
          from error
  if isinstance(config, TwoTowersConfig):
    config = config.vision
  if not isinstance(config, ViTConfig):
    raise UserError(f"A RICES image encoder needs a TwoTowersConfig, a ViTConfig or a CLIP "
                    f"run's config, got {type(config).__name__}.")
  if "image" in params:
    params = params["image"]
  _check_fits(params, config)
  return ClipImageEncoder(config, params, batch_size)


def _check_fits(params: dict, config: ViTConfig) -> None:
  """Raises, naming them, where `params` are not those of `ViT(config)` (names, shapes)."""
  size = config.image_size
  abstract = jax.eval_shape(lambda: nn.unbox(ViT(config).init(
      jax.random.key(0), jnp.zeros((1, size, size, config.channels), jnp.uint8))["params"]))
  problems = checkpoints.param_mismatches(abstract, params)
  if problems:
    raise UserError(f"The image tower's parameters do not fit its config: "
                    f"{'; '.join(problems[:6])}{' ...' if len(problems) > 6 else ''}.")


def load_clip_image_encoder(path: str | os.PathLike, step: int | None = None, *,
                            batch_size: int = 64) -> ClipImageEncoder:
  """The image tower of the CLIP model in `path`: a `python -m mmjax.train` run of
  `configs/clip.py` or a `python -m mmjax.convert` conversion of a CLIP checkpoint.

  Args:
    path: a directory holding `config.json` and `checkpoints/<step>`.
    step: the checkpoint to read (default: the newest complete one).
    batch_size: the most images encoded in one call of the model.
  """
  path = pathlib.Path(path).expanduser()
  file = path / "config.json"
  if not file.is_file():
    raise UserError(f"No config.json in {path}: expected a CLIP run's workdir or a "
                    "converted CLIP checkpoint (a directory with config.json and checkpoints/).")
  try:
    config = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise UserError(f"{file} is not valid JSON ({error}).") from error
  if not isinstance(config, dict):
    raise UserError(f"{file} holds no config object.")
  return clip_image_encoder(config, checkpoints.load_params(path, step),
                            batch_size=batch_size)


# ---------------------------------------------------------------------------------------
# Retrieval.
# ---------------------------------------------------------------------------------------
def _normalise(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cache_name(model_key: str, support_images: Sequence[str]) -> str:
  """The embedding cache's file name for an encoder and the distinct support images in
  order: any change of either gives another name."""
  digest = hashlib.sha256()
  digest.update(model_key.encode())
  for image in support_images:
    digest.update(b"\0" + image.encode())
  return f"rices-{digest.hexdigest()[:24]}.npy"


class Rices:
  """Demonstrations for queries by image similarity, from a fixed support set.

  The support set is a sequence of examples, each named by its image (`support_images`,
  e.g. the image paths): examples sharing an image (several questions about one picture)
  share its embedding, computed once. Embeddings are computed on first use, in batches,
  over the whole support set.

  Args:
    encode_images: uint8 `"b h w 3"` -> `"b d"` (e.g. `ClipImageEncoder`); its outputs are
      L2-normalised here in any case.
    support_images: `"n"` names of the support examples' images; equal names mean one
      image.
    load_images: names -> uint8 `"b h w 3"` images, as `encode_images` takes them.
    batch_size: the most images loaded and encoded at once.
    cache_dir: where embeddings are kept between runs (`<cache_dir>/rices-<hash>.npy`,
      `cache_name`); None keeps them in memory only.
    model_key: what identifies `encode_images` in the cache's name: the model and its
      parameters (`ClipImageEncoder.key`, used when `encode_images` has a `key`).
  """

  def __init__(self, encode_images: EncodeImages, support_images: Sequence[str],
               load_images: Callable[[list[str]], np.ndarray], *, batch_size: int = 64,
               cache_dir: str | os.PathLike | None = None, model_key: str | None = None):
    if not support_images:
      raise UserError("RICES needs a non-empty support set to retrieve demonstrations from.")
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    self.encode_images = encode_images
    self.load_images = load_images
    self.batch_size = batch_size
    distinct: dict[str, int] = {}
    self._image_of = np.array([distinct.setdefault(name, len(distinct))
                               for name in support_images], np.int64)
    self._distinct = list(distinct)
    self.cache_file = None
    if cache_dir is not None:
      model_key = model_key if model_key is not None else getattr(encode_images, "key", None)
      if model_key is None:
        raise UserError("An embedding cache (cache_dir) needs a model_key naming the image "
                        "encoder and its parameters, so that another encoder's embeddings "
                        "are never reused.")
      self.cache_file = pathlib.Path(cache_dir) / cache_name(model_key, self._distinct)
    self._embeddings: np.ndarray | None = None
    self._on_device: jax.Array | None = None

  @classmethod
  def for_examples(cls, encode_images: EncodeImages, examples: Sequence[benchmarks.Example],
                   image_size: int, **kwargs) -> "Rices":
    """Retrieval among benchmark examples (`mmjax.evaluate.benchmarks`), named by their
    image paths and loaded as `benchmarks.load_image` loads them; `kwargs` as `Rices`."""
    by_path = {e.image_path: e for e in examples}
    return cls(encode_images, [e.image_path for e in examples],
               lambda paths: benchmarks.load_images([by_path[p] for p in paths], image_size),
               **kwargs)

  def __len__(self) -> int:
    return len(self._image_of)

  @property
  def embeddings(self) -> np.ndarray:
    """float32 `"n d"`: the L2-normalised embedding of each support example."""
    if self._embeddings is None:
      self._embeddings = self._image_embeddings()[self._image_of]
    return self._embeddings

  def _image_embeddings(self) -> np.ndarray:
    """float32 `"m d"` of the distinct support images: read from the cache, or computed
    (and then cached)."""
    count = len(self._distinct)
    if self.cache_file is not None and self.cache_file.is_file():
      try:
        cached = np.load(self.cache_file)
      except (OSError, ValueError) as error:
        logging.warning("RICES: cannot read the cached embeddings %s (%s); recomputing them.",
                        self.cache_file, error)
      else:
        if cached.ndim == 2 and len(cached) == count and cached.dtype == np.float32:
          return cached
        logging.warning("RICES: the cached embeddings %s have shape %s, not (%d, d); "
                        "recomputing them.", self.cache_file, cached.shape, count)
    parts = []
    for start in range(0, count, self.batch_size):
      names = self._distinct[start:start + self.batch_size]
      parts.append(_normalise(self.encode_images(self.load_images(names))))
      logging.log_every_n_seconds(logging.INFO, "RICES: embedded %d of %d support images.",
                                  60, start + len(names), count)
    embeddings = np.concatenate(parts)
    if self.cache_file is not None:
      _save_atomically(self.cache_file, embeddings)
    return embeddings

  def nearest(self, queries: np.ndarray, k: int) -> np.ndarray:
    """int `"q k"`: for each query embedding (`"q d"`), the indices of the `k` most
    similar support examples by cosine similarity, the most similar last; of equally
    similar ones, the lower index comes later."""
    if np.ndim(queries) != 2:
      raise ValueError(f"Query embeddings must be 'q d', got shape {np.shape(queries)}.")
    queries = _normalise(queries)
    if not 0 <= k <= len(self):
      raise UserError(f"RICES: {k} demonstrations asked for, but the support set has "
                      f"{len(self)} examples.")
    if self._on_device is None:
      self._on_device = jnp.asarray(self.embeddings)
    support = self._on_device
    rows = []
    for start in range(0, len(queries), QUERY_CHUNK):
      similarity = jnp.matmul(jnp.asarray(queries[start:start + QUERY_CHUNK]), support.T,
                              precision=jax.lax.Precision.HIGHEST)
      rows.append(np.asarray(jax.lax.top_k(similarity, k)[1]))
    indices = np.concatenate(rows) if rows else np.zeros((0, k), np.int32)
    return indices[:, ::-1].astype(np.int64)

  def find(self, query_images: np.ndarray, k: int) -> np.ndarray:
    """int `"q k"`: the `k` support examples most similar to each query image (uint8
    `"q h w 3"`, as `encode_images` takes them), the most similar last."""
    return self.nearest(self.encode_images(query_images), k)


def _save_atomically(file: pathlib.Path, array: np.ndarray) -> None:
  """Writes `array` to `file` through a temporary file, so that a reader never sees a
  partly written cache."""
  file.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=file.parent, suffix=".npy.tmp", delete=False) as out:
    np.save(out, array)
  os.replace(out.name, file)
