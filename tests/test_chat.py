"""LLaVA through mmjax.load and `python -m mmjax.chat`: the run's template renders every
prompt, answers are the lower-level generation's tokens (batched, streamed and multi-turn
alike), and mistakes are named."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_inference import save_run

from mmjax import convert, inference
from mmjax.cli import UserError
from mmjax.configs import llava as llava_recipe
from mmjax.data import conversation, sources
from mmjax.data import tokenizer as tok
from mmjax.models import llava
from mmjax.tasks import get_task

ROOT = pathlib.Path(__file__).parent.parent
SIZE = 32
NEW = 8  # tokens per answer: a random model rarely says EOS, so answers run to the limit
# The questions, few and reused: each prompt length compiles generation once.
Q = "what colour is the circle?"
Q2 = "is there a square on the left?"


def llava_config():
  """The LLaVA recipe with a toy model: 4 image tokens, a 2-layer LM (the embedded
  tokenizer's vocabulary), and LLaVA-1.5's system prompt."""
  config = llava_recipe.get_config()
  model = config.model.to_dict()
  model["vision"].update(image_size=SIZE, patch_size=16, width=32, depth=1, num_heads=2,
                         mlp_dim=64)
  model["lm"].update(width=32, depth=1, num_heads=2, mlp_dim=64, position="learned",
                     max_len=256)
  config.model = model
  config.data.update(image_size=SIZE, image_tokens=4, system=None)
  return config


def init_params(config):
  model = get_task("llava").build_model(config)
  args = (jnp.zeros((1, 1, SIZE, SIZE, 3), jnp.uint8), jnp.zeros((1, 8), jnp.int32))
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(0), *args)["params"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  config = llava_config()
  model, params = init_params(config)
  workdir = tmp_path_factory.mktemp("chat") / "run"
  save_run(workdir, config, params)
  return workdir, config, model, params


@pytest.fixture(scope="module")
def vlm(run):
  return inference.load(run[0])


def image(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), np.uint8)


def direct(vlm, turns, images, max_new_tokens=NEW, seed=0, **kwargs) -> list[list[int]]:
  """Each conversation's answer tokens (EOS left out) from `mmjax.models.llava.generate`
  on the template's prompt, one conversation at a time."""
  model, params, tokenizer, fmt = vlm.model, vlm.params, vlm.tokenizer, vlm.format
  out = []
  for t, x in zip(turns, images, strict=True):
    ids = np.asarray([fmt.prompt(t, tokenizer)], np.int32)
    generated = llava.generate(model, params, jnp.asarray(x)[None, None], ids,
                               np.asarray([ids.shape[1]], np.int32), jax.random.key(seed),
                               max_new_tokens=max_new_tokens, stop_ids=(tokenizer.eos_id,),
                               pad_id=tokenizer.pad_id, **kwargs)
    row, n = np.asarray(generated.tokens)[0], int(generated.lengths[0])
    out.append([int(i) for i in row[:n] if i != tokenizer.eos_id])
  return out


def test_chat_is_the_lower_level_generation_on_the_templates_prompt(run, vlm):
  question = Q
  [want] = direct(vlm, [[("user", "<image>\n" + question)]], [image(0)])
  assert vlm.format == conversation.format_of(run[1]) == conversation.Format("vicuna_v1",
                                                                              None, 4)
  assert vlm.tokenizer.pieces() == tok.make_tokenizer(run[1]).pieces()
  prompt = vlm.conversation(image(0)).prompt(question)
  text = vlm.tokenizer.decode(prompt)
  # (The embedded tokenizer spells the space between "USER:" and the image out of sight.)
  assert text == f"{conversation.VICUNA_SYSTEM} USER:{'<image>' * 4}\n{question} ASSISTANT:"
  assert prompt.count(vlm.tokenizer.media_id) == 4 and prompt[0] == vlm.tokenizer.bos_id
  answer = vlm.chat(image(0), question, max_new_tokens=NEW)
  assert answer == vlm.tokenizer.decode(want) and want


def test_streamed_pieces_join_to_the_answer_greedy_and_sampled(vlm):
  chat = vlm.conversation(image(1))
  for options in ({}, {"temperature": 1.0, "top_k": 20, "seed": 3}):
    pieces = list(chat.ask(Q, stream=True, max_new_tokens=NEW, **options))
    assert chat.turns[-1] == ("assistant", "".join(pieces))
    chat.reset()
    assert len(pieces) > 1
    assert "".join(pieces) == chat.ask(Q, max_new_tokens=NEW, **options)
    chat.reset()


def test_pieces_hold_back_incomplete_characters():
  text = "é€x"
  ids = list(text.encode())  # one byte per token
  decode = lambda i: bytes(i).decode(errors="replace")
  assert list(inference._pieces(decode, iter(ids))) == ["é", "€", "x"]


def test_batched_prompts_of_different_lengths_answer_as_one_by_one(run, vlm):
  questions = [Q2, Q]
  images = [image(3), image(0)]
  batched = vlm.generate(images, questions, max_new_tokens=NEW)
  single = [vlm.generate(x, q, max_new_tokens=NEW) for x, q in zip(images, questions)]
  want = direct(vlm, [[("user", "<image>\n" + q)] for q in questions], images)
  assert batched == single == [vlm.tokenizer.decode(w) for w in want]


def test_a_conversation_renders_its_turns_as_the_template_does(run, vlm, monkeypatch):
  prompts, real = [], llava.generate

  def spy(model, params, images, prompt, lengths, rng, **kwargs):
    prompts.append(np.asarray(prompt)[0, :int(lengths[0])].tolist())
    return real(model, params, images, prompt, lengths, rng, **kwargs)

  monkeypatch.setattr(llava, "generate", spy)
  chat = vlm.conversation(image(2))
  first = chat.ask(Q, max_new_tokens=NEW)
  second = chat.ask("and the square?", max_new_tokens=NEW)
  turns = [("user", f"<image>\n{Q}"), ("assistant", first),
           ("user", "and the square?")]
  assert chat.turns == turns + [("assistant", second)]
  fmt, tokenizer = conversation.format_of(run[1]), vlm.tokenizer
  assert prompts == [fmt.prompt(turns[:1], tokenizer), fmt.prompt(turns, tokenizer)]
  # The second prompt: the first, the answer's tokens with EOS, the question.
  assert prompts[1][:len(prompts[0])] == prompts[0]
  rest = tokenizer.decode(prompts[1][len(prompts[0]):])
  assert rest == f"{first}USER: and the square? ASSISTANT:"  # (EOS is spelled out of sight)
  assert prompts[1].count(tokenizer.eos_id) == 1
  assert [vlm.tokenizer.decode(w) for w in direct(vlm, [turns], [image(2)])] == [
      chat.turns[-1][1]]
  chat.reset(image(3))
  assert chat.turns == [] and chat.prompt("hi") == fmt.prompt(
      [("user", "<image>\nhi")], tokenizer)


def test_a_converted_checkpoint_chats_in_llava_15s_format(run, vlm, tmp_path):
  _, _, model, params = run
  convert.save(tmp_path / "converted", "llava", model.config, params)
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "tokenizer.model").write_bytes(tok.EMBEDDED.read_bytes())
  (hf / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
  converted = inference.load(tmp_path / "converted", tokenizer=hf)
  assert converted.format == conversation.Format("vicuna_v1", None, 4)
  assert converted.pad_colour == sources.CLIP_PAD_COLOUR
  # Its tokenizer (LLaMA-style: a space in front of the text) gives other ids.
  [want] = direct(converted, [[("user", f"<image>\n{Q}")]], [image(0)])
  assert converted.chat(image(0), Q, max_new_tokens=NEW) == converted.tokenizer.decode(want)


def test_images_are_padded_to_squares_where_training_padded_them(vlm, tmp_path):
  assert vlm.pad_colour is None  # shapes-world conversations: square images, cropped
  config = llava_config()
  source = config.data.datasets.conversations.source
  source.update(image_aspect_ratio="pad", pad_colour=(1, 2, 3))
  assert inference._llava_pad_colour(config, tmp_path) == (1, 2, 3)
  source.image_aspect_ratio = "square"
  with pytest.raises(UserError, match="config.data.datasets: image_aspect_ratio='square'"):
    inference._llava_pad_colour(config, tmp_path)
  del config["data"]  # a converted checkpoint: LLaVA-1.5's padding
  assert inference._llava_pad_colour(config, tmp_path) == sources.CLIP_PAD_COLOUR
  wide = np.random.default_rng(0).integers(0, 256, (20, 48, 3), np.uint8)
  Image.fromarray(wide).save(tmp_path / "wide.png")
  padded = dataclasses.replace(vlm, pad_colour=(1, 2, 3))
  want = sources.decode_image((tmp_path / "wide.png").read_bytes(), SIZE, (1, 2, 3))
  assert (want[0] == (1, 2, 3)).all()  # the padding shows
  for x in (tmp_path / "wide.png", wide, Image.fromarray(wide)):
    np.testing.assert_array_equal(padded.conversation(x).image, want)
  np.testing.assert_array_equal(vlm.conversation(wide).image,
                                sources.resize_center_crop(Image.fromarray(wide), SIZE))


def test_mistakes_are_named(run, vlm, tmp_path):
  with pytest.raises(UserError, match="No image file"):
    vlm.chat(tmp_path / "missing.png", "hi")
  with pytest.raises(UserError, match="holds no <image>"):
    vlm.chat(image(0), "<image> hi")
  with pytest.raises(UserError, match="2 prompts need a list of 2 images"):
    vlm.generate(image(0), ["a", "b"])
  with pytest.raises(UserError, match="stream=True streams one answer"):
    vlm.generate([image(0)] * 2, ["a", "b"], stream=True)
  left = 256 - len(vlm.conversation(image(0)).prompt("hi"))
  with pytest.raises(UserError, match="with max_new_tokens=.* exceeds the 256 positions"):
    vlm.chat(image(0), "hi", max_new_tokens=left + 1)
  with pytest.raises(UserError, match="max_new_tokens must be a positive integer"):
    vlm.chat(image(0), "hi", max_new_tokens=0)
  with pytest.raises(UserError, match="one <image>"):
    vlm.generate(image(0), [("user", "hi")])
  config = llava_config()
  config.data.image_tokens = 5
  with pytest.raises(UserError, match="image_tokens=5.*4 features.*set it to 4"):
    inference._llava_format(config, vlm.model, vlm.tokenizer, tmp_path)
  config.model.image_token_id = 6
  with pytest.raises(UserError, match="<image> is id 4, the model's image token id 6"):
    inference._llava_format(llava_config(), get_task("llava").build_model(config),
                            vlm.tokenizer, tmp_path)


def chat_cli(*args, stdin: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "mmjax.chat", *args], input=stdin, text=True,
                        capture_output=True, check=False, env=env, timeout=240, cwd=ROOT)


