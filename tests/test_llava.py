"""LLaVA: conversation templates and labels, the feature splice, the model's parts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import conversation
from mmjax.data.conversation import EOS, Format, Segment, build_conversation, segments
from mmjax.data.pipeline import ShapesWorldConversations
from mmjax.data.sequences import CorruptRecord
from mmjax.data.tokenizer import Tokenizer
from mmjax.models.llava import Llava, LlavaConfig, projector_depth, splice
from mmjax.models.lm import LMConfig
from mmjax.models.vit import ViT, ViTConfig

TOKENIZER = Tokenizer()
SHAPE = (64, 64, 3)
TWO_ROUNDS = [("user", "<image>\nwhat colour is it?"), ("assistant", "red"),
              ("user", "how many are there?"), ("assistant", "two")]


def text_of(parts: list[Segment]) -> str:
  return "".join({"<bos>": "<s>", "<eos>": "</s>"}.get(s.text, s.text) for s in parts)


def record(conversations, images=1):
  return {"id": "r1", "images": np.zeros((images, *SHAPE), np.uint8),
          "conversations": [{"from": "human" if r == "user" else "gpt", "value": t}
                            for r, t in conversations]}


def test_vicuna_v1_renders_llava_15s_prompt():
  # LLaVA's conv_vicuna_v1.get_prompt(): system, " ", then "USER: q ASSISTANT: a</s>" rounds
  # joined by " " after the user's and by "</s>" after the assistant's.
  system = conversation.VICUNA_SYSTEM
  expected = (f"<s>{system} USER: <image>\nwhat colour is it? ASSISTANT:red</s>"
              "USER: how many are there? ASSISTANT:two</s>")
  assert text_of(segments("vicuna_v1", TWO_ROUNDS)) == expected
  # The answer is its own segment (tokenised alone, so with the leading space a
  # SentencePiece tokenizer gives a word after "ASSISTANT:"), and only it and EOS train.
  trained = [s.text for s in segments("vicuna_v1", TWO_ROUNDS) if s.trained]
  assert trained == ["red", EOS, "two", EOS]


def test_llama_2_and_plain_templates():
  assert text_of(segments("llama_2", TWO_ROUNDS, system="be brief")) == (
      "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\n<image>\nwhat colour is it? [/INST]red</s>"
      "<s>[INST] how many are there? [/INST]two</s>")
  # plain (stage 1): the question is dropped, only the image and the caption remain.
  plain = segments("plain", TWO_ROUNDS[:2])
  assert text_of(plain) == "<s><image>red</s>"
  with pytest.raises(CorruptRecord, match="one question"):
    segments("plain", TWO_ROUNDS)


def test_generation_prompt_is_the_training_prefix_before_the_answer():
  fmt = Format("vicuna_v1", "", image_tokens=3)
  ids, trained = conversation.encode(fmt.segments(TWO_ROUNDS[:2]), TOKENIZER, 3)
  prompt = fmt.prompt(TWO_ROUNDS[:1], TOKENIZER)
  first_trained = int(np.flatnonzero(trained)[0])
  assert ids[:first_trained].tolist() == prompt
  assert prompt.count(TOKENIZER.media_id) == 3


def test_trained_tokens_are_exactly_the_answers_on_shapes_world():
  source = ShapesWorldConversations()
  fmt = Format("vicuna_v1", "", image_tokens=64)
  for i in range(100):
    doc = source[i]
    example, stats = build_conversation(doc, TOKENIZER, fmt, 400, 1, SHAPE)
    answers = [t["value"] for t in doc["conversations"][1::2]]
    expected = sum((TOKENIZER.encode(a) + [TOKENIZER.eos_id] for a in answers), [])
    assert example["targets"][example["loss_mask"] > 0].tolist() == expected
    assert not stats
    assert np.sum(example["tokens"] == TOKENIZER.media_id) == 64


def test_truncation_after_image_expansion_is_counted_by_reason_with_the_id():
  fmt = Format("vicuna_v1", "", image_tokens=64)
  doc = record(TWO_ROUNDS)
  full, _ = build_conversation(doc, TOKENIZER, fmt, 400, 1, SHAPE)
  length = int(np.sum(full["tokens"] != TOKENIZER.pad_id))  # all the ids (seq_len >= them)
  # The last answer's EOS cut: kept, counted.
  cut, stats = build_conversation(doc, TOKENIZER, fmt, length - 2, 1, SHAPE)
  assert stats == {"answer_truncated": 1} and cut["loss_mask"].sum() > 0
  # Cut inside the image tokens: nothing to train on is left.
  with pytest.raises(CorruptRecord, match="'r1'.*no answer left") as error:
    build_conversation(doc, TOKENIZER, fmt, 40, 1, SHAPE)
  assert error.value.reason == "answer_truncated_away"


@pytest.mark.parametrize("conversations, images, reason", [
    ([("user", "<image>\nhi")], 1, "bad_conversation"),                   # no answer
    ([("assistant", "x"), ("user", "<image>")], 1, "bad_conversation"),   # wrong order
    ([("user", "hi"), ("assistant", "x")], 1, "image_token_mismatch"),   # image, no <image>
    ([("user", "<image>\nhi"), ("assistant", "x")], 2, "image_token_mismatch"),
])
def test_bad_conversations_are_named_and_counted(conversations, images, reason):
  fmt = Format("vicuna_v1", "", image_tokens=4)
  doc = record(conversations, images)
  with pytest.raises(CorruptRecord, match="'r1'") as error:
    build_conversation(doc, TOKENIZER, fmt, 64, 1, SHAPE)
  assert error.value.reason == reason


def test_chat_template_spans_match_transformers_apply_chat_template(tmp_path):
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer as Fast
  from tokenizers import decoders, models, pre_tokenizers, trainers

  from mmjax.data.tokenizer import HFTokenizer
  fast = Fast(models.BPE(unk_token="<unk>"))
  fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  fast.decoder = decoders.ByteLevel()
  fast.train_from_iterator(["what colour is it? red. how many are there? two."] * 20,
                           trainers.BpeTrainer(vocab_size=150, special_tokens=[
                               "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]))
  template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
              "<|user|>{{ m['content'] }}\n{% else %}<|assistant|>{{ m['content'] }}"
              "{{ eos_token }}\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=fast, bos_token="<s>",
                                            eos_token="</s>", unk_token="<unk>")
  hf.chat_template = template
  hf.save_pretrained(tmp_path)
  assert conversation.chat_template_of(tmp_path) == template
  tokenizer = HFTokenizer(tmp_path)
  fmt = Format("chat_template", chat_template=template, image_tokens=2)
  messages = [{"role": r, "content": t} for r, t in TWO_ROUNDS]
  parts = fmt.segments(TWO_ROUNDS, tokenizer)
  assert "".join(s.text for s in parts) == hf.apply_chat_template(
      messages, tokenize=False).replace("<image>\n", "<image>\n")
  assert [s.text for s in parts if s.trained] == ["red</s>\n", "two</s>\n"]
  prompt = fmt.segments(TWO_ROUNDS[:3], tokenizer, generation=True)
  assert "".join(s.text for s in prompt) == hf.apply_chat_template(
      messages[:3], tokenize=False, add_generation_prompt=True)


def test_splice_reads_features_in_order_at_image_tokens():
  rng = np.random.default_rng(0)
  tokens = np.array([[1, 9, 9, 9, 2, 9, 3], [9, 9, 4, 5, 6, 7, 9]])
  features = rng.normal(size=(2, 5, 3)).astype(np.float32)
  embedded = rng.normal(size=(2, 7, 3)).astype(np.float32)
  out = np.asarray(splice(jnp.asarray(embedded), jnp.asarray(tokens), jnp.asarray(features), 9))
  expected = embedded.copy()
  for b in range(2):
    k = 0
    for t in range(7):
      if tokens[b, t] == 9:
        expected[b, t] = features[b, k]
        k += 1
  np.testing.assert_array_equal(out, expected)


def tiny_llava(**kwargs) -> LlavaConfig:
  return LlavaConfig(vision=ViTConfig(image_size=16, patch_size=8, width=32, depth=3,
                                      num_heads=2, output_dim=None),
                     lm=LMConfig(vocab_size=50, width=48, depth=2, num_heads=4, max_len=64),
                     image_token_id=7, **kwargs)


@pytest.mark.parametrize("select, layer", [("default", -2), ("full", -1), ("default", 1)])
def test_features_are_the_chosen_vit_layer_before_any_norm_through_the_projector(select,
                                                                                layer):
  cfg = tiny_llava(vision_feature_select=select, vision_feature_layer=layer)
  model = Llava(cfg)
  images = jax.random.randint(jax.random.key(1), (2, 1, 16, 16, 3), 0, 255).astype(jnp.uint8)
  tokens = jnp.full((2, 8), 7)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"])
  rng = np.random.default_rng(0)  # random values of init's shapes, without compiling it
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), params)
  features = jax.jit(lambda p: model.apply({"params": p}, images,
                                           method=Llava.image_features))(params)
  assert features.shape == (2, cfg.image_tokens, 48)
  assert cfg.image_tokens == 4 + (select == "full")
  vit_cfg = ViTConfig(**{**cfg.vision.__dict__, "keep_class_token": True})
  vit_params = dict(params["vision"])
  hidden = jax.jit(lambda p: ViT(vit_cfg).apply({"params": p}, images[:, 0],
                                                feature_layer=layer)["tokens"])(vit_params)
  hidden = hidden if select == "full" else hidden[:, 1:]
  p = params["projector"]
  h = jax.nn.gelu(hidden @ p["linear_0"]["kernel"] + p["linear_0"]["bias"], approximate=False)
  expected = h @ p["linear_1"]["kernel"] + p["linear_1"]["bias"]
  np.testing.assert_allclose(features, expected, atol=1e-5)


def test_projector_names_and_config_errors():
  assert projector_depth("linear") == 1 and projector_depth("mlp3x_gelu") == 3
  with pytest.raises(ValueError, match="mlp<N>x_gelu"):
    tiny_llava(projector="mlp_relu")
  with pytest.raises(ValueError, match="token_norm"):
    LlavaConfig(vision=ViTConfig(image_size=16, patch_size=8, width=32, depth=2, num_heads=2,
                                 token_norm=True), lm=tiny_llava().lm, image_token_id=7)
  with pytest.raises(ValueError, match="image_token_id"):
    LlavaConfig(vision=tiny_llava().vision, lm=tiny_llava().lm, image_token_id=99)


def test_paper_shapes_count_llava_15_7bs_parameters():
  from mmjax.configs import llava as recipe
  from mmjax.tasks import llava as task
  config = recipe.get_config("llava-1.5-7b")
  model = task.build_model(config)
  args, kwargs = task.init_inputs(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs)["params"])
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(shapes)))
  # llava-hf/llava-1.5-7b-hf has 7,063,427,072, of which the vision tower's last layer
  # (12,596,224) and post_layernorm (2,048) are never run, so never created here.
  assert count == 7_063_427_072 - 12_596_224 - 2_048


# ---------------------------------------------------------------------------------------
# The recipe at toy size: training, frozen parts, skipped records, evaluation.
# ---------------------------------------------------------------------------------------
def llava_config(variant: str = "tiny", steps: int = 4):
  """The LLaVA recipe at toy size, from random weights: 32 px images of 16 patches, a
  two-layer ViT and LM."""
  from mmjax.configs import llava as recipe
  config = recipe.get_config(variant)
  with config.unlocked():
    del config["init"]
  config.model.vision.update(image_size=32, patch_size=8, width=32, depth=2, num_heads=2)
  config.model.lm.update(width=32, depth=2, num_heads=2, max_len=128)
  config.data.update(image_size=32, batch_size=4, seq_len=96, image_tokens=16)
  for entry in (*config.data.datasets.values(), *config.data.eval_datasets.values()):
    entry.source.image_size = 32
  config.train.update(steps=steps, log_every=2, checkpoint_every=2, eval_every=2,
                      eval_batches=1)
  if "evaluate" in config:
    config.evaluate.update(episodes=4, batch_size=4, max_new_tokens=3)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  from test_train import run
  config = llava_config()
  workdir = tmp_path_factory.mktemp("llava")
  return config, workdir, run(config, workdir)


def test_a_run_trains_the_projector_and_lm_and_reports_held_out_accuracy(trained):
  from mmjax import checkpoints
  config, workdir, metrics = trained
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["eval_loss"])
  report = __import__("json").loads((workdir / "eval.json").read_text())
  scores = report["scores"]["instruct"]["0"]
  assert 0.0 <= scores["accuracy"] <= 1.0 and "accuracy/colour" in scores or scores
  predictions = report["predictions"]["instruct"]["0"]
  assert predictions and {"question", "answer", "prediction", "correct"} <= set(predictions[0])
  # The vision tower never trains: its weights are those of the initialisation.
  from mmjax import train
  parts = train.build(config, jax.devices()[:1])
  fresh = train.init_state(config, parts, pretrained=False)
  loaded = checkpoints.load(workdir)
  trained_params = checkpoints.flat_params(loaded.params)
  for path, value in checkpoints.flat_params(fresh["frozen"]).items():
    assert path.startswith("vision/")
    np.testing.assert_array_equal(trained_params[path], value)
  changed = [p for p, v in checkpoints.flat_params(fresh["params"]).items()
             if not np.array_equal(trained_params[p], v)]
  assert any(p.startswith("projector/") for p in changed)
  assert any(p.startswith("lm/") for p in changed)


def test_data_image_tokens_must_match_the_model():
  from mmjax import config as config_lib
  from mmjax.cli import UserError
  config = llava_config()
  config.data.image_tokens = 17
  with pytest.raises(UserError, match="image_tokens=17 differs from the 16 features"):
    config_lib.validate(config)
