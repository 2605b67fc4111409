"""LoRA and adapters (mmjax.peft) on mmjax models: exact function at init, the naive
LoRA formula, peft's initialisation, merge/unmerge, training only the LoRA parameters,
and parity with Hugging Face peft's files and logits (mmjax.convert.peft)."""

import json
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import checkpoints, peft, train
from mmjax.layers import Dense
from mmjax.models.blip2 import Blip2, Blip2Config
from mmjax.models.lm import LanguageModel, LMConfig
from mmjax.models.qformer import QFormerConfig
from mmjax.models.vit import ViTConfig

LM = LMConfig(vocab_size=50, width=16, depth=2, num_heads=2, mlp_dim=32, max_len=16)
LORA = peft.LoraConfig(rank=4, alpha=8, targets=("query", "value", "mlp/up"))
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 0, 50)


def _init(model, *args, seed=0):
  """`model`'s initial parameters (compiling an init with its random draws takes seconds)."""
  return nn.unbox(jax.jit(model.init)(jax.random.key(seed), *args)["params"])


def _random(model, *args, seed=0):
  """Parameters of `model`'s shapes drawn at random (N(0, 0.3^2)), without compiling its
  init: for the tests that compare functions, not initialisations."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def _run(model, params, *args, **kwargs):
  """`model.apply` compiled (op-by-op dispatch of a whole model is slower than compiling)."""
  return jax.jit(lambda p, a: model.apply({"params": p}, *a, **kwargs))(params, args)


@pytest.fixture(scope="module")
def lm():
  model = LanguageModel(LM)
  wrapped = peft.wrap(model, lora=LORA)
  return model, wrapped, _random(wrapped, TOKENS)


def test_targets_match_whole_paths_or_path_ends_and_exclude_comes_first():
  assert peft.matches("layers_0/attn/query", ("query",))
  assert peft.matches("lm/layers_0/attn/query", ("attn/query",))
  assert not peft.matches("layers_0/attn/query_norm", ("query",))
  assert not peft.matches("layers_0/attn/myquery", ("query",))
  assert peft.matches("layers_0/attn/query", r".*attn/(query|value)")
  assert not peft.matches("xlayers_0/attn/query", r"layers_\d/attn/query")  # fullmatch
  assert not peft.matches("layers_1/attn/query", ("query",), exclude=r"layers_1/.*")
  assert not peft.matches("layers_1/attn/query", r".*", exclude=("layers_1/attn/query",))


def test_lora_leaves_sit_beside_the_targeted_kernels_only(lm):
  _, _, params = lm
  flat = checkpoints.flat_params(params)
  lora = sorted(k for k in flat if k.endswith(("lora_a", "lora_b")))
  assert lora == sorted(f"layers_{i}/{m}/{leaf}" for i in range(2)
                        for m in ("attn/query", "attn/value", "mlp/up")
                        for leaf in ("lora_a", "lora_b"))
  # Factorised like the kernel: query's kernel is "d h k", A "d r", B "r h k".
  assert flat["layers_0/attn/query/lora_a"].shape == (16, 4)
  assert flat["layers_0/attn/query/lora_b"].shape == (4, 2, 8)


def test_a_fresh_lora_leaves_the_logits_unchanged(lm):
  model, wrapped, _ = lm
  params = _init(wrapped, TOKENS)
  _, base = peft.split(params)
  np.testing.assert_allclose(_run(wrapped, params, TOKENS), _run(model, base, TOKENS),
                             atol=1e-6)


def test_peft_init_draws_a_within_one_over_sqrt_fan_in_and_gaussian_with_variance_1_over_r():
  model = Dense((4, 64), ("embed", "heads", "head_dim"))
  x = jnp.ones((1, 256))
  a = nn.unbox(peft.wrap(model, lora=peft.LoraConfig(rank=64, targets=r".*")).init(
      jax.random.key(0), x)["params"]["lora_a"])
  bound = 1 / math.sqrt(256)  # torch kaiming_uniform_(a=sqrt(5)) on [r, fan_in]
  assert float(jnp.max(jnp.abs(a))) <= bound
  assert float(jnp.max(jnp.abs(a))) > 0.95 * bound
  np.testing.assert_allclose(float(jnp.var(a)), bound**2 / 3, rtol=0.05)  # uniform's
  gaussian = nn.unbox(peft.wrap(model, lora=peft.LoraConfig(
      rank=64, targets=r".*", init="gaussian")).init(jax.random.key(0), x)["params"])
  np.testing.assert_allclose(float(jnp.var(gaussian["lora_a"])), 1 / 64, rtol=0.05)
  assert not np.any(np.asarray(gaussian["lora_b"]))


class _Draw(nn.Module):
  """The keep mask the first "dropout" draw of a root module makes (as the Dense's)."""

  def __call__(self, x):
    return jax.random.bernoulli(self.make_rng("dropout"), 0.5, x.shape)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_computes_x_w_plus_scale_times_dropout_x_a_b(rslora):
  cfg = peft.LoraConfig(rank=3, alpha=6, rslora=rslora, dropout=0.5, targets=r".*")
  model = peft.wrap(Dense((2, 5), ("embed", "heads", "head_dim"), use_bias=True), lora=cfg)
  x = jax.random.normal(jax.random.key(0), (4, 6))
  params = _random(model, x)
  y = _run(model, params, x, rngs={"dropout": jax.random.key(3)})
  keep = _Draw().apply({}, x, rngs={"dropout": jax.random.key(3)})  # the branch's draw
  dropped = jnp.where(keep, x / 0.5, 0)
  w, a, b = (params["kernel"].reshape(6, 10), params["lora_a"], params["lora_b"].reshape(3, 10))
  scale = 6 / (math.sqrt(3) if rslora else 3)
  naive = x @ w + params["bias"].reshape(10) + scale * (dropped @ a) @ b
  np.testing.assert_allclose(y.reshape(4, 10), naive, atol=1e-5)
  # Without a "dropout" rng the branch is deterministic.
  y = _run(model, params, x)
  np.testing.assert_allclose(y.reshape(4, 10), x @ w + params["bias"].reshape(10)
                             + scale * (x @ a) @ b, atol=1e-5)


def test_the_train_steps_context_turns_lora_dropout_on_and_only_it():
  cfg = peft.LoraConfig(rank=3, alpha=6, dropout=0.5, targets=r".*")
  model = peft.wrap(Dense(5, ("embed", "mlp")), lora=cfg)
  x = jax.random.normal(jax.random.key(0), (4, 6))
  params = _random(model, x)
  deterministic = _run(model, params, x)
  with peft.training(jax.random.key(3)):  # as the trainer runs a task's loss
    first, second = _run(model, params, x), _run(model, params, x)
  with peft.training(jax.random.key(3)):
    again = _run(model, params, x)
  assert not np.allclose(first, deterministic)
  assert not np.allclose(first, second)  # each apply draws its own mask
  np.testing.assert_array_equal(first, again)  # from the step's key alone
  np.testing.assert_array_equal(_run(model, params, x), deterministic)  # after: off again


def test_merge_gives_the_base_model_the_wrapped_ones_function_and_unmerge_undoes_it(lm):
  model, wrapped, params = lm
  merged = peft.merge(params, LORA)
  lora, base = peft.split(params)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
  np.testing.assert_allclose(_run(model, merged, TOKENS),
                             _run(wrapped, params, TOKENS), atol=1e-5)
  restored = peft.unmerge(merged, lora, LORA)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
                         restored, params)
  assert peft.combine(lora, base).keys() == params.keys()