def test_the_terminal_chat_answers_through_a_pipe(run, vlm, tmp_path):
  Image.fromarray(image(0)).save(tmp_path / "a.png")
  Image.fromarray(image(1)).save(tmp_path / "b.png")
  out = chat_cli(f"--workdir={run[0]}", f"--image={tmp_path / 'a.png'}",
                 f"--max_new_tokens={NEW}",
                 stdin=f"{Q}\n/image {tmp_path / 'b.png'}\n{Q}\n/reset\n{Q}\n/quit\n{Q}\n")
  assert out.returncode == 0, out.stderr
  first = vlm.chat(tmp_path / "a.png", Q, max_new_tokens=NEW)
  second = vlm.chat(tmp_path / "b.png", Q, max_new_tokens=NEW)
  assert first in out.stdout and second in out.stdout
  # The answers, one line each, then /reset's fresh start answers as the first did.
  lines = out.stdout.splitlines()
  assert lines == [first, f"(new conversation about {tmp_path / 'b.png'})", second,
                   "(new conversation)", second]


def test_the_terminal_chat_names_a_missing_image_and_a_model_that_is_not_llava(run, tmp_path):
  missing = chat_cli(f"--workdir={run[0]}", f"--image={tmp_path / 'nope.png'}", stdin="")
  assert missing.returncode == 2 and "No image file" in missing.stderr and "--image" in (
      missing.stderr)
  (tmp_path / "lm").mkdir()
  (tmp_path / "lm" / "config.json").write_text(json.dumps({"task": "lm", "model": {}}))
  other = chat_cli(f"--workdir={tmp_path / 'lm'}", f"--image={tmp_path / 'nope.png'}",
                   stdin="")
  assert other.returncode == 2 and "task 'lm'; mmjax.chat talks with LLaVA" in other.stderr


