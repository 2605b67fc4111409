"""`python -m mmjax.convert`: a checkpoint in, an mmjax checkpoint and config out.

  python -m mmjax.convert --hf_dir=DIR --output=OUT   # LM, CLIP, SigLIP, BERT, RoBERTa,
                                                      # ViT, T5, BLIP-2, IDEFICS, LLaVA
                                                      # (Hugging Face's)
  python -m mmjax.convert --hf_dir=LLAVA --vision=CLIP_DIR [--media_token_id=ID] \
      --output=OUT                                    # original LLaVA (haotian-liu/LLaVA)
  python -m mmjax.convert --openflamingo=checkpoint.pt --vision=TOWER --hf_dir=LM \
      --output=OUT
  python -m mmjax.convert --medclip=pytorch_model.bin --hf_dir=BERT --output=OUT
  python -m mmjax.convert --mmbcd=model_best.pt --hf_dir=ROBERTA --output=OUT
  python -m mmjax.convert --hf_dir=LM --peft_adapter=ADAPTER --output=OUT  # LoRA merged
  python -m mmjax.convert --videogpt=vqvae.ckpt --output=OUT  # VideoGPT's VQ-VAE

The kind of model comes from `DIR/config.json`'s `model_type` (VideoGPT's VQ-VAE, which has
no Hugging Face directory, from its Lightning checkpoint's args); see `mmjax.convert`.
"""

import json
import pathlib

from absl import flags

from mmjax import cli, peft
from mmjax.convert import common
from mmjax.convert.bert import convert_bert
from mmjax.convert.blip2 import convert_blip2
from mmjax.convert.clip import convert_clip
from mmjax.convert.idefics import convert_idefics
from mmjax.convert.llava import LLAVA_TYPES, convert_llava
from mmjax.convert.lm import LM_TYPES, convert_lm
from mmjax.convert.medclip import convert_medclip
from mmjax.convert.mmbcd import convert_mmbcd
from mmjax.convert.openflamingo import convert_openflamingo
from mmjax.convert.peft import load_adapter
from mmjax.convert.siglip import convert_siglip
from mmjax.convert.t5 import convert_t5
from mmjax.convert.videogpt import convert_videogpt
from mmjax.convert.vit import convert_vit

flags.DEFINE_string("hf_dir", None, "A Hugging Face model directory.")
flags.DEFINE_string("output", None, "Where the checkpoint and config go.")
flags.DEFINE_string("openflamingo", None, "OpenFlamingo's checkpoint.pt; --hf_dir is then "
                    "its language model and --vision its CLIP vision tower.")
flags.DEFINE_string("vision", None, "The vision tower of a checkpoint that keeps it apart: "
                    "OpenFlamingo's (open_clip / OpenAI CLIP weights file, or a Hugging Face "
                    "CLIP directory); original LLaVA's (its mm_vision_tower's Hugging Face "
                    "CLIP directory).")
flags.DEFINE_string("vision_activation", "quick_gelu", "OpenFlamingo: the open_clip "
                    "tower's activation (quick_gelu: OpenAI's weights; gelu: LAION's).")
flags.DEFINE_integer("media_token_id", None, "IDEFICS, OpenFlamingo, original LLaVA: the "
                     "<image> token id (OpenFlamingo: default from --hf_dir's tokenizer; "
                     "original LLaVA: default a new id appended to the vocabulary, see "
                     "mmjax.convert.llava).")
flags.DEFINE_integer("endofchunk_token_id", None, "IDEFICS, OpenFlamingo: the end-of-chunk "
                     "token id.")
flags.DEFINE_string("medclip", None, "MedCLIP's (ResNet) pytorch_model.bin; --hf_dir is "
                    "then a directory with its text model's config.json (Bio_ClinicalBERT's).")
flags.DEFINE_string("mmbcd", None, "MMBCD's whole-model checkpoint (model_best.pt, its "
                    "DINO ViT and RoBERTa inside); --hf_dir is then a directory with its text "
                    "model's config.json (roberta-base's).")
flags.DEFINE_string("peft_adapter", None, "An LM: a peft LoRA adapter directory (its "
                    "adapter_config.json and adapter_model.safetensors) for --hf_dir, merged "
                    "into the converted weights (mmjax.convert.peft).")
flags.DEFINE_string("videogpt", None, "VideoGPT's VQ-VAE checkpoint (its Lightning .ckpt, "
                    "whose hyper_parameters.args give the config); no --hf_dir.")
flags.mark_flags_as_required(["output"])

