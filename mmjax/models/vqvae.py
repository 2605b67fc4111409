"""VideoGPT's 3D VQ-VAE (Yan et al. 2021), channels last: video `"b t h w 3"` -> discrete
latents `"b t' h' w'"` -> video.

Encoder: `log2(max downsample)` same-padded 4x4x4 convolutions (stride 2 on the axes still to
be downsampled, 1 on the others, ReLU after each), a 3x3x3 `conv_last`, `n_res_layers`
attention residual blocks (BatchNorm, ReLU, 3x3x3 conv to n/2, BatchNorm, ReLU, 1x1x1 conv to
n, BatchNorm, ReLU, axial attention: three multi-head attentions, over time, height and
width, summed), a final BatchNorm and ReLU. A 1x1x1 `pre_vq` projects to the codebook's
width; the codebook quantises to the nearest of `n_codes` vectors; `post_vq` projects back
and the decoder mirrors the encoder (residual stack, then same-padded transposed
convolutions, the last to 3 channels, no output activation).

The codebook is trained by exponential moving averages, not by gradients: its vectors, counts
and sums are state in the collection "codebook" (beside "batch_stats"), updated on every
training call; its first training call initialises the vectors from the batch, and every
training call replaces the vectors whose count fell below one by vectors of the batch (draws
from the rng stream "codebook"). Under `jit` on a batch sharded over devices every sum is the
global batch's, as VideoGPT's all-reduce makes it.

`conv_last` always takes the `n` channels of the strided convolutions. VideoGPT sizes its
input from a loop variable, 3 channels when the largest downsampling factor is 2: such a model
fails on its first forward pass, so no trained checkpoint of it exists to load.

Convolutions pad like VideoGPT's `SamePadConv3d`: `k - s` in all per axis, the odd one at the
front; transposed convolutions equal its `SamePadConvTranspose3d` (that padding on the input,
then torch's `ConvTranspose3d(padding=k - 1)`), with the kernel `"kt kh kw out in"` (torch's
weight `"in out kt kh kw"` permuted).
"""

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.layers import Dense
from mmjax.layers.conv import Conv
from mmjax.models.common import dtype as to_dtype
from mmjax.models.resnet import TORCH_LINEAR_INIT, BatchNorm

# A convolution's kernel `"kt kh kw in out"` and its input `"b t h w c"` (the batch split, the
# channels whole: see mmjax.models.resnet.CONV_INPUT_AXES).
CONV_AXES = (None, None, None, "embed", "mlp")
CONV_INPUT_AXES = ("batch", None, None, None, None)


