"""mmjax.load and its models: the same outputs as the lower-level generation and
evaluation paths, images prepared as training prepares them, and clear errors."""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from mmjax.configs import flamingo as flamingo_recipe
from mmjax.configs import lm as lm_recipe
from conftest import random_gates
from mmjax import checkpoints, convert, evaluate, inference
from mmjax.cli import UserError
from mmjax.data import shapes_world as sw
from mmjax.data import tokenizer as tok
from mmjax.data.sources import decode_image, resize_center_crop
from mmjax.evaluate import prompts as prompts_lib
from mmjax.evaluate import scoring
from mmjax.decoding import SamplingConfig
from mmjax.models.flamingo import generate as flamingo_generate
from mmjax.models.lm import generate as lm_generate
from mmjax.tasks import get_task
from mmjax.train import partition_params

ROOT = pathlib.Path(__file__).parent.parent
SIZE = 32
WORLD = sw.ShapesWorld(seed=0, image_size=SIZE)


def flamingo_config():
  """The Flamingo recipe with a toy model (the embedded tokenizer's vocabulary)."""
  config = flamingo_recipe.get_config()
  model = config.model.to_dict()
  model["vision"].update(image_size=SIZE, patch_size=16, width=32, depth=1, num_heads=2)
  model["resampler"].update(depth=1, num_heads=2, head_dim=16, num_latents=2)
  model["lm"].update(width=32, depth=2, num_heads=2, max_len=128, position="learned")
  model["xattn"].update(every=1, num_heads=2, head_dim=16)
  config.model = model
  return config


def save_run(workdir: pathlib.Path, config, params) -> None:
  """What the trainer leaves in a workdir: config.json and a checkpoint whose state holds
  the trainable and frozen parameters apart."""
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  trainable, frozen = partition_params(params, config.trainable)
  mngr = checkpoints.manager(workdir)
  mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(
      {"step": 7, "params": trainable, "frozen": frozen})))
  mngr.wait_until_finished()
  mngr.close()


def init_params(config):
  task = get_task(config.task)
  model = task.build_model(config)
  if config.task == "flamingo":
    args = (jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 1, 1, SIZE, SIZE, 3), jnp.uint8))
  else:
    args = (jnp.zeros((1, 8), jnp.int32),)
  # Open gates (a trained model's), so that images change what is generated.
  return model, random_gates(nn.unbox(jax.jit(model.init)(jax.random.key(0), *args)["params"]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A Flamingo run's workdir; its config, model and parameters."""
  config = flamingo_config()
  model, params = init_params(config)
  workdir = tmp_path_factory.mktemp("inference") / "run"
  save_run(workdir, config, params)
  return workdir, config, model, params


@pytest.fixture(scope="module")
def vlm(run):
  return inference.load(run[0])


@pytest.fixture
def inputs(monkeypatch):
  """The arguments of each `mmjax.models.flamingo.generate` call the API makes."""
  from mmjax.models import flamingo
  calls, real = [], flamingo.generate

  def spy(model, params, prompt, prompt_lengths, rng, **kwargs):
    calls.append(dict(tokens=np.asarray(prompt), lengths=np.asarray(prompt_lengths),
                      images=np.asarray(kwargs["images"]),
                      num_images=np.asarray(kwargs["num_images"])))
    return real(model, params, prompt, prompt_lengths, rng, **kwargs)

  monkeypatch.setattr(flamingo, "generate", spy)
  return calls


def lower_level(model, params, tokenizer, texts, images, max_new_tokens, **kwargs):
  """What `generate` replaces: encode, pad images, generate, decode without the stop."""
  tokens, lengths = evaluate.encode_prompts(tokenizer, texts)
  batch = np.zeros((len(texts), max(map(len, images)), 1, SIZE, SIZE, 3), np.uint8)
  for i, row in enumerate(images):
    batch[i, :len(row), 0] = row
  out = flamingo_generate(model, params, jnp.asarray(tokens), jnp.asarray(lengths),
                          kwargs.pop("rng", jax.random.key(0)), images=jnp.asarray(batch),
                          num_images=jnp.array([len(r) for r in images]),
                          max_new_tokens=max_new_tokens,
                          stop_ids=(tokenizer.endofchunk_id, tokenizer.eos_id),
                          pad_id=tokenizer.pad_id, **kwargs)
  texts = []
  for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths), strict=True):
    stopped = row[n - 1] in (tokenizer.endofchunk_id, tokenizer.eos_id)
    texts.append(tokenizer.decode(row[:n - stopped]))
  return texts, out


