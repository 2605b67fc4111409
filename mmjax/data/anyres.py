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
"""

import math
from collections.abc import Sequence

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
