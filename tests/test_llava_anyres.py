"""LLaVA-1.6 anyres in mmjax's Llava: the batched packing against the one-image reference
(`anyres.pack_anyres_features`), rows of different grids batched together, and the logits
and image-token counts of transformers' LlavaNextForConditionalGeneration."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax import flops, summary
from mmjax.config import validate
from mmjax.convert import clip, common, llama
from mmjax.data import anyres, conversation, sources
from mmjax.data.pipeline import Dataset, make_dataset
from mmjax.data.sequences import SequenceSpec
from mmjax.data.tokenizer import Tokenizer
from mmjax.models.llava import Llava, LlavaConfig, generate
from mmjax.models.lm import LMConfig
from mmjax.models.vit import ViTConfig
from mmjax.tasks import llava as task

TILE = 28  # the vision tower's input side: 2 x 2 patches of 14
# LLaVA-1.6's grid, scaled from 336 to TILE pixels.
GRID = ((28, 56), (56, 28), (56, 56), (84, 28), (28, 84))
IMAGE_TOKEN = 99


def tiny_config(**kwargs) -> LlavaConfig:
  return LlavaConfig(
      vision=ViTConfig(image_size=TILE, patch_size=14, width=32, depth=3, num_heads=4,
                       mlp_dim=64, activation="quick_gelu", output_dim=None),
      lm=LMConfig(vocab_size=100, width=48, depth=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=96, activation="silu", gated_mlp=True, norm="rmsnorm",
                  norm_eps=1e-6, use_bias=False, position="rope", max_len=256,
                  tie_embeddings=False),
      image_token_id=IMAGE_TOKEN, anyres_grid=GRID, **kwargs)


def views(image: np.ndarray, count: int) -> tuple[np.ndarray, tuple[int, int]]:
  """`("count p p 3", (width, height))`: the base view and tiles, zero views after."""
  base, tiles, _ = anyres.tiles(image, GRID, TILE)
  out = np.zeros((count, TILE, TILE, 3), np.uint8)
  out[0], out[1:1 + len(tiles)] = base, tiles
  return out, (image.shape[1], image.shape[0])


# Sizes (width, height) with every grid of GRID among them, and unpadding of rows, of
# columns and of nothing; LLaVA's float unpadding and transformers' rounded one agree here.
SIZES = [(50, 30), (30, 50), (40, 40), (90, 25), (25, 90), (56, 28), (33, 70), (28, 28)]


def test_layout_matches_llavas_grid_and_feature_length():
  sizes = [(w, h) for w in range(1, 200, 3) for h in range(1, 200, 7)] + SIZES
  lay = anyres.layout(np.asarray(sizes), GRID, TILE, 2)
  for i, size in enumerate(sizes):
    assert (lay["rows"][i], lay["cols"][i]) == anyres.grid_shape(size, GRID, TILE), size
    assert lay["length"][i] == anyres.feature_length(size, GRID, TILE, 2), size
  assert anyres.layout(np.zeros((1, 2), int), GRID, TILE, 2)["length"].tolist() == [0]


def test_float_floor_is_pythons_int_of_a_float_product():
  rng = np.random.default_rng(0)
  mult, den = rng.integers(1, 4000, 20000), rng.integers(1, 4000, 20000)
  # Half of the cases with mult * num / den whole, where the float product can fall short.
  num = np.where(np.arange(20000) % 2, rng.integers(1, 4000, 20000),
                 den // np.gcd(den, mult) * rng.integers(1, 8, 20000))
  want = [int(m * (n / d)) for m, n, d in zip(mult.tolist(), num.tolist(), den.tolist(),
                                              strict=True)]
  assert np.any(np.asarray(want) != mult * num // den)  # the cases that matter are here
  np.testing.assert_array_equal(anyres.float_floor(mult, num, den), want)
  np.testing.assert_array_equal(
      jax.jit(lambda *a: anyres.float_floor(*a, xp=jnp))(mult[:2000], num[:2000], den[:2000]),
      want[:2000])


def test_packed_features_match_the_per_image_reference_and_rows_batch():
  cfg = tiny_config()
  model = Llava(cfg)
  v, n = cfg.anyres_views, cfg.anyres_max_features
  rng = np.random.default_rng(0)
  rows = [SIZES[:3], SIZES[3:5], SIZES[5:8]]  # rows of different grids and image counts
  images = np.zeros((len(rows), 3, v, TILE, TILE, 3), np.uint8)
  image_sizes = np.zeros((len(rows), 3, 2), np.int32)
  for r, row in enumerate(rows):
    for i, (w, h) in enumerate(row):
      images[r, i], image_sizes[r, i] = views(rng.integers(0, 256, (h, w, 3), np.uint8), v)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images,
                                        jnp.zeros((1, 4), jnp.int32),
                                        image_sizes=image_sizes)["params"])
  packed = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s,
                                               method=Llava.image_features))(
      params, images, image_sizes)
  assert packed.shape == (len(rows), 3 * n, cfg.lm.width)
  # Every view through the model's tower and projector, packed image by image.
  views_features = np.asarray(jax.jit(lambda p, x: model.apply(
      {"params": p}, x, method=lambda m, x: m.projector(m.vision(x, feature_layer=-2)
                                                        ["tokens"])))(
      params, images.reshape(-1, TILE, TILE, 3))).reshape(*images.shape[:3], 4, -1)
  newline = np.asarray(params["image_newline"])

  def one(r, i, size):
    grid = anyres.grid_shape(size, GRID, TILE)
    feats = views_features[r, i]
    return np.asarray(anyres.pack_anyres_features(
        feats[0], feats[1:1 + grid[0] * grid[1]], grid, size, newline))

  for r, row in enumerate(rows):
    want = np.concatenate([one(r, i, size) for i, size in enumerate(row)])
    got = np.asarray(packed[r])
    np.testing.assert_allclose(got[:len(want)], want, atol=1e-5)
    assert not got[len(want):].any()
    assert len(want) == cfg.anyres_lengths(image_sizes[r]).sum()


def hf_llava_next(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.LlavaNextConfig(
      vision_config=transformers.CLIPVisionConfig(
          image_size=TILE, patch_size=14, hidden_size=32, intermediate_size=64,
          num_hidden_layers=3, num_attention_heads=4, projection_dim=16),
      text_config=transformers.LlamaConfig(
          vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
          rms_norm_eps=1e-6),
      image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[list(p) for p in GRID],
      vision_feature_layer=-2, vision_feature_select_strategy="default")
  model = transformers.LlavaNextForConditionalGeneration(config).eval()
  with torch.no_grad():  # a newline far from zero, so that misplacing it shows
    model.model.image_newline.mul_(10)
  model.save_pretrained(tmp_path)
  return model


def mmjax_params(state: dict[str, np.ndarray], cfg: LlavaConfig) -> dict:
  """The tree `Llava(cfg).init` builds, filled from a LlavaNext state dict: the CLIP
  tower's layers that run (`mmjax.convert.clip`), the LLaMA (`mmjax.convert.llama`), the
  projector's `linear_{1,2}` as `linear_{0,1}` and `image_newline`."""
  vision = clip.vit_params(common.Reader(state, ("vision_tower.",)), cfg.vision, None)
  lm_state = {k.replace("language_model.model.", "model.").replace("language_model.", ""): v
              for k, v in state.items() if k.startswith("language_model.")}
  params = {
      "vision": vision, "lm": llama.params(lm_state, cfg.lm),
      "projector": {f"linear_{i}": {"kernel": state[f"multi_modal_projector.linear_{i + 1}"
                                                    ".weight"].T,
                                    "bias": state[f"multi_modal_projector.linear_{i + 1}.bias"]}
                    for i in range(2)},
      "image_newline": state["image_newline"]}
  shapes = nn.unbox(jax.eval_shape(Llava(cfg).init, jax.random.key(0),
                          jnp.zeros((1, 1, cfg.anyres_views, TILE, TILE, 3), jnp.uint8),
                          jnp.ones((1, 4), jnp.int32),
                          image_sizes=jnp.ones((1, 1, 2), jnp.int32))["params"])

  def pick(tree, want):  # the vision layers after the feature layer are not run
    if not isinstance(want, dict):
      assert np.shape(tree) == want.shape
      return jnp.asarray(tree)
    return {k: pick(tree[k], want[k]) for k in want}

  return pick(params, shapes)


