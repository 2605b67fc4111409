"""LLaVA's data as it is distributed: the instruction JSON with its image folder, the same
converted to ArrayRecord, LLaVA-1.5's pad-to-square images and LLaVA-1.6's anyres tiles and
feature packing, against written-out references of LLaVA's functions and transformers'."""

import io
import json
import logging
import math
import types

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmjax.data import anyres, convert, sources
from mmjax.data.conversation import Format
from mmjax.data.pipeline import DataHealth, Dataset, dataset_from_config, make_dataset
from mmjax.data.sequences import CorruptRecord, SequenceSpec
from mmjax.data.tokenizer import Tokenizer

SIZE = 12
RNG = np.random.default_rng(0)


def noise(height: int, width: int) -> np.ndarray:
  return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(path, pixels: np.ndarray, format: str = "PNG"):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path, format=format)


def talk(question: str, answer: str) -> list[dict[str, str]]:
  return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# ------------------------------------------------------------------------------ pad or crop

def llava_expand2square(image: Image.Image, colour) -> Image.Image:
  """LLaVA-1.5's `expand2square`, written out: the image pasted onto a square of `colour`
  at `(0, (w - h) // 2)` (wide) or `((h - w) // 2, 0)` (tall)."""
  w, h = image.size
  if w == h:
    return image
  square = Image.new(image.mode, (max(w, h),) * 2, colour)
  square.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
  return square


def test_pad_colour_is_clips_mean_and_the_image_is_centred(tmp_path):
  assert sources.CLIP_PAD_COLOUR == (122, 116, 104)
  assert sources.mean_colour((0.5, 0.5, 0.5)) == (127, 127, 127)  # SigLIP's
  images = {"wide.png": noise(5, SIZE), "tall.png": noise(SIZE, 6), "square.png": noise(9, 9)}
  for name, pixels in images.items():
    save(tmp_path / "img" / name, pixels)
  records = [{"id": name, "image": name, "conversations": talk("<image>\nwhat?", "noise")}
             for name in images]
  (tmp_path / "data.json").write_text(json.dumps(records))
  padded = sources.LlavaJson(str(tmp_path / "data.json"), SIZE, str(tmp_path / "img"), "pad")
  cropped = sources.LlavaJson(str(tmp_path / "data.json"), SIZE, str(tmp_path / "img"))
  colour = np.array(sources.CLIP_PAD_COLOUR, np.uint8)

  wide = padded[0]["images"][0]  # 5 rows on 12: 3 rows of padding above, 4 below
  np.testing.assert_array_equal(wide[3:8], images["wide.png"])
  assert np.all(wide[:3] == colour) and np.all(wide[8:] == colour)
  tall = padded[1]["images"][0]  # 6 columns on 12: 3 on each side
  np.testing.assert_array_equal(tall[:, 3:9], images["tall.png"])
  assert np.all(tall[:, :3] == colour) and np.all(tall[:, 9:] == colour)
  for i, (name, pixels) in enumerate(images.items()):  # LLaVA's steps, written out
    reference = llava_expand2square(Image.fromarray(pixels), (122, 116, 104))
    np.testing.assert_array_equal(padded[i]["images"][0],
                                  sources.resize_center_crop(reference, SIZE))
    np.testing.assert_array_equal(cropped[i]["images"][0],
                                  sources.resize_center_crop(Image.fromarray(pixels), SIZE))
  assert not np.array_equal(padded[0]["images"], cropped[0]["images"])
  assert padded[0]["conversations"] == records[0]["conversations"]
  assert padded[0]["id"] == "wide.png"

  white = sources.LlavaJson(str(tmp_path / "data.json"), SIZE, str(tmp_path / "img"), "pad",
                            pad_colour=(255, 255, 255))
  assert np.all(white[0]["images"][0][:3] == 255)
  with pytest.raises(ValueError, match="image_aspect_ratio='square'.*'crop'"):
    sources.LlavaJson(str(tmp_path / "data.json"), SIZE, image_aspect_ratio="square")


# --------------------------------------------------------------------------- bad records

