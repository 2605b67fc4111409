"""BLIP-2: a Q-Former between a frozen vision tower and a frozen LM, trained in two stages
on shapes-world image-text pairs, then evaluated zero-shot.

  python -m mmjax.train --config=configs/blip2.py --workdir=/tmp/blip2

runs stage 2 (the queries' projection into the frozen LM) from the stage-1 run
`configs/blip2.py:stage1` (the Q-Former trained with ITC, ITM and ITG), trained on first
use and cached under $MMJAX_CACHE like the frozen backbones: the vision tower of
configs/clip.py and the LM of configs/lm.py, the same runs the Flamingo recipe freezes.
`--config.init.qformer.workdir=DIR --config.init.vision.workdir=DIR` takes stage 1 from
another run instead. Stage 1 starts its Q-Former from BERT, as the paper does, with a
converted BERT (`python -m mmjax.convert --hf_dir=bert-base-uncased --output=/ckpt/bert`):

  python -m mmjax.train --config=configs/blip2.py:stage1 --workdir=/tmp/stage1 \
      --config.init.qformer="{'workdir': '/ckpt/bert', 'drop': '^(token_types|pooler)/'}"

(its token types and pooler are unused; the Q-Former's vocabulary grows by [DEC], its
cross-attention starts new and its query feed-forwards start as BERT's).

Variants (`--config=configs/blip2.py:<variant>`):
  tiny         the embedded default, stage 2, with Flamingo's tiny backbones and a
               4-layer Q-Former of 16 queries (as many visual tokens as Flamingo's
               resampler gives its LM).
  stage1       stage 1 of the same shapes.
  vitg-stage1, vitg-opt2.7b, vitg-opt6.7b, vitg-flant5xl, vitg-flant5xxl
               the paper's shapes (Li et al. 2023): EVA ViT-g/14 at 224px (39 layers, the
               257 tokens of its penultimate EVA block), a BERT-base Q-Former with 32
               queries and cross-attention every 2nd layer, and OPT-2.7B or 6.7B or
               FLAN-T5-XL or XXL; for `mmjax.summary`, FLOP counts and fit checks (the
               FLAN-T5 variants have no embedded-data run: mmjax pretrains no T5).
"""

import ml_collections

from mmjax.cli import UserError
from mmjax.configs import flamingo
from mmjax.models.vit import EVA_VIT_G

DEC = flamingo.VOCAB_SIZE  # the Q-Former's [DEC], one past the embedded vocabulary


def _opt(width: int, depth: int, heads: int) -> dict:
  return dict(vocab_size=50272, width=width, depth=depth, num_heads=heads, mlp_dim=4 * width,
              activation="relu", max_len=2048, tie_embeddings=True)


def _flan_t5(width: int, heads: int, mlp_dim: int) -> dict:
  # BLIP-2 runs FLAN-T5's gated feed-forward with erf GELU (its config override).
  return dict(vocab_size=32128, width=width, depth=24, num_heads=heads, head_dim=64,
              mlp_dim=mlp_dim, activation="gelu", gated_mlp=True, tie_embeddings=False)


TINY = dict(
    vision=dict(flamingo.VARIANTS["tiny"]["vision"], output_dim=None, keep_class_token=True,
                token_norm=True),
    qformer=dict(vocab_size=DEC + 1, width=128, depth=4, num_heads=4, num_queries=16,
                 cross_attention_freq=2, encoder_width=128, max_len=32),
    embed_dim=128, dec_token_id=DEC, pad_token_id=flamingo.PAD)
VITG = dict(
    # ln_vision (the ViT's post_norm here) has LAVIS's eps, 1e-5; transformers' 1e-6 (a
    # converted checkpoint's config says which).
    vision=dict(EVA_VIT_G, output_dim=None, keep_class_token=True, token_norm=True,
                post_norm_eps=1e-5),
    qformer=dict(vocab_size=30523, width=768, depth=12, num_heads=12, num_queries=32,
                 cross_attention_freq=2, encoder_width=EVA_VIT_G["width"], max_len=512),
    embed_dim=256, dec_token_id=30522, pad_token_id=0)