def test_logits_and_image_token_counts_match_transformers_llava_next(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf = hf_llava_next(tmp_path)
  cfg = tiny_config(projector="mlp2x_gelu")
  params = mmjax_params(common.read_hf_weights(tmp_path), cfg)
  processor = transformers.LlavaNextImageProcessorPil(
      size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
      image_grid_pinpoints=[list(p) for p in GRID])
  rng = np.random.default_rng(1)
  v = cfg.anyres_views
  # Two rows with one image each, of different grids (1 x 2 tiles, 2 x 1), padded rows
  # and columns cut off; images' counts of tokens differ, so their prompts differ in length.
  pictures = [rng.integers(0, 256, (30, 50, 3), np.uint8),
              rng.integers(0, 256, (70, 33, 3), np.uint8)]
  inputs = processor(images=pictures, return_tensors="pt")
  pixels = inputs["pixel_values"].numpy()  # "b v c h w", zero views after each image's
  sizes_hw = inputs["image_sizes"].numpy()
  assert pixels.shape[1] == v
  lengths = cfg.anyres_lengths(sizes_hw[:, None, ::-1].copy())[:, 0]
  text = [3, 5, 7]
  t = int(lengths.max()) + 2 * len(text)
  tokens = np.zeros((2, t), np.int64)
  for r, n in enumerate(lengths):
    row = text[:2] + [IMAGE_TOKEN] * int(n) + text[2:]
    tokens[r, :len(row)] = row
    tokens[r, len(row):] = 11
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(tokens), pixel_values=inputs["pixel_values"],
              image_sizes=inputs["image_sizes"]).logits.numpy()
  model = Llava(cfg)
  images = jnp.asarray(pixels.transpose(0, 1, 3, 4, 2)[:, None])  # normalised floats
  image_sizes = jnp.asarray(sizes_hw[:, None, ::-1].copy())
  got = jax.jit(lambda p, x, t, s: model.apply({"params": p}, x, t, image_sizes=s))(
      params, images, jnp.asarray(tokens, jnp.int32), image_sizes)
  diff = np.abs(np.asarray(got) - want).max()
  print(f"max |logit difference| {diff:.2e}")
  assert diff < 1e-4, diff
  # transformers' processor expands each <image> to as many tokens.
  counter = transformers.LlavaNextProcessor.__new__(transformers.LlavaNextProcessor)
  counter.image_processor, counter.patch_size, counter.num_additional_image_tokens = (
      processor, 14, 0)
  assert [counter._get_number_of_features(int(h), int(w), TILE, TILE)
          for h, w in sizes_hw] == lengths.tolist()
  # Greedy decoding (the packing under `generate`'s jit) continues as transformers' argmax.
  prompt = jnp.asarray(tokens[:, :int(lengths.max()) + 3], jnp.int32)
  out = generate(model, params, images, prompt, jnp.asarray(lengths + 3, jnp.int32),
                 jax.random.key(0), max_new_tokens=1, image_sizes=image_sizes)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0],
                                want[np.arange(2), lengths + 2].argmax(-1))


