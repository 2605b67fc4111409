"""LLaVA-1.6 ("LLaVA-NeXT") "anyres" images: one image seen as a low-resolution whole and a
grid of full-resolution tiles, and the features of both packed into the LM's sequence.

Image side (numpy, uint8 `"h w 3"` arrays; sizes are `(width, height)` as in LLaVA):
  `select_best_resolution` picks, of the grid's resolutions (`grid_pinpoints`, e.g.
  `[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]`), the one that keeps
  the most of the image's pixels, then the one that wastes the least; `resize_and_pad`
  fits the image into it (aspect kept, bicubic, centred on black); `tiles` cuts that into
  `patch_size` squares and adds the base view: the whole image resized to `patch_size`
  squared, distorted, not padded.

Feature side (jnp, shapes static): the vision tower turns the base view and each tile into
`p = s * s` patch features. `pack_anyres_features` lays the tiles' features out as one
`"(gh s) (gw s) d"` grid, cuts off the rows or columns that only saw the padding
(`unpad_features`, computed from the original size as LLaVA's `unpad_image` does), ends
every row with the learned `newline` vector and puts the result after the base view's
features: LLaVA's `mm_patch_merge_type="spatial_unpad"` sequence.

The number of image tokens therefore depends on each image's size (`feature_length`).
`layout` and `packed_index` compute the same arrangement for a batch with static shapes
(numpy or jax.numpy), so that a jitted model packs images of different grids together.
"""

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

Size = tuple[int, int]  # (width, height)


def select_best_resolution(original_size: Size, possible_resolutions: Sequence[Size]) -> Size:
  """The resolution `(width, height)` of `possible_resolutions` an image of `original_size`
  is fitted into: the one with the largest effective resolution (pixels of the image
  scaled to fit, aspect kept, sides truncated, never more than the image has), ties
  broken by the least wasted area (target area minus effective resolution); the first of
  equals wins."""
  width, height = original_size
  best, best_effective, best_wasted = None, -1, math.inf
  for target_width, target_height in possible_resolutions:
    scale = min(target_width / width, target_height / height)
    effective = min(int(width * scale) * int(height * scale), width * height)
    wasted = target_width * target_height - effective
    if effective > best_effective or (effective == best_effective and wasted < best_wasted):
      best, best_effective, best_wasted = (target_width, target_height), effective, wasted
  if best is None:
    raise ValueError("select_best_resolution needs at least one possible resolution.")
  return best


def fitted_size(original_size: Size, target: Size) -> Size:
  """`(width, height)` of an image of `original_size` scaled to fit `target`, aspect kept:
  the side that limits the scale takes the target's, the other is rounded up (at most the
  target's)."""
  width, height = original_size
  target_width, target_height = target
  scale_w, scale_h = target_width / width, target_height / height
  if scale_w < scale_h:
    return target_width, min(math.ceil(height * scale_w), target_height)
  return min(math.ceil(width * scale_h), target_width), target_height


def _resize(image: np.ndarray, size: Size) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC), np.uint8)


def _check_image(image: np.ndarray):
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"Expected a uint8 'h w 3' image, got {image.dtype} {image.shape}.")


def resize_and_pad(image: np.ndarray, target: Size) -> np.ndarray:
  """uint8 `"h w 3"` -> `"th tw 3"` (`target = (tw, th)`): resized to `fitted_size`
  (bicubic) and centred on black, the odd pixel of padding after it."""
  image = np.asarray(image)
  _check_image(image)
  height, width = image.shape[:2]
  new_width, new_height = fitted_size((width, height), target)
  out = np.zeros((target[1], target[0], 3), np.uint8)
  top, left = (target[1] - new_height) // 2, (target[0] - new_width) // 2
  out[top:top + new_height, left:left + new_width] = _resize(image, (new_width, new_height))
  return out


def grid_shape(original_size: Size, grid_pinpoints: Sequence[Size], patch_size: int
               ) -> tuple[int, int]:
  """`(rows, cols)` of tiles an image of `original_size` is cut into. (LLaVA's
  `get_anyres_image_grid_shape` returns the same numbers as `(cols, rows)`.)"""
  width, height = select_best_resolution(original_size, grid_pinpoints)
  if width % patch_size or height % patch_size:
    raise ValueError(f"Grid resolution {(width, height)} is not a whole number of "
                     f"{patch_size}-pixel tiles; grid_pinpoints must be multiples of "
                     "patch_size.")
  return height // patch_size, width // patch_size


