"""Flamingo's defining behaviour: identity at zero gates, media masking, padding, decoding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ENDOFCHUNK, MEDIA, PAD, flamingo_config, random_gates
from mmjax.decoding import SamplingConfig
from mmjax.models.flamingo import Flamingo, FlamingoConfig, generate
from mmjax.models.lm import LanguageModel
from mmjax.models.xattn import (GatedCrossAttentionBlock, XAttnConfig, media_attention_mask,
                                media_index)

TOL = dict(atol=1e-5, rtol=1e-5)


def logits_fn(model):
  return jax.jit(lambda p, tokens, images, n: model.apply({"params": p}, tokens, images, n))


def test_zero_gates_give_exactly_the_plain_lm(toy_flamingo):
  model, _, tokens, images, num_images = toy_flamingo
  params = nn.unbox(jax.jit(model.init)(jax.random.key(3), tokens, images, num_images)["params"])
  flamingo_logits = logits_fn(model)(params, tokens, images, num_images)
  lm_params = {k: v for k, v in params["lm"].items() if not k.startswith("xattn_")}
  lm_logits = jax.jit(LanguageModel(model.config.lm).apply)({"params": lm_params}, tokens)
  assert any(k.startswith("xattn_") for k in params["lm"])
  np.testing.assert_array_equal(flamingo_logits, lm_logits)


def _changed_positions(model, params, tokens, images, num_images, row, image):
  """Positions whose logits, and whose first gated block's output, change with an image.

  The first gated block reads an image-independent input, so its output shows exactly
  which tokens the image reaches through cross-attention. Logits also change later on,
  through the LM's self-attention over earlier tokens (Flamingo's design).
  Unchanged positions must be bit-identical.
  """
  first_block = f"xattn_{model.config.xattn.layer_indices(model.config.lm.depth)[0]}"

  @jax.jit
  def run(images):
    logits, state = model.apply(
        {"params": params}, tokens, images, num_images, mutable=["intermediates"],
        capture_intermediates=lambda m, _: isinstance(m, GatedCrossAttentionBlock))
    return logits, state["intermediates"]["lm"][first_block]["__call__"][0]

  other = images.at[row, image].set(jax.random.normal(jax.random.key(9), images.shape[2:]))
  result = []
  for base, new in zip(run(images), run(other), strict=True):
    changed = np.abs(np.asarray(new - base)).max(axis=-1) > 1e-6
    for r in range(tokens.shape[0]):
      np.testing.assert_array_equal(new[r][~changed[r]], base[r][~changed[r]])
    result.append([tuple(int(i) for i in np.flatnonzero(c)) for c in changed])
  logits_changed, xattn_changed = result
  return xattn_changed, logits_changed


def test_media_attention_mask_rules():
  # <image> at 1 and 4 of 6 tokens; the second row has one real image of two.
  text_index = media_index(jnp.array([[5, MEDIA, 6, 7, MEDIA, 8]] * 2), MEDIA)
  np.testing.assert_array_equal(text_index[0], [0, 1, 1, 1, 2, 2])
  valid = jnp.array([[True, True], [True, False]])
  immediate = media_attention_mask(text_index, valid, only_immediate=True)
  np.testing.assert_array_equal(immediate[0], [[0, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1]])
  np.testing.assert_array_equal(immediate[1], [[0, 0], [1, 0], [1, 0], [1, 0], [0, 0], [0, 0]])
  every = media_attention_mask(text_index, valid, only_immediate=False)
  np.testing.assert_array_equal(every[0], [[0, 0], [1, 0], [1, 0], [1, 0], [1, 1], [1, 1]])
  np.testing.assert_array_equal(every[1], [[0, 0], [1, 0], [1, 0], [1, 0], [1, 0], [1, 0]])


def test_image_k_only_reaches_its_own_chunk(toy_flamingo):
  model, params, tokens, images, num_images = toy_flamingo
  # Row 0: tokens 0-1 precede any image, image 0 owns 2-5, image 1 owns 6-11.
  xattn, logits = _changed_positions(model, params, tokens, images, num_images, 0, 0)
  assert xattn == [tuple(range(2, 6)), ()]
  assert logits == [tuple(range(2, 12)), ()]  # 6+ see tokens 2-5 through self-attention
  xattn, logits = _changed_positions(model, params, tokens, images, num_images, 0, 1)
  assert xattn == [tuple(range(6, 12)), ()]
  assert logits == [tuple(range(6, 12)), ()]  # nothing before image 1's <image> changes


def test_attending_to_all_previous_images(toy_flamingo):
  _, params, tokens, images, num_images = toy_flamingo
  model = Flamingo(flamingo_config(only_immediate=False))
  xattn, _ = _changed_positions(model, params, tokens, images, num_images, 0, 0)
  assert xattn == [tuple(range(2, 12)), ()]
  xattn, _ = _changed_positions(model, params, tokens, images, num_images, 0, 1)
  assert xattn == [tuple(range(6, 12)), ()]


def test_padding_images_and_tokens_change_nothing(toy_flamingo):
  model, params, tokens, images, num_images = toy_flamingo
  fn = logits_fn(model)
  base = fn(params, tokens, images, num_images)
  # Row 1 has one real image: its padding image (index 1) is invisible.
  assert _changed_positions(model, params, tokens, images, num_images, 1, 1) == ([(), ()],) * 2
  # ... and the row equals a run with no padding image at all.
  alone = fn(params, tokens[1:], images[1:, :1], num_images[1:])
  np.testing.assert_allclose(alone[0], base[1], **TOL)
  # Row 1's padding tokens (positions 7+) may hold anything.
  noisy = tokens.at[1, 7:].set(jnp.array([MEDIA, 40, ENDOFCHUNK, MEDIA, 41]))
  np.testing.assert_array_equal(fn(params, noisy, images, num_images)[1, :7], base[1, :7])


def test_text_before_first_image_gets_no_gradient_from_images_and_no_nan(toy_flamingo):
  model, params, tokens, images, num_images = toy_flamingo

  def loss(images, params):
    logits = model.apply({"params": params}, tokens, images, num_images)
    return jnp.sum(logits[0, :2] ** 2)  # only the two tokens before row 0's first image

  image_grad, param_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(images, params)
  np.testing.assert_array_equal(image_grad, 0.0)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(param_grad))


def test_kv_cached_decoding_equals_full_forward(toy_flamingo):
  model, params, tokens, images, num_images = toy_flamingo
  full = logits_fn(model)(params, tokens, images, num_images)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  media = model.apply({"params": params}, images, method=Flamingo.encode_media)
  _, state = model.apply({"params": params}, tokens, media=media, num_images=num_images,
                         positions=positions, decode=True, mutable=["cache"])
  cache = jax.tree_util.tree_map(jnp.zeros_like, state["cache"])

  @jax.jit
  def step(cache, tokens, positions, media=None, num_images=None):
    logits, state = model.apply({"params": params, "cache": cache}, tokens, media=media,
                                num_images=num_images, positions=positions, decode=True,
                                mutable=["cache"])
    return logits, state["cache"]

  # Prefill up to the middle of row 0's first chunk; then one token at a time, crossing
  # an <image> token (position 6), without passing the media again.
  logits, cache = step(cache, tokens[:, :4], positions[:, :4], media, num_images)
  outs = [logits]
  for i in range(4, t):
    logits, cache = step(cache, tokens[:, i:i + 1], positions[:, i:i + 1])
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


def _greedy_reference(model, params, prompt, images, num_images, max_new, stop):
  """Token by token with the full forward pass: the slow, obviously-right decoder.

  The sequence is right-padded to a fixed length so that one compilation serves all steps.
  """
  width = len(prompt) + max_new
  forward = jax.jit(lambda seq: model.apply({"params": params}, seq, images[None],
                                            num_images[None])[0])
  seq = list(np.asarray(prompt))
  for _ in range(max_new):
    logits = forward(jnp.array([seq + [PAD] * (width - len(seq))]))
    seq.append(int(jnp.argmax(logits[len(seq) - 1])))
    if seq[-1] in stop:
      break
  return seq[len(prompt):]


def test_batched_greedy_generation_matches_full_forward_loop(toy_flamingo):
  model, params, _, images, num_images = toy_flamingo
  prompt = jnp.array([[5, MEDIA, 7, 8, ENDOFCHUNK, MEDIA, 9], [MEDIA, 13, PAD, PAD, PAD, PAD, PAD]])
  lengths = jnp.array([7, 2])
  out = generate(model, params, prompt, lengths, jax.random.key(0), images=images,
                 num_images=num_images, max_new_tokens=6, stop_ids=(ENDOFCHUNK, 3))
  for r in range(2):
    ref = _greedy_reference(model, params, prompt[r, :lengths[r]], images[r], num_images[r],
                            6, (ENDOFCHUNK, 3))
    n = int(out.lengths[r])
    assert list(np.asarray(out.tokens[r, :n])) == ref
    np.testing.assert_array_equal(out.tokens[r, n:], PAD)


def test_generation_stops_at_endofchunk_and_sampling_limits(toy_flamingo):
  model, params, _, images, num_images = toy_flamingo
  prompt = jnp.array([[MEDIA, 13, 14]] * 2)
  lengths = jnp.array([3, 3])
  greedy = generate(model, params, prompt, lengths, jax.random.key(0), images=images,
                    num_images=num_images, max_new_tokens=5)
  first = int(greedy.tokens[0, 0])
  # Make the greedy first token a stop token: rows end after one token.
  stopped = generate(model, params, prompt, lengths, jax.random.key(0), images=images,
                     num_images=num_images, max_new_tokens=5, stop_ids=(first,))
  np.testing.assert_array_equal(stopped.lengths[0], 1)
  # top_k=1 and a tiny top_p leave only the argmax: sampling equals greedy.
  for sampling in (SamplingConfig(temperature=1.5, top_k=1),
                   SamplingConfig(temperature=1.5, top_p=1e-6)):
    sampled = generate(model, params, prompt, lengths, jax.random.key(5), images=images,
                       num_images=num_images, max_new_tokens=5, sampling=sampling)
    np.testing.assert_array_equal(sampled.tokens, greedy.tokens)


@pytest.mark.parametrize("placement,every,expected", [
    ("openflamingo", 2, (1, 3)), ("idefics", 2, (0, 2)), ("openflamingo", 1, (0, 1, 2, 3)),
    ("openflamingo", 4, (3,)), ("idefics", 4, (0,))])
def test_xattn_placement_rules(placement, every, expected):
  assert XAttnConfig(every=every, placement=placement).layer_indices(4) == expected


def test_config_from_dict_and_errors():
  cfg = flamingo_config()
  as_dict = {k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in cfg.__dict__.items()}
  assert FlamingoConfig.from_dict(as_dict) == cfg
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['widht'\]"):
    FlamingoConfig.from_dict({**as_dict, "lm": {**as_dict["lm"], "widht": 3}})
  with pytest.raises(ValueError, match="outside the LM vocabulary"):
    FlamingoConfig.from_dict({**as_dict, "media_token_id": 64})
  with pytest.raises(ValueError, match="'b T F h w c'"):
    model = Flamingo(cfg)
    model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 2, 16, 16, 3)))


def test_every_parameter_carries_logical_axis_names(toy_flamingo):
  model, _, tokens, images, num_images = toy_flamingo
  boxed = jax.eval_shape(model.init, jax.random.key(0), tokens, images, num_images)["params"]
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  unnamed = [jax.tree_util.keystr(path) for path, leaf in leaves
             if not isinstance(leaf, nn.LogicallyPartitioned) or len(leaf.names) != leaf.value.ndim]
  assert len(leaves) > 50 and not unnamed


def test_bfloat16_compute_with_float32_params(toy_flamingo):
  import dataclasses
  model, params, tokens, images, num_images = toy_flamingo
  cfg = model.config
  bf16 = Flamingo(dataclasses.replace(
      cfg, vision=dataclasses.replace(cfg.vision, dtype="bfloat16"),
      resampler=dataclasses.replace(cfg.resampler, dtype="bfloat16"),
      lm=dataclasses.replace(cfg.lm, dtype="bfloat16")))
  logits32 = logits_fn(model)(params, tokens, images, num_images)
  logits16 = logits_fn(bf16)(params, tokens, images, num_images)
  assert logits16.dtype == jnp.bfloat16
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda p: p.dtype == jnp.float32, params))
  # bf16 keeps ~3 significant digits; the toy logits are O(1).
  np.testing.assert_allclose(logits16.astype(jnp.float32), logits32, atol=0.1)


@pytest.mark.parametrize("variant, total, blocks", [("3b", 3.2e9, 24), ("9b", 9.3e9, 8),
                                                    ("80b", 80e9, 12)])
def test_paper_variants_have_the_papers_shapes(variant, total, blocks):
  """Sizes of Flamingo-3B/9B/80B (Alayrac et al. 2022): totals within 10% (the vision
  tower is a ViT standing in for NFNet-F6), the resampler's 194M parameters within 5%."""
  from mmjax.configs import flamingo as recipe
  from mmjax.tasks import get_task
  config = recipe.get_config(variant)
  task = get_task("flamingo")
  args, kwargs = task.init_inputs(config)
  shapes = nn.unbox(jax.eval_shape(task.build_model(config).init, jax.random.key(0), *args,
                                   **kwargs)["params"])
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  assert count(shapes) == pytest.approx(total, rel=0.1)
  assert count(shapes["resampler"]) == pytest.approx(194e6, rel=0.05)
  # Scanned (the variants' default): count the blocks in the per-layer layout.
  from mmjax.checkpoints import flat_params, per_layer
  paths = per_layer(flat_params(shapes["lm"]), take=lambda value, i: value)
  assert "groups" in shapes["lm"]
  assert len({path.split("/")[0] for path in paths if path.startswith("xattn_")}) == blocks


