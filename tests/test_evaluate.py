"""Few-shot evaluation: prompts, answer parsing, metrics, and a run on a toy model."""

import flax.linen as nn
import jax
import numpy as np

from mmjax.configs import clip as clip_recipe
from mmjax.configs import flamingo as flamingo_recipe
from mmjax.configs import lm as lm_recipe
from mmjax import evaluate
from mmjax.data import shapes_world as sw
from mmjax.data.tokenizer import Tokenizer
from mmjax.tasks import get_task

WORLD = sw.ShapesWorld(seed=0, image_size=32)


def test_naming_prompts_end_before_the_name_and_chance_is_support_guessing():
  prompts, chance = evaluate.naming_prompts(WORLD, shots=2, episodes=40)
  for p in prompts:
    assert p.text.endswith(f"{sw.MEDIA_TOKEN}this is a")
    assert p.text.count(sw.MEDIA_TOKEN) == len(p.images) == 3
    # Support chunks bind a colour to a name: "<image>this is a red dax.<|endofchunk|>".
    assert p.text.startswith(f"{sw.MEDIA_TOKEN}this is a ") and sw.ENDOFCHUNK_TOKEN in p.text
  # The query's colour and name are shown in the support whenever it shows that name.
  for p in prompts:
    if f" {p.answer}." in p.text:
      assert f" {p.colour} {p.answer}." in p.text
  with_colour, _ = evaluate.naming_prompts(WORLD, shots=2, episodes=5, with_colour=True)
  assert all(p.text.endswith(f"this is a {p.colour}") for p in with_colour)
  # With two support examples of two ways, the support shows one or both names.
  assert 0.5 <= chance <= 1.0
  assert evaluate.naming_prompts(WORLD, shots=0, episodes=5)[1] == 0.0


def test_vqa_and_caption_prompts_use_heldout_examples():
  for task in ("vqa", "captioning"):
    for p in evaluate.example_prompts(WORLD, shots=2, episodes=5, task=task):
      assert p.text.count(sw.MEDIA_TOKEN) == 3 == len(p.images)
      assert p.answer and p.answer not in ("", ".")
  vqa = evaluate.example_prompts(WORLD, shots=0, episodes=1, task="vqa")[0]
  assert vqa.text.startswith(sw.MEDIA_TOKEN + "question: ") and vqa.text.endswith("answer:")


def test_answers_are_parsed_and_captions_scored_by_attributes():
  tok = Tokenizer()
  ids = tok.encode(" red dax. this is<|endofchunk|><image>more")
  assert evaluate.answer_text(tok, np.array(ids), len(ids), "naming") == "red dax"
  assert evaluate.answer_text(tok, np.array(ids), len(ids), "vqa") == "red dax. this is"
  prompts = [evaluate.Prompt("", np.zeros((1, 2, 2, 3)), "dax", "red"),
             evaluate.Prompt("", np.zeros((1, 2, 2, 3)), "wug", "blue")]
  assert evaluate.naming_scores(["red dax", "red wug"], prompts) == {"accuracy": 1.0,
                                                                     "colour": 0.5}
  assert evaluate.naming_scores(["dax", ""], prompts) == {"accuracy": 0.5, "colour": 0.0}
  assert evaluate.attribute_recall("two large red crosses.", "two large red crosses.") == 1.0
  assert evaluate.attribute_recall("two small red squares.", "two large red crosses.") == 0.5
  assert evaluate.attribute_recall("a small red cross on the left.",
                                   "a small red cross in the centre.") == 1.0


