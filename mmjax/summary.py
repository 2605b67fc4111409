"""Inspects a model config: parameter counts, then a compiled forward pass and generation.

  python -m mmjax.summary --config=configs/flamingo.py[:variant] [--run=false]
  python -m mmjax.summary --config=configs/blip2.py:vitg-opt2.7b --run=false
  python -m mmjax.summary --config=configs/clip.py:siglip-b16 --run=false

Counts come from abstract shapes (`jax.eval_shape`), so any size can be inspected on a
laptop; `--run` then initialises random weights and times one compiled forward pass and
one batched generation on a random batch (interleaved for Flamingo; CLIP does not
generate).
"""

import functools
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from mmjax import checkpoints, cli, peft
from mmjax import config as config_lib
from mmjax.models import blip2, flamingo, llava
from mmjax.tasks import blip2 as blip2_task
from mmjax.tasks import get_task
from mmjax.tasks import flamingo as flamingo_task

_CONFIG = config_lib.define_flag()
_RUN = flags.DEFINE_bool("run", True, "Also run a compiled forward pass and generation.")


def param_table(params, trainable: str) -> list[tuple[str, int, bool]]:
  """`(group, count, trains)` rows: per top-level module, gated blocks grouped together."""
  rows: dict[tuple[str, bool], int] = {}
  for name, leaf in checkpoints.flat_params(params).items():
    group = re.sub(r"^lm/(groups/)?xattn_\d+/.*", "lm/xattn_*", name)  # scanned or not
    group = group if group == "lm/xattn_*" else name.split("/")[0]
    trains = re.search(trainable, name) is not None
    rows[(group, trains)] = rows.get((group, trains), 0) + int(np.prod(leaf.shape))
  return [(group, count, trains) for (group, trains), count in rows.items()]


def example_batch(config, rng):
  """A random interleaved batch: `<image> text <|endofchunk|>` chunks, right-padded."""
  s, m = config.summary, config.model
  tokens = np.array(jax.random.randint(rng, (s.batch_size, s.seq_len), 5,
                                         m.lm["vocab_size"]))
  chunk = s.seq_len // s.num_images
  for i in range(s.num_images):
    tokens[:, i * chunk] = m.media_token_id
    tokens[:, (i + 1) * chunk - 1] = m.endofchunk_token_id
  v = m.vision
  images = jax.random.normal(rng, (s.batch_size, s.num_images, 1, v["image_size"],
                                   v["image_size"], 3))
  return jnp.asarray(tokens), images, jnp.full((s.batch_size,), s.num_images, jnp.int32)


def model_and_inputs(config, rng):
  """`(model, inputs, tokens, generate)`: the recipe's model, the positional inputs of its
  forward pass on a random batch, that batch's tokens, and `generate(params, prompt,
  lengths, rng, **settings)` on its images (None for a model that does not generate:
  BLIP-2's stage 1)."""
  if config.task == "flamingo":
    model = peft.from_config(config, flamingo_task.build_model(config))
    tokens, images, num_images = example_batch(config, rng)
    return model, (tokens, images, num_images), tokens, functools.partial(
        flamingo.generate, model, images=images, num_images=num_images)
  s, m = config.summary, config.model
  if config.task in ("clip", "medclip"):
    model = peft.from_config(config, get_task(config.task).build_model(config))
    tokens = jax.random.randint(rng, (s.batch_size, s.seq_len), 5, m.text["vocab_size"])
    images = jax.random.normal(rng, (s.batch_size, *[m.vision["image_size"]] * 2, 3))
    return model, (images, tokens), tokens, None
  if config.task == "mmbcd":  # one case: `num_regions` crops and its history
    model = peft.from_config(config, get_task("mmbcd").build_model(config))
    k = config.data.regions.num_regions
    tokens = jax.random.randint(rng, (s.batch_size, s.seq_len), 5, m.text["vocab_size"])
    regions = jax.random.normal(rng, (s.batch_size, k, *[m.vision["image_size"]] * 2, 3))
    return model, (regions, tokens), tokens, None
  if config.task == "llava":
    model = peft.from_config(config, get_task("llava").build_model(config))
    cfg, side = model.config, m.vision["image_size"]
    tokens = jax.random.randint(rng, (s.batch_size, s.seq_len), 5, m.lm["vocab_size"])
    if cfg.anyres_grid:  # one image on the largest grid: every view and feature used
      largest = max(cfg.anyres_grid, key=lambda size: size[0] * size[1])
      views, sizes = (cfg.anyres_views,), jnp.tile(jnp.asarray(largest), (s.batch_size, 1, 1))
      count = int(cfg.anyres_lengths(np.asarray(sizes[:1, 0]))[0])
    else:
      views, sizes, count = (), None, cfg.image_tokens
    tokens = tokens.at[:, 1:1 + count].set(m.image_token_id)
    images = jax.random.normal(rng, (s.batch_size, 1, *views, side, side, 3))
    return model, (images, tokens, sizes), tokens, functools.partial(
        llava.generate, model, images=images, image_sizes=sizes)
  model = peft.from_config(config, blip2_task.build_model(config))
  vocab = (m.get("lm") or m.get("t5") or m.qformer)["vocab_size"]
  tokens = jax.random.randint(rng, (s.batch_size, s.seq_len), 5, vocab)
  images = jax.random.normal(rng, (s.batch_size, *[m.vision["image_size"]] * 2, 3))
  def generate(params, *args, **kwargs):
    return blip2.generate(model, params, images, *args, **kwargs)
  return (model, (images, tokens), tokens,
          generate if m.get("lm") or m.get("t5") else None)