SUPPORTED = LM_TYPES + ("clip", "siglip", "bert", "roberta", "vit", "t5", "blip-2",
                       "idefics") + LLAVA_TYPES


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"Unexpected arguments {argv[1:]}; every input is a --flag.")
  f = flags.FLAGS
  if f.videogpt:
    if f.hf_dir or f.medclip or f.openflamingo or f.mmbcd or f.peft_adapter:
      raise cli.UserError("--videogpt converts the VQ-VAE checkpoint alone: give no "
                          "--hf_dir, --medclip, --openflamingo, --mmbcd or --peft_adapter.")
    cfg, params, model_state = convert_videogpt(f.videogpt)
    common.save(f.output, "vqvae", cfg, params, model_state)
    print(f"Converted {f.videogpt} ({common.count(params):,} parameters) to {f.output}.")
    return
  if f.hf_dir is None:
    raise cli.UserError("--hf_dir is required (a Hugging Face model directory), unless "
                        "--videogpt is given.")
  hf_dir, output = pathlib.Path(f.hf_dir), f.output
  if not (hf_dir / "config.json").is_file():
    raise cli.UserError(f"--hf_dir={hf_dir} has no config.json: expected a Hugging Face "
                        "model directory (save_pretrained's output).")
  kind = json.loads((hf_dir / "config.json").read_text()).get("model_type")
  model_state = None
  if f.peft_adapter and (kind not in LM_TYPES or f.medclip or f.openflamingo or f.mmbcd):
    raise cli.UserError(f"--peft_adapter applies to a Hugging Face LM ({', '.join(LM_TYPES)}) "
                        f"converted alone; {hf_dir} is {kind!r}.")
  if sum(map(bool, (f.medclip, f.openflamingo, f.mmbcd))) > 1:
    raise cli.UserError("Give one of --medclip, --openflamingo and --mmbcd.")
  if f.medclip:
    task, (cfg, params, model_state) = "medclip", convert_medclip(f.medclip, hf_dir)
  elif f.mmbcd:
    task, (cfg, params, model_state) = "mmbcd", convert_mmbcd(f.mmbcd, hf_dir)
  elif f.openflamingo:
    if f.vision is None:
      raise cli.UserError("--openflamingo needs --vision: the CLIP vision tower (open_clip "
                          "weights file or Hugging Face CLIP directory).")
    media, endofchunk = f.media_token_id, f.endofchunk_token_id
    if media is None or endofchunk is None:
      from mmjax.data.tokenizer import HFTokenizer
      tokenizer = HFTokenizer(hf_dir)  # extended as OpenFlamingo's factory extends it
      media, endofchunk = tokenizer.media_id, tokenizer.endofchunk_id
    task, (cfg, params) = "flamingo", convert_openflamingo(
        f.openflamingo, vision=f.vision, lm_dir=hf_dir, media_token_id=media,
        endofchunk_token_id=endofchunk, vision_activation=f.vision_activation)
  elif kind == "idefics":
    if f.media_token_id is None or f.endofchunk_token_id is None:
      raise cli.UserError("IDEFICS needs --media_token_id and --endofchunk_token_id (its "
                          "tokenizer's <image> and end-of-chunk ids).")
    task, (cfg, params) = "flamingo", convert_idefics(
        hf_dir, media_token_id=f.media_token_id, endofchunk_token_id=f.endofchunk_token_id)
  elif kind == "clip":
    task, (cfg, params) = "clip", convert_clip(hf_dir)
  elif kind == "siglip":
    task, (cfg, params) = "clip", convert_siglip(hf_dir)
  elif kind in ("bert", "roberta"):
    task, (cfg, params) = "bert", convert_bert(hf_dir)
  elif kind == "vit":
    task, (cfg, params) = "vit", convert_vit(hf_dir)
  elif kind == "t5":
    task, (cfg, params) = "t5", convert_t5(hf_dir)
  elif kind == "blip-2":
    task, (cfg, params) = "blip2", convert_blip2(hf_dir)
  elif kind in LLAVA_TYPES:
    task, (cfg, params) = "llava", convert_llava(hf_dir, vision=f.vision,
                                                 image_token_id=f.media_token_id)
  elif kind in LM_TYPES:
    task, (cfg, params) = "lm", convert_lm(hf_dir)
    if f.peft_adapter:
      lora, lora_params = load_adapter(f.peft_adapter, hf_dir)
      params = peft.merge(peft.combine(params, lora_params), lora)
  else:
    raise cli.UserError(f"{hf_dir / 'config.json'} has model_type {kind!r}; supported: "
                        f"{', '.join(SUPPORTED)} (and OpenFlamingo with --openflamingo, "
                        "MedCLIP with --medclip, MMBCD with --mmbcd).")
  common.save(output, task, cfg, params, model_state)
  print(f"Converted {f.medclip or f.mmbcd or f.openflamingo or hf_dir} ({common.count(params):,} "
        f"parameters) to {output}.")


if __name__ == "__main__":
  cli.run(main)