def _torch_conv_init(key, shape, dtype=jnp.float32):
  """torch's default convolution initialisation: uniform within 1 / sqrt(fan_in), fan_in
  the receptive field times the kernel's next-to-last axis. Drawn as a matrix and reshaped:
  XLA on CPU compiles the 5-d draw for several seconds."""
  flat = (math.prod(shape[:-1]), shape[-1])
  return jnp.reshape(TORCH_LINEAR_INIT(key, flat, dtype), shape)


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
  """VideoGPT's VQ-VAE (defaults: its 64x64, 16-frame model with a 2048-code codebook).

  Attributes:
    embedding_dim: the codebook vectors' width `e`.
    n_codes: codebook size.
    n_hiddens: the encoder's and decoder's width `n`.
    n_res_layers: attention residual blocks in the encoder and in the decoder.
    downsample: `(t, h, w)` downsampling factors, powers of two (at least one above 1).
    num_heads: heads of each axial attention (VideoGPT: 2).
    frames, resolution: the clips' shape the model is built for.
    commitment: weight of the commitment loss `mse(z, sg(e))`.
    ema_decay: the codebook's moving-average decay.
    data_variance: the reconstruction loss is `mse / data_variance`.
    restart: replace codes whose count fell below one by batch vectors.
    bn_eps, bn_momentum: BatchNorm's, in torch's convention (the weight of a new batch).
  """

  embedding_dim: int = 256
  n_codes: int = 2048
  n_hiddens: int = 240
  n_res_layers: int = 4
  downsample: tuple[int, int, int] = (4, 4, 4)
  num_heads: int = 2
  frames: int = 16
  resolution: int = 64
  commitment: float = 0.25
  ema_decay: float = 0.99
  data_variance: float = 0.06
  restart: bool = True
  bn_eps: float = 1e-5
  bn_momentum: float = 0.1
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    ds = tuple(self.downsample)
    if len(ds) != 3 or any(d < 1 or d & (d - 1) for d in ds) or max(ds) < 2:
      raise ValueError(f"VQVAEConfig: downsample={self.downsample} must be three powers of "
                       "two (t, h, w), at least one above 1.")
    object.__setattr__(self, "downsample", ds)
    for axis, size, d in (("frames", self.frames, ds[0]), ("resolution", self.resolution, ds[1]),
                          ("resolution", self.resolution, ds[2])):
      if size % d:
        raise ValueError(f"VQVAEConfig: {axis}={size} is not divisible by its downsampling "
                         f"factor {d} (downsample={ds}).")
    if self.n_hiddens % 2 or self.n_hiddens % self.num_heads:
      raise ValueError(f"VQVAEConfig: n_hiddens={self.n_hiddens} must be even (the residual "
                       f"blocks halve it) and divisible by num_heads={self.num_heads}.")
    if not 0 <= self.bn_momentum <= 1 or not 0 <= self.ema_decay < 1:
      raise ValueError(f"VQVAEConfig: bn_momentum={self.bn_momentum} must be in [0, 1] "
                       f"(torch's convention) and ema_decay={self.ema_decay} in [0, 1).")

  @property
  def num_down(self) -> int:
    """Stride-2 stages: the encoder's strided convolutions, the decoder's transposed ones."""
    return int(math.log2(max(self.downsample)))

  def strides(self) -> list[tuple[int, int, int]]:
    """Each stage's `(t, h, w)` strides, the encoder's order: 2 on the axes with halvings
    left, 1 on the others."""
    left = [int(math.log2(d)) for d in self.downsample]
    out = []
    for _ in range(self.num_down):
      out.append(tuple(2 if n > 0 else 1 for n in left))
      left = [n - 1 for n in left]
    return out

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """`(t', h', w')` of the encodings of a `frames x resolution x resolution` clip."""
    t, h, w = self.downsample
    return self.frames // t, self.resolution // h, self.resolution // w


