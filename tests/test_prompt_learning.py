"""CoOp / CoCoOp: prompt assembly, context initialisation, what trains, CoCoOp's chunks,
the base-to-new protocol and a short recipe run, on toy shapes."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import checkpoints, train
from mmjax import config as config_lib
from mmjax.configs import coop as coop_recipe
from mmjax.data.pipeline import ShapesWorldClasses, base_new_split, few_shot_indices
from mmjax.data.shapes_world import CLASSES
from mmjax.data.tokenizer import Tokenizer
from mmjax.evaluate import prompt_learning as evaluation
from mmjax.models import prompt_learning
from mmjax.models.lm import LMConfig
from mmjax.models.prompt_learning import PromptLearnerConfig, prompt_layout
from mmjax.models.two_towers import TwoTowersConfig
from mmjax.models.vit import ViTConfig

IMAGE = 16
SEQ_LEN = 16
CLIP = TwoTowersConfig(
    vision=ViTConfig(image_size=IMAGE, patch_size=8, width=16, depth=1, num_heads=2,
                     output_dim=16),
    text=LMConfig(vocab_size=512, width=16, depth=1, num_heads=2, max_len=32),
    embed_dim=16)
NAMES = ("small red circle", "large blue square", "small green cross")
TOKENIZER = Tokenizer()


def make(**fields):
  cfg = PromptLearnerConfig(clip=CLIP, class_names=fields.pop("class_names", NAMES),
                            **{"n_ctx": 4, **fields})
  model = prompt_learning.build(cfg, TOKENIZER, SEQ_LEN)
  images = jax.random.randint(jax.random.key(1), (5, IMAGE, IMAGE, 3), 0, 256, jnp.int32)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), images[:1])["params"]))()
  return model, params, images.astype(jnp.uint8)


# Token positions written out: BOS 2, EOS 1, placeholder 9, name 10 11, "." 12, pad 0.
LAYOUTS = {
    "end": ([2, 9, 9, 9, 9, 10, 11, 12, 1, 0, 0, 0],
            [-1, 0, 1, 2, 3, -1, -1, -1, -1, -1, -1, -1]),
    "middle": ([2, 9, 9, 10, 11, 9, 9, 12, 1, 0, 0, 0],
               [-1, 0, 1, -1, -1, 2, 3, -1, -1, -1, -1, -1]),
    "front": ([2, 10, 11, 9, 9, 9, 9, 12, 1, 0, 0, 0],
              [-1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, -1]),
}


@pytest.mark.parametrize("position", sorted(LAYOUTS))
def test_prompt_layout(position):
  tokens, slots = prompt_layout([10, 11], [12], 4, position, bos_id=2, eos_id=1,
                                placeholder_id=9, pad_id=0, seq_len=12)
  np.testing.assert_array_equal(tokens, LAYOUTS[position][0])
  np.testing.assert_array_equal(slots, LAYOUTS[position][1])


@pytest.fixture(scope="module")
def coop():
  """A CoOp model, its parameters, images, and its logits for any prompts (one compile)."""
  model, params, images = make()
  logits = jax.jit(lambda p, tokens, slots: model.apply({"params": p}, images, tokens, slots))
  return model, params, images, logits


def hand_built_logits(params, images, ctx, position):
  """CLIP run on input embeddings laid out by hand: the token embeddings of BOS, name,
  "." and EOS around the context `"c n d"`, pooled at EOS."""
  table = np.asarray(params["clip"]["text"]["embed"]["embedding"])
  head = TOKENIZER.encode("X")
  dot = TOKENIZER.encode("X.")[len(head):]
  rows, tokens = [], []
  for c, name in enumerate(NAMES):
    name_ids = TOKENIZER.encode(f"X {name}.")[len(head):-len(dot)]
    named = [table[i] for i in name_ids]
    context = list(ctx[c])
    body = {"end": context + named, "middle": context[:2] + named + context[2:],
            "front": named + context}[position]
    seq = [table[TOKENIZER.bos_id], *body, *(table[i] for i in dot), table[TOKENIZER.eos_id]]
    ids = [TOKENIZER.bos_id] + [9] * (len(seq) - 2) + [TOKENIZER.eos_id]  # pooled at EOS
    pad = SEQ_LEN - len(seq)
    rows.append(np.concatenate([np.stack(seq), np.zeros((pad, table.shape[1]))]))
    tokens.append(ids + [TOKENIZER.pad_id] * pad)
  clip = prompt_learning.TwoTowers(CLIP)
  text = clip.apply({"params": params["clip"]}, jnp.asarray(tokens),
                    embeddings=jnp.asarray(np.stack(rows), jnp.float32),
                    method=prompt_learning.TwoTowers.encode_text)
  image = clip.apply({"params": params["clip"]}, images,
                     method=prompt_learning.TwoTowers.encode_image)
  return np.exp(params["clip"]["log_scale"]) * image @ text.T


@pytest.mark.parametrize("position", sorted(LAYOUTS))
def test_logits_against_hand_built_prompts(coop, position):
  _, params, images, logits = coop
  tokens, slots = prompt_learning.class_prompts(TOKENIZER, NAMES, 4, position, SEQ_LEN)
  ctx = np.broadcast_to(params["ctx"], (len(NAMES), *params["ctx"].shape))
  np.testing.assert_allclose(logits(params, tokens, slots),
                             hand_built_logits(params, images, ctx, position),
                             atol=1e-4, rtol=1e-4)


def test_class_specific_context_against_hand_built_prompts():
  model, params, images = make(class_position="middle", class_specific=True)
  assert params["ctx"].shape == (len(NAMES), 4, CLIP.text.width)
  np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, images),
                             hand_built_logits(params, images, params["ctx"], "middle"),
                             atol=1e-4, rtol=1e-4)


def test_phrase_init_is_the_phrase_embedding_and_sets_n_ctx():
  phrase = "a photo of a"
  ids = TOKENIZER.encode(phrase)
  model, params, _ = make(ctx_init=phrase, n_ctx=16, class_specific=True)
  assert model.n_ctx == len(ids) != 16
  assert params["ctx"].shape == (len(ids), CLIP.text.width)  # shared: CSC is ignored
  # A backbone loaded after init (the trainer's order): the context is its embeddings.
  loaded = jax.tree_util.tree_map(lambda x: x + 1.0, params["clip"])
  context = model.apply({"params": {**params, "clip": loaded}}, method="context")
  np.testing.assert_array_equal(context, loaded["text"]["embed"]["embedding"][np.array(ids)])
  # and the prompts hold len(ids) context slots
  assert (np.array(model.class_slots) >= 0).sum(axis=1).tolist() == [len(ids)] * len(NAMES)


def tiny_config(variant: str, steps: int = 3):
  config = coop_recipe.get_config(variant)
  config.model.n_ctx = 4
  config.model.clip = dataclasses.asdict(CLIP)
  config.data.image_size = IMAGE
  config.data.seq_len = SEQ_LEN
  config.data.batch_size = 8  # the tests simulate 8 devices
  for entry in (*config.data.datasets.values(), *config.data.eval_datasets.values()):
    entry.source.image_size = IMAGE
  config.data.datasets.shots.source.shots = 1
  config.data.datasets.shots.source.pool = 600
  config.data.eval_datasets.base_eval.source.size = 8
  config.init.clip.steps = 0
  config.train.steps = steps
  config.train.log_every = steps
  config.train.checkpoint_every = steps
  config.train.eval_every = steps
  config.train.eval_batches = 1
  config.evaluate.episodes = 8
  return config


@pytest.mark.parametrize("variant", coop_recipe.VARIANTS)
def test_recipe_variants_are_valid_and_name_mismatched_classes(variant):
  config = coop_recipe.get_config(variant)
  assert config_lib.problems(config, num_devices=8) == []
  config.data.datasets.shots.source.classes = "new"  # the model names the base classes
  found = config_lib.problems(config, num_devices=8)
  assert len(found) == 1 and "config.data.datasets.shots.source.classes='new'" in found[0]


@pytest.mark.parametrize("variant,trained", [
    ("coop", {"ctx"}),
    ("cocoop", {"ctx", "meta_net/linear1/bias", "meta_net/linear1/kernel",
                "meta_net/linear2/bias", "meta_net/linear2/kernel"})])
def test_only_context_and_meta_net_train(variant, trained):
  parts = train.build(tiny_config(variant))
  assert set(checkpoints.flat_params(parts.abstract["params"])) == trained
  frozen = checkpoints.flat_params(parts.abstract["frozen"])
  assert frozen and all(k.startswith("clip/") for k in frozen)
  # Adam's moments exist for the trained parameters only.
  sizes = {x.size for x in jax.tree_util.tree_leaves(parts.abstract["opt_state"]) if x.ndim}
  assert sizes <= {x.size for x in jax.tree_util.tree_leaves(parts.abstract["params"])}


@pytest.fixture(scope="module")
def cocoop(coop):
  """A CoCoOp model on the CoOp fixture's CLIP and context."""
  model, params, _ = make(meta_net=True)
  return model, {**params, "clip": coop[1]["clip"], "ctx": coop[1]["ctx"]}


