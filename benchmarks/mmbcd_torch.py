"""MMBCD's PyTorch reference, written out: the original DINO ViT's layout and forward
(facebookresearch/dino `vision_transformer.py`, `num_classes=0`) and the authors' MMBCD
module (Mammo-IITD-AIIMS/MMBCD `code/model.py`), its layers named as there (so its
`state_dict` converts with `mmjax.convert.convert_mmbcd`), at any size, for the conversion
tests (tests/test_mmbcd_convert.py) and the train-step benchmark (benchmarks/mmbcd.py).

The reference loads `torch.hub`'s `dino_vits8` and `roberta-base`; here both are built at
the sizes given, with random weights. Its freezing is an option (`vision_frozen_blocks`,
`text_trained_layers`): DINO's patch embedding and first blocks frozen (its class token,
positions and final norm are bare parameters or a later child, and train), and RoBERTa
frozen whole but for its last encoder layers.
"""

import torch
import transformers
from torch import nn


class DinoViT(nn.Module):
  """The original DINO ViT's layout and forward: `"n 3 s s"` -> the normed class token
  `"n d"`."""

  def __init__(self, width: int, depth: int, heads: int, mlp: int, size: int, patch: int):
    super().__init__()
    self.heads, self.size = heads, size
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, width, patch, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embed = nn.Parameter(torch.zeros(1, (size // patch) ** 2 + 1, width))
    self.blocks = nn.ModuleList()
    for _ in range(depth):
      block = nn.Module()
      block.norm1, block.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
      block.attn = nn.Module()
      block.attn.qkv, block.attn.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
      block.mlp = nn.Module()
      block.mlp.fc1, block.mlp.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)
      self.blocks.append(block)
    self.norm = nn.LayerNorm(width, eps=1e-6)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
    b, n, d = x.shape
    for block in self.blocks:
      q, k, v = block.attn.qkv(block.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(
          2, 0, 3, 1, 4)
      attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
      x = x + block.attn.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
      x = x + block.mlp.fc2(nn.functional.gelu(block.mlp.fc1(block.norm2(x))))
    return self.norm(x)[:, 0]


class TorchMMBCD(nn.Module):
  """The reference's MMBCD: `vision` the `DinoViT` arguments, `roberta` a
  `transformers.RobertaConfig` (its RobertaForSequenceClassification's last hidden state's
  `<s>` is the history), `embed_dim` the projections' width. `img_fc1` is registered on
  its own and inside `img_fc_layer` (so saved twice), as there. `vision_frozen_blocks`:
  freeze DINO's patch embedding and its first blocks (None: nothing);
  `text_trained_layers`: freeze RoBERTa but for its last encoder layers (None: nothing).

  forward: images `"b k 3 s s"` (normalised), `input_ids` and `attention_mask` `"b t"` ->
  logits `"b classes"`."""

  def __init__(self, vision: dict, roberta: transformers.RobertaConfig, embed_dim: int,
               num_classes: int = 2, attn_dropout: float = 0.3,
               vision_frozen_blocks: int | None = None, text_trained_layers: int | None = None):
    super().__init__()
    self.image_encoder = DinoViT(**vision)
    width, text_width = vision["width"], roberta.hidden_size
    self.img_fc1 = nn.Linear(width, embed_dim)
    self.img_fc_layer = nn.Sequential(nn.BatchNorm1d(width), self.img_fc1, nn.GELU())
    self.text_encoder = transformers.RobertaForSequenceClassification(roberta)
    self.txt_fc1 = nn.Linear(text_width, embed_dim)
    self.txt_fc_layer = nn.Sequential(nn.BatchNorm1d(text_width), self.txt_fc1, nn.GELU())
    self.attention = nn.MultiheadAttention(embed_dim, num_heads=1, batch_first=True,
                                           dropout=attn_dropout)
    self.model_fc2 = nn.Linear(3 * embed_dim, num_classes)
    if vision_frozen_blocks is not None:
      frozen = [self.image_encoder.patch_embed,
                *self.image_encoder.blocks[:vision_frozen_blocks]]
      for p in (p for module in frozen for p in module.parameters()):
        p.requires_grad_(False)
    if text_trained_layers is not None:
      self.text_encoder.requires_grad_(False)
      layers = self.text_encoder.roberta.encoder.layer
      for layer in layers[len(layers) - text_trained_layers:]:
        layer.requires_grad_(True)

  def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> torch.Tensor:
    b, k = images.shape[:2]
    size = self.image_encoder.size
    features = self.image_encoder(images.reshape(-1, 3, size, size))
    regions = self.img_fc_layer(features).view(b, k, -1)
    text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                             output_hidden_states=True).hidden_states[-1][:, 0]
    text = self.txt_fc_layer(text)
    attended, _ = self.attention(text.unsqueeze(1), regions, regions)
    return self.model_fc2(torch.cat([attended.squeeze(1), text, regions.max(1).values], 1))