def test_merge_handles_scanned_layer_stacks():
  cfg = LMConfig(**{**LM.__dict__, "scan_layers": True})
  model = LanguageModel(cfg)
  wrapped = peft.wrap(model, lora=LORA)
  params = _random(wrapped, TOKENS)
  assert params["layers"]["attn"]["query"]["lora_a"].shape == (2, 16, 4)
  np.testing.assert_allclose(_run(model, peft.merge(params, LORA), TOKENS),
                             _run(wrapped, params, TOKENS), atol=1e-5)


def test_the_wrapped_model_is_hashable_equal_to_an_equal_wrap_and_a_static_jit_argument(lm):
  model, wrapped, params = lm
  again = peft.wrap(LanguageModel(LM), lora=LORA)
  assert wrapped == again and hash(wrapped) == hash(again) and wrapped != model
  assert isinstance(wrapped, LanguageModel) and peft.unwrap(wrapped) == model

  @jax.jit
  def logits(params):
    return forward(wrapped, params)

  forward = jax.jit(lambda m, p: m.apply({"params": p}, TOKENS), static_argnums=0)
  np.testing.assert_allclose(logits(params), _run(wrapped, params, TOKENS),
                             atol=1e-6)


def test_adapters_are_the_identity_at_init_and_their_parameters_get_gradients():
  model = LanguageModel(LM)
  wrapped = peft.wrap(model, adapters=peft.AdapterConfig(dim=4, targets=("attn/out",)))
  params = _init(wrapped, TOKENS)
  out = params["layers_0"]["attn"]["out"]
  assert out["adapter_down"].shape == (16, 4) and out["adapter_up"].shape == (4, 16)
  adapters, base = peft.split(params, peft.ADAPTER_LEAVES)
  np.testing.assert_allclose(_run(wrapped, params, TOKENS), _run(model, base, TOKENS),
                             atol=1e-6)

  def loss(adapters):
    logits = wrapped.apply({"params": peft.combine(adapters, base)}, TOKENS)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  grads = checkpoints.flat_params(jax.jit(jax.grad(loss))(adapters))
  assert float(jnp.abs(grads["layers_0/attn/out/adapter_up"]).max()) > 0
  assert float(jnp.abs(grads["layers_1/attn/out/adapter_up_bias"]).max()) > 0


