"""The benchmark harness measures what it says (no speed is asserted: only that each
result is complete and consistent)."""

import importlib.util

import jax
import pytest

from benchmarks import harness, train_step
from mmjax.configs import flamingo


def test_train_step_result_is_complete(tmp_path):
  config = flamingo.get_config()
  config.data.batch_size, config.data.seq_len = 2, 32
  result = train_step.measure(config, warmup=1, runs=2, devices=jax.devices()[:1],
                              profile=str(tmp_path / "trace"))
  assert result["runs"] == 2 and result["step_min_s"] <= result["step_s"] <= result["step_max_s"]
  assert result["tokens_per_s"] == pytest.approx(2 * 32 / result["step_s"])
  assert result["mfu"] == pytest.approx(result["model_flops_per_s"] / result["peak_flops"])
  assert 0 < result["mfu"] and result["model_flops_per_step"] > 0
  line = harness.record("train_step", result, out=str(tmp_path / "results.jsonl"))
  assert (tmp_path / "results.jsonl").read_text().count("\n") == 1
  assert line["machine"]["backend"] == "cpu"


def test_side_by_side_times_both_systems_on_the_same_model(tmp_path):
  pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
  pytest.importorskip("transformers", reason="transformers is in the dev extra")
  from benchmarks import side_by_side
  size = dict(lm=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, vocab_size=64),
              vision=dict(embed_dim=16, image_size=16, patch_size=8, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=24),
              perceiver=dict(resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8,
                             resampler_n_latents=3),
              batch=2, seq_len=16, images=2, new_tokens=4)
  only = ("train", "lm", "generate")
  measurements = ["train_step", "lm_train_step", "generation"]
  if importlib.util.find_spec("open_flamingo") and importlib.util.find_spec("einops_exts"):
    only += ("openflamingo",)
    measurements += ["openflamingo_perceiver", "openflamingo_gated_block"]
  lines = side_by_side.run(size, name="toy", rounds=1, runs=1, only=only,
                           out=str(tmp_path / "results.jsonl"))
  got = {(line["measurement"], line["system"]) for line in lines}
  assert got == {(m, s) for m in measurements for s in ("mmjax", "torch")}
  for line in lines:
    if line["system"] == "mmjax":
      theirs = next(other for other in lines if other["measurement"] == line["measurement"]
                    and other["system"] == "torch")
      rate = next(k for k in line if k.endswith("_per_s") and k != "model_flops_per_s")
      assert line["speedup_vs_torch"] == pytest.approx(line[rate] / theirs[rate])


BLIP2_TOY = {"vision": {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
             "qformer": {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "intermediate_size": 24,
                         "max_position_embeddings": 16, "cross_attention_frequency": 2},
             "opt": {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "ffn_dim": 24},
             "num_queries": 3, "embed_dim": 8, "seq_len": 8, "stage1_batch": 4,
             "stage2_batch": 2}


@pytest.mark.parametrize("stage", [1, 2])
def test_blip2_torch_step_computes_mmjax_loss(stage, tmp_path, monkeypatch):
  """The PyTorch side's loss is mmjax's on the same weights and batch: stage 2's
  transformers `labels` loss, stage 1's ITC + ITM (on mmjax's ITM pairs of the same
  negatives) from the retrieval model's modules."""
  torch = pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
  pytest.importorskip("transformers", reason="transformers is in the dev extra")
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import blip2
  from mmjax.models.blip2 import Blip2
  from mmjax.tasks import blip2 as task
  model, cfg, params = blip2.reference_model(BLIP2_TOY, stage, str(tmp_path))
  vocab = BLIP2_TOY["opt" if stage == 2 else "qformer"]["vocab_size"]
  batch = blip2.example_batch(BLIP2_TOY, stage, vocab, np.random.default_rng(0))
  step = blip2.TorchStep(model, stage, batch, blip2.recipe(cfg, BLIP2_TOY, stage).optim)
  model.eval()
  with torch.no_grad():
    theirs = float(model(**step.inputs).loss if stage == 2 else step.stage1_loss())
  mmjax = Blip2(cfg)
  images, tokens = jnp.asarray(batch["image"]), jnp.asarray(batch["tokens"])
  if stage == 2:
    total, count, _ = task.loss_terms(mmjax, params, {"image": images, "tokens": tokens},
                                      jax.random.key(0))
    ours = total / count
  else:
    apply = lambda method, *args: mmjax.apply({"params": params}, *args, method=method)
    valid = tokens != cfg.pad_token_id
    image = apply(Blip2.image_features, images)
    ours, similarity = task.contrastive_loss(*apply(Blip2.contrastive, image, tokens, valid))
    negative = jnp.roll(jnp.arange(len(tokens)), -1)  # the PyTorch side's negatives
    monkeypatch.setattr(task, "hard_negatives", lambda similarity, rng: (negative, negative))
    ours += task.matching_loss(lambda i, t, v: apply(Blip2.matching, i, t, v), image, tokens,
                               valid, similarity, jax.random.key(0))
  assert abs(float(ours) - theirs) < 1e-4, (float(ours), theirs)



def test_contrastive_losses_match_open_clip():
  """The contrastive benchmark compares like with like: at a tiny batch, mmjax's InfoNCE
  and sigmoid losses and their gradients (features, scale, bias) are open_clip's
  `ClipLoss` and `SigLipLoss` on the same features, and its train-step recipes train with
  the loss they are named after."""
  pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
  if importlib.util.find_spec("open_clip") is None:
    pytest.skip("pip install --no-deps open_clip_torch==3.3.0")
  import numpy as np

  from benchmarks import contrastive
  from mmjax.models.two_towers import TwoTowersConfig
  from mmjax.tasks import model_config
  image, text = contrastive.features(8, dim=16)
  for loss in contrastive.LOSSES:
    ours = contrastive.MmjaxLoss(loss, image, text)
    value, grads = ours.value_and_grads()
    their_value, their_grads = contrastive.OpenClipLoss(loss, image, text).value_and_grads()
    assert value == pytest.approx(their_value, rel=1e-5), loss
    assert len(grads) == len(their_grads) == (4 if loss == "sigmoid" else 3)
    for g, h in zip(grads, their_grads):
      np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5, err_msg=loss)
    assert ours.memory["temp_bytes"] > 0
    model = model_config(TwoTowersConfig, contrastive.recipe(loss, 16, 1))
    assert model.loss == loss and (model.init_bias is not None) == (loss == "sigmoid")


