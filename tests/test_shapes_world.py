"""Shapes world: deterministic, faithful to its captions, and strict about held-out pairs."""

import numpy as np
import pytest

from mmjax.data import shapes_world as sw

WORLD = sw.ShapesWorld(seed=0, image_size=64)


def test_items_are_a_pure_function_of_seed_split_and_index():
  a, b = WORLD.example("train", 17), sw.ShapesWorld(seed=0).example("train", 17)
  np.testing.assert_array_equal(a.image, b.image)
  assert a.caption == b.caption and a.answer == b.answer
  assert WORLD.document("eval", 3)["text"] == WORLD.document("eval", 3)["text"]
  other = sw.ShapesWorld(seed=1).example("train", 17)
  assert not np.array_equal(a.image, other.image)


def test_heldout_pairs_never_reach_training():
  train = {(WORLD.example("train", i).scene.shape, WORLD.example("train", i).scene.colour)
           for i in range(400)}
  evals = {(WORLD.example("eval", i).scene.shape, WORLD.example("eval", i).scene.colour)
           for i in range(200)}
  assert train.isdisjoint(sw.HELDOUT_PAIRS) and evals == set(sw.HELDOUT_PAIRS)
  assert len(train) == len(sw.SHAPES) * len(sw.COLOURS) - len(sw.HELDOUT_PAIRS)
  # Every shape and every colour is still seen in training.
  assert {s for s, _ in train} == set(sw.SHAPES) and {c for _, c in train} == set(sw.COLOURS)


@pytest.mark.parametrize("index", range(8))
def test_images_show_what_captions_say(index):
  e = WORLD.example("train", index)
  colour = np.asarray(sw.COLOURS[e.scene.colour], np.float32)
  for y, x in e.scene.centres:
    assert np.abs(e.image[y, x].astype(np.float32) - colour).max() < 40
  object_pixels = (np.abs(e.image.astype(np.float32) - colour).max(-1) < 40).sum()
  one = sw.shape_mask(e.scene.shape, (32, 32), sw.SIZES[e.scene.size] * 64, 64).sum()
  assert abs(object_pixels - e.scene.count * one) <= 0.05 * e.scene.count * one
  assert e.scene.colour in e.caption and e.scene.size in e.caption
  assert e.scene.shape in e.caption and sw.COUNT_WORDS[e.scene.count] in e.caption + " one"


def test_naming_episodes_bind_names_to_colours_afresh():
  names_seen = set()
  for index in range(20):
    ep = WORLD.naming_episode("eval", index, shots=4, ways=2)
    assert len(ep.names) == 2 and ep.answer in ep.names.values()
    assert len(ep.support_images) == 4 and set(ep.support_names) <= set(ep.names.values())
    assert all(name in sw.NAME_POOLS[colour] for colour, name in ep.names.items())
    by_name = {name: colour for colour, name in ep.names.items()}
    assert ep.support_colours == tuple(by_name[n] for n in ep.support_names)
    assert ep.names[ep.query_colour] == ep.answer
    for image, name in zip(ep.support_images, ep.support_names, strict=True):
      rgb = np.asarray(sw.COLOURS[by_name[name]], np.float32)
      assert (np.abs(image.astype(np.float32) - rgb).max(-1) < 40).sum() > 20
    names_seen |= set(ep.names.values())
  assert len(names_seen) >= 15  # the binding is drawn per episode
  assert len(WORLD.naming_episode("eval", 0, shots=0).support_images) == 0


def test_documents_interleave_one_image_token_per_image():
  for index in range(30):
    doc = WORLD.document("train", index, max_images=4)
    n = len(doc["images"])
    assert 1 <= n <= 4 and doc["images"].dtype == np.uint8
    assert doc["text"].count(sw.MEDIA_TOKEN) == n == doc["text"].count(sw.ENDOFCHUNK_TOKEN)
    assert doc["text"].startswith(sw.MEDIA_TOKEN) and doc["text"].endswith(sw.ENDOFCHUNK_TOKEN)


def test_unknown_split_is_explained():
  with pytest.raises(ValueError, match="Unknown shapes-world split 'test'"):
    WORLD.example("test", 0)


def test_scenes_fit_small_images_and_impossible_ones_are_refused():
  """Placement restarts when its first objects leave no room for the rest."""
  world = sw.ShapesWorld(seed=0, image_size=8)
  for i in range(50):
    assert world.naming_episode("eval", i, shots=4).support_images.shape == (4, 8, 8, 3)
  with pytest.raises(ValueError, match="larger image_size"):
    sw.sample_scene(np.random.default_rng(0), 4, [("circle", "red")], max_count=3)
