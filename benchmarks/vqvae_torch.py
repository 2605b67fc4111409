"""VideoGPT's 3D VQ-VAE (wilson1yan/VideoGPT@733d2b1, `videogpt/vqvae.py` and the axial
attention of `videogpt/attention.py`) written out in PyTorch, with the reference's module
names (so its `state_dict` has the released checkpoints' keys and converts with
`mmjax.convert.convert_videogpt`), its constructor arguments and its behaviour, codebook
state and random draws included. It is the reference the conversion tests
(tests/test_vqvae_convert.py) and the train-step benchmark (benchmarks/vqvae.py) compare
mmjax with, since the reference itself needs pytorch_lightning and its own checkout.

Layout is the reference's: video `"b c t h w"` in [-0.5, 0.5]. What it keeps:
  * `SamePadConv3d` pads `k - s` per axis, the odd one on the left/front, then convolves
    without padding; `SamePadConvTranspose3d` pads the same way, then transposes with
    `padding=k-1`.
  * `Encoder.conv_last` takes `in_channels` from the last iteration of the downsampling
    loop: 3 (the video's channels) when every factor is at most 2, so such an encoder
    only runs (on the single downsampling conv's `n_hiddens` channels) when `n_hiddens`
    is 3: any other such model fails at its first forward. Kept, since checkpoints
    hold that shape.
  * Heads are `n_hiddens // 2` wide, so the projections are `2 * (n_hiddens // 2)` wide:
    narrower than `n_hiddens` when it is odd, as there.
  * The codebook's `embeddings`, `N` and `z_avg` are buffers; `_need_init` is a plain
    attribute (True after construction and after `load_state_dict`): the first
    train-mode call initialises the codebook from the batch, whatever was loaded.
  * Random draws in the reference's order: per train call, at the first one the init's
    tiling noise (only when the batch has fewer vectors than codes) and permutation,
    then the restart's tiling noise and permutation.
No distributed training: the batch statistics are this process's (the reference
all-reduces them and broadcasts rank 0's restart draws).
"""

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DATA_VARIANCE = 0.06  # the reconstruction loss's divisor
COMMITMENT = 0.25


def channels_last(x: torch.Tensor) -> torch.Tensor:
  """`"b c ..."` -> `"b ... c"`, contiguous."""
  return x.movedim(1, -1).contiguous()


def channels_first(x: torch.Tensor) -> torch.Tensor:
  """`"b ... c"` -> `"b c ..."`, contiguous."""
  return x.movedim(-1, 1).contiguous()


def _same_padding(kernel_size, stride) -> tuple[tuple[int, ...], tuple[int, ...], tuple]:
  """`(kernel, stride, F.pad argument)`: `k - s` per axis, `ceil` of half before."""
  kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
  stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
  pad = []
  for k, s in reversed(list(zip(kernel, stride, strict=True))):  # F.pad: last axis first
    total = k - s
    pad += [total - total // 2, total // 2]
  return kernel, stride, tuple(pad)


class SamePadConv3d(nn.Module):
  """A Conv3d whose output is `ceil(input / stride)` long on each axis (input divisible by
  the stride), padded explicitly, the odd one before."""

  def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True):
    super().__init__()
    kernel, stride, self.pad_input = _same_padding(kernel_size, stride)
    self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=0,
                          bias=bias)

  def forward(self, x):
    return self.conv(F.pad(x, self.pad_input))


class SamePadConvTranspose3d(nn.Module):
  """The transpose of `SamePadConv3d`'s shape: `input * stride` long on each axis."""

  def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True):
    super().__init__()
    kernel, stride, self.pad_input = _same_padding(kernel_size, stride)
    self.convt = nn.ConvTranspose3d(in_channels, out_channels, kernel, stride=stride,
                                    bias=bias, padding=tuple(k - 1 for k in kernel))

  def forward(self, x):
    return self.convt(F.pad(x, self.pad_input))