def test_evaluation_runs_end_to_end_on_a_toy_model():
  config = flamingo_recipe.get_config()
  model_cfg = config.model.to_dict()
  model_cfg["vision"].update(image_size=32, patch_size=16, width=32, depth=1, num_heads=2)
  model_cfg["resampler"].update(depth=1, num_heads=2, head_dim=16, num_latents=2)
  model_cfg["lm"].update(width=32, depth=2, num_heads=2, max_len=128)
  model_cfg["xattn"].update(num_heads=2, head_dim=16)
  config.model = model_cfg
  config.data.image_size = 32
  config.evaluate.update(shots=(0, 1), episodes=3, max_new_tokens=4)
  task = get_task("flamingo")
  model = task.build_model(config)
  args, _ = task.init_inputs(config)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *args)["params"])
  results = evaluate.evaluate(config, params)
  assert set(results) == {"naming", "vqa", "captioning"} and set(results["naming"]) == {0, 1}
  assert results["naming"][0]["chance"] == 0.0
  table = evaluate.format_table(results)
  assert "0-shot" in table and "naming (in-context)" in table


def test_a_language_model_is_scored_on_recalling_names_from_prompt_text():
  config = lm_recipe.get_config()
  config.model.update(width=32, depth=1, num_heads=2)
  config.evaluate.update(shots=(0, 2), episodes=6)
  task = get_task("lm")
  args, _ = task.init_inputs(config)
  params = nn.unbox(jax.jit(task.build_model(config).init)(jax.random.key(0), *args)["params"])
  results = evaluate.evaluate(config, params)
  assert set(results) == {"naming"} and set(results["naming"]) == {0, 2}
  assert all(0.0 <= r["recall"] <= 1.0 for r in results["naming"].values())
  assert results["naming"][0]["chance"] == 0.0 < results["naming"][2]["chance"]
  assert "naming (text)" in evaluate.format_table(results)


def test_recipes_agree_on_the_backbone_shapes():
  """Flamingo's frozen towers must graft onto the CLIP and LM recipes' parameters."""
  flamingo = flamingo_recipe.get_config()
  shapes = {}
  for name, config in (("flamingo", flamingo), ("clip", clip_recipe.get_config()),
                       ("lm", lm_recipe.get_config())):
    task = get_task(config.task)
    args, _ = task.init_inputs(config)
    model = task.build_model(config)
    shapes[name] = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
  same = lambda a, b: jax.tree_util.tree_map(lambda x, y: x.shape == y.shape, a, b)
  assert all(jax.tree_util.tree_leaves(same(shapes["flamingo"]["vision"],
                                            shapes["clip"]["image"])))
  lm = {k: v for k, v in shapes["flamingo"]["lm"].items() if not k.startswith("xattn_")}
  assert all(jax.tree_util.tree_leaves(same(lm, shapes["lm"])))
  assert {target: init.recipe for target, init in flamingo.init.items()} == {
      "vision": "clip", "lm": "lm"}



def test_padded_prompts_and_images_give_the_answers_of_unpadded_ones():
  """Every cell of an evaluation is padded to one shape so that it compiles once; padding
  tokens and images must not change a single answer."""
  import dataclasses

  import jax.numpy as jnp
  from conftest import flamingo_config, random_gates

  from mmjax.models.flamingo import Flamingo
  tokenizer = Tokenizer()
  config = flamingo_config()
  model = Flamingo(dataclasses.replace(
      config, lm=dataclasses.replace(config.lm, vocab_size=tokenizer.vocab_size),
      media_token_id=tokenizer.media_id, endofchunk_token_id=tokenizer.endofchunk_id))
  images = jnp.zeros((1, 2, 1, 16, 16, 3), jnp.uint8)
  params = random_gates(nn.unbox(jax.jit(model.init)(
      jax.random.key(1), jnp.ones((1, 8), jnp.int32), images, jnp.ones((1,), jnp.int32)
  )["params"]))
  prompts = evaluate.example_prompts(sw.ShapesWorld(seed=0, image_size=16), shots=1,
                                     episodes=4, task="vqa")
  answer = evaluate.make_answer_fn(model, tokenizer, max_new_tokens=5)
  unpadded = answer(params, prompts, "vqa", 0, 2)
  assert unpadded == answer(params, prompts, "vqa", 40, 4)
  assert any(unpadded)  # a random model still says something
