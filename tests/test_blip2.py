"""BLIP-2: the Q-Former's masks (what each position sees), its grafting from BERT, the
stage-1 losses against naive references, stage-2 decoding, and the recipe's checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import checkpoints
from mmjax.models.bert import Bert, BertConfig
from mmjax.models.blip2 import Blip2, Blip2Config, generate
from mmjax.models.lm import LMConfig
from mmjax.models.qformer import QFormer, QFormerConfig, attention_mask
from mmjax.models.t5 import T5, T5Config
from mmjax.models.vit import ViTConfig
from mmjax.tasks import blip2 as task

VOCAB, DEC = 40, 40
VISION = ViTConfig(image_size=16, patch_size=8, width=24, depth=1, num_heads=2,
                   output_dim=None, keep_class_token=True, token_norm=True)
QFORMER = QFormerConfig(vocab_size=VOCAB + 1, width=32, depth=3, num_heads=4, num_queries=4,
                        encoder_width=24, max_len=16)
LM = LMConfig(vocab_size=VOCAB, width=16, depth=2, num_heads=2, max_len=64)


def _model(lm=None, t5=None):
  model = Blip2(Blip2Config(VISION, QFORMER, dec_token_id=DEC, lm=lm, t5=t5, embed_dim=8))
  images = jax.random.randint(jax.random.key(1), (4, 16, 16, 3), 0, 255).astype(jnp.uint8)
  tokens = jax.random.randint(jax.random.key(2), (4, 7), 3, VOCAB)
  tokens = tokens.at[:, 0].set(2).at[1, 5:].set(0)  # [CLS]-first, row 1 padded
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens)["params"])
  return model, params, images, tokens


@pytest.fixture(scope="module")
def stage1():
  return _model()


@pytest.fixture(scope="module")
def qformer():
  model = QFormer(QFORMER)
  image = jax.random.normal(jax.random.key(3), (2, 5, 24))
  tokens = jax.random.randint(jax.random.key(4), (2, 6), 1, VOCAB)
  params = jax.jit(model.init)(jax.random.key(0), image, tokens)["params"]
  return model, params, image, tokens


def test_each_mask_lets_each_position_see_what_the_paper_says():
  q, valid = 2, jnp.array([[True, True, False]])  # 2 queries, 2 real tokens and a pad
  sees = lambda kind: np.asarray(attention_mask(kind, q, valid)[0, 0]).astype(int)
  # Rows attend to columns; order [q0 q1 t0 t1 pad].
  np.testing.assert_array_equal(sees("unimodal"), [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0],
                                                   [0, 0, 1, 1, 0], [0, 0, 1, 1, 0],
                                                   [0, 0, 1, 1, 0]])
  np.testing.assert_array_equal(sees("bidirectional"), [[1, 1, 1, 1, 0]] * 5)
  np.testing.assert_array_equal(sees("causal"), [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0],
                                                 [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                                                 [1, 1, 1, 1, 0]])
  with pytest.raises(ValueError, match="Unknown Q-Former mask 'causl'"):
    attention_mask("causl", q, valid)


def test_under_the_itc_mask_query_outputs_do_not_move_when_the_text_changes(qformer):
  model, params, image, tokens = qformer
  other = jnp.roll(tokens, 1, axis=1).at[:, 2].set(7)
  run = lambda t, kind: model.apply({"params": params}, image, t, mask=kind)
  np.testing.assert_array_equal(run(tokens, "unimodal")["queries"],
                                run(other, "unimodal")["queries"])
  np.testing.assert_array_equal(run(tokens, "causal")["queries"],
                                run(other, "causal")["queries"])
  # ...while under the ITM mask they read the text.
  assert not np.allclose(run(tokens, "bidirectional")["queries"],
                         run(other, "bidirectional")["queries"], atol=1e-3)


def test_one_unimodal_pass_equals_separate_query_and_text_passes(qformer):
  model, params, image, tokens = qformer
  joint = model.apply({"params": params}, image, tokens, mask="unimodal")
  queries = model.apply({"params": params}, image)["queries"]
  text = model.apply({"params": params}, None, tokens)["text"]
  np.testing.assert_allclose(joint["queries"], queries, atol=1e-5)
  np.testing.assert_allclose(joint["text"], text, atol=1e-5)


def test_causal_text_outputs_see_no_later_text(qformer):
  model, params, image, tokens = qformer
  run = lambda t: model.apply({"params": params}, image, t, mask="causal")["text"]
  changed = tokens.at[:, 4].set((tokens[:, 4] + 1) % VOCAB)
  np.testing.assert_array_equal(run(tokens)[:, :4], run(changed)[:, :4])
  assert not np.allclose(run(tokens)[:, 4:], run(changed)[:, 4:], atol=1e-3)


def test_the_queries_alone_build_only_the_query_parameters():
  image = jnp.zeros((1, 5, 24))
  params = QFormer(QFORMER).init(jax.random.key(0), image)["params"]
  assert sorted(params) == ["embed_norm", "layers_0", "layers_1", "layers_2", "queries"]
  assert sorted(params["layers_0"]) == ["attn", "attn_norm", "mlp_query", "mlp_query_norm",
                                        "xattn", "xattn_norm"]
  assert "xattn" not in params["layers_1"]  # cross-attention on every 2nd layer only


def test_a_grafted_bert_gives_the_qformer_its_text_encoder():
  """A BERT grafted as the recipe's `config.init.qformer` does (token types and pooler
  dropped, then `initial_params`): with BERT's token-type embedding at zero (the Q-Former
  has none), the Q-Former's text pass is the BERT's; the query feed-forwards start as the
  text ones; [DEC]'s row and the cross-attention stay new."""
  bert = Bert(BertConfig(vocab_size=VOCAB, width=32, depth=3, num_heads=4, max_len=16))
  tokens = jax.random.randint(jax.random.key(5), (2, 6), 1, VOCAB)
  bert_params = nn.unbox(bert.init(jax.random.key(1), tokens)["params"])
  bert_params["token_types"]["embedding"] = jnp.zeros_like(
      bert_params["token_types"]["embedding"])
  model = QFormer(QFORMER)
  initial = nn.unbox(model.init(jax.random.key(0), jnp.zeros((2, 5, 24)), tokens)["params"])
  source = {k: v for k, v in bert_params.items() if k not in ("token_types", "pooler")}
  grafted = checkpoints.graft({"qformer": initial}, "qformer", source,
                              may_stay_new=r"^qformer/")["qformer"]
  grafted = task.initial_params({"qformer": grafted})["qformer"]
  np.testing.assert_allclose(model.apply({"params": grafted}, None, tokens)["text"],
                             bert.apply({"params": bert_params}, tokens)["hidden"], atol=1e-5)
  np.testing.assert_array_equal(grafted["layers_1"]["mlp_query"]["up"]["kernel"],
                                bert_params["layers_1"]["mlp"]["up"]["kernel"])
  np.testing.assert_array_equal(grafted["layers_0"]["xattn"]["query"]["kernel"],
                                initial["layers_0"]["xattn"]["query"]["kernel"])
  assert grafted["embed"]["embedding"].shape[0] == VOCAB + 1  # [DEC] added
  # Query feed-forwards that came from a pretrained BLIP-2 are kept.
  kept = task.initial_params({"qformer": initial}, {"qformer/layers_0/mlp_query/up/kernel"})
  np.testing.assert_array_equal(kept["qformer"]["layers_0"]["mlp_query"]["up"]["kernel"],
                                initial["layers_0"]["mlp_query"]["up"]["kernel"])
  assert not np.array_equal(kept["qformer"]["layers_1"]["mlp_query"]["up"]["kernel"],
                            initial["layers_1"]["mlp_query"]["up"]["kernel"])