def write_mixed_jsonl(tmp_path) -> str:
  save(tmp_path / "img" / "ok.png", noise(10, 14))
  lines = [json.dumps({"id": f"good-{i}", "image": "ok.png",
                       "conversations": talk("<image>\nwhat is it?", f"noise {i}")})
           for i in range(4)]
  lines += [json.dumps({"id": "text-only", "conversations": talk("hello?", "hi")}),
            json.dumps({"id": "lost", "image": "missing.png",
                        "conversations": talk("<image>\nwhat?", "gone")}),
            json.dumps({"id": "mute", "image": "ok.png"}),
            '{"id": "broken", "conversations": [',
            ""]
  (tmp_path / "data.jsonl").write_text("\n".join(lines))
  return str(tmp_path / "data.jsonl")


def test_bad_records_are_counted_with_their_ids_never_fatal(tmp_path, caplog):
  path = write_mixed_jsonl(tmp_path)
  source = dataset_from_config({"name": "llava", "source": {
      "kind": "llava_json", "path": path, "image_folder": str(tmp_path / "img"),
      "image_size": SIZE, "image_aspect_ratio": "pad"}}).source
  assert isinstance(source, sources.LlavaJson) and len(source) == 8  # the blank line: none
  assert source[4]["images"].shape == (0, SIZE, SIZE, 3)  # text-only
  for index, reason, detail in ((5, "missing_image", "record 'lost'"),
                                (6, "bad_conversation", "record 'mute'"),
                                (7, "bad_record", "line 8: not JSON")):
    with pytest.raises(CorruptRecord, match=f"{reason}: .*{detail}"):
      source[index]

  health = DataHealth(max_logged=100)
  spec = SequenceSpec(seq_len=48, max_images=1, image_size=SIZE, mode="conversation",
                      conversation=Format("vicuna_v1", system="", image_tokens=2))
  with caplog.at_level(logging.WARNING):
    iterator = iter(make_dataset([Dataset("llava", source)], Tokenizer(), spec, batch_size=4,
                                 seed=0, health=health))
    batches = [next(iterator) for _ in range(4)]  # two passes over the records at least
  assert all(b["images"].shape == (4, 1, SIZE, SIZE, 3) for b in batches)
  assert {int(n) for b in batches for n in b["num_images"]} == {0, 1}
  counts = health.counts()
  assert set(counts) == {"llava/missing_image", "llava/bad_conversation", "llava/bad_record"}
  assert all(count >= 2 for count in counts.values()), counts
  assert "'lost'" in caplog.text and "'mute'" in caplog.text and "line 8" in caplog.text


def test_a_json_list_that_is_not_json_is_refused_when_the_source_is_made(tmp_path):
  (tmp_path / "data.json").write_text('[{"id": "a", "conversations": []}, {"id": ')
  with pytest.raises(ValueError, match="starts as a JSON list but is not valid JSON"):
    sources.LlavaJson(str(tmp_path / "data.json"), SIZE)


# ------------------------------------------------------------------------ conversion round trip