def tiles(image: np.ndarray, grid_pinpoints: Sequence[Size], patch_size: int
          ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
  """An image's anyres views.

  Args:
    image: uint8 `"h w 3"`.
    grid_pinpoints: the possible resolutions `(width, height)`, multiples of `patch_size`.
    patch_size: the vision tower's input side.
  Returns:
    `(base "p p 3", tiles "(gh gw) p p 3", (gh, gw))`, `p = patch_size`: the whole image
    resized (distorted) to `p x p`, and the tiles of `resize_and_pad(image, best)` row by
    row, `best = select_best_resolution`.
  """
  image = np.asarray(image)
  _check_image(image)
  height, width = image.shape[:2]
  rows, cols = grid_shape((width, height), grid_pinpoints, patch_size)
  padded = resize_and_pad(image, (cols * patch_size, rows * patch_size))
  cut = padded.reshape(rows, patch_size, cols, patch_size, 3).transpose(0, 2, 1, 3, 4)
  return (_resize(image, (patch_size, patch_size)),
          cut.reshape(rows * cols, patch_size, patch_size, 3), (rows, cols))


def unpadded_window(shape: tuple[int, int], original_size: Size) -> tuple[slice, slice]:
  """The `(rows, cols)` slices of a `shape = (H, W)` feature grid that saw the image of
  `original_size` rather than the padding, as LLaVA's `unpad_image` computes them: the
  image's other side scaled to the grid (truncated), the rest split in two (the smaller
  half, taken off both ends)."""
  height, width = shape
  original_width, original_height = original_size
  if original_width / original_height > width / height:
    new_height = int(original_height * (width / original_width))
    padding = (height - new_height) // 2
    return slice(padding, height - padding), slice(0, width)
  new_width = int(original_width * (height / original_height))
  padding = (width - new_width) // 2
  return slice(0, height), slice(padding, width - padding)


def unpad_features(features: jnp.ndarray, original_size: Size) -> jnp.ndarray:
  """`"H W d"` features of the padded, tiled image -> `"h' w' d"`, the rows or columns
  that saw only padding cut off (`unpadded_window`)."""
  rows, cols = unpadded_window(features.shape[:2], original_size)
  return features[rows, cols]


def pack_anyres_features(base: jnp.ndarray, tile_features: jnp.ndarray,
                         grid: tuple[int, int], original_size: Size,
                         newline: jnp.ndarray) -> jnp.ndarray:
  """LLaVA's "spatial_unpad" image sequence.

  Args:
    base: `"n d"`, the base view's features.
    tile_features: `"(gh gw) p d"`, each tile's `p = s * s` patch features (row-major),
      tiles row by row.
    grid: `(gh, gw)`, as `tiles` gives it.
    original_size: `(width, height)` of the image before any resizing.
    newline: `"d"`, the vector that ends each row.
  Returns:
    `"(n + h' (w' + 1)) d"`: the base features, then the unpadded `"h' w'"` grid of the
    tiles' features row by row, each row followed by `newline`.
  """
  rows, cols = grid
  count, p, d = tile_features.shape
  side = math.isqrt(p)
  if count != rows * cols or side * side != p:
    raise ValueError(f"tile_features {tile_features.shape} are not {rows} x {cols} tiles "
                     "of a square grid of patches each.")
  grid_features = (tile_features.reshape(rows, cols, side, side, d)
                   .transpose(0, 2, 1, 3, 4).reshape(rows * side, cols * side, d))
  kept = unpad_features(grid_features, original_size)
  h, w = kept.shape[:2]
  ends = jnp.broadcast_to(jnp.asarray(newline, kept.dtype), (h, 1, d))
  lines = jnp.concatenate([kept, ends], axis=1).reshape(h * (w + 1), d)
  return jnp.concatenate([jnp.asarray(base, kept.dtype), lines], axis=0)


def feature_length(original_size: Size, grid_pinpoints: Sequence[Size], patch_size: int,
                   patches_per_side: int) -> int:
  """How many vectors `pack_anyres_features` gives for an image of `original_size`: the
  base view's `s * s` and `h' (w' + 1)` of the tiles (`s = patches_per_side`)."""
  rows, cols = grid_shape(original_size, grid_pinpoints, patch_size)
  r, c = unpadded_window((rows * patches_per_side, cols * patches_per_side), original_size)
  h, w = r.stop - r.start, c.stop - c.start
  return patches_per_side ** 2 + h * (w + 1)


# ------------------------------------------------------------------- batched, in-graph layout

def max_tiles(grid_pinpoints: Sequence[Size], patch_size: int) -> int:
  """The most tiles any image is cut into: the views per image are `1 + max_tiles`."""
  return max((w // patch_size) * (h // patch_size) for w, h in grid_pinpoints)


def max_feature_length(grid_pinpoints: Sequence[Size], patch_size: int,
                       patches_per_side: int) -> int:
  """The most features `pack_anyres_features` gives any image (nothing unpadded)."""
  s = patches_per_side
  return s * s + max((h // patch_size * s) * (w // patch_size * s + 1)
                     for w, h in grid_pinpoints)


_DIVISION_STEPS = 70  # fractional bits: up to 15 leading zeros, 53 kept, the guard


def _bit_length(x, xp, bits=31):
  return sum((x >= (1 << k)).astype(xp.int32) for k in range(bits))

def float_floor(mult, num, den, xp=np):
  """`int(mult * (num / den))` exactly as Python computes it in double precision (which
  LLaVA's resolution choice and unpadding do), elementwise for positive ints below 2**14,
  in int32 arithmetic (`xp`: numpy or jax.numpy), so that it holds under jit without
  64-bit floats. The float product falls one below the exact floor where `num / den`
  rounds down and `mult * num / den` is a whole number."""
  mult, num, den = (xp.asarray(a).astype(xp.int32) for a in (mult, num, den))
  mult, num, den = xp.broadcast_arrays(mult, num, den)
  exact = (mult * num) // den
  # num / den rounded to 53 significant bits: long division, the last kept bit, the next
  # (guard) bit and the remainder after it.
  whole, rem = num // den, num % den
  sig = _bit_length(whole, xp, 15)
  exponent = sig - 1
  last = whole & 1
  zero = xp.zeros_like(rem)

  def step(i, state):
    rem, sig, exponent, last, guard, after = state
    rem = rem * 2
    bit = (rem >= den).astype(xp.int32)
    rem = rem - bit * den
    exponent = xp.where((sig == 0) & (bit == 1), -i, exponent)
    counting = (sig < 53) & ((sig > 0) | (bit == 1))
    last = xp.where(counting, bit, last)
    taking_guard = sig == 53
    guard = xp.where(taking_guard, bit, guard)
    after = xp.where(taking_guard, rem, after)
    sig = sig + (counting | taking_guard).astype(xp.int32)
    return rem, sig, exponent, last, guard, after

  state = (rem, sig, exponent, last, zero, zero)
  if xp is np:
    for i in range(1, _DIVISION_STEPS):
      state = step(i, state)
  else:
    state = jax.lax.fori_loop(1, _DIVISION_STEPS, step, state)
  _, _, exponent, last, guard, after = state
  rounds_up = (guard == 1) & ((after != 0) | (last == 1))
  # Rounded down, mult * (num / den) falls short of the integer `exact` by
  # mult * r * 2**(exponent - 52) / den (r: the remainder after 53 bits, 2 r = guard
  # den + after); it rounds below `exact` when that is more than half the spacing of
  # doubles below it, 2**(below - 52), below = floor(log2(exact - 0)).
  below = _bit_length(exact, xp) - 1 - ((exact & (exact - 1)) == 0).astype(xp.int32)
  shift = below - exponent
  lhs = mult * (guard * den + after)
  rhs = den * xp.left_shift(xp.ones_like(shift), xp.clip(shift, 0, 30))
  rhs = xp.where(shift < 0, 0, rhs)
  quirk = (mult * num % den == 0) & ~rounds_up & (lhs > rhs) & (exact > 0)
  return exact - quirk.astype(xp.int32)


def layout(sizes, grid_pinpoints: Sequence[Size], patch_size: int, patches_per_side: int,
           xp=np) -> dict:
  """`select_best_resolution`, `grid_shape` and `unpadded_window` for a whole batch of
  original sizes at once, with `xp` (numpy on the host, jax.numpy inside a jitted model)
  and static shapes, so that the data's token counts and the model's features come from
  one computation. LLaVA's float products are reproduced exactly (`float_floor`);
  transformers' LLaVA-NeXT rounds its unpadding to 7 decimals first, which for a few sizes
  cuts less padding (704 x 396 on LLaVA-1.6's grid: 1948 features there, 1850 here).

  Args:
    sizes: int `"... 2"`, `(width, height)` of each image (below 2**14 each); `(0, 0)`
      marks no image.
    grid_pinpoints, patch_size, patches_per_side: as `feature_length`'s.
  Returns:
    int32 arrays `"..."`: `rows`, `cols` (the tile grid), `top`, `left`, `height`, `width`
    (the unpadded window of the `"(rows s) (cols s)"` patch grid) and `length` (the
    image's features, as `feature_length`; 0 for no image).
  """
  if any(w % patch_size or h % patch_size for w, h in grid_pinpoints):
    raise ValueError(f"grid_pinpoints {list(grid_pinpoints)} are not all multiples of "
                     f"patch_size={patch_size}.")
  sizes = xp.asarray(sizes).astype(xp.int32)
  present = (sizes[..., 0] > 0) & (sizes[..., 1] > 0)
  w = xp.maximum(sizes[..., 0], 1)[..., None]
  h = xp.maximum(sizes[..., 1], 1)[..., None]
  tw = xp.asarray([p[0] for p in grid_pinpoints], xp.int32)
  th = xp.asarray([p[1] for p in grid_pinpoints], xp.int32)
  # Scaled to fit each target, aspect kept: scale = min(tw / w, th / h).
  by_width = tw * h <= th * w
  num, den = xp.where(by_width, tw, th), xp.where(by_width, w, h)
  scaled = float_floor(xp.stack([w + 0 * num, h + 0 * num]), num, den, xp)  # LLaVA's int()s
  effective = xp.minimum(scaled[0] * scaled[1], w * h)
  wasted = tw * th - effective
  best_effective = xp.max(effective, axis=-1, keepdims=True)
  wasted = xp.where(effective == best_effective, wasted, np.iinfo(np.int32).max)
  best = xp.argmin(wasted, axis=-1)[..., None]
  s = patches_per_side
  rows = xp.take_along_axis(xp.broadcast_to(th // patch_size, wasted.shape), best, -1)[..., 0]
  cols = xp.take_along_axis(xp.broadcast_to(tw // patch_size, wasted.shape), best, -1)[..., 0]
  grid_h, grid_w = rows * s, cols * s
  w, h = w[..., 0], h[..., 0]
  wide = w * grid_h > grid_w * h  # wider than the grid: rows of padding are cut
  # The other side of the image scaled to the grid: of the height if wide, else the width.
  kept = float_floor(xp.where(wide, h, w), xp.where(wide, grid_w, grid_h),
                     xp.where(wide, w, h), xp)
  pad_rows = xp.where(wide, (grid_h - kept) // 2, 0)
  pad_cols = xp.where(wide, 0, (grid_w - kept) // 2)
  height, width = grid_h - 2 * pad_rows, grid_w - 2 * pad_cols
  length = xp.where(present, s * s + height * (width + 1), 0)
  out = {"rows": rows, "cols": cols, "top": pad_rows, "left": pad_cols, "height": height,
         "width": width, "length": length}
  return {k: v.astype(xp.int32) for k, v in out.items()}


def packed_index(lay: dict, patches_per_side: int, max_tiles: int, length: int, xp=np):
  """Where each of an image's `length` packed features comes from, for `layout`'s `lay`
  (arrays `"..."`): int32 `"... length"` indices into the image's table `"(v p + 2) d"`,
  which holds its `v = 1 + max_tiles` views' `p = s * s` features (base view first, tiles
  row by row), then `newline`, then a zero vector (read past the image's own `length`)."""
  s = patches_per_side
  p = s * s
  newline, zero = (1 + max_tiles) * p, (1 + max_tiles) * p + 1
  j = xp.arange(length, dtype=xp.int32)
  def ex(a):
    return a[..., None]

  k = j - p
  line, col = k // (ex(lay["width"]) + 1), k % (ex(lay["width"]) + 1)
  r, c = ex(lay["top"]) + line, ex(lay["left"]) + col
  tile = (r // s) * ex(lay["cols"]) + c // s
  from_tile = p + tile * p + (r % s) * s + c % s
  index = xp.where(col == ex(lay["width"]), newline, from_tile)
  index = xp.where(line >= ex(lay["height"]), zero, index)
  return xp.where(j < p, j, index).astype(xp.int32)


def views(image: np.ndarray, grid_pinpoints: Sequence[Size], patch_size: int
          ) -> np.ndarray:
  """uint8 `"h w 3"` -> `"(1 + max_tiles) p p 3"`: the base view, the tiles row by row
  (`tiles`), and zero views after them, so that every image of a grid has one shape."""
  base, cut, _ = tiles(image, grid_pinpoints, patch_size)
  out = np.zeros((1 + max_tiles(grid_pinpoints, patch_size), patch_size, patch_size, 3),
                 np.uint8)
  out[0], out[1:1 + len(cut)] = base, cut
  return out


@dataclasses.dataclass(frozen=True)
class AnyresTokens:
  """The image tokens of an image of `(width, height)` under anyres (`layout`'s
  `length`): what a conversation's `<image>` expands to (`conversation.Format`).
  `views` is the count of views per image (`views`)."""

  grid_pinpoints: tuple[Size, ...]
  patch_size: int
  patches_per_side: int

  def __post_init__(self):
    object.__setattr__(self, "grid_pinpoints",
                       tuple(tuple(int(v) for v in p) for p in self.grid_pinpoints))

  @property
  def views(self) -> int:
    return 1 + max_tiles(self.grid_pinpoints, self.patch_size)

  def __call__(self, size: Size) -> int:
    return int(layout(np.asarray(size), self.grid_pinpoints, self.patch_size,
                      self.patches_per_side)["length"])