def same_padding(kernel: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
  """VideoGPT's "same" padding: `k - s` per axis, the odd one at the front."""
  return [((k - s + 1) // 2, (k - s) // 2) for k, s in zip(kernel, strides)]


def conv3d(features: int, kernel: int, strides: Sequence[int] = (1, 1, 1), *,
           use_bias: bool = True, name: str | None = None, **kw) -> Conv:
  """VideoGPT's `SamePadConv3d`, `"b t h w c -> b t/s h/s w/s f"`: kernel
  `"kt kh kw c f"`, `bias "f"` (without `use_bias`, none)."""
  k = (kernel,) * 3
  return Conv(features, k, tuple(strides), same_padding(k, strides), use_bias=use_bias,
              kernel_init=nn.with_logical_partitioning(_torch_conv_init, CONV_AXES),
              bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
              name=name, **kw)


def conv_transpose3d(features: int, kernel: int, strides: Sequence[int], *,
                     name: str | None = None, **kw) -> Conv:
  """VideoGPT's `SamePadConvTranspose3d`, `"b t h w c -> b t*s h*s w*s f"`: kernel
  `"kt kh kw f c"` (torch's `ConvTranspose3d` weight `"c f kt kh kw"` permuted), `bias "f"`.

  torch pads the input by `same_padding` and then runs the transposed convolution with
  padding `k - 1`, which crops nothing from the stride-dilated input: the same as padding
  the dilated input by `s` times the input's padding and convolving with the flipped
  kernel, `lax.conv_transpose` with that explicit padding (here in its stride-1 form,
  `mmjax.layers.conv`)."""
  k = (kernel,) * 3
  padding = [(a * s, b * s) for (a, b), s in zip(same_padding(k, strides), strides)]
  return Conv(features, k, tuple(strides), padding, transpose=True, transpose_kernel=True,
              kernel_init=nn.with_logical_partitioning(_torch_conv_init,
                                                       (None, None, None, "mlp", "embed")),
              bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
              name=name, **kw)


def _batch_split(x: jax.Array) -> jax.Array:
  return nn.with_logical_constraint(x, CONV_INPUT_AXES)


class AxialAttention(nn.Module):
  """Multi-head self-attention along one axis of `"b t h w n"` (every other position
  independent): `query`, `key`, `value` `{kernel "n n"}` (no bias), `out {kernel, bias}`,
  `num_heads` heads of width `n / num_heads`."""

  axis: int
  num_heads: int
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = x.shape[-1]
    init = nn.initializers.normal(1 / math.sqrt(n))  # VideoGPT's (n_layer = 1)
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "kernel_init": init}
    heads, head_dim = self.num_heads, n // self.num_heads
    q, k, v = (Dense(n, ("embed", "mlp"), name=name, **kw)(x)
               for name in ("query", "key", "value"))

    def split(y):  # "b t h w n" -> "(b rest) l heads d", the attended axis as `l`
      y = jnp.moveaxis(y, self.axis, -2)
      return y.reshape(-1, y.shape[-2], heads, head_dim)

    moved = jnp.moveaxis(q, self.axis, -2).shape
    out = jax.nn.dot_product_attention(split(q), split(k), split(v))
    out = jnp.moveaxis(out.reshape(moved), -2, self.axis)
    return Dense(n, ("mlp", "embed"), use_bias=True, name="out", **kw)(out)


def axial_block(x: jax.Array, num_heads: int, kw: dict) -> jax.Array:
  """`"b t h w n"`: attention over width, height and time (`attn_w`, `attn_h`, `attn_t`),
  summed. Called inside a compact module, whose children the three become."""
  out = 0
  for axis, name in ((3, "w"), (2, "h"), (1, "t")):
    out = out + AxialAttention(axis, num_heads, name=f"attn_{name}", **kw)(x)
  return out


class AttentionResidualBlock(nn.Module):
  """`x + axial(relu(norm_2(conv_1(relu(norm_1(conv_0(relu(norm_0(x)))))))))`, `"b t h w n"`:
  `conv_0` 3x3x3 to n/2, `conv_1` 1x1x1 back to n, both without bias."""

  config: VQVAEConfig

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cfg = self.config
    kw = {"dtype": to_dtype(cfg.dtype), "param_dtype": to_dtype(cfg.param_dtype)}
    n = x.shape[-1]
    h = x
    for i, (features, kernel) in enumerate(((n // 2, 3), (n, 1))):
      h = nn.relu(_norm(cfg, f"norm_{i}", kw)(h, not train))
      h = conv3d(features, kernel, use_bias=False, name=f"conv_{i}", **kw)(_batch_split(h))
    h = nn.relu(_norm(cfg, "norm_2", kw)(h, not train))
    return x + axial_block(h, cfg.num_heads, kw)


def _norm(cfg: VQVAEConfig, name: str, kw: dict) -> BatchNorm:
  return BatchNorm(cfg.bn_momentum, cfg.bn_eps, name=name, **kw)


def _res_stack(cfg: VQVAEConfig, h: jax.Array, train: bool, kw: dict) -> jax.Array:
  for j in range(cfg.n_res_layers):
    h = AttentionResidualBlock(cfg, name=f"res_{j}")(h, train)
  return nn.relu(_norm(cfg, "norm", kw)(h, not train))


def preprocess(video: jax.Array) -> jax.Array:
  """uint8 video -> `x / 255 - 0.5`; float video is taken as already in [-0.5, 0.5]."""
  if jnp.issubdtype(video.dtype, jnp.integer):
    return video.astype(jnp.float32) / 255.0 - 0.5
  return video


class Encoder(nn.Module):
  """`video "b t h w 3"` (uint8, or float in [-0.5, 0.5]) -> `{"resnet", "attention"}`,
  both `"b t' h' w' n"`: "resnet" after `conv_last` (the 3D ResNet's latent), "attention"
  after the attention residual stack and its final BatchNorm and ReLU."""

  config: VQVAEConfig

  @nn.compact
  def __call__(self, video: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    cfg = self.config
    kw = {"dtype": to_dtype(cfg.dtype), "param_dtype": to_dtype(cfg.param_dtype)}
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"VQVAE Encoder expects video 'b t h w 3', got shape {video.shape}.")
    sizes = video.shape[1:4]
    if any(s % d for s, d in zip(sizes, cfg.downsample)):
      raise ValueError(f"VQVAE Encoder: clip shape (t, h, w)={sizes} is not divisible by "
                       f"downsample={cfg.downsample}; crop or resize the clips.")
    h = preprocess(video).astype(kw["dtype"])
    for i, strides in enumerate(cfg.strides()):
      h = nn.relu(conv3d(cfg.n_hiddens, 4, strides, name=f"convs_{i}", **kw)(_batch_split(h)))
    resnet = conv3d(cfg.n_hiddens, 3, name="conv_last", **kw)(_batch_split(h))
    return {"resnet": resnet, "attention": _res_stack(cfg, resnet, train, kw)}


class Decoder(nn.Module):
  """`"b t' h' w' n" -> "b t h w 3"`: the residual stack, its BatchNorm and ReLU, then the
  transposed convolutions (ReLU between them, none after the last)."""

  config: VQVAEConfig

  @nn.compact
  def __call__(self, h: jax.Array, *, train: bool = False) -> jax.Array:
    cfg = self.config
    kw = {"dtype": to_dtype(cfg.dtype), "param_dtype": to_dtype(cfg.param_dtype)}
    h = _res_stack(cfg, h, train, kw)
    strides = cfg.strides()
    for i, s in enumerate(strides):
      last = i == len(strides) - 1
      h = conv_transpose3d(3 if last else cfg.n_hiddens, 4, s, name=f"convts_{i}", **kw)(
          _batch_split(h))
      if not last:
        h = nn.relu(h)
    return h


def tile(key: jax.Array, z: jax.Array, n_codes: int) -> jax.Array:
  """`"m e"` -> at least `n_codes` rows: `z` itself, or (fewer rows) `z` repeated whole
  `ceil(n_codes / m)` times plus Gaussian noise of std `0.01 / sqrt(e)` (VideoGPT's)."""
  m, e = z.shape
  if m >= n_codes:
    return z
  y = jnp.tile(z, (-(-n_codes // m), 1))
  return y + jax.random.normal(key, y.shape, y.dtype) * (0.01 / math.sqrt(e))


def random_codes(key: jax.Array, z: jax.Array, n_codes: int) -> jax.Array:
  """`n_codes` distinct rows of `tile(z)` drawn at random: `"n_codes e"`."""
  noise, order = jax.random.split(key)
  y = tile(noise, z, n_codes)
  return y[jax.random.permutation(order, y.shape[0])[:n_codes]]


def laplace_codes(counts: jax.Array, sums: jax.Array) -> jax.Array:
  """The codes from the moving averages: `sums / counts`, the counts Laplace-smoothed
  (`(N + 1e-7) / (sum N + n_codes 1e-7) * sum N`)."""
  total = jnp.sum(counts)
  smoothed = (counts + 1e-7) / (total + counts.shape[0] * 1e-7) * total
  return sums / smoothed[:, None]


class Codebook(nn.Module):
  """Nearest-code quantisation of `z "... e"` with an EMA-trained codebook.

  State (collection "codebook"): `embeddings "n_codes e"`, `counts "n_codes"` (VideoGPT's
  `N`), `sums "n_codes e"` (its `z_avg`), `initialized` (False until the first training
  call's data-dependent initialisation). Training calls update them (apply with
  `mutable=["codebook", ...]` and an rng stream "codebook"); other calls change nothing.

  Returns `embeddings` (straight-through: the codes forward, the identity backward),
  `encodings` int32 `"..."`, `commitment_loss` (`mse(z, sg(codes))`, unweighted),
  `perplexity` and `codes_used` (distinct codes in the batch).
  """

  n_codes: int
  ema_decay: float = 0.99
  restart: bool = True

  @nn.compact
  def __call__(self, z: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    e = z.shape[-1]
    embeddings = self.variable("codebook", "embeddings", lambda: jax.random.normal(
        self.make_rng("params"), (self.n_codes, e), jnp.float32))
    counts = self.variable("codebook", "counts", jnp.zeros, (self.n_codes,), jnp.float32)
    sums = self.variable("codebook", "sums", lambda: embeddings.value)
    initialized = self.variable("codebook", "initialized", lambda: jnp.array(False))
    update = train and not self.is_initializing()
    flat = z.reshape(-1, e).astype(jnp.float32)
    codes, n_sum, z_sum = embeddings.value, counts.value, sums.value
    if update:
      first = random_codes(self.make_rng("codebook"), flat, self.n_codes)
      done = initialized.value
      codes = jnp.where(done, codes, first)
      z_sum = jnp.where(done, z_sum, first)
      n_sum = jnp.where(done, n_sum, 1.0)
    distances = (jnp.sum(flat ** 2, axis=1, keepdims=True) - 2 * flat @ codes.T
                 + jnp.sum(codes ** 2, axis=1)[None])
    index = jnp.argmin(distances, axis=1)
    onehot = jax.nn.one_hot(index, self.n_codes, dtype=jnp.float32)
    quantised = codes[index].reshape(z.shape).astype(z.dtype)
    commitment = jnp.mean(jnp.square(z.astype(jnp.float32) - jax.lax.stop_gradient(
        quantised).astype(jnp.float32)))
    n_batch = jnp.sum(onehot, axis=0)
    if update:
      d = self.ema_decay
      n_sum = d * n_sum + (1 - d) * n_batch
      z_sum = d * z_sum + (1 - d) * (onehot.T @ flat)
      new = laplace_codes(n_sum, z_sum)
      if self.restart:
        fresh = random_codes(self.make_rng("codebook"), flat, self.n_codes)
        new = jnp.where((n_sum >= 1)[:, None], new, fresh)
      embeddings.value, counts.value, sums.value = new, n_sum, z_sum
      initialized.value = jnp.array(True)
    probs = n_batch / flat.shape[0]
    return {
        "embeddings": z + jax.lax.stop_gradient(quantised - z),
        "encodings": index.reshape(z.shape[:-1]).astype(jnp.int32),
        "commitment_loss": commitment,
        "perplexity": jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10))),
        "codes_used": jnp.sum(n_batch > 0).astype(jnp.float32),
    }

  def lookup(self, encodings: jax.Array) -> jax.Array:
    """int `"..."` -> the codes `"... e"`."""
    return self.get_variable("codebook", "embeddings")[encodings]


class VQVAE(nn.Module):
  """The whole VQ-VAE: `encoder`, `pre_vq`, `codebook`, `post_vq`, `decoder`."""

  config: VQVAEConfig

  def setup(self):
    cfg = self.config
    kw = {"dtype": to_dtype(cfg.dtype), "param_dtype": to_dtype(cfg.param_dtype)}
    self.encoder = Encoder(cfg)
    self.pre_vq = conv3d(cfg.embedding_dim, 1, **kw)
    self.codebook = Codebook(cfg.n_codes, cfg.ema_decay, cfg.restart)
    self.post_vq = conv3d(cfg.n_hiddens, 1, **kw)
    self.decoder = Decoder(cfg)

  def encode(self, video: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """`video "b t h w 3"` -> `resnet`, `attention` (`"b t' h' w' n"`), `pre_vq`
    (`"b t' h' w' e"`), `encodings` (int32 `"b t' h' w'"`)."""
    out, pre_vq, vq = self._encode(video, train)
    return {**out, "pre_vq": pre_vq, "encodings": vq["encodings"]}

  def _encode(self, video, train):
    out = self.encoder(video, train=train)
    pre_vq = self.pre_vq(out["attention"])
    return out, pre_vq, self.codebook(pre_vq, train=train)

  def decode(self, encodings: jax.Array) -> jax.Array:
    """int `"b t' h' w'"` -> `recon "b t h w 3"` (BatchNorm on its running statistics)."""
    return self.decoder(self.post_vq(self.codebook.lookup(encodings)), train=False)

  def __call__(self, video: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """Reconstructs `video "b t h w 3"`; `train`: BatchNorm on batch statistics and the
    codebook's EMA update (apply with `mutable=["batch_stats", "codebook"]` and an rng
    stream "codebook")."""
    x = preprocess(video)
    _, _, vq = self._encode(video, train)
    recon = self.decoder(self.post_vq(vq["embeddings"]), train=train)
    mse = jnp.mean(jnp.square(recon.astype(jnp.float32) - x.astype(jnp.float32)))
    return {
        "recon": recon,
        "recon_loss": mse / self.config.data_variance,
        "commitment_loss": self.config.commitment * vq["commitment_loss"],
        "perplexity": vq["perplexity"],
        "codes_used": vq["codes_used"],
        "encodings": vq["encodings"],
    }