def test_conversion_round_trip_gives_the_documents_of_the_originals(tmp_path):
  shapes = {"a.png": (10, 14), "b.png": (14, 10), "c/d.png": (12, 12), "e.png": (7, 20)}
  for name, (h, w) in shapes.items():
    save(tmp_path / "img" / name, noise(h, w))
  records = [{"id": f"rec-{i}", "image": name,
              "conversations": talk("<image>\ndescribe", name) + talk("more?", "no") * (i % 2)}
             for i, name in enumerate(shapes)]
  records += [{"id": "text", "conversations": talk("2 + 2?", "4")},
              {"id": "lost", "image": "nope.png", "conversations": talk("<image>\nx", "y")},
              {"id": "mismatch", "image": "a.png", "conversations": talk("no image", "y")},
              {"id": "mute", "image": "a.png", "conversations": []},
              "not an object"]
  data = tmp_path / "data.json"
  data.write_text(json.dumps(records, indent=1))
  report = convert.convert("llava", str(data), str(tmp_path / "out" / "llava"),
                           image_root=str(tmp_path / "img"), num_shards=2,
                           image_format="png", progress_every=None)
  assert (report.rows, report.written, report.images) == (9, 5, 4)
  assert dict(report.skipped) == {"missing_image": 1, "image_token_mismatch": 1,
                                  "bad_conversation": 1, "bad_row": 1}
  assert "'lost'" in report.first_case["skipped/missing_image"]

  for aspect in ("pad", "crop"):
    original = sources.LlavaJson(str(data), SIZE, str(tmp_path / "img"), aspect)
    converted = dataset_from_config({"name": "c", "source": {
        "kind": "arrayrecord_conversations", "image_size": SIZE, "image_aspect_ratio": aspect,
        "paths": str(tmp_path / "out" / "llava-*.array_record")}}).source
    assert len(converted) == 5
    expected = {original[i]["id"]: original[i] for i in range(5)}
    for i in range(len(converted)):
      document = converted[i]
      reference = expected.pop(document["id"])
      assert document["conversations"] == reference["conversations"]
      np.testing.assert_array_equal(document["images"], reference["images"])
    assert not expected

  # JPEG storage (the default) is lossy but close; a pairs reader refuses the records.
  y, x = np.mgrid[:30, :40]
  save(tmp_path / "img" / "smooth.png", np.stack([6 * x, 8 * y, 3 * (x + y)], -1).astype(np.uint8))
  smooth = tmp_path / "smooth.jsonl"
  smooth.write_text(json.dumps({"id": "s", "image": "smooth.png",
                                "conversations": talk("<image>", "a gradient")}))
  convert.convert("llava", str(smooth), str(tmp_path / "jpeg" / "llava"),
                  image_root=str(tmp_path / "img"), progress_every=None)
  jpeg = sources.ArrayRecordConversations(str(tmp_path / "jpeg" / "llava-*.array_record"),
                                          SIZE, "pad")[0]
  first = sources.LlavaJson(str(smooth), SIZE, str(tmp_path / "img"), "pad")[0]
  assert jpeg["id"] == first["id"] == "s"
  assert np.abs(jpeg["images"].astype(int) - first["images"]).mean() < 1.5
  with pytest.raises(CorruptRecord, match="kind 'conversation'.*arrayrecord_conversations"):
    sources.ArrayRecordPairs(str(tmp_path / "jpeg" / "llava-*.array_record"), SIZE)[0]


def test_conversion_of_jsonl_counts_a_broken_line(tmp_path):
  path = write_mixed_jsonl(tmp_path)
  report = convert.convert("llava", path, str(tmp_path / "out"), image_root=str(
      tmp_path / "img"), progress_every=None)
  assert (report.rows, report.written) == (8, 5)
  assert dict(report.skipped) == {"missing_image": 1, "missing_key": 1, "bad_row": 1}


# ---------------------------------------------------------------------------------- anyres
# LLaVA's mm_utils and llava_arch, written out (sizes (width, height), grids (width, height)).

def ref_select_best_resolution(original_size, possible_resolutions):
  original_width, original_height = original_size
  best_fit, max_effective, min_wasted = None, 0, float("inf")
  for width, height in possible_resolutions:
    scale = min(width / original_width, height / original_height)
    down_w, down_h = int(original_width * scale), int(original_height * scale)
    effective = min(down_w * down_h, original_width * original_height)
    wasted = width * height - effective
    if effective > max_effective or (effective == max_effective and wasted < min_wasted):
      max_effective, min_wasted, best_fit = effective, wasted, (width, height)
  return best_fit