@pytest.mark.parametrize("policy", ["minimal", "save_qkv_proj", "full"])
def test_remat_policies_keep_gradients_and_save_fewer_activations(toy_flamingo, policy):
  from mmjax.tasks import with_fields
  model, params, tokens, images, num_images = toy_flamingo
  rematted = Flamingo(with_fields(model.config, remat=policy))  # every sub-model

  def loss(m):
    return lambda p: jnp.sum(m.apply({"params": p}, tokens, images, num_images) ** 2)

  grads, remat_grads = jax.grad(loss(model))(params), jax.grad(loss(rematted))(params)
  # Recomputed activations may be fused differently: float32 noise, relative to the
  # largest gradient (~30).
  scale = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(grads))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale),
                         remat_grads, grads)
  # The residuals the backward pass keeps are the leaves of the VJP closure.
  saved = lambda m: sum(x.size for x in jax.tree_util.tree_leaves(jax.vjp(loss(m), params)[1]))
  assert saved(rematted) < saved(model)


@pytest.mark.parametrize("placement, every", [("openflamingo", 2), ("idefics", 3)])
def test_scanned_layers_compute_what_per_layer_layers_compute(toy_flamingo, placement, every):
  """Scanned ViT, resampler and LM (groups of `every` layers with their gated block, and
  with idefics/3 a 4th layer after the scan) against the per-layer model, with the same
  weights moved between layouts by `match_layout`; KV-cached generation included."""
  from mmjax.checkpoints import flat_params, match_layout, tree_params
  from mmjax.tasks import with_fields
  _, _, tokens, images, num_images = toy_flamingo
  model = Flamingo(flamingo_config(placement=placement, every=every))
  scanned = Flamingo(with_fields(model.config, scan_layers=True))
  params = random_gates(nn.unbox(jax.jit(model.init)(jax.random.key(4), tokens, images,
                                                     num_images)["params"]))
  target = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(4), tokens, images,
                                   num_images)["params"])
  moved, unused = match_layout(flat_params(params),
                               {k: v.shape for k, v in flat_params(target).items()})
  assert not unused and set(moved) == set(flat_params(target))
  assert "lm/groups/layers_0/attn/query/kernel" in moved and "vision/layers/mlp/up/bias" in moved
  scanned_params = tree_params(moved)

  np.testing.assert_allclose(logits_fn(scanned)(scanned_params, tokens, images, num_images),
                             logits_fn(model)(params, tokens, images, num_images), **TOL)
  back, _ = match_layout(moved, {k: v.shape for k, v in flat_params(params).items()})
  jax.tree_util.tree_map(np.testing.assert_array_equal, tree_params(back), params)

  prompt, lengths = jnp.array([[5, MEDIA, 7, 8], [MEDIA, 13, PAD, PAD]]), jnp.array([4, 2])
  run = lambda m, p: generate(m, p, prompt, lengths, jax.random.key(0), images=images,
                              num_images=num_images, max_new_tokens=5).tokens
  np.testing.assert_array_equal(run(scanned, scanned_params), run(model, params))