def timed(fn, *args, **kwargs):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - start


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  if config.task not in ("flamingo", "blip2", "clip", "medclip", "llava", "mmbcd"):
    raise cli.UserError(f"mmjax.summary inspects Flamingo, BLIP-2, CLIP, MedCLIP, LLaVA and "
                        f"MMBCD recipes; this config's task is {config.task!r} "
                        "(--config=configs/flamingo.py[:variant]).")
  model, inputs, tokens, generate = model_and_inputs(config, jax.random.key(0))
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *inputs)["params"]))
  rows = param_table(shapes, config.trainable)
  total = sum(count for _, count, _ in rows)
  name = {"flamingo": "Flamingo", "blip2": "BLIP-2", "clip": "CLIP",
          "medclip": "MedCLIP", "llava": "LLaVA", "mmbcd": "MMBCD"}[config.task]
  print(f"{name} '{config.variant}': {total / 1e6:,.2f}M parameters")
  for group, count, trains in sorted(rows):
    print(f"  {group:<14} {count / 1e6:>12,.2f}M  {'trainable' if trains else 'frozen'}")
  print(f"  trainable: {sum(count for _, count, trains in rows if trains) / 1e6:,.2f}M")
  if not _RUN.value:
    return

  variables, init_s = timed(jax.jit(lambda: nn.unbox(
      model.init(jax.random.key(0), *inputs))))  # with BatchNorm's statistics, if any
  params = variables["params"]
  forward = jax.jit(lambda v, *args: model.apply(v, *args))
  out, compile_s = timed(forward, variables, *inputs)
  _, step_s = timed(forward, variables, *inputs)
  shapes = [tuple(x.shape) for x in jax.tree_util.tree_leaves(out)]
  print(f"forward on {', '.join(str(tuple(x.shape)) for x in inputs)}: outputs "
        f"{', '.join(map(str, shapes))}, first call {compile_s:.2f}s (compiles), then "
        f"{step_s:.3f}s")
  if generate is None:
    return
  s = config.summary
  prompt_len = s.seq_len // 2
  stop_ids = (config.tokens.eos,) + ((config.model.endofchunk_token_id,)
                                     if config.task == "flamingo" else ())
  gen_kw = dict(max_new_tokens=s.max_new_tokens, stop_ids=stop_ids, pad_id=config.tokens.pad)
  lengths = jnp.full((s.batch_size,), prompt_len, jnp.int32)
  prompt = tokens[:, :prompt_len]
  out, compile_s = timed(generate, params, prompt, lengths, jax.random.key(1), **gen_kw)
  _, step_s = timed(generate, params, prompt, lengths, jax.random.key(1), **gen_kw)
  print(f"greedy generation of up to {s.max_new_tokens} tokens: lengths "
        f"{np.asarray(out.lengths).tolist()}, first call {compile_s:.2f}s, then {step_s:.3f}s")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run(main, flags_parser=config_lib.parse_flags)