def ref_process_anyres_image(image: Image.Image, pinpoints, patch_size: int) -> np.ndarray:
  """`"(1 + tiles) p p 3"`: the base view, then the tiles, as LLaVA's `process_anyres_image`
  makes them (before the processor's normalisation)."""
  target_w, target_h = ref_select_best_resolution(image.size, pinpoints)
  w, h = image.size
  if target_w / w < target_h / h:
    new_w, new_h = target_w, min(math.ceil(h * target_w / w), target_h)
  else:
    new_w, new_h = min(math.ceil(w * target_h / h), target_w), target_h
  canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
  canvas.paste(image.resize((new_w, new_h)), ((target_w - new_w) // 2, (target_h - new_h) // 2))
  patches = [canvas.crop((j, i, j + patch_size, i + patch_size))
             for i in range(0, target_h, patch_size) for j in range(0, target_w, patch_size)]
  views = [image.resize((patch_size, patch_size))] + patches
  return np.stack([np.asarray(v) for v in views])


def ref_unpad_image(tensor: np.ndarray, original_size) -> np.ndarray:
  """LLaVA's `unpad_image` on a `"c h w"` array, `original_size = (width, height)`."""
  original_width, original_height = original_size
  current_height, current_width = tensor.shape[1:]
  if original_width / original_height > current_width / current_height:
    new_height = int(original_height * (current_width / original_width))
    padding = (current_height - new_height) // 2
    return tensor[:, padding:current_height - padding, :]
  new_width = int(original_width * (current_height / original_height))
  padding = (current_width - new_width) // 2
  return tensor[:, :, padding:current_width - padding]


def ref_spatial_unpad(features: np.ndarray, original_size, pinpoints, image_size: int,
                      newline: np.ndarray) -> np.ndarray:
  """LLaVA's `prepare_inputs_labels_for_multimodal`, `mm_patch_merge_type="spatial_unpad"`,
  for one image's `"(1 + tiles) p d"` features."""
  base, rest = features[0], features[1:]
  side = math.isqrt(base.shape[0])
  grid_w, grid_h = (x // image_size
                    for x in ref_select_best_resolution(original_size, pinpoints))
  grid = rest.reshape(grid_h, grid_w, side, side, -1).transpose(4, 0, 2, 1, 3)
  grid = grid.reshape(grid.shape[0], grid_h * side, grid_w * side)
  grid = ref_unpad_image(grid, original_size)
  ends = np.broadcast_to(newline[:, None, None], (*grid.shape[:-1], 1))
  grid = np.concatenate([grid, ends], axis=-1)
  return np.concatenate([base, grid.reshape(grid.shape[0], -1).T], axis=0)


PINPOINTS = [(8, 16), (16, 8), (16, 16), (24, 8), (8, 24)]  # LLaVA's, scaled 336 -> 8
SIZES = [(30, 50), (50, 30), (40, 40), (100, 20), (20, 100), (9, 7), (7, 9), (33, 17), (5, 5),
         (147, 196), (196, 147), (64, 31), (13, 61)]


def test_select_best_resolution_is_llavas_and_transformers():
  from transformers.image_processing_utils import select_best_resolution as hf_select

  llava_pinpoints = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
  sizes = [(w, h) for w in range(40, 2100, 97) for h in range(40, 2100, 89)] + [
      (336, 336), (672, 672), (1, 1000), (1000, 1)]
  for pinpoints in (llava_pinpoints, PINPOINTS):
    for size in sizes:
      best = anyres.select_best_resolution(size, pinpoints)
      assert best == ref_select_best_resolution(size, pinpoints), size
      # transformers orders every size (height, width)
      assert hf_select(size[::-1], [p[::-1] for p in pinpoints]) == best[::-1], size
  # ties on effective resolution go to the least wasted area, then to the first listed
  assert anyres.select_best_resolution((10, 10), [(40, 20), (20, 20), (20, 40)]) == (20, 20)
  assert anyres.select_best_resolution((10, 10), [(40, 20), (20, 40)]) == (40, 20)


@pytest.mark.parametrize("size", SIZES)
def test_tiles_are_llavas_views(size):
  image = noise(size[1], size[0])
  base, tiles, grid = anyres.tiles(image, PINPOINTS, 8)
  reference = ref_process_anyres_image(Image.fromarray(image), PINPOINTS, 8)
  np.testing.assert_array_equal(np.concatenate([base[None], tiles]), reference)
  width, height = ref_select_best_resolution(size, PINPOINTS)
  assert grid == (height // 8, width // 8) == anyres.grid_shape(size, PINPOINTS, 8)
  padded = anyres.resize_and_pad(image, (width, height))
  assert padded.shape == (height, width, 3)


def test_tiles_match_transformers_image_processor():
  from transformers.models.llava_next import image_processing_pil_llava_next as hf

  processor = hf.LlavaNextImageProcessorPil(
      size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}, do_rescale=False,
      do_normalize=False, image_grid_pinpoints=[list(p[::-1]) for p in PINPOINTS])
  for size in SIZES[:6]:
    image = noise(size[1], size[0])
    base, tiles, _ = anyres.tiles(image, PINPOINTS, 8)
    theirs = processor(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_array_equal(np.concatenate([base[None], tiles]).transpose(0, 3, 1, 2),
                                  theirs)


@pytest.mark.parametrize("size", SIZES)
def test_packed_features_are_llavas_spatial_unpad(size):
  side, d = 2, 5  # 2 x 2 patch features per 8-pixel tile
  rows, cols = anyres.grid_shape(size, PINPOINTS, 8)
  features = RNG.normal(size=(1 + rows * cols, side * side, d)).astype(np.float32)
  newline = RNG.normal(size=d).astype(np.float32)
  packed = anyres.pack_anyres_features(jnp.asarray(features[0]), jnp.asarray(features[1:]),
                                       (rows, cols), size, jnp.asarray(newline))
  reference = ref_spatial_unpad(features, size, PINPOINTS, 8, newline)
  np.testing.assert_array_equal(np.asarray(packed), reference)
  assert packed.shape[0] == anyres.feature_length(size, PINPOINTS, 8, side)
  grid = RNG.normal(size=(rows * side, cols * side, d)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(anyres.unpad_features(jnp.asarray(grid), size)),
                                ref_unpad_image(grid.transpose(2, 0, 1), size).transpose(1, 2, 0))


def test_packed_features_match_transformers_llava_next():
  import torch
  from transformers.models.llava_next import modeling_llava_next as hf

  side, d = 2, 4
  model = types.SimpleNamespace(config=types.SimpleNamespace(
      vision_config=types.SimpleNamespace(image_size=8, patch_size=4),
      image_grid_pinpoints=[list(p[::-1]) for p in PINPOINTS]))
  newline = RNG.normal(size=d).astype(np.float32)
  checked = 0
  for size in SIZES:
    rows, cols = anyres.grid_shape(size, PINPOINTS, 8)
    assert hf.get_anyres_image_grid_shape(size[::-1], model.config.image_grid_pinpoints,
                                          8) == (rows, cols)
    features = RNG.normal(size=(1 + rows * cols, side * side, d)).astype(np.float32)
    ours = anyres.pack_anyres_features(jnp.asarray(features[0]), jnp.asarray(features[1:]),
                                       (rows, cols), size, jnp.asarray(newline))
    theirs, lengths = hf.LlavaNextModel.pack_image_features(
        model, [torch.from_numpy(features)], torch.tensor([size[::-1]]), "default",
        torch.from_numpy(newline))
    if size in ((147, 196), (196, 147)):  # see the next test
      assert int(lengths[0]) != ours.shape[0]
      continue
    np.testing.assert_array_equal(np.asarray(ours), theirs[0].numpy())
    checked += 1
  assert checked == len(SIZES) - 2


def test_unpadding_truncates_as_llava_does_not_as_transformers_rounds():
  """Where the scaled side is a float a hair below an integer, LLaVA's `int()` truncates
  it (one more padding row or column cut on each side) and transformers rounds it first;
  LLaVA-1.6's checkpoints were trained with LLaVA's."""
  import torch
  from transformers.models.llava_next.modeling_llava_next import unpad_image

  grid = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)  # "c h w": 2 x 2 tiles
  size = (147, 196)  # 4 * 147 / 196 = 2.9999999999999996
  ours = np.asarray(anyres.unpad_features(jnp.asarray(grid.transpose(1, 2, 0)), size))
  assert ours.shape[:2] == (4, 2)  # LLaVA: width int(2.99..) = 2, padding (4 - 2) // 2 = 1
  np.testing.assert_array_equal(ours.transpose(2, 0, 1), ref_unpad_image(grid, size))
  assert tuple(unpad_image(torch.from_numpy(grid), size[::-1]).shape[1:]) == (4, 4)
  for other in [(w, h) for w in range(3, 60, 4) for h in range(3, 60, 5)]:
    ours = anyres.unpad_features(jnp.asarray(grid.transpose(1, 2, 0)), other)
    theirs = unpad_image(torch.from_numpy(grid), other[::-1]).numpy()
    np.testing.assert_array_equal(np.asarray(ours).transpose(2, 0, 1), theirs)


def test_anyres_inputs_are_checked():
  with pytest.raises(ValueError, match="not a whole number of 8-pixel tiles"):
    anyres.grid_shape((10, 10), [(12, 12)], 8)
  with pytest.raises(ValueError, match="uint8 'h w 3'"):
    anyres.tiles(np.zeros((4, 4)), PINPOINTS, 8)
  with pytest.raises(ValueError, match="not 2 x 2 tiles"):
    anyres.pack_anyres_features(jnp.zeros((4, 3)), jnp.zeros((3, 4, 3)), (2, 2), (8, 8),
                                jnp.zeros(3))


def test_images_in_records_decode_from_bytes_like_files(tmp_path):
  buffer = io.BytesIO()
  Image.fromarray(noise(6, 12)).save(buffer, format="PNG")
  padded = sources.decode_image(buffer.getvalue(), SIZE, sources.CLIP_PAD_COLOUR)
  assert np.all(padded[:3] == sources.CLIP_PAD_COLOUR)