def test_an_image_width_the_cross_attention_cannot_read_is_refused_naming_both():
  with pytest.raises(ValueError, match=r"24 wide.*encoder_width=32.*set it to 24"):
    Blip2Config(VISION, QFormerConfig(vocab_size=41, width=32, depth=1, num_heads=4,
                                      encoder_width=32), dec_token_id=DEC)
  with pytest.raises(ValueError, match="30 wide but the cross-attention reads "
                                       "encoder_width=24"):
    QFormer(QFORMER).init(jax.random.key(0), jnp.zeros((1, 5, 30)))


def test_itc_is_the_label_smoothed_contrastive_loss_over_the_best_query():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(3, 4, 5)).astype(np.float32)
  text = rng.normal(size=(3, 5)).astype(np.float32)
  loss, sim = task.contrastive_loss(jnp.asarray(image), jnp.asarray(text), jnp.float32(0.5))

  def smoothed_ce(row, label, eps=0.1):
    logp = row - np.log(np.sum(np.exp(row)))
    return -((1 - eps) * logp[label] + eps * np.mean(logp))

  naive_sim = np.array([[max(image[i, q] @ text[j] for q in range(4)) for j in range(3)]
                        for i in range(3)]) / 0.5
  naive = np.mean([(smoothed_ce(naive_sim[i], i) + smoothed_ce(naive_sim[:, i], i)) / 2
                   for i in range(3)])
  np.testing.assert_allclose(sim, naive_sim, rtol=1e-5)
  np.testing.assert_allclose(loss, naive, rtol=1e-5)


