"""Flamingo: frozen ViT + Perceiver Resampler + frozen LM with gated cross-attention,
trained on interleaved shapes-world documents mixed with image-caption pairs, then
evaluated few-shot.

  python -m mmjax.train --config=configs/flamingo.py --workdir=/tmp/flamingo

The frozen backbones are the runs of configs/clip.py (vision tower) and configs/lm.py
(language model) of the same variant: trained on first use, cached under
$MMJAX_CACHE (default ~/.cache/mmjax) by a hash of their config, reused afterwards.
`--config.init.lm.workdir=DIR` takes the LM from another run (or a converted checkpoint),
`--config.init.lm.steps=20` pretrains it for 20 steps only, `--config.init.lm.steps=0`
not at all. A smoke run of the whole recipe (backbones included) takes about 2.5 minutes
on a 2-core CPU:

  python -m mmjax.train --config=configs/flamingo.py --workdir=/tmp/smoke \
      --config.init.vision.steps=20 --config.init.lm.steps=20 --config.train.steps=20 \
      --config.evaluate.episodes=8

Variants (`--config=configs/flamingo.py:<variant>`):
  tiny   the embedded default: 64px images, a 4-layer LM; runs on a laptop CPU.
  base   width 768, 12 LM layers, a ViT-B/16 and a 32k vocabulary: model shapes for
         benchmarks and `mmjax.summary`; not trainable on the embedded tokenizer.
  3b, 9b, 80b
         the paper's shapes (Alayrac et al. 2022, Table 4 and its Chinchilla LMs: 1.4B,
         7B and 70B): Perceiver Resampler of 6 layers, 64 latents, 16 heads of 128 over
         1536-wide features; gated blocks with 128-wide heads before every LM layer (3B),
         every 4th (9B: 8 blocks) or every 7th (80B: 12 blocks); squared ReLU in both.
         The paper's NFNet-F6 is replaced by a ViT of its feature width (1536) and size
         (~450M parameters) at its 320px resolution; rotary positions stand in for the
         LMs' relative ones. Totals: 3.1B, 8.6B and 73.7B parameters, of which 1.3B, 1.6B
         and 8.5B train. For `mmjax.summary`, FLOP counts and fit checks.

Inspect a variant (parameter counts, a compiled forward pass and generation):
  python -m mmjax.summary --config=configs/flamingo.py:base
"""

import ml_collections

from mmjax.cli import UserError
from mmjax.data.tokenizer import BOS_ID as BOS
from mmjax.data.tokenizer import ENDOFCHUNK_ID as ENDOFCHUNK
from mmjax.data.tokenizer import EOS_ID as EOS
from mmjax.data.tokenizer import MEDIA_ID as MEDIA
from mmjax.data.tokenizer import PAD_ID as PAD
from mmjax.data.tokenizer import VOCAB_SIZE

VARIANTS = {
    "tiny": dict(
        vision=dict(image_size=64, patch_size=8, width=128, depth=4, num_heads=4,
                    output_dim=128, activation="quick_gelu"),
        resampler=dict(depth=2, num_heads=4, head_dim=32, num_latents=16),
        # Rotary positions: with learned ones the LM did not learn to repeat names from its
        # context in 500 steps (3/50 one-way episodes; 22/50 with RoPE).
        lm=dict(vocab_size=VOCAB_SIZE, width=256, depth=4, num_heads=4, max_len=256,
                position="rope"),
        xattn=dict(every=1, num_heads=4, head_dim=32),
    ),
    "base": dict(
        vision=dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12,
                    output_dim=512, activation="quick_gelu"),
        resampler=dict(depth=6, num_heads=8, head_dim=64, num_latents=64),
        lm=dict(vocab_size=32000, width=768, depth=12, num_heads=12, max_len=1024),
        xattn=dict(every=1, num_heads=8, head_dim=64),
    ),
}


def _paper_variant(lm_width: int, lm_depth: int, lm_heads: int, every: int,
                   placement: str) -> dict:
  return dict(
      vision=dict(image_size=320, patch_size=16, width=1536, depth=16, num_heads=16,
                  output_dim=1536, activation="gelu"),
      resampler=dict(depth=6, num_heads=16, head_dim=128, num_latents=64,
                     activation="squared_relu"),
      lm=dict(vocab_size=32000, width=lm_width, depth=lm_depth, num_heads=lm_heads,
              head_dim=128, norm="rmsnorm", use_bias=False, position="rope", max_len=2048),
      xattn=dict(every=every, placement=placement, num_heads=lm_heads, head_dim=128,
                 activation="squared_relu"),
  )


PAPER_VARIANTS = {
    "3b": _paper_variant(2048, 24, 16, every=1, placement="openflamingo"),
    "9b": _paper_variant(4096, 32, 32, every=4, placement="openflamingo"),
    "80b": _paper_variant(8192, 80, 64, every=7, placement="idefics"),
}
VARIANTS |= PAPER_VARIANTS