def test_cocoop_with_zero_shift_is_coop(coop, cocoop):
  _, params, images, coop_logits = coop
  model, cparams = cocoop
  expected = coop_logits(params, *map(jnp.asarray, (model.class_tokens, model.class_slots)))
  apply = jax.jit(model.apply)
  zero = jax.tree_util.tree_map(jnp.zeros_like, cparams["meta_net"]["linear2"])
  zeroed = {**cparams, "meta_net": {**cparams["meta_net"], "linear2": zero}}
  np.testing.assert_allclose(apply({"params": zeroed}, images), expected, atol=1e-5)
  # (A shift equal in every dimension would vanish in the tower's LayerNorms.)
  bias = jax.random.normal(jax.random.key(2), zero["bias"].shape)
  shifted = {**cparams, "meta_net": {**cparams["meta_net"], "linear2": {**zero, "bias": bias}}}
  assert not np.allclose(apply({"params": shifted}, images), expected, atol=1e-3)


def test_chunked_cocoop_equals_unchunked(coop, cocoop):
  images = coop[2]
  whole, params = cocoop
  chunked = whole.clone(config=dataclasses.replace(whole.config, image_chunk=2))  # 5 images
  labels = jnp.array([0, 1, 2, 0, 1])

  def loss(model, p):
    logits = model.apply({"params": {**params, **p}}, images)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(5), labels]), logits

  trained = {"ctx": params["ctx"], "meta_net": params["meta_net"]}
  grad = lambda model: jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))
  (_, logits1), g1 = grad(whole)(trained)
  (_, logits2), g2 = grad(chunked)(trained)
  np.testing.assert_allclose(logits2, logits1, atol=1e-5)
  assert logits1.shape == (5, len(NAMES))
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_base_new_split_and_relabelling():
  assert base_new_split([7, 3, 9, 1, 3, 5, 8]) == ((1, 3, 5), (7, 8, 9))  # 6 labels
  assert base_new_split([4, 0, 2, 1, 3]) == ((0, 1, 2), (3, 4))  # ceil(5 / 2) base
  base = ShapesWorldClasses(split="eval", classes="base", size=20, image_size=IMAGE)
  new = ShapesWorldClasses(split="eval", classes="new", size=20, image_size=IMAGE)
  assert base.class_names() == CLASSES[:30] and new.class_names() == CLASSES[30:]
  for source, offset in ((base, 0), (new, 30)):
    for i in range(len(source)):
      item = source[i]
      assert 0 <= item["label"] < 30
      assert CLASSES[offset + item["label"]] in item["text"]
  assert len(base) == len(new) == 20
  assert evaluation.harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)