def test_hard_negatives_follow_the_similarities_and_never_pick_the_positive():
  sim = jnp.array([[5.0, 4.0, -9.0], [0.0, 5.0, 0.0], [-9.0, 15.0, 5.0]])
  draws = [task.hard_negatives(sim, jax.random.key(i)) for i in range(200)]
  texts = np.array([d[0] for d in draws])
  images = np.array([d[1] for d in draws])
  assert not np.any(texts == np.arange(3)) and not np.any(images == np.arange(3))
  assert np.mean(texts[:, 0] == 1) > 0.99  # image 0's hardest other text: 1 (4 vs -9)
  assert np.mean(images[:, 1] == 2) > 0.99  # text 1's hardest other image: 2 (15 vs 4)
  # Without gradient: the draw is a constant of the similarities.
  grad = jax.grad(lambda s: jnp.sum(task.hard_negatives(s, jax.random.key(0))[0]
                                    .astype(jnp.float32)))(sim)
  np.testing.assert_array_equal(grad, 0)


def test_a_batch_of_one_has_no_negative_and_fails_with_a_message():
  with pytest.raises(ValueError, match="batch of 1 has none"):
    task.hard_negatives(jnp.ones((1, 1)), jax.random.key(0))


def test_itm_pairs_positives_with_one_negative_text_and_one_negative_image(stage1):
  model, params, images, tokens = stage1
  seen = {}

  def matching(image, t, valid):
    seen["image"], seen["tokens"] = image, t
    return jnp.zeros((image.shape[0], 2))

  sim = jnp.eye(4) * -5.0 + jnp.arange(16.0).reshape(4, 4) / 10
  image = jnp.arange(4.0)[:, None, None] * jnp.ones((4, 2, 3))
  loss = task.matching_loss(matching, image, tokens, tokens != 0, sim, jax.random.key(0))
  np.testing.assert_allclose(loss, np.log(2), rtol=1e-6)  # uniform logits
  negative_text, negative_image = task.hard_negatives(sim, jax.random.key(0))
  np.testing.assert_array_equal(seen["image"][:, 0, 0],
                                np.concatenate([np.arange(4), negative_image, np.arange(4)]))
  np.testing.assert_array_equal(seen["tokens"], np.concatenate(
      [tokens, tokens, tokens[negative_text]]))


def test_the_stage1_loss_is_the_sum_of_its_three_terms_and_itg_is_smoothed_after_dec(stage1):
  model, params, images, tokens = stage1
  total, count, terms = jax.jit(lambda p: task.loss_terms(
      model, p, {"image": images, "tokens": tokens}, jax.random.key(0)))(params)
  np.testing.assert_allclose(total / count, terms["itc"] + terms["itm"] + terms["itg"],
                             rtol=1e-6)
  # ITG: the text after [DEC], label-smoothed, padding excluded.
  logits = model.apply({"params": params}, model.apply({"params": params}, images,
                                                       method=Blip2.image_features),
                       tokens, tokens != 0, method=Blip2.captioning)
  logp = jax.nn.log_softmax(logits[:, :-1])
  targets, valid = tokens[:, 1:], tokens[:, 1:] != 0
  ce = -(0.9 * jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
         + 0.1 * jnp.mean(logp, -1))
  np.testing.assert_allclose(terms["itg"], jnp.sum(ce * valid) / jnp.sum(valid), rtol=1e-5)
  # [DEC] replaces the first token for captioning only.
  changed = tokens.at[:, 0].set(5)
  np.testing.assert_array_equal(
      logits, model.apply({"params": params}, model.apply(
          {"params": params}, images, method=Blip2.image_features), changed, changed != 0,
          method=Blip2.captioning))