def variant_shapes(arg: str | None, recipe: str = "flamingo") -> tuple[str, dict]:
  """`(name, shapes)` of the variant `arg` (default "tiny"), shared by the recipes whose
  models are Flamingo's parts."""
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise UserError(f"Unknown {recipe} variant {variant!r}; choose from {sorted(VARIANTS)} "
                    f"(--config=configs/{recipe}.py:<variant>).")
  return variant, VARIANTS[variant]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, _ = variant_shapes(arg)
  image_size = VARIANTS[variant]["vision"]["image_size"]
  config = ml_collections.ConfigDict()
  config.task = "flamingo"
  config.variant = variant
  config.seed = 0
  # Devices: a (data, fsdp, tensor) mesh, -1 filling with the remaining devices, and the
  # sharding preset ("data_parallel", "fsdp", "fsdp_tensor"; see mmjax.sharding).
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = "fsdp"
  # "bfloat16": mixed precision, float32 parameters and optimizer state (mmjax.tasks).
  config.compute_dtype = "float32"
  # Rematerialise every layer: "none", "minimal", "save_qkv_proj", "full" (mmjax.layers.stack).
  config.remat = "none"
  # Each layer stack as one scanned layer: compiles once whatever the depth.
  config.scan_layers = variant in PAPER_VARIANTS
  # A Hugging Face tokenizer directory (mmjax.data.tokenizer.HFTokenizer: `<image>`,
  # `<|endofchunk|>` and `<PAD>` added as OpenFlamingo adds them), or "" for the embedded
  # one. The token ids below (model.media_token_id, model.endofchunk_token_id,
  # model.lm.vocab_size, tokens) are the embedded tokenizer's: a run with another stops at
  # start-up, naming the values to set.
  config.tokenizer = ""
  config.model = dict(
      **VARIANTS[variant], media_token_id=MEDIA, endofchunk_token_id=ENDOFCHUNK,
      vision_feature_layer=-1)
  # Parameters that train (a regex on '/'-joined paths); everything else stays frozen.
  config.trainable = r"^(resampler|lm/(groups/)?xattn_\d+)/"
  # Token ids whose rows of the LM's input embedding train while its other rows stay
  # bit-identical (with tied embeddings, also their output rows); `trainable` must match
  # lm/embed/embedding. As OpenFlamingo trains the `<image>` and `<|endofchunk|>` it adds to
  # a pretrained LM: (model.media_token_id, model.endofchunk_token_id). Adam keeps state
  # for the whole embedding.
  config.trainable_token_rows = ()
  # Pretrained backbones, keyed by the parameter subtree they fill: the run of
  # configs/<recipe>.py:<variant>, trained once and cached (`steps`: its train.steps, -1
  # for the recipe's own, 0 for none: the backbone stays randomly initialised), or the run
  # or converted checkpoint in `workdir`; `source` is the subtree of its parameters taken.
  config.init = dict(
      vision=dict(recipe="clip", variant=variant, steps=-1, workdir="", source="image"),
      lm=dict(recipe="lm", variant=variant, steps=-1, workdir="", source=""))
  # Mappings of dataset names to entries (`--config.data.datasets.pairs.weight=0` leaves
  # one out); `weight` samples the mixture, `loss_weight` scales each one's loss.
  documents = dict(kind="shapes_world_documents", image_size=image_size, max_images=4)
  config.data = dict(
      seq_len=64, batch_size=16, max_images=4, image_size=image_size, mode="interleaved",
      datasets=dict(
          documents=dict(source=dict(documents, split="train"), weight=3.0, loss_weight=1.0),
          pairs=dict(source=dict(kind="shapes_world_pairs", split="train",
                                 image_size=image_size),
                     weight=1.0, loss_weight=0.5)),
      eval_datasets=dict(documents_eval=dict(
          source=dict(documents, split="eval", size=4096), weight=1.0, loss_weight=1.0)))
  config.optim = dict(lr=5e-4, warmup_steps=50, final_lr_fraction=0.1, b1=0.9, b2=0.98,
                      eps=1e-8, weight_decay=0.05, decay_pattern=r"kernel$",
                      clip_norm=1.0, accum_steps=1)
  config.train = dict(steps=500, log_every=50, eval_every=250, eval_batches=8,
                      checkpoint_every=250, keep_checkpoints=2, nonfinite="abort",
                      few_shot_every=0)
  # Run at the end of training, and every `train.few_shot_every` steps when that is set
  # (mmjax.evaluate): `episodes` test examples per task, shot count and trial; `ways`
  # colours per naming episode; benchmarks (`tasks=("coco", ...)`) read from `data_dir`;
  # `num_beams=3, length_penalty=0.0` decode as OpenFlamingo's evaluation does;
  # `formats={"vqa": "openflamingo_vqa"}` prompts a task in a named format.
  config.evaluate = dict(
      tasks=("naming", "vqa", "captioning"), shots=(0, 1, 2, 4, 8), episodes=256, trials=1,
      query_set_size=2048, demos="random", rices_tower="", ways=4, batch_size=32,
      max_new_tokens=12, num_beams=1, length_penalty=0.0, data_dir="", formats={}, seed=0)
  config.tokens = dict(pad=PAD, eos=EOS, bos=BOS)
  config.summary = dict(batch_size=2, num_images=2, seq_len=64, max_new_tokens=16)
  return config