def test_lora_wraps_blip2s_lm_and_method_calls_of_the_original_class_work():
  vision = ViTConfig(image_size=16, patch_size=8, width=24, depth=1, num_heads=2,
                     output_dim=None, keep_class_token=True, token_norm=True)
  qformer = QFormerConfig(vocab_size=41, width=16, depth=1, num_heads=2, num_queries=2,
                          encoder_width=24, max_len=16)
  model = Blip2(Blip2Config(vision, qformer, dec_token_id=40, embed_dim=8,
                            lm=LMConfig(vocab_size=40, width=16, depth=2, num_heads=2,
                                        max_len=64)))
  cfg = peft.LoraConfig(rank=2, targets=r"lm/layers_\d+/attn/(query|value)")
  wrapped = peft.wrap(model, lora=cfg)
  images = jax.random.randint(jax.random.key(1), (2, 16, 16, 3), 0, 255).astype(jnp.uint8)
  tokens = jax.random.randint(jax.random.key(2), (2, 7), 3, 40)
  params = _random(wrapped, images, tokens)
  flat = checkpoints.flat_params(params)
  assert sorted(k for k in flat if "lora" in k) == sorted(
      f"lm/layers_{i}/attn/{m}/lora_{x}" for i in range(2) for m in ("query", "value")
      for x in "ab")
  # An unbound method of the original class, and the forward pass: as the merged model's.
  merged = peft.merge(params, cfg)
  prefix = _run(wrapped, params, images, method=Blip2.prefix)
  np.testing.assert_allclose(_run(model, merged, images, tokens, prefix=prefix),
                             _run(wrapped, params, images, tokens), atol=1e-5)


# ---------------------------------------------------------------------------------------
# The trainer: config.peft.
# ---------------------------------------------------------------------------------------
def _peft_lm_config(steps):
  from test_train import lm_config  # the LM recipe at toy size
  config = lm_config(**{"train.steps": steps, "train.checkpoint_every": 1,
                        "train.keep_checkpoints": 3})
  config.peft = {"lora": {"rank": 4, "alpha": 8, "targets": ("query", "value")},
                 "modules_to_save": (r"^final_norm/",)}
  return config


def test_a_peft_run_trains_only_lora_and_the_modules_to_save_and_resumes_exactly(tmp_path):
  config = _peft_lm_config(3)  # warm-up: the first step's lr is 0; A moves once B is not 0
  train.run(config, tmp_path / "whole", devices=jax.devices()[:1])
  assert config.trainable == peft.trainable_pattern(config)
  # The first step's lr is 0 (warm-up): its checkpoint holds the initial parameters.
  params = checkpoints.flat_params(checkpoints.load(tmp_path / "whole", step=1).params)
  trained = checkpoints.flat_params(checkpoints.load(tmp_path / "whole").params)
  assert trained.keys() == params.keys()
  changed = {k for k in params if not np.array_equal(params[k], trained[k])}
  assert changed == {k for k in params if k.endswith(("lora_a", "lora_b"))
                     or k.startswith("final_norm/")}
  trainable, _ = train.partition_params(checkpoints.tree_params(params), config.trainable)
  assert sorted(checkpoints.flat_params(trainable)) == sorted(changed)
  # Stopped after a step and re-run: the same losses as the uninterrupted run.
  from test_train import losses_by_step
  train.run(_peft_lm_config(2), tmp_path / "resumed", devices=jax.devices()[:1])
  train.run(_peft_lm_config(3), tmp_path / "resumed", devices=jax.devices()[:1])
  assert losses_by_step(tmp_path / "resumed") == losses_by_step(tmp_path / "whole")