def test_a_scanned_plain_lm_matches_the_per_layer_lm():
  from conftest import LLAMA_LIKE
  from mmjax.checkpoints import flat_params, match_layout, tree_params
  import dataclasses
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, LLAMA_LIKE.vocab_size)
  model = LanguageModel(LLAMA_LIKE)
  scanned = LanguageModel(dataclasses.replace(LLAMA_LIKE, scan_layers=True, remat="full"))
  params = nn.unbox(model.init(jax.random.key(1), tokens)["params"])
  target = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(1), tokens)["params"])
  moved, _ = match_layout(flat_params(params), {k: v.shape for k, v in flat_params(target).items()})
  assert moved["layers/attn/query/kernel"].shape[0] == LLAMA_LIKE.depth
  np.testing.assert_allclose(scanned.apply({"params": tree_params(moved)}, tokens),
                             model.apply({"params": params}, tokens), **TOL)


def test_gated_block_feed_forward_width_can_be_set_directly():
  block = GatedCrossAttentionBlock(XAttnConfig(num_heads=2, head_dim=8, mlp_dim=44,
                                               gated_ff=True, activation="silu"))
  x, media = jnp.ones((1, 3, 32)), jnp.ones((1, 5, 16))
  params = nn.unbox(block.init(jax.random.key(0), x, media, jnp.ones((1, 3, 5), bool)))
  assert params["params"]["mlp"]["gate"]["kernel"].shape == (32, 44)
  assert XAttnConfig().ff_dim(32) == 128
