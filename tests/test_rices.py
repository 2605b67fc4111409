"""RICES retrieves what a plain cosine top-k over the support set retrieves, most similar
last; its embedding cache is reused only for the same encoder and support images."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from mmjax.cli import UserError
from mmjax.evaluate import benchmarks, rices
from mmjax.models.lm import LMConfig
from mmjax.models.two_towers import TwoTowers, TwoTowersConfig
from mmjax.models.vit import ViTConfig


class CountingEncoder:
  """A fixed random linear map of the pixels, counting the images it encodes."""

  def __init__(self, seed=0, size=4, dim=6):
    self.projection = np.random.default_rng(seed).normal(size=(size * size * 3, dim))
    self.images = 0

  def __call__(self, images):
    self.images += len(images)
    return images.reshape(len(images), -1).astype(np.float64) / 255 @ self.projection


def random_images(n, seed=1, size=4):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8)


def indexed(images):
  """`(names, load)` of images named by their index."""
  return [str(i) for i in range(len(images))], lambda names: images[[int(n) for n in names]]


def naive_rices(support, queries, k):
  """Cosine top-k, most similar last, written out with numpy."""
  support = support / np.linalg.norm(support, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  order = np.argsort(-(queries @ support.T), axis=1, kind="stable")
  return order[:, :k][:, ::-1]


def test_find_is_cosine_top_k_with_the_most_similar_last():
  encoder, support, queries = CountingEncoder(), random_images(50), random_images(7, seed=2)
  retriever = rices.Rices(encoder, *indexed(support), batch_size=16)
  found = retriever.find(queries, 5)
  expected = naive_rices(encoder(support), encoder(queries), 5)
  np.testing.assert_array_equal(found, expected)
  assert found.shape == (7, 5) and found.dtype == np.int64
  similarity = retriever.embeddings[found] @ rices._normalise(encoder(queries))[:, :, None]
  assert (np.diff(similarity[..., 0], axis=1) >= 0).all()  # rising towards the query
  np.testing.assert_allclose(np.linalg.norm(retriever.embeddings, axis=1), 1, rtol=1e-6)
  assert retriever.find(queries, 0).shape == (7, 0)
  with pytest.raises(UserError, match="51 demonstrations asked for, but the support set has "
                     "50 examples"):
    retriever.find(queries, 51)


def test_examples_sharing_an_image_share_its_embedding():
  encoder, images = CountingEncoder(), random_images(3)
  names = ["0", "1", "0", "2", "1"]  # e.g. two questions about image 0
  retriever = rices.Rices(encoder, names, lambda n: images[[int(i) for i in n]])
  assert len(retriever) == 5 and retriever.embeddings.shape == (5, 6)
  assert encoder.images == 3  # each distinct image once
  np.testing.assert_array_equal(retriever.embeddings[0], retriever.embeddings[2])
  # Equally similar examples: the lower index ends nearer the query.
  np.testing.assert_array_equal(retriever.find(images[:1], 2), [[2, 0]])


def test_the_cache_is_reused_only_for_the_same_encoder_and_support(tmp_path):
  support = random_images(20)
  names, load = indexed(support)
  encoder = CountingEncoder()
  first = rices.Rices(encoder, names, load, cache_dir=tmp_path, model_key="clip-a")
  embeddings = first.embeddings
  assert encoder.images == 20 and first.cache_file.parent == tmp_path
  again = rices.Rices(encoder, names, load, cache_dir=tmp_path, model_key="clip-a")
  np.testing.assert_array_equal(again.embeddings, embeddings)
  assert encoder.images == 20  # read from the cache, nothing encoded

  other_model = rices.Rices(encoder, names, load, cache_dir=tmp_path, model_key="clip-b")
  other_model.embeddings
  assert encoder.images == 40
  other_support = rices.Rices(encoder, names[:-1], load, cache_dir=tmp_path,
                              model_key="clip-a")
  assert other_support.embeddings.shape == (19, 6) and encoder.images == 59
  assert len({r.cache_file for r in (first, other_model, other_support)}) == 3

  first.cache_file.write_bytes(b"damaged")
  recomputed = rices.Rices(encoder, names, load, cache_dir=tmp_path, model_key="clip-a")
  np.testing.assert_array_equal(recomputed.embeddings, embeddings)
  assert encoder.images == 79


def test_the_cache_needs_a_model_key(tmp_path):
  names, load = indexed(random_images(3))
  with pytest.raises(UserError, match="needs a model_key"):
    rices.Rices(CountingEncoder(), names, load, cache_dir=tmp_path)
  encoder = CountingEncoder()
  encoder.key = "from-the-encoder"
  assert rices.Rices(encoder, names, load, cache_dir=tmp_path).cache_file.name == \
      rices.cache_name("from-the-encoder", names)
  with pytest.raises(UserError, match="non-empty support set"):
    rices.Rices(encoder, [], load)


TINY_CLIP = TwoTowersConfig(
    vision=ViTConfig(image_size=16, patch_size=8, width=32, depth=2, num_heads=4, output_dim=16),
    text=LMConfig(vocab_size=64, width=32, depth=1, num_heads=4, max_len=8), embed_dim=16)


@pytest.fixture(scope="module")
def tiny_clip():
  model = TwoTowers(TINY_CLIP)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3), jnp.uint8),
                                        jnp.ones((1, 8), jnp.int32))["params"])
  return model, jax.tree_util.tree_map(np.asarray, params)


def test_clip_image_encoder_is_the_two_towers_image_embedding(tiny_clip):
  model, params = tiny_clip
  images = random_images(5, size=16)
  encoder = rices.clip_image_encoder(TINY_CLIP, params, batch_size=4)  # 4, then 1 padded
  expected = jax.jit(lambda p, x: model.apply({"params": p}, x, method=TwoTowers.encode_image))(
      params, images)
  np.testing.assert_allclose(encoder(images), expected, atol=1e-5)
  assert encoder.image_size == 16 and encoder(images[:0]).shape == (0, 16)

  run_config = {"task": "clip", "model": dataclasses.asdict(TINY_CLIP)}
  from_run = rices.clip_image_encoder(run_config, params, batch_size=4)
  assert from_run.key == encoder.key
  np.testing.assert_allclose(from_run(images), expected, atol=1e-5)
  assert rices.clip_image_encoder(TINY_CLIP.vision, params["image"]).key == encoder.key
  changed = jax.tree_util.tree_map(lambda x: x, params)
  changed["image"]["head"]["kernel"] = changed["image"]["head"]["kernel"] + 1e-3
  assert rices.clip_image_encoder(TINY_CLIP, changed).key != encoder.key


def test_clip_image_encoder_errors(tiny_clip):
  _, params = tiny_clip
  wider = dataclasses.replace(TINY_CLIP.vision, width=64)
  with pytest.raises(UserError, match=r"do not fit its config: .*is \(32,\), the config makes "
                     r"\(64,\)"):
    rices.clip_image_encoder(wider, params)
  with pytest.raises(UserError, match="task 'clip'"):
    rices.clip_image_encoder({"task": "lm", "model": {}}, params)


def test_retrieval_among_benchmark_examples_with_a_tiny_clip(tiny_clip, tmp_path):
  from mmjax.convert import common
  _, params = tiny_clip
  common.save(tmp_path / "clip", "clip", TINY_CLIP, params)
  encoder = rices.load_clip_image_encoder(tmp_path / "clip", batch_size=4)
  pictures = random_images(6, size=24)
  examples = []
  for i, picture in enumerate(pictures):
    Image.fromarray(picture).save(tmp_path / f"{i}.png")
    examples.append(benchmarks.Example(id=f"q{i}", image_path=str(tmp_path / f"{i}.png")))
  examples.append(dataclasses.replace(examples[3], id="q6"))  # a second question on image 3
  retriever = rices.Rices.for_examples(encoder, examples, encoder.image_size,
                                       cache_dir=tmp_path / "cache")
  queries = benchmarks.load_images([examples[3], examples[0]], 16)
  found = retriever.find(queries, 3)
  assert list(found[0, -2:]) == [6, 3] and found[1, -1] == 0  # the query's own image last
  distinct = encoder(benchmarks.load_images(examples[:6], 16))
  expected = naive_rices(distinct[[0, 1, 2, 3, 4, 5, 3]], encoder(queries), 3)
  np.testing.assert_array_equal(found, expected)
  assert retriever.cache_file.name.startswith("rices-") and retriever.cache_file.is_file()


def test_a_converted_transformers_clip_embeds_images_as_transformers_does(tmp_path):
  """uint8 pixels through the encoder = transformers' processor (no resizing: the images
  are already square) and its image features, L2-normalised."""
  torch = pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
  transformers = pytest.importorskip("transformers", reason="transformers is in the dev extra")
  from mmjax import convert
  torch.manual_seed(0)
  transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=16, pad_token_id=0,
                       bos_token_id=62, eos_token_id=63),
      vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4),
      projection_dim=16)).save_pretrained(tmp_path)
  model = transformers.CLIPModel.from_pretrained(tmp_path).eval()
  images = random_images(3, size=32)
  processor = transformers.CLIPImageProcessor(do_resize=False, do_center_crop=False)
  pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    expected = model.visual_projection(pooled).numpy()
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  encoder = rices.clip_image_encoder(*convert.convert_clip(tmp_path))
  np.testing.assert_allclose(encoder(images), expected, atol=1e-5)