def test_few_shot_draws_are_deterministic_per_seed():
  labels = np.random.default_rng(0).integers(0, 4, size=200)
  draws = {seed: few_shot_indices(labels, (1, 3), 5, seed) for seed in (1, 2, 3)}
  assert draws[1] == few_shot_indices(labels, (1, 3), 5, 1)
  assert len({tuple(d) for d in draws.values()}) == 3
  for draw in draws.values():
    assert labels[draw].tolist() == [1] * 5 + [3] * 5 and len(set(draw)) == 10
  source = lambda seed: ShapesWorldClasses(classes="new", shots=2, shots_seed=seed,
                                           pool=400, image_size=IMAGE)
  a, b = source(1), source(2)
  assert a._items == source(1)._items != b._items
  assert sorted(label for _, label in a._items) == sorted(list(range(30)) * 2)


def test_recipe_runs_and_evaluates(tmp_path):
  config = tiny_config("coop", steps=2)
  config.train.eval_every = 0
  metrics = train.run(config, tmp_path)
  assert np.isfinite(metrics["loss"])
  params = checkpoints.load_params(tmp_path)
  assert set(params) == {"clip", "ctx"}
  scores = evaluation.base_to_new(train.build(config).model, params, TOKENIZER, SEQ_LEN,
                                  size=8, image_size=IMAGE)
  assert set(scores) == {"base", "new", "h"}
  assert all(0 <= v <= 1 for v in scores.values())
  # The evaluation at the end of training, and `python -m mmjax.evaluate`, report them.
  from mmjax.evaluate import evaluate_workdir
  final = json.loads((tmp_path / "eval.json").read_text())["scores"]["base_to_new"]["0"]
  again = evaluate_workdir(tmp_path, progress=False).scores["base_to_new"][0]
  assert final == pytest.approx(scores) and again == pytest.approx(scores)
