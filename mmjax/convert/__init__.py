"""Converts pretrained checkpoints into mmjax: an Orbax checkpoint and the model config.

  python -m mmjax.convert --hf_dir=/models/Llama-3.2-1B --output=/ckpt/llama-1b

reads a Hugging Face model directory (config.json and model.safetensors, sharded
safetensors with their index, or pytorch_model.bin; nothing is downloaded) and writes
`output/checkpoints/0` (the parameters, as a run's checkpoint) and `output/config.json`
(`{"task": "lm", "model": ...}`). OpenFlamingo (`--openflamingo=checkpoint.pt --vision=...
--hf_dir=<its LM>`) and IDEFICS convert to a whole Flamingo; LLaVA (Hugging Face's
`model_type: llava`, or original LLaVA's directory with `--vision=<its CLIP directory>`) to
mmjax's `Llava` (`"task": "llava"`); see `__main__`.

Every conversion is strict in both directions, so that it cannot be silently wrong: each
tensor of the source is consumed or listed as ignored on purpose (a module's
`IGNORED_TENSORS`: buffers, task heads), each config field is read or listed as ignored on
purpose (`IGNORED_FIELDS`, with why; `common.GENERIC_FIELDS`), a value the model cannot
compute is refused naming the field and the supported values, and the result is exactly
the tree the mmjax model's `init` builds (`common.check_tree`). Anything else is a
`ConversionError` naming what differs.

One module per checkpoint family: `gpt2`, `opt`, `llama` (and Mistral), `mpt` (dispatched
by `lm`), `clip`, `siglip`, `open_clip` (vision towers, whole CLIPs), `bert` (and RoBERTa),
`vit` (Hugging Face's ViTModel, DINO's original layout), `t5` (T5,
FLAN-T5), `blip2`, `idefics`, `openflamingo`, `llava`, `resnet` (torchvision ResNets), `medclip`
(MedCLIP's ResNet checkpoint, `--medclip`; its BatchNorm statistics are saved beside the
parameters as the checkpoint's "model_state"), `mmbcd` (the MMBCD authors' whole model,
`--mmbcd`; its BatchNorm statistics likewise), `videogpt` (VideoGPT's VQ-VAE Lightning
checkpoint, `--videogpt`: "task" "vqvae", its BatchNorm statistics and EMA codebook as the
model state); shared readers and checks in `common`. Adding
a family means a module `<family>.py` that reads its config with `common.Fields` (finishing with its
`IGNORED_FIELDS`), its tensors with
`common.Reader` (finishing with its `IGNORED_TENSORS`), checks the result with
`common.check_tree` and exports `convert_<family>(path) -> (model config, params)`; then
its names here, a branch in `__main__`, a strictness test in tests/test_convert_strict.py
and a row in the README's table. (A decoder-only LM instead adds `config` and `params` and
an entry in `lm.LM_FAMILIES`.)
"""

from mmjax.convert.bert import bert_config, convert_bert
from mmjax.convert.blip2 import blip2_config, convert_blip2, convert_blip2_vision
from mmjax.convert.clip import clip_config, convert_clip, text_config, vit_config, vit_params
from mmjax.convert.common import (ConversionError, count, read_hf_config, read_hf_dir,
                                  read_hf_weights, read_state_file, save, save_hf)
from mmjax.convert.idefics import convert_idefics
from mmjax.convert.llama import ROPE_SCALINGS, rope_settings
from mmjax.convert.llava import convert_llava, llava_config
from mmjax.convert.lm import LM_TYPES, convert_lm, export_lm, lm_config, lm_params
from mmjax.convert.medclip import convert_medclip
from mmjax.convert.mmbcd import convert_mmbcd
from mmjax.convert.open_clip import convert_open_clip, open_clip_model, open_clip_vision
from mmjax.convert.openflamingo import convert_openflamingo
from mmjax.convert.resnet import convert_resnet, resnet_config
from mmjax.convert.siglip import convert_siglip, siglip_config
from mmjax.convert.t5 import convert_t5, t5_config, t5_params
from mmjax.convert.videogpt import convert_videogpt, videogpt_config
from mmjax.convert.vit import convert_dino, convert_vit

__all__ = ["ConversionError", "LM_TYPES", "ROPE_SCALINGS", "bert_config", "blip2_config",
           "clip_config", "convert_bert", "convert_blip2", "convert_blip2_vision", "convert_clip",
           "convert_dino", "convert_idefics", "convert_llava", "convert_lm", "convert_medclip",
           "convert_mmbcd", "convert_open_clip", "convert_openflamingo", "convert_resnet",
           "convert_siglip", "convert_t5", "convert_videogpt", "convert_vit", "count", "export_lm",
           "llava_config", "lm_config", "lm_params", "open_clip_model", "open_clip_vision",
           "read_hf_config",
           "read_hf_dir", "read_hf_weights", "read_state_file", "resnet_config", "rope_settings",
           "save", "save_hf", "siglip_config", "t5_config", "t5_params", "text_config",
           "videogpt_config", "vit_config", "vit_params"]