def test_llava_json_anyres_documents_expand_each_image_to_its_own_count(tmp_path):
  rng = np.random.default_rng(2)
  pictures = {"a.png": rng.integers(0, 256, (30, 50, 3), np.uint8),
              "b.png": rng.integers(0, 256, (70, 33, 3), np.uint8)}
  for name, picture in pictures.items():
    Image.fromarray(picture).save(tmp_path / name)
  records = [
      {"id": "two", "image": ["a.png", "b.png"], "conversations": [
          {"from": "human", "value": "<image> and <image>: which is wider?"},
          {"from": "gpt", "value": "the first"}]},
      {"id": "text", "conversations": [{"from": "human", "value": "hi"},
                                       {"from": "gpt", "value": "hello"}]}]
  (tmp_path / "data.json").write_text(json.dumps(records))
  source = sources.LlavaJson(str(tmp_path / "data.json"), TILE,
                             image_aspect_ratio="anyres", grid_pinpoints=GRID)
  cfg = tiny_config()
  config = ml_collections.ConfigDict({"data": {
      "template": "vicuna_v1", "system": "", "image_tokens": 4, "image_size": TILE,
      "grid_pinpoints": GRID}})
  fmt = conversation.format_of(config)
  tokenizer = Tokenizer()
  built = [conversation.build_conversation(source[i], tokenizer, fmt, 160, 2,
                                          (TILE, TILE, 3))[0] for i in range(2)]
  two, text = built
  assert two["images"].shape == (2, cfg.anyres_views, TILE, TILE, 3)
  for i, picture in enumerate(pictures.values()):
    np.testing.assert_array_equal(two["images"][i], anyres.views(picture, GRID, TILE))
  assert two["image_sizes"].tolist() == [[50, 30], [33, 70]]
  assert not text["images"].any() and not text["image_sizes"].any()
  batch = {k: np.stack([b[k] for b in built]) for k in ("tokens", "image_sizes")}
  counts = np.sum(batch["tokens"] == tokenizer.media_id, axis=1)
  assert counts.tolist() == cfg.anyres_lengths(batch["image_sizes"]).sum(1).tolist()
  assert counts[0] == (anyres.feature_length((50, 30), GRID, TILE, 2)
                       + anyres.feature_length((33, 70), GRID, TILE, 2))
  # Batched by the pipeline: images "b m v p p 3" and image_sizes "b m 2".
  spec = SequenceSpec(seq_len=160, max_images=2, image_size=TILE, mode="conversation",
                      conversation=fmt)
  batch = next(iter(make_dataset([Dataset("llava", source)], tokenizer, spec, batch_size=4,
                                 seed=0)))
  assert batch["images"].shape == (4, 2, cfg.anyres_views, TILE, TILE, 3)
  assert batch["image_sizes"].shape == (4, 2, 2)
  counts = np.sum(batch["tokens"] == tokenizer.media_id, axis=1)
  assert counts.tolist() == cfg.anyres_lengths(batch["image_sizes"]).sum(1).tolist()
  # The prompt at inference counts alike.
  prompt = fmt.prompt([("user", "<image>\nwhat is it?")], tokenizer, [(50, 30)])
  assert prompt.count(tokenizer.media_id) == anyres.feature_length((50, 30), GRID, TILE, 2)


def test_llava_16_7b_shapes_views_and_flops():
  from mmjax.configs import llava as recipe  # the recipes' folder, importable in tests
  config = recipe.get_config("llava-1.6-7b")
  validate(config)
  assert task.check_config(config) == []
  model, inputs, _, _ = summary.model_and_inputs(config, jax.random.key(0))
  assert inputs[0].shape == (2, 1, 5, 336, 336, 3)
  assert int(np.sum(inputs[1][0] == model.config.image_token_id)) == 2928
  args, kwargs = task.init_inputs(config)  # as training initialises it
  assert args[0].shape == (1, 1, 5, 336, 336, 3) and kwargs["image_sizes"].shape == (1, 1, 2)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs)["params"])
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(shapes)))
  # llava-hf/llava-v1.6-vicuna-7b-hf: llava-1.5-7b's 7,063,427,072 and the 4096-wide
  # image_newline, less the vision layer and norm after the feature layer.
  assert count == 7_063_427_072 + 4_096 - 12_596_224 - 2_048
  def vision(c):
    return sum(f for p, f, _ in flops.components(c) if p.startswith("vision/"))

  assert vision(config) == 5 * vision(recipe.get_config("llava-1.5-7b"))
