"""Few-shot evaluation: prompts, answer parsing, metrics, and a run on a toy model."""

import flax.linen as nn
import jax
import numpy as np

from configs import clip as clip_recipe
from configs import flamingo as flamingo_recipe
from configs import lm as lm_recipe
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
  ids = tok.encode(" dax. this is<|endofchunk|><image>more")
  assert evaluate.answer_text(tok, np.array(ids), len(ids), "naming") == "dax"
  assert evaluate.answer_text(tok, np.array(ids), len(ids), "vqa") == "dax. this is"
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
  assert [i["recipe"] for i in flamingo.init] == ["clip", "lm"]