def test_medclip_torch_step_computes_mmjax_loss():
  """The MedCLIP step benchmark compares like with like: its PyTorch semantic matching loss
  (MedCLIP's `ImageTextContrastiveLoss`) is `mmjax.losses.semantic_matching_loss` and its
  gradients, on labels with missing findings (every row has some), and its step trains the
  recipe's towers on a batch as the recipe's pipeline gives it."""
  torch = pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
  pytest.importorskip("transformers", reason="transformers is in the dev extra")
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import contrastive, medclip, medclip_torch
  from mmjax import losses
  image, text = contrastive.features(6, dim=8)
  rng = np.random.default_rng(0)
  labels = rng.choice([np.nan, 0.0, 1.0, -1.0], size=(2, 6, 5)).astype(np.float32)
  labels[:, :, 0] = 1.0
  scale = 100.0
  ours, grads = jax.value_and_grad(losses.semantic_matching_loss, argnums=(0, 1))(
      jnp.asarray(image), jnp.asarray(text), scale, *map(jnp.asarray, labels))
  image_t, text_t = (torch.tensor(x, requires_grad=True) for x in (image, text))
  theirs = medclip_torch.semantic_matching_loss(
      scale * image_t @ text_t.T, *map(torch.tensor, np.nan_to_num(labels)))
  theirs.backward()
  assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
  for g, t in zip(grads, (image_t, text_t)):
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-4, atol=1e-5)
  config = medclip.step_recipe(medclip.STEP_SIZES["tiny"] | {"batch": 4})
  size, seq = config.data.image_size, config.data.seq_len
  batch = {"image": rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8),
           "tokens": np.where(np.arange(seq) < 9, rng.integers(4, 100, (4, seq)), 0),
           "image_labels": labels[0, :4], "text_labels": labels[1, :4]}
  step = medclip.TorchStep(config, batch)
  before = step.model.text_model.projection_head.weight.detach().clone()
  step()
  assert np.isfinite(step.loss)
  assert not torch.equal(before, step.model.text_model.projection_head.weight)
  assert sum(p.numel() for p in step.model.parameters()) > 200_000  # the recipe's towers


def test_llava_step_compares_like_with_like(tmp_path):
  """The LLaVA step benchmark compares like with like: on the same converted weights and
  batch, mmjax with LoRA (config.peft) and transformers + peft start from the same loss and
  train the same number of parameters, and the step path records both systems."""
  pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
  pytest.importorskip("transformers", reason="transformers is in the dev extra")
  pytest.importorskip("peft", reason="peft is in the dev extra")
  from benchmarks import llava
  lines = llava.train_steps(["tiny"], ["lora8"], rounds=1, runs=1, rss_steps=0,
                            out=str(tmp_path / "llava.jsonl"))
  assert [x["system"] for x in lines] == ["mmjax", "torch"]
  ours = lines[0]
  assert ours["loss_mmjax"] == pytest.approx(ours["loss_torch"], abs=1e-4)
  assert ours["trainable_mmjax"] == ours["trainable_torch"] > 0
  assert ours["temp_bytes"] > 0 and ours["speedup_vs_torch"] > 0
  assert "| tiny | lora8 |" in llava.step_table(lines)


def test_mmbcd_step_compares_like_with_like(tmp_path):
  """The MMBCD step benchmark compares like with like: on the same converted weights and
  the pipeline's crops, mmjax and the reference start from the same loss with the
  attention's dropout off and train the same (partly frozen) parameters, and the step path
  records both systems."""
  pytest.importorskip("torch", reason="torch==2.13.0 (CPU) is in the dev extra")
  pytest.importorskip("transformers", reason="transformers is in the dev extra")
  from benchmarks import mmbcd
  lines = mmbcd.train_steps(["toy"], rounds=1, runs=1, out=str(tmp_path / "mmbcd.jsonl"))
  assert [x["system"] for x in lines] == ["mmjax", "torch"]
  ours = lines[0]
  assert ours["loss0_nodropout_mmjax"] == pytest.approx(ours["loss0_nodropout_torch"],
                                                         abs=1e-4)
  assert 0 < ours["trainable"] < ours["params"]  # both froze the same, or it raised
  assert ours["temp_bytes"] > 0 and ours["speedup_vs_torch"] > 0
  assert "| toy (16 px) | 4 x 2 |" in mmbcd.step_table(lines)