def test_load_gives_the_runs_model_params_tokenizer_and_config(run, vlm):
  workdir, config, model, params = run
  assert isinstance(vlm, inference.FlamingoModel) and vlm.model == model
  assert isinstance(vlm.tokenizer, tok.Tokenizer) and vlm.config.task == "flamingo"
  assert vlm.image_size == SIZE and "parameters" in repr(vlm)
  jax.tree_util.tree_map(np.testing.assert_array_equal, vlm.params, params)


def test_generate_gives_the_tokens_of_the_lower_level_path(run, vlm, inputs):
  _, _, model, params = run
  images = [e.image for e in (WORLD.example("eval", i) for i in range(3))]
  prompts = [f"{sw.MEDIA_TOKEN}a small red circle.{sw.ENDOFCHUNK_TOKEN}{sw.MEDIA_TOKEN}",
             f"question: what is it?{sw.MEDIA_TOKEN}"]
  rows = [[images[0], images[1]], [images[2]]]
  expected, out = lower_level(model, params, vlm.tokenizer, prompts, rows, 8)
  assert np.asarray(out.lengths).max() > 1  # generated text, not an immediate stop
  assert vlm.generate(prompts, rows, max_new_tokens=8) == expected
  tokens, lengths = evaluate.encode_prompts(vlm.tokenizer, prompts)
  np.testing.assert_array_equal(inputs[0]["tokens"], tokens)
  np.testing.assert_array_equal(inputs[0]["lengths"], lengths)
  np.testing.assert_array_equal(inputs[0]["num_images"], [2, 1])
  np.testing.assert_array_equal(inputs[0]["images"][0, :, 0], rows[0])
  np.testing.assert_array_equal(inputs[0]["images"][1, 0, 0], rows[1][0])
  assert not inputs[0]["images"][1, 1].any()  # padding
  sampling = SamplingConfig(temperature=1.5, top_k=40)
  sampled = vlm.generate(prompts, rows, max_new_tokens=8, temperature=1.5, top_k=40, seed=3)
  assert sampled == lower_level(model, params, vlm.tokenizer, prompts, rows, 8,
                                rng=jax.random.key(3), sampling=sampling)[0]
  assert sampled != expected


@pytest.mark.parametrize("task", ["captioning", "vqa"])
def test_caption_and_answer_are_what_the_evaluation_reads(run, vlm, task, inputs):
  """Few-shot prompts built from the same held-out examples as `mmjax.evaluate`'s, and
  the answers parsed as it parses them (a batch of queries shares the examples)."""
  _, _, model, params = run
  shots, max_new = 2, 6
  support = [WORLD.example("train", j) for j in range(shots)]
  queries = [WORLD.example("eval", i) for i in range(3)]
  fmt = prompts_lib.FORMATS[f"shapes_{task}"]
  answer = (lambda e: e.answer) if task == "vqa" else (lambda e: e.caption)
  prompt = scoring.Prompt(evaluate.few_shot_text(
      [fmt.solved(question=e.question, answer=answer(e)) for e in support],
      fmt.query(question=queries[0].question)),
      np.stack([e.image for e in support] + [queries[0].image]))

  def ask(images, questions):
    if task == "captioning":
      return vlm.caption(images, max_new_tokens=max_new,
                         examples=[(e.image, e.caption) for e in support])
    return vlm.answer(images, questions, max_new_tokens=max_new,
                      examples=[(e.image, e.question, e.answer) for e in support])

  # The evaluation's prompt, and the same with other queries: a batch shares the support.
  prompts = [scoring.Prompt(prompt.text.rsplit(sw.MEDIA_TOKEN, 1)[0] + sw.MEDIA_TOKEN
                            + evaluate.chunk_text(task, q.question),
                            np.concatenate([prompt.images[:-1], q.image[None]]))
             for q in queries]
  assert prompts[0].text == prompt.text
  expected = scoring.make_answer_fn(model, vlm.tokenizer, max_new)(
      params, prompts, length=0, max_images=len(prompts[0].images), task=task)
  got = ask([q.image for q in queries], [q.question for q in queries])
  assert got == expected
  # The very prompts and images the evaluation generates from.
  tokens, _ = evaluate.encode_prompts(vlm.tokenizer, [p.text for p in prompts])
  np.testing.assert_array_equal(inputs[-1]["tokens"], tokens)
  np.testing.assert_array_equal(inputs[-1]["images"][:, :, 0], [p.images for p in prompts])
  assert len(set(got)) > 1  # the image matters: no preparation of images passes unseen