def test_a_lora_run_loads_with_its_updates_folded_in(vlm, tmp_path):
  peft = pytest.importorskip("mmjax.peft")
  config = llava_config()
  config.peft = {"lora": {"rank": 2, "alpha": 4, "targets": r"lm/layers_\d+/(attn|mlp)/\w+"},
                 "modules_to_save": (r"^projector/",)}
  config.trainable = peft.trainable_pattern(config)
  model = inference.build_model(config)
  args = (jnp.zeros((1, 1, SIZE, SIZE, 3), jnp.uint8), jnp.zeros((1, 8), jnp.int32))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), *args)["params"])
  rng = iter(jax.random.split(jax.random.key(2), 64))
  params = jax.tree_util.tree_map_with_path(  # trained LoRA: B is no longer zero
      lambda path, x: jax.random.normal(next(rng), x.shape) * 0.5
      if jax.tree_util.keystr(path).endswith("['lora_b']") else x, params)
  save_run(tmp_path / "lora", config, params)
  loaded = inference.load(tmp_path / "lora")
  assert type(loaded.model) is llava.Llava  # unwrapped: LoRA folded into the kernels
  assert loaded.model == vlm.model
  wrapped = inference.LlavaModel(model, params, vlm.tokenizer, config, tmp_path, vlm.format)
  [want] = direct(wrapped, [[("user", f"<image>\n{Q}")]], [image(0)])
  assert loaded.chat(image(0), Q, max_new_tokens=NEW) == vlm.tokenizer.decode(want)
  [plain] = direct(vlm, [[("user", f"<image>\n{Q}")]], [image(0)])
  assert want != plain  # the LoRA changes the answer
