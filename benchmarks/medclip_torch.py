"""MedCLIP's PyTorch reference, written out: torchvision's ResNet (its structure and module
names, hence its state dict) and MedCLIP's ResNet model (`MedCLIPModel` with
`MedCLIPVisionModel`: its names, pooling, projections and clamped logit scale), its semantic
matching loss (`ImageTextContrastiveLoss`), for the parity tests (tests/test_resnet.py,
tests/test_medclip_model.py) and the train-step benchmark (benchmarks/medclip.py).

Neither torchvision nor the `medclip` package (0.0.3) is imported. torchvision's wheels for
this torch (0.28.0 on PyPI) are CUDA builds whose compiled operators do not load beside the
CPU build of torch ("operator torchvision::nms does not exist" at import; the CPU builds
come only from PyTorch's own package index). `medclip` imports torchvision at module level,
its towers' constructors download pretrained weights
(`AutoModel.from_pretrained("emilyalsentzer/Bio_ClinicalBERT")`, `resnet50(pretrained=True)`)
and its `encode_text` and `forward` call `.cuda()`. So the modules here reproduce their
computation from plain torch and transformers' BertModel: bottleneck stride on the 3x3
convolution (torchvision's), BertModel with `output_hidden_states`, the mean over positions
(padding included) and then over hidden states 1, 2 and -1, bias-free projections, L2
normalisation, logits `exp(clamp(logit_scale, 0, 4.6052)) * image @ text.T`.
"""

import numpy as np
import torch
import transformers
from torch import nn


class TorchBlock(nn.Module):
  """torchvision's BasicBlock (`bottleneck=False`) or Bottleneck, its names."""

  def __init__(self, inplanes: int, planes: int, stride: int, bottleneck: bool):
    super().__init__()
    expansion = 4 if bottleneck else 1
    if bottleneck:
      shapes = ((inplanes, planes, 1, 1), (planes, planes, 3, stride),
                (planes, planes * expansion, 1, 1))
    else:
      shapes = ((inplanes, planes, 3, stride), (planes, planes, 3, 1))
    for i, (c_in, c_out, k, s) in enumerate(shapes, 1):
      setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False))
      setattr(self, f"bn{i}", nn.BatchNorm2d(c_out))
    self.n = len(shapes)
    self.downsample = None
    if stride != 1 or inplanes != planes * expansion:
      self.downsample = nn.Sequential(
          nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * expansion))

  def forward(self, x):
    h = x
    for i in range(1, self.n + 1):
      h = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(h))
      if i < self.n:
        h = torch.relu(h)
    return torch.relu(h + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
  """torchvision's ResNet structure and names; `fc`: None, "bias" (classifier) or
  "nobias" (MedCLIP's projection) to `out` features. `((3, 4, 6, 3), 64, True)` is
  ResNet-50."""

  def __init__(self, depths=(1, 1, 1, 1), width=8, bottleneck=True, fc=None, out=10):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes, expansion = width, 4 if bottleneck else 1
    for s, depth in enumerate(depths):
      planes, blocks = width * 2 ** s, []
      for i in range(depth):
        blocks.append(TorchBlock(inplanes, planes, 2 if s and not i else 1, bottleneck))
        inplanes = planes * expansion
      setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
    self.depths = depths
    self.fc = None if fc is None else nn.Linear(inplanes, out, bias=fc == "bias")

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for s in range(len(self.depths)):
      x = getattr(self, f"layer{s + 1}")(x)
    x = x.mean((2, 3))
    return x if self.fc is None else self.fc(x)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random BatchNorm affine parameters and running statistics, so that every one of them
  shows in the outputs."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
  return model


def to_torch(x: np.ndarray) -> torch.Tensor:
  """`"b h w c"` images (mmjax's layout) -> `"b c h w"` (torch's)."""
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


class TorchMedCLIP(nn.Module):
  """MedCLIPModel's names: `vision_model.model` (a ResNet with a bias-free fc to `embed`),
  `text_model.model` (BertModel of the Hugging Face config dict `bert`),
  `text_model.projection_head`, `logit_scale` (starting at `logit_scale`; MedCLIP's clamp
  caps it at ln 100). The ResNet's BatchNorm is `randomise`d. BertModel keeps its pooler,
computed and unused, as in MedCLIP."""

  def __init__(self, bert: dict, embed: int, depths=(1, 1, 1, 1), width=4,
               logit_scale: float = 5.0):
    super().__init__()
    self.vision_model = nn.Module()
    self.vision_model.model = randomise(TorchResNet(depths, width, True, "nobias", embed))
    self.text_model = nn.Module()
    self.text_model.model = transformers.BertModel(transformers.BertConfig(**bert))
    self.text_model.projection_head = nn.Linear(bert["hidden_size"], embed, bias=False)
    self.logit_scale = nn.Parameter(torch.tensor(logit_scale))

  def encode_image(self, pixels):
    """`pixels "b c h w"`, normalised, c 1 (repeated to 3) or 3."""
    if pixels.shape[1] == 1:
      pixels = pixels.repeat(1, 3, 1, 1)
    x = self.vision_model.model(pixels)
    return x / x.norm(dim=-1, keepdim=True)

  def encode_text(self, input_ids, attention_mask):
    states = self.text_model.model(input_ids=input_ids, attention_mask=attention_mask,
                                   output_hidden_states=True).hidden_states
    chosen = torch.stack([states[1], states[2], states[-1]])  # "n b t d"
    x = self.text_model.projection_head(chosen.permute(1, 0, 2, 3).mean(2).mean(1))
    return x / x.norm(dim=-1, keepdim=True)

  def forward(self, pixels, input_ids, attention_mask):
    """`(image "b e", text "b e", logits "b b")`, logits per image."""
    image, text = self.encode_image(pixels), self.encode_text(input_ids, attention_mask)
    scale = self.logit_scale.clamp(0, 4.6052).exp()
    return image, text, scale * image @ text.T


def semantic_matching_loss(logits: torch.Tensor, image_labels: torch.Tensor,
                           text_labels: torch.Tensor) -> torch.Tensor:
  """MedCLIP's `ImageTextContrastiveLoss` with labels: `logits "b b"` per image, label
  vectors `"b l"` (missing findings already 0, as MedCLIP's data give them). The label
  similarity is their raw dot product; the targets its softmax over each row (images) and
  each column (texts); each direction's soft cross-entropy is summed over the batch and
  divided by its size; the loss is their mean. (An unlabelled row's targets are uniform
  here, where `mmjax.losses.semantic_matching_loss` keeps its own pair.)"""
  similarity = image_labels @ text_labels.T

  def soft_cross_entropy(logits, targets):
    return -(targets * torch.log_softmax(logits, dim=1)).sum() / logits.shape[0]

  return (soft_cross_entropy(logits, torch.softmax(similarity, 1))
          + soft_cross_entropy(logits.T, torch.softmax(similarity.T, 1))) / 2