def test_pil_images_arrays_and_files_are_prepared_as_training_data_are(vlm, tmp_path):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (48, 40, 3), np.uint8)  # not square, not the model's size
  Image.fromarray(pixels).save(tmp_path / "image.png")
  trained = decode_image((tmp_path / "image.png").read_bytes(), SIZE)  # the data pipeline's
  kinds = [pixels, Image.fromarray(pixels), tmp_path / "image.png", str(tmp_path / "image.png")]
  for kind in kinds:
    np.testing.assert_array_equal(vlm.preprocess(kind)[0], trained)
  captions = {vlm.caption(kind, max_new_tokens=6) for kind in kinds}
  assert len(captions) == 1
  assert vlm.caption(kinds, max_new_tokens=6) == [captions.pop()] * len(kinds)
  # An image of the model's size is used as it is; grey and RGBA ones become RGB.
  exact = pixels[:SIZE, :SIZE]
  np.testing.assert_array_equal(vlm.preprocess(exact)[0], exact)
  np.testing.assert_array_equal(vlm.preprocess(exact[..., 0])[0],
                                np.repeat(exact[..., :1], 3, axis=-1))
  rgba = np.concatenate([exact, np.full((SIZE, SIZE, 1), 255, np.uint8)], axis=-1)
  np.testing.assert_array_equal(vlm.preprocess(rgba)[0], exact)
  np.testing.assert_array_equal(vlm.preprocess(np.stack([exact, exact])),
                                np.stack([exact, exact]))
  np.testing.assert_array_equal(
      vlm.preprocess(Image.fromarray(pixels).convert("P")),
      resize_center_crop(Image.fromarray(pixels).convert("P"), SIZE)[None])