class AxialAttention(nn.Module):
  """The reference's non-causal multi-head attention along one axis of `"b t h w c"`:
  bias-free query, key and value projections, softmax(q k^T / sqrt(d)) v per head, and an
  output projection with bias. `axis`: -4 time, -3 height, -2 width (the reference's
  `axial_dim`)."""

  def __init__(self, width: int, heads: int, axis: int, n_layer: int = 1):
    super().__init__()
    self.heads, self.axis = heads, axis
    inner = heads * (width // heads)  # < width when heads does not divide it, as there
    self.w_qs = nn.Linear(width, inner, bias=False)
    self.w_ks = nn.Linear(width, inner, bias=False)
    self.w_vs = nn.Linear(width, inner, bias=False)
    self.fc = nn.Linear(inner, width, bias=True)
    for linear in (self.w_qs, self.w_ks, self.w_vs):
      linear.weight.data.normal_(std=1.0 / np.sqrt(width))
    self.fc.weight.data.normal_(std=1.0 / np.sqrt(width * n_layer))

  def forward(self, q, k, v):
    heads = self.heads

    def split(x, linear):  # "b t h w c" -> "b heads t h w d" -> the axis second to last
      x = linear(x).unflatten(-1, (heads, -1)).movedim(-2, 1)
      return x.movedim(self.axis, -2)

    q, k, v = split(q, self.w_qs), split(k, self.w_ks), split(v, self.w_vs)
    scores = torch.matmul(q, k.transpose(-1, -2)) / np.sqrt(q.shape[-1])
    out = torch.matmul(F.softmax(scores, dim=-1), v)
    out = out.movedim(-2, self.axis).movedim(1, -2).flatten(-2)
    return self.fc(out)


class AxialBlock(nn.Module):
  """The sum of attention over width, height and time (not one after another), on
  `"b c t h w"`."""

  def __init__(self, n_hiddens, n_head):
    super().__init__()
    self.attn_w = AxialAttention(n_hiddens, n_head, -2)
    self.attn_h = AxialAttention(n_hiddens, n_head, -3)
    self.attn_t = AxialAttention(n_hiddens, n_head, -4)

  def forward(self, x):
    x = channels_last(x)
    x = self.attn_w(x, x, x) + self.attn_h(x, x, x) + self.attn_t(x, x, x)
    return channels_first(x)


class AttentionResidualBlock(nn.Module):
  """`x + f(x)`, f: BN, ReLU, 3^3 conv to n/2 (no bias), BN, ReLU, 1^3 conv back to n (no
  bias), BN, ReLU, axial attention; `block.{0..8}` as in the reference's Sequential."""

  def __init__(self, n_hiddens):
    super().__init__()
    half = n_hiddens // 2
    self.block = nn.Sequential(
        nn.BatchNorm3d(n_hiddens), nn.ReLU(),
        SamePadConv3d(n_hiddens, half, 3, bias=False),
        nn.BatchNorm3d(half), nn.ReLU(),
        SamePadConv3d(half, n_hiddens, 1, bias=False),
        nn.BatchNorm3d(n_hiddens), nn.ReLU(),
        AxialBlock(n_hiddens, 2))

  def forward(self, x):
    return x + self.block(x)


def _residual_stack(n_hiddens: int, n_res_layers: int) -> nn.Sequential:
  """`n_res_layers` attention residual blocks, then BN and ReLU."""
  return nn.Sequential(*(AttentionResidualBlock(n_hiddens) for _ in range(n_res_layers)),
                       nn.BatchNorm3d(n_hiddens), nn.ReLU())


def _halvings(factors) -> list[int]:
  """log2 of each downsampling factor."""
  return [int(math.log2(d)) for d in factors]


class Encoder(nn.Module):
  """`"b 3 t h w"` -> `"b n t' h' w'"`: `max log2(downsample)` stride-2 k4 convs (stride 1
  on axes already downsampled enough), each followed by ReLU, `conv_last` (k3), then the
  residual stack."""

  def __init__(self, n_hiddens, n_res_layers, downsample):
    super().__init__()
    left = _halvings(downsample)
    self.convs = nn.ModuleList()
    in_channels = 3  # what conv_last takes if the loop below does not run: never, in use
    for i in range(max(left)):
      in_channels = 3 if i == 0 else n_hiddens
      stride = tuple(2 if n > 0 else 1 for n in left)
      self.convs.append(SamePadConv3d(in_channels, n_hiddens, 4, stride=stride))
      left = [n - 1 for n in left]
    # The reference's quirk: the loop's last in_channels, not n_hiddens.
    self.conv_last = SamePadConv3d(in_channels, n_hiddens, kernel_size=3)
    self.res_stack = _residual_stack(n_hiddens, n_res_layers)

  def features(self, x) -> dict[str, torch.Tensor]:
    """`{"resnet": conv stack's output, "attention": the residual stack's}`, both
    `"b n t' h' w'"`."""
    h = x
    for conv in self.convs:
      h = F.relu(conv(h))
    h = self.conv_last(h)
    return {"resnet": h, "attention": self.res_stack(h)}

  def forward(self, x):
    return self.features(x)["attention"]


class Decoder(nn.Module):
  """`"b n t' h' w'"` -> `"b 3 t h w"`: the residual stack, then `max log2(upsample)` k4
  transposed convs (stride 2 on the axes still to upsample), ReLU between them, none
  after the last (no output activation)."""

  def __init__(self, n_hiddens, n_res_layers, upsample):
    super().__init__()
    self.res_stack = _residual_stack(n_hiddens, n_res_layers)
    left = _halvings(upsample)
    steps = max(left)
    self.convts = nn.ModuleList()
    for i in range(steps):
      stride = tuple(2 if n > 0 else 1 for n in left)
      out_channels = 3 if i == steps - 1 else n_hiddens
      self.convts.append(SamePadConvTranspose3d(n_hiddens, out_channels, 4, stride=stride))
      left = [n - 1 for n in left]

  def forward(self, x):
    h = self.res_stack(x)
    for i, convt in enumerate(self.convts):
      h = convt(h)
      if i + 1 < len(self.convts):
        h = F.relu(h)
    return h


class Codebook(nn.Module):
  """Nearest-code quantisation with an EMA codebook held in buffers (`embeddings`, `N`
  the EMA of code counts, `z_avg` the EMA of the sums of the vectors given each code),
  data-dependent initialisation at the first train call and dead-code restarts (codes
  whose `N` fell below 1 replaced by random batch vectors) after every EMA update."""

  def __init__(self, n_codes, embedding_dim):
    super().__init__()
    self.register_buffer("embeddings", torch.randn(n_codes, embedding_dim))
    self.register_buffer("N", torch.zeros(n_codes))
    self.register_buffer("z_avg", self.embeddings.data.clone())
    self.n_codes, self.embedding_dim = n_codes, embedding_dim
    self._need_init = True

  def _tile(self, flat):
    """`flat` repeated (with noise of std 0.01 / sqrt(e)) to at least `n_codes` rows."""
    rows, width = flat.shape
    if rows >= self.n_codes:
      return flat
    flat = flat.repeat((self.n_codes + rows - 1) // rows, 1)
    return flat + torch.randn_like(flat) * (0.01 / np.sqrt(width))

  def _random_vectors(self, flat):
    """`n_codes` rows of `flat` (tiled) in random order."""
    tiled = self._tile(flat)
    return tiled[torch.randperm(tiled.shape[0])][:self.n_codes]

  def _init_embeddings(self, z):
    self._need_init = False
    chosen = self._random_vectors(channels_last(z).flatten(end_dim=-2))
    self.embeddings.data.copy_(chosen)
    self.z_avg.data.copy_(chosen)
    self.N.data.copy_(torch.ones(self.n_codes))

  def forward(self, z):
    """`z` `"b e t h w"` -> `{embeddings` (straight-through) `"b e t h w"`, `encodings`
    `"b t h w"`, `commitment_loss`, `perplexity}`."""
    if self._need_init and self.training:
      self._init_embeddings(z)
    flat = channels_last(z).flatten(end_dim=-2)
    distances = ((flat ** 2).sum(dim=1, keepdim=True) - 2 * flat @ self.embeddings.t()
                 + (self.embeddings.t() ** 2).sum(dim=0, keepdim=True))
    indices = torch.argmin(distances, dim=1)
    onehot = F.one_hot(indices, self.n_codes).type_as(flat)
    encodings = indices.view(z.shape[0], *z.shape[2:])
    quantised = channels_first(F.embedding(encodings, self.embeddings))
    commitment_loss = COMMITMENT * F.mse_loss(z, quantised.detach())

    if self.training:
      counts, sums = onehot.sum(dim=0), flat.t() @ onehot
      self.N.data.mul_(0.99).add_(counts, alpha=0.01)
      self.z_avg.data.mul_(0.99).add_(sums.t(), alpha=0.01)
      total = self.N.sum()
      smoothed = (self.N + 1e-7) / (total + self.n_codes * 1e-7) * total
      self.embeddings.data.copy_(self.z_avg / smoothed.unsqueeze(1))
      restart = self._random_vectors(flat)
      alive = (self.N.view(self.n_codes, 1) >= 1).float()
      self.embeddings.data.mul_(alive).add_(restart * (1 - alive))

    probs = onehot.mean(dim=0)
    perplexity = torch.exp(-torch.sum(probs * torch.log(probs + 1e-10)))
    return {"embeddings": (quantised - z).detach() + z, "encodings": encodings,
            "commitment_loss": commitment_loss, "perplexity": perplexity}

  def dictionary_lookup(self, encodings):
    return F.embedding(encodings, self.embeddings)


def _args(args) -> argparse.Namespace:
  return argparse.Namespace(**args) if isinstance(args, dict) else args


class VQVAE(nn.Module):
  """The reference's `VQVAE(args)`: `args` (a Namespace or dict) with `embedding_dim`,
  `n_codes`, `n_hiddens`, `n_res_layers`, `downsample` (and, for `latent_shape`,
  `sequence_length` and `resolution`)."""

  def __init__(self, args):
    super().__init__()
    self.args = args = _args(args)
    self.embedding_dim, self.n_codes = args.embedding_dim, args.n_codes
    self.encoder = Encoder(args.n_hiddens, args.n_res_layers, args.downsample)
    self.decoder = Decoder(args.n_hiddens, args.n_res_layers, args.downsample)
    self.pre_vq_conv = SamePadConv3d(args.n_hiddens, args.embedding_dim, 1)
    self.post_vq_conv = SamePadConv3d(args.embedding_dim, args.n_hiddens, 1)
    self.codebook = Codebook(args.n_codes, args.embedding_dim)

  @property
  def latent_shape(self):
    shape = (self.args.sequence_length, self.args.resolution, self.args.resolution)
    return tuple(s // d for s, d in zip(shape, self.args.downsample, strict=True))

  def encode(self, x, include_embeddings=False):
    out = self.codebook(self.pre_vq_conv(self.encoder(x)))
    if include_embeddings:
      return out["encodings"], out["embeddings"]
    return out["encodings"]

  def features(self, x) -> dict[str, torch.Tensor]:
    """The encoder's latents: `resnet`, `attention` (`"b n t' h' w'"`), `pre_vq`
    (`"b e t' h' w'"`), and the `encodings` (`"b t' h' w'"`)."""
    out = self.encoder.features(x)
    out["pre_vq"] = self.pre_vq_conv(out["attention"])
    out["encodings"] = self.codebook(out["pre_vq"])["encodings"]
    return out

  def decode(self, encodings):
    h = channels_first(F.embedding(encodings, self.codebook.embeddings))
    return self.decoder(self.post_vq_conv(h))

  def forward(self, x):
    """`(recon_loss, x_recon, codebook outputs)` of `x` `"b 3 t h w"` in [-0.5, 0.5]."""
    vq = self.codebook(self.pre_vq_conv(self.encoder(x)))
    recon = self.decoder(self.post_vq_conv(vq["embeddings"]))
    return F.mse_loss(recon, x) / DATA_VARIANCE, recon, vq

  def training_step(self, batch, batch_idx=0):
    recon_loss, _, vq = self(batch["video"])
    return recon_loss + vq["commitment_loss"]

  def configure_optimizers(self):
    return torch.optim.Adam(self.parameters(), lr=3e-4, betas=(0.9, 0.999))
