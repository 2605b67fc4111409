"""Prompt learning on a frozen CLIP: CoOp's learned context vectors in front of (or around)
each class name, and CoCoOp's image-conditional shift of them.

CoOp (Zhou et al. 2022): each class's prompt is `[BOS, ctx_1 ... ctx_n, name, ".", EOS]`
with the class name at the "end", or in the "middle" (`ctx[:n//2], name, ctx[n//2:]`) or
at the "front" (`name, ctx`). The context vectors replace token embeddings at the input of
the frozen text tower, whose feature is read at the EOS position (`TwoTowers.encode_text`);
logits are CLIP's frozen learned scale times the cosine similarity of image and prompt.
The context is shared by all classes, or class-specific (`class_specific`). Initialised
from a phrase (`ctx_init`, e.g. "a photo of a"), it starts as the phrase's token
embeddings, the context length is the phrase's token count (its word count under CLIP's
BPE) and the context is shared.

CoCoOp (Zhou et al. 2022b): a meta-network `Linear -> ReLU -> Linear` (hidden width
`embed_dim // 16`) maps the L2-normalised image feature to one vector added to every
context vector, so each image has its own prompts: the text tower runs over
`batch x classes` prompts. `image_chunk` runs it over that many images at a time
(a rematerialised scan), which bounds the activation memory by the chunk instead of the
batch.

Prompts are token ids with a slot map (`class_prompts`): the slot of each position is the
context vector read there, or -1 for the token's own embedding. The model holds the
prompts of its training classes and takes others (new class names) at call time.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.layers import Dense
from mmjax.models.two_towers import TwoTowers, TwoTowersConfig

POSITIONS = ("end", "middle", "front")


@dataclasses.dataclass(frozen=True)
class PromptLearnerConfig:
  """CoOp, or CoCoOp with `meta_net=True`, on the frozen dual encoder `clip`.

  Attributes:
    clip: the frozen CLIP.
    class_names: the classes trained on, in label order (underscores read as spaces).
    n_ctx: context vectors per prompt (ignored with `ctx_init`: its token count).
    ctx_init: a phrase the context starts from (then shared); "" for N(0, 0.02) vectors.
    class_specific: one context per class (CoOp's CSC); classes must then be the trained
      ones.
    class_position: where the class name sits: "end", "middle" or "front".
    meta_net: CoCoOp's image-conditional shift of the context.
    meta_hidden: the meta-network's hidden width; None: `clip.embed_dim // 16`.
    image_chunk: CoCoOp: images whose prompts run through the text tower together (a
      rematerialised scan over chunks); 0: the whole batch at once.
  """

  clip: TwoTowersConfig
  class_names: tuple[str, ...]
  n_ctx: int = 16
  ctx_init: str = ""
  class_specific: bool = False
  class_position: Literal["end", "middle", "front"] = "end"
  meta_net: bool = False
  meta_hidden: int | None = None
  image_chunk: int = 0

  def __post_init__(self):
    if self.class_position not in POSITIONS:
      raise ValueError(f"PromptLearnerConfig: class_position must be one of {POSITIONS}, "
                       f"got {self.class_position!r}.")
    if not self.class_names:
      raise ValueError("PromptLearnerConfig: class_names is empty; name the classes trained "
                       "on, in label order.")
    if self.n_ctx < 1 and not self.ctx_init:
      raise ValueError(f"PromptLearnerConfig: n_ctx={self.n_ctx} must be at least 1.")
    if self.image_chunk < 0:
      raise ValueError(f"PromptLearnerConfig: image_chunk={self.image_chunk} must be >= 0 "
                       "(0: the whole batch at once).")


# ------------------------------------------------------------------------------ prompts

def prompt_layout(name_ids: Sequence[int], dot_ids: Sequence[int], n_ctx: int,
                  position: str, *, bos_id: int, eos_id: int, placeholder_id: int,
                  pad_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """One class's prompt: (int32 tokens `"t"`, int32 slots `"t"`), the slot of a position
  being the context vector read there and -1 where the token's own embedding is.
  Context positions hold `placeholder_id` (CoOp's "X"), which never reaches the tower."""
  ctx = [(placeholder_id, i) for i in range(n_ctx)]
  name = [(i, -1) for i in name_ids]
  dot = [(i, -1) for i in dot_ids]
  if position == "end":
    body = ctx + name + dot
  elif position == "middle":
    body = ctx[:n_ctx // 2] + name + ctx[n_ctx // 2:] + dot
  elif position == "front":
    body = name + ctx + dot
  else:
    raise ValueError(f"Unknown class position {position!r}; expected one of {POSITIONS}.")
  items = [(bos_id, -1), *body, (eos_id, -1)]
  if len(items) > seq_len:
    raise ValueError(f"A prompt of {n_ctx} context vectors and {len(name_ids)} name tokens "
                     f"is {len(items)} tokens long, more than seq_len={seq_len}; raise "
                     "data.seq_len (within the text tower's max_len) or lower n_ctx.")
  tokens = np.full(seq_len, pad_id, np.int32)
  slots = np.full(seq_len, -1, np.int32)
  tokens[:len(items)], slots[:len(items)] = zip(*items, strict=True)
  return tokens, slots


def _after_word(tokenizer: Any, text: str) -> list[int]:
  """The ids of `text` as it reads after a word ("X" + " " + text), so that a name is
  tokenized as inside a sentence whatever the tokenizer does with a leading space."""
  head = tokenizer.encode("X")
  ids = tokenizer.encode(f"X{text}")
  if ids[:len(head)] != head:
    raise ValueError(f"The tokenizer merges {text!r} with the word before it; CoOp's prompt "
                     "assembly needs the name's tokens apart.")
  return ids[len(head):]


def class_prompts(tokenizer: Any, class_names: Sequence[str], n_ctx: int, position: str,
                  seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens `"c t"`, slots `"c t"`) of CoOp's prompts `X ... X name.` for `class_names`
  (see `prompt_layout`); the name and "." tokenized as CoOp tokenizes its placeholder
  prompt, the name's tokens as they read after a word."""
  dot = _after_word(tokenizer, ".")
  placeholder = tokenizer.encode("X")[0]
  tokens, slots = [], []
  for name in class_names:
    name_dot = _after_word(tokenizer, " " + name.replace("_", " ") + ".")
    if name_dot[-len(dot):] != dot:
      raise ValueError(f"The tokenizer merges the '.' after the class name {name!r}; "
                       "CoOp's prompt assembly needs it apart.")
    t, s = prompt_layout(name_dot[:-len(dot)], dot, n_ctx, position, bos_id=tokenizer.bos_id,
                         eos_id=tokenizer.eos_id, placeholder_id=placeholder,
                         pad_id=tokenizer.pad_id, seq_len=seq_len)
    tokens.append(t)
    slots.append(s)
  return np.stack(tokens), np.stack(slots)


# -------------------------------------------------------------------------------- model

class MetaNet(nn.Module):
  """CoCoOp's meta-network: `"b e -> b d"`, `linear2(relu(linear1(x)))`."""

  hidden: int
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(Dense(self.hidden, ("embed", "mlp"), use_bias=True, name="linear1")(x))
    return Dense(self.features, ("mlp", "embed"), use_bias=True, name="linear2")(h)


class PromptLearner(nn.Module):
  """`images "b h w c" -> logits "b c"` (float32) over the classes whose prompts it is
  given (default: its training classes).

  Attributes:
    config: the prompt learner and its CLIP.
    class_tokens, class_slots: the training classes' prompts (`class_prompts`), as
      nested tuples.
    init_ids: the token ids of `config.ctx_init` (empty without one). The context is then
      those ids' embeddings in the frozen text tower plus the learned `ctx`, which starts at
      zero: the same function and the same gradients as CoOp's vectors initialised by
      copy, and a context that follows the backbone it is loaded on.
  """

  config: PromptLearnerConfig
  class_tokens: tuple[tuple[int, ...], ...]
  class_slots: tuple[tuple[int, ...], ...]
  init_ids: tuple[int, ...] = ()

  @property
  def n_ctx(self) -> int:
    return len(self.init_ids) or self.config.n_ctx

  def setup(self):
    cfg = self.config
    self.clip = TwoTowers(cfg.clip)
    width = cfg.clip.text.width
    if self.init_ids:
      shape, init, axes = (self.n_ctx, width), nn.initializers.zeros, (None, "embed")
    elif cfg.class_specific:
      shape = (len(self.class_tokens), self.n_ctx, width)
      init, axes = nn.initializers.normal(0.02), (None, None, "embed")
    else:
      shape, init, axes = (self.n_ctx, width), nn.initializers.normal(0.02), (None, "embed")
    self.ctx = self.param("ctx", nn.with_logical_partitioning(init, axes), shape)
    if cfg.meta_net:
      self.meta = MetaNet(cfg.meta_hidden or max(cfg.clip.embed_dim // 16, 1), width,
                          name="meta_net")

  def context(self) -> jax.Array:
    """The context vectors: `"n d"`, or `"c n d"` when class-specific."""
    if not self.init_ids:
      return self.ctx
    if self.is_initializing():  # the text tower's embedding does not exist yet
      return self.ctx
    table = nn.unbox(self.clip.text.variables["params"]["embed"]["embedding"])
    phrase = jax.lax.stop_gradient(table[jnp.asarray(self.init_ids)])
    return phrase.astype(self.ctx.dtype) + self.ctx

  def encode_prompts(self, ctx: jax.Array, tokens: jax.Array, slots: jax.Array) -> jax.Array:
    """Context `"r n d"`, prompts `tokens, slots "r t"` -> normalised features `"r e"`."""
    rows = jnp.arange(tokens.shape[0])[:, None]
    embeddings = ctx[rows, jnp.maximum(slots, 0)]  # "r t d"
    return self.clip.encode_text(tokens, embeddings=embeddings, embedding_mask=slots >= 0)

  def __call__(self, images: jax.Array, tokens: jax.Array | None = None,
               slots: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    if tokens is None:
      tokens, slots = jnp.asarray(self.class_tokens), jnp.asarray(self.class_slots)
    num_classes = tokens.shape[0]
    ctx = self.context()
    if ctx.ndim == 3 and ctx.shape[0] != num_classes:
      raise ValueError(f"Class-specific contexts are learned for {ctx.shape[0]} classes; "
                       f"prompts for {num_classes} were given. Only shared contexts "
                       "(class_specific=False) transfer to other classes.")
    ctx = jnp.broadcast_to(ctx, (num_classes, *ctx.shape[-2:]))  # "c n d"
    image = self.clip.encode_image(images)  # "b e", normalised
    scale = self.clip.logits_scale_and_bias()[0]
    if not cfg.meta_net:
      text = self.encode_prompts(ctx, tokens, slots)  # "c e"
      return scale * image @ text.T
    shift = self.meta(image)  # "b d"
    return scale * self._conditional_similarity(image, shift, ctx, tokens, slots)

  def _conditional_similarity(self, image, shift, ctx, tokens, slots) -> jax.Array:
    """CoCoOp's `"b c"` cosines, each image against the prompts its shift makes."""
    b, c = image.shape[0], tokens.shape[0]

    def chunk(module, image, shift):  # "k e", "k d" -> "k c"
      k = image.shape[0]
      shifted = ctx[None] + shift[:, None, None].astype(ctx.dtype)  # "k c n d"
      text = module.encode_prompts(shifted.reshape(k * c, *ctx.shape[1:]),
                                   jnp.tile(tokens, (k, 1)), jnp.tile(slots, (k, 1)))
      return jnp.einsum("ke,kce->kc", image, text.reshape(k, c, -1))

    size = self.config.image_chunk or b
    if size >= b or self.is_initializing():
      return chunk(self, image, shift)
    pad = (-b) % size
    grouped = [jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, size, x.shape[-1])
               for x in (image, shift)]
    scan = nn.scan(nn.remat(lambda module, carry, xs: (carry, chunk(module, *xs))),
                   variable_broadcast="params", split_rngs={"params": False},
                   length=grouped[0].shape[0])
    _, out = scan(self, None, tuple(grouped))
    return out.reshape(-1, c)[:b]


def context_length(config: PromptLearnerConfig, init_ids: Sequence[int]) -> int:
  """The context length the prompts are laid out for: the phrase's token count with
  `ctx_init`, else `n_ctx`."""
  return len(init_ids) or config.n_ctx


def build(config: PromptLearnerConfig, tokenizer: Any, seq_len: int) -> PromptLearner:
  """The prompt learner of `config` with its training classes' prompts, tokenized by
  `tokenizer` into `seq_len` tokens."""
  init_ids = tuple(tokenizer.encode(config.ctx_init)) if config.ctx_init else ()
  if config.ctx_init and not init_ids:
    raise ValueError(f"ctx_init={config.ctx_init!r} has no tokens.")
  tokens, slots = class_prompts(tokenizer, config.class_names,
                                context_length(config, init_ids), config.class_position,
                                seq_len)
  return PromptLearner(config, tuple(map(tuple, tokens.tolist())),
                       tuple(map(tuple, slots.tolist())), init_ids)