def test_bad_images_and_prompts_are_named(vlm, tmp_path):
  image = WORLD.example("eval", 0).image
  cases = [
      (lambda: vlm.caption(image.astype(np.float32) / 255), "uint8.*float32.*255"),
      (lambda: vlm.caption(image.transpose(2, 0, 1)), r"'h w 3'.*\(3, 32, 32\)"),
      (lambda: vlm.caption(tmp_path / "missing.png"), "No image file .*missing.png"),
      (lambda: vlm.caption(7), "PIL image, a uint8 numpy array or a file path, got int"),
      (lambda: vlm.caption([]), "No images given"),
      (lambda: vlm.generate(sw.MEDIA_TOKEN, image), "images of a prompt must be a list"),
      (lambda: vlm.generate(sw.MEDIA_TOKEN * 2, [image]), "2 <image> marker.*1 image"),
      (lambda: vlm.generate([sw.MEDIA_TOKEN, "x"], [image]), "2 prompts need a list of 2"),
      (lambda: vlm.generate("x", max_new_tokens=0), "max_new_tokens must be a positive"),
      (lambda: vlm.generate("x", temperature=-1), "temperature must be >= 0"),
      (lambda: vlm.generate("x " * 130, max_new_tokens=4), "exceeds the 128 positions"),
      (lambda: vlm.answer([image, image], ["what?"]), "2 images but 1 questions"),
      (lambda: vlm.answer(image, ["what?"]), "one image and one question"),
      (lambda: vlm.caption(image, examples=[image]), r"\(image, caption\) tuples"),
  ]
  (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
  cases.append((lambda: vlm.caption(tmp_path / "broken.png"), "broken.png: .*cannot decode"))
  for call, message in cases:
    with pytest.raises(UserError, match=message):
      call()


def test_a_converted_checkpoint_loads_with_its_tokenizer_directory(run, vlm, tmp_path):
  _, _, model, params = run
  convert.save(tmp_path / "converted", "flamingo", model.config, params)
  with pytest.raises(UserError, match="names no tokenizer.*tokenizer="):
    inference.load(tmp_path / "converted")
  # The embedded tokenizer as a Hugging Face (LLaMA-style) directory: the same ids.
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "tokenizer.model").write_bytes(tok.EMBEDDED.read_bytes())
  (hf / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
  converted = inference.load(tmp_path / "converted", tokenizer=hf)
  assert isinstance(converted.tokenizer, tok.HFTokenizer)
  image = WORLD.example("eval", 0).image
  assert (converted.answer(image, "what colour is the circle?", max_new_tokens=6)
          == vlm.answer(image, "what colour is the circle?", max_new_tokens=6))
  # Without a pad token, `<PAD>` goes after the vocabulary: ids the model does not have.
  (hf / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
  with pytest.raises(UserError, match="does not match the tokenizer.*vocab_size"):
    inference.load(tmp_path / "converted", tokenizer=hf)


def test_what_cannot_be_loaded_is_named(run, tmp_path):
  workdir, config, _, params = run
  assert inference.load(workdir, step=7).config.task == "flamingo"
  with pytest.raises(UserError, match=r"No checkpoint of step 3 under .*steps \[7\]"):
    inference.load(workdir, step=3)
  with pytest.raises(UserError, match="No directory"):
    inference.load(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="No config.json in"):
    inference.load(tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="not valid JSON"):
    inference.load(tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text(config.to_json_best_effort())
  with pytest.raises(UserError, match="No complete checkpoint.*mmjax.train"):
    inference.load(tmp_path / "empty")
  # A config edited after training: the parameters that no longer fit are named.
  edited = json.loads(config.to_json_best_effort())
  edited["model"]["resampler"]["num_latents"] = 3
  save_run(tmp_path / "edited", config, params)
  (tmp_path / "edited" / "config.json").write_text(json.dumps(edited))
  with pytest.raises(UserError, match="does not fit.*resampler/latents is .*2, 32.*3, 32"):
    inference.load(tmp_path / "edited")


def test_a_clip_run_is_refused_saying_what_it_is_and_what_is_served(tmp_path):
  from mmjax.configs import clip as clip_recipe
  config = clip_recipe.get_config()
  (tmp_path / "clip").mkdir()
  (tmp_path / "clip" / "config.json").write_text(config.to_json_best_effort())
  with pytest.raises(UserError, match="CLIP dual encoder.*'flamingo'.*'lm'"):
    inference.load(tmp_path / "clip")


def test_a_language_model_run_generates_text_as_the_lower_level_path(tmp_path):
  config = lm_recipe.get_config()
  config.model.update(width=32, depth=2, num_heads=2, max_len=64)
  model, params = init_params(config)
  save_run(tmp_path / "lm", config, params)
  lm = inference.load(tmp_path / "lm")
  assert isinstance(lm, inference.TextModel)
  prompts = ["a small red", "question: how many objects are there? answer:"]
  tokens, lengths = evaluate.encode_prompts(lm.tokenizer, prompts)
  out = lm_generate(model, params, jnp.asarray(tokens), jnp.asarray(lengths),
                    jax.random.key(0), max_new_tokens=6,
                    stop_ids=(lm.tokenizer.endofchunk_id, lm.tokenizer.eos_id),
                    pad_id=lm.tokenizer.pad_id)
  expected = [lm.tokenizer.decode(row[:n - (row[n - 1] in (tok.EOS_ID, tok.ENDOFCHUNK_ID))])
              for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths), strict=True)]
  assert lm.generate(prompts, max_new_tokens=6) == expected
  assert expected[0] != expected[1]


def test_import_mmjax_stays_light_and_load_is_exported():
  code = ("import sys, mmjax; assert 'jax' not in sys.modules, 'jax imported'; "
          "from mmjax import inference; assert mmjax.load is inference.load")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