def test_config_peft_is_checked_field_by_field():
  from mmjax import config as config_lib
  config = _peft_lm_config(1)
  config.peft = {"lora": {"rank": 0, "rnak": 4, "targets": "(", "init": "kaiming",
                          "dropout": 1.5},
                 "modules_to_save": ("[",)}
  found = "\n".join(config_lib.problems(config))
  for text in ("rnak", "config.peft.lora.init='kaiming' is not one of ('peft', 'gaussian')",
               "config.peft.lora.rank=0 must be >= 1", "targets='(' is not a regular",
               "dropout=1.5 must be in [0, 1)",
               "modules_to_save='[' is not a regular"):
    assert text in found, (text, found)


# ---------------------------------------------------------------------------------------
# Hugging Face peft's files and logits.
# ---------------------------------------------------------------------------------------
def _hf_lora(tmp_path, family, targets):
  """A random small HF LM under peft's LoRA (B random too, so that it matters), the base
  saved by save_pretrained in tmp_path/base and the adapter by peft in tmp_path/adapter."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_peft = pytest.importorskip("peft")
  torch.manual_seed(0)
  if family == "llama":
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40))
  else:
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=40))
  with torch.no_grad():
    for p in base.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  base.eval().save_pretrained(tmp_path / "base")
  model = hf_peft.get_peft_model(base, hf_peft.LoraConfig(r=4, lora_alpha=8,
                                                          target_modules=targets))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(torch.randn_like(p) * 0.3)
  model.eval().save_pretrained(tmp_path / "adapter")
  return model


def _torch_logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


@pytest.mark.parametrize("family,targets", [
    ("llama", ["q_proj", "v_proj", "o_proj", "down_proj"]),
    ("gpt2", ["c_attn", "c_proj"])])
def test_a_peft_adapter_loads_with_peft_s_logits_and_saves_back_to_peft(tmp_path, family,
                                                                        targets):
  from mmjax.convert import peft as convert_peft
  from mmjax.convert.lm import convert_lm
  hf_model = _hf_lora(tmp_path, family, targets)
  tokens = np.array([[1, 5, 9, 33, 2, 70, 4, 11], [3, 3, 8, 95, 0, 17, 60, 1]])
  cfg, params = convert_lm(tmp_path / "base")
  lora, lora_params = convert_peft.load_adapter(tmp_path / "adapter", tmp_path / "base")
  assert (lora.rank, lora.alpha, lora.scale) == (4, 8.0, 2.0)
  model = peft.wrap(LanguageModel(cfg), lora=lora)
  logits = _run(model, peft.combine(params, lora_params), jnp.asarray(tokens))
  expected = _torch_logits(hf_model, tokens)
  np.testing.assert_allclose(logits, expected, atol=1e-4)
  # Without the adapter the logits are far from peft's: the test can fail.
  assert np.abs(_run(LanguageModel(cfg), params, jnp.asarray(tokens)) - expected).max() > 0.1
  if family == "gpt2":  # c_attn: the same A on query, key and value, B split by rows
    layer = lora_params["layers_0"]["attn"]
    np.testing.assert_array_equal(layer["query"]["lora_a"], layer["value"]["lora_a"])

  # Saved back: peft loads it onto the base model and computes the same logits.
  import transformers
  from peft import PeftModel
  convert_peft.save_adapter(tmp_path / "saved", lora_params, lora, tmp_path / "base")
  base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
  reloaded = PeftModel.from_pretrained(base, tmp_path / "saved").eval()
  np.testing.assert_allclose(_torch_logits(reloaded, tokens), expected, atol=1e-5)
  saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
  assert sorted(saved["target_modules"]) == sorted(targets)
  # Merged, then exported by the LM export: plain weights transformers loads with the
  # adapted model's logits.
  from mmjax.convert.common import save_hf
  from mmjax.convert.lm import export_lm
  save_hf(tmp_path / "exported", *export_lm(
      peft.merge(peft.combine(params, lora_params), lora), like=tmp_path / "base"))
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
  np.testing.assert_allclose(_torch_logits(exported, tokens), expected, atol=1e-4)
  if family == "llama":  # the command line merges the adapter into the converted LM
    import subprocess
    import sys
    subprocess.run([sys.executable, "-m", "mmjax.convert", f"--hf_dir={tmp_path / 'base'}",
                    f"--peft_adapter={tmp_path / 'adapter'}", f"--output={tmp_path / 'merged'}"],
                   check=True, capture_output=True, cwd=pathlib.Path(__file__).parent.parent)
    merged = checkpoints.load(tmp_path / "merged").params
    np.testing.assert_allclose(_run(LanguageModel(cfg), merged, jnp.asarray(tokens)), expected,
                               atol=1e-4)


def test_adapters_mmjax_cannot_compute_or_write_are_refused_by_name(tmp_path):
  import shutil

  from mmjax.convert import peft as convert_peft
  from mmjax.convert.common import ConversionError
  _hf_lora(tmp_path, "gpt2", ["c_attn"])
  adapter = tmp_path / "adapter"
  config = json.loads((adapter / "adapter_config.json").read_text())
  for field, value, says in (("use_dora", True, "use_dora=True is not supported"),
                             ("bias", "all", "bias='all' is not supported"),
                             ("rank_pattern", {"c_attn": 8}, "rank_pattern"),
                             ("peft_type", "IA3", "only LoRA adapters"),
                             ("some_new_field", 1, "some_new_field")):
    (adapter / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ConversionError, match=says):
      convert_peft.load_adapter(adapter, tmp_path / "base")
  (adapter / "adapter_config.json").write_text(json.dumps(config))
  lora, lora_params = convert_peft.load_adapter(adapter, tmp_path / "base")
  # Unknown tensors in the weights file.
  from safetensors.numpy import load_file, save_file
  weights = load_file(str(adapter / "adapter_model.safetensors"))
  odd = tmp_path / "odd"
  shutil.copytree(adapter, odd)
  save_file({**weights, "base_model.model.transformer.wte.lora_embedding_A": np.ones(
      (4, 96), np.float32)}, str(odd / "adapter_model.safetensors"))
  with pytest.raises(ConversionError, match="lora_embedding_A"):
    convert_peft.load_adapter(odd, tmp_path / "base")
  # c_attn's query, key and value trained apart have no peft form.
  flat = checkpoints.flat_params(lora_params)
  flat["layers_1/attn/key/lora_a"] = flat["layers_1/attn/key/lora_a"] + 1
  with pytest.raises(ConversionError, match="transformer.h.1.attn.c_attn.*LoRA A's differ"):
    convert_peft.save_adapter(tmp_path / "saved", checkpoints.tree_params(flat), lora,
                              tmp_path / "base")


@pytest.mark.parametrize("family", ["flamingo", "clip"])
def test_lora_wraps_flamingos_lm_and_clips_towers(family):
  """The same patterns on other families: LoRA leaves where they match, a fresh LoRA
  leaves the outputs alone, and a nonzero B changes them."""
  from conftest import flamingo_config

  from mmjax.models.flamingo import Flamingo
  from mmjax.models.two_towers import TwoTowers, TwoTowersConfig
  from mmjax.models.vit import ViTConfig
  if family == "flamingo":
    model, targets = Flamingo(flamingo_config()), r"lm/layers_\d+/attn/(query|value)"
    tokens = jnp.array([[1, 5, 6, 2, 0]])  # <image> text <|endofchunk|> pad
    args = (tokens, jnp.zeros((1, 1, 1, 16, 16, 3)), jnp.ones((1,), jnp.int32))
  else:
    model = TwoTowers(TwoTowersConfig(
        vision=ViTConfig(image_size=16, patch_size=8, width=32, depth=2, num_heads=4,
                         output_dim=16),
        text=LMConfig(vocab_size=64, width=32, depth=1, num_heads=4, max_len=8),
        embed_dim=16))
    targets = ("query", "value")
    args = (jnp.zeros((1, 16, 16, 3), jnp.uint8), jnp.ones((1, 8), jnp.int32))
  wrapped = peft.wrap(model, lora=peft.LoraConfig(rank=2, targets=targets))
  params = _random(wrapped, *args)
  lora, base = peft.split(params)
  paths = [p for p in checkpoints.flat_params(lora) if p.endswith("lora_a")]
  if family == "flamingo":
    assert sorted(paths) == [f"lm/layers_{i}/attn/{m}/lora_a" for i in range(4)
                             for m in ("query", "value")]
  else:  # both towers
    assert {p.split("/")[0] for p in paths} == {"image", "text"}
  zero_b = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if "lora_b" in jax.tree_util.keystr(path) else x,
      params)
  first = lambda out: jax.tree_util.tree_leaves(out)[0]
  np.testing.assert_allclose(first(_run(wrapped, zero_b, *args)),
                             first(_run(model, base, *args)), atol=1e-5)
  assert not np.allclose(first(_run(wrapped, params, *args)), first(_run(model, base, *args)))