VARIANTS = {
    "tiny": dict(TINY, lm=flamingo.VARIANTS["tiny"]["lm"]),
    "stage1": TINY,
    "vitg-stage1": VITG,
    "vitg-opt2.7b": dict(VITG, lm=_opt(2560, 32, 32)),
    "vitg-opt6.7b": dict(VITG, lm=_opt(4096, 32, 32)),
    "vitg-flant5xl": dict(VITG, t5=_flan_t5(2048, 32, 5120)),
    "vitg-flant5xxl": dict(VITG, t5=_flan_t5(4096, 64, 10240)),
}
PAPER_VARIANTS = ("vitg-stage1", "vitg-opt2.7b", "vitg-opt6.7b", "vitg-flant5xl",
                  "vitg-flant5xxl")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise UserError(f"Unknown blip2 variant {variant!r}; choose from {sorted(VARIANTS)} "
                    "(--config=configs/blip2.py:<variant>).")
  model = VARIANTS[variant]
  stage = 2 if "lm" in model or "t5" in model else 1
  paper = variant in PAPER_VARIANTS
  image_size = model["vision"]["image_size"]
  config = ml_collections.ConfigDict()
  config.task = "blip2"
  config.variant = variant
  config.seed = 0
  # Devices, sharding, precision, remat and scan as in configs/flamingo.py.
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding = "fsdp"
  config.compute_dtype = "float32"
  config.remat = "none"
  config.scan_layers = paper
  config.tokenizer = ""
  config.model = dict(model)
  # Parameters that train (a regex on '/'-joined paths). `vision/post_norm` is BLIP-2's
  # ln_vision, outside the frozen ViT in both stages.
  heads = "qformer|vision_proj|text_proj|itm_head|text_head|temp" if stage == 1 else (
      "qformer|lm_proj")
  config.trainable = rf"^({heads}|vision/post_norm)(/|$)"
  # Pretrained parts, keyed by the parameter subtree they fill (see configs/flamingo.py):
  # stage 1 starts from the CLIP vision tower (its projection head unused); stage 2 from
  # stage 1's vision tower and Q-Former (without the text embeddings and feed-forwards,
  # which stage 2 has no use for) and the LM.
  # The paper's shapes start from converted checkpoints, e.g.
  # `--config.init.lm.workdir=/ckpt/opt-2.7b` (python -m mmjax.convert); as written they
  # start from random weights (`steps=0`).
  lm = "lm" if "lm" in model else "t5"
  if paper:
    converted = dict(steps=0, workdir="", source="")
    config.init = dict(vision=converted) if stage == 1 else dict(
        vision=converted, qformer=converted, **{lm: converted})
  elif stage == 1:
    config.init = dict(vision=dict(recipe="clip", variant="tiny", steps=-1, workdir="",
                                   source="image", drop=r"^head/"))
  else:
    config.init = dict(
        vision=dict(recipe="blip2", variant="stage1", steps=-1, workdir="", source="vision"),
        qformer=dict(recipe="blip2", variant="stage1", steps=-1, workdir="", source="qformer",
                     drop=r"^(embed|positions)/|/mlp(_norm)?/"),
        lm=dict(recipe="lm", variant="tiny", steps=-1, workdir="", source=""))
  pairs = dict(kind="shapes_world_pairs", image_size=image_size)
  datasets = dict(pairs=dict(source=dict(pairs, split="train"), weight=1.0, loss_weight=1.0))
  if stage == 2:
    # Stage 2 trains on captions, as the paper's does. `documents.weight=3` adds
    # single-image documents (captions and question/answer text: the image-text data the
    # Flamingo recipe trains on, less its multi-image naming episodes); measured in the
    # README: VQA up from 0.37 to 0.42, captioning down from CIDEr 240 to 25, since with
    # no prompt the LM then starts a question as often as a caption.
    datasets["documents"] = dict(
        source=dict(kind="shapes_world_documents", split="train", image_size=image_size,
                    max_images=1, naming_fraction=0.0), weight=0.0, loss_weight=1.0)
  config.data = dict(
      seq_len=24, batch_size=32 if stage == 1 else 16, image_size=image_size, mode="pair",
      datasets=datasets,
      eval_datasets=dict(pairs_eval=dict(source=dict(pairs, split="eval", size=4096),
                                         weight=1.0, loss_weight=1.0)))
  config.optim = dict(lr=5e-4, warmup_steps=50, final_lr_fraction=0.1, b1=0.9, b2=0.98,
                      eps=1e-8, weight_decay=0.05, decay_pattern=r"kernel$",
                      clip_norm=1.0, accum_steps=1)
  config.train = dict(steps=300 if stage == 1 else 500, log_every=50, eval_every=250,
                      eval_batches=4, checkpoint_every=250, keep_checkpoints=2,
                      nonfinite="abort", few_shot_every=0)
  if stage == 2:
    # Zero-shot, as the paper evaluates BLIP-2 (mmjax.evaluate); the VQA prompt format is
    # the one the LM learnt ("question: ... answer:"); on real benchmarks BLIP-2's is
    # `formats={"vqa": "blip2_vqa"}` ("Question: {} Short answer:") with 5 beams and
    # length_penalty=-1.
    config.evaluate = dict(
        tasks=("vqa", "captioning"), shots=(0,), episodes=256, trials=1, demos="random",
        batch_size=32, max_new_tokens=12, num_beams=1, length_penalty=0.0, data_dir="",
        formats={}, seed=0)
  config.tokens = dict(pad=flamingo.PAD, eos=flamingo.EOS, bos=flamingo.BOS)
  config.summary = dict(batch_size=2, num_images=1, seq_len=24, max_new_tokens=16)
  return config