def test_stage2_decoding_with_the_cache_equals_the_full_forward():
  model, params, images, tokens = _model(LM)
  assert "temp" not in params and "embed" not in params["qformer"]
  lengths = jnp.array([3, 6, 5, 4])
  out = generate(model, params, images, tokens, lengths, jax.random.key(0), max_new_tokens=4)
  # Teacher-forced: each prompt followed by its generated tokens, in one forward pass.
  rows = [jnp.concatenate([tokens[r, :lengths[r]], out.tokens[r]]) for r in range(4)]
  full = jnp.stack([jnp.pad(row, (0, 10 - len(row))) for row in rows])
  logits = model.apply({"params": params}, images, full)
  for r in range(4):
    steps = lengths[r] - 1 + jnp.arange(4)
    np.testing.assert_array_equal(jnp.argmax(logits[r, steps], -1), out.tokens[r])


def test_prefix_lm_split_cuts_between_the_second_token_and_the_middle():
  tokens = jnp.array([[5, 6, 7, 8, 9, 1, 0, 0], [5, 6, 1, 0, 0, 0, 0, 0]])
  valid = tokens != 0
  cuts = set()
  for seed in range(40):
    inputs, input_valid, targets, target_valid = task.prefix_lm_split(
        tokens, valid, jax.random.key(seed), 0)
    for row in range(2):
      cut = int(jnp.sum(input_valid[row]))
      n = int(jnp.sum(valid[row]))
      assert 1 <= cut <= max(n // 2, 1)
      cuts.add((row, cut))
      # Inputs and targets together are the text, in order.
      np.testing.assert_array_equal(
          np.concatenate([inputs[row][input_valid[row]], targets[row][target_valid[row]]]),
          tokens[row, :n])
      assert np.all(np.asarray(targets[row])[~np.asarray(target_valid[row])] == 0)
  assert cuts == {(0, 1), (0, 2), (0, 3), (1, 1)}  # every allowed cut is drawn


def test_the_flan_t5_variant_encodes_the_queries_before_the_prompt():
  t5 = T5Config(vocab_size=VOCAB, width=16, depth=2, num_heads=2, mlp_dim=32,
                activation="gelu", gated_mlp=True, tie_embeddings=False)
  model, params, images, tokens = _model(t5=t5)
  assert "lm_proj" in params and "temp" not in params
  lengths = jnp.array([3, 6, 5, 4])
  mask = jnp.arange(7) < lengths[:, None]
  decoder = jnp.array([[0, 5, 9]] * 4)
  logits = model.apply({"params": params}, images, tokens, mask, decoder_tokens=decoder)
  prefix = model.apply({"params": params}, images, method=Blip2.prefix)
  np.testing.assert_allclose(logits, T5(t5).apply({"params": params["t5"]}, tokens, decoder,
                                                  token_mask=mask, prefix=prefix), atol=1e-6)
  out = generate(model, params, images, tokens, lengths, jax.random.key(0), max_new_tokens=3)
  full = jnp.concatenate([jnp.zeros((4, 1), jnp.int32), out.tokens[:, :2]], axis=1)
  greedy = jnp.argmax(model.apply({"params": params}, images, tokens, mask,
                                  decoder_tokens=full), -1)
  produced = jnp.arange(3) < out.lengths[:, None]  # up to and with the end token
  np.testing.assert_array_equal(jnp.where(produced, greedy, -1),
                                jnp.where(produced, out.tokens, -1))
  assert int(jnp.sum(out.lengths)) > 4  # not all stopped at once


def blip2_config(stage: int = 1, **data):
  """The BLIP-2 recipe at toy size: 32px images, 32-wide towers, no pretrained parts."""
  from mmjax.configs import blip2 as recipe
  config = recipe.get_config("stage1" if stage == 1 else "tiny")
  model = config.model
  model.vision.update(image_size=32, patch_size=8, width=32, depth=1, num_heads=2)
  model.qformer.update(width=32, depth=2, num_heads=2, num_queries=4, encoder_width=32)
  model.embed_dim = 16
  if stage == 2:
    model.lm.update(width=32, depth=2, num_heads=2)
  config.data.update(image_size=32, batch_size=8, **data)
  for entry in (*config.data.datasets.values(), *config.data.eval_datasets.values()):
    entry.source.image_size = 32
  config.init = {}
  return config
