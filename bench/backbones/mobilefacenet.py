"""MobileFaceNet backbones ``mbf`` and ``mbf_large``.

Paper: Chen, Liu, Gao, Han, "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
Verification on Mobile Devices", CCBR 2018, arXiv:1804.07573. From it come the inverted-residual
(MobileNetV2-style) bottlenecks with PReLU, the early stride-2 stem and the global depthwise
convolution (GDC) head: a linear depthwise conv whose kernel covers the whole final feature map,
then a linear projection to the embedding.

Layer naming credits insightface ``recognition/arcface_torch/backbones/mobilefacenet.py``
(github.com/deepinsight/insightface, MIT licence), which credits cavaface.pytorch. Every
parameter and buffer has that file's name and shape, so its checkpoints load with
``load_state_dict(strict=True)`` at ``input_size=112``. The code here is written independently.
Facts taken from that file, which differs from the paper's table:

- Widths are scaled by ``scale`` (2 for ``mbf``, 4 for ``mbf_large``). Stage blocks are
  ``blocks=(1, 4, 6, 2)`` for ``mbf`` and ``(2, 8, 12, 4)`` for ``mbf_large``.
- Each bottleneck (``DepthWise``) is 1x1 ConvBlock -> depthwise 3x3 ConvBlock -> 1x1 LinearBlock.
  Its hidden width is a fixed number (128, 256 or 512) that does not scale with ``scale``.
  ConvBlock is conv -> BN -> PReLU; LinearBlock is conv -> BN with no activation.
- With ``blocks[0] == 1`` the second layer is a grouped 3x3 ConvBlock with 64 groups, so it is
  depthwise only when ``scale == 1``. Otherwise it is a Residual stack of ``blocks[0]`` bottlenecks.
- The head is ``conv_sep`` (1x1 ConvBlock to 512), then ``features`` = GDC: a 7x7 depthwise
  LinearBlock, flatten, Linear(512, embedding, bias=False), BatchNorm1d(embedding). This
  BatchNorm1d keeps a trainable weight, unlike IResNet's ``features``.
- Init: Kaiming-normal (fan_out, relu gain) for convs and the Linear; BN weight 1, bias 0. All
  BNs use PyTorch defaults (eps=1e-5, momentum 0.1).
- ``fp16``: CUDA autocast around ``layers``. ``conv_sep`` and the head run in float32.
  ``fp16=True`` does nothing for CPU inputs, as upstream.

Where we differ from upstream (parameters are unaffected): the GDC kernel is ``input_size / 16``
(7 at 112), so other input sizes work, and ``nn.Flatten`` replaces upstream's own Flatten module.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.backbones import BACKBONES
from bench.backbones.iresnet import check_backbone_args

# Total stride: the stem and three bottlenecks each halve the feature map.
MBF_STRIDE = 16
# Channels into the GDC head (insightface mobilefacenet.py, conv_sep).
MBF_HEAD_CHANNELS = 512


class ConvBlock(nn.Module):
    """conv (no bias) -> BatchNorm2d -> PReLU, stored as ``layers.{0,1,2}``; with ``activation=False``
    the "linear" block of the paper, conv -> BatchNorm2d as ``layers.{0,1}``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, padding: int = 0,
        groups: int = 1, activation: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if activation:
            layers.append(nn.PReLU(out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def LinearBlock(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                groups: int = 1) -> ConvBlock:
    """The paper's linear block: :class:`ConvBlock` without its activation."""
    return ConvBlock(in_channels, out_channels, kernel, stride, padding, groups, activation=False)


class DepthWise(nn.Module):
    """Bottleneck: 1x1 expand to ``hidden_channels`` -> 3x3 depthwise(stride) -> 1x1 linear project.

    Adds the input when ``residual`` is set, which needs stride 1 and equal widths.
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden_channels: int, stride: int = 2, residual: bool = False
    ) -> None:
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError("DepthWise: a residual bottleneck needs stride 1 and in_channels == out_channels")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_channels, hidden_channels),
            ConvBlock(hidden_channels, hidden_channels, kernel=3, stride=stride, padding=1, groups=hidden_channels),
            LinearBlock(hidden_channels, out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out + x if self.residual else out


class Residual(nn.Module):
    """``num_blocks`` stride-1 residual bottlenecks of width ``channels``, as ``layers.{i}``."""

    def __init__(self, channels: int, num_blocks: int, hidden_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(DepthWise(channels, channels, hidden_channels, stride=1, residual=True) for _ in range(num_blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv head: ``kernel x kernel`` depthwise LinearBlock -> flatten -> Linear -> BN1d."""

    def __init__(self, embedding_size: int, kernel: int, channels: int = MBF_HEAD_CHANNELS) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, kernel=kernel, groups=channels),
            nn.Flatten(1),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet trunk (``layers``), ``conv_sep`` and the GDC head (``features``).

    ``blocks`` gives the bottlenecks of the four stages and ``scale`` multiplies the widths 64 and
    128. ``input_size`` must be a multiple of 16; the builders check this.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        input_size: int = 112,
        *,
        blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
        scale: int = 2,
        fp16: bool = False,
    ) -> None:
        super().__init__()
        self.fp16 = fp16
        narrow, wide = 64 * scale, 128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, narrow, kernel=3, stride=2, padding=1)])
        # The groups (64) and the bottlenecks' hidden widths (128/256/512) are fixed numbers in
        # insightface, not multiplied by scale; checkpoints depend on them.
        if blocks[0] == 1:
            self.layers.append(ConvBlock(narrow, narrow, kernel=3, padding=1, groups=64))
        else:
            self.layers.append(Residual(narrow, blocks[0], hidden_channels=128))
        self.layers.extend(
            [
                DepthWise(narrow, narrow, hidden_channels=128, stride=2),
                Residual(narrow, blocks[1], hidden_channels=128),
                DepthWise(narrow, wide, hidden_channels=256, stride=2),
                Residual(wide, blocks[2], hidden_channels=256),
                DepthWise(wide, wide, hidden_channels=512, stride=2),
                Residual(wide, blocks[3], hidden_channels=256),
            ]
        )
        self.conv_sep = ConvBlock(wide, MBF_HEAD_CHANNELS)
        self.features = GDC(embedding_size, kernel=input_size // MBF_STRIDE)

        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp16 and x.is_cuda:
            with torch.autocast(device_type="cuda", dtype=torch.float16):
                x = self.trunk(x)
            x = x.float()  # conv_sep and the head run in float32, as upstream
        else:
            x = self.trunk(x)
        return self.features(self.conv_sep(x))


@BACKBONES.register("mbf")
def mobilefacenet(embedding_size: int = 512, input_size: int = 112, fp16: bool = False) -> MobileFaceNet:
    """MobileFaceNet as in insightface ``mbf``: blocks (1, 4, 6, 2), scale 2.
    ``fp16``: CUDA autocast of the trunk."""
    check_backbone_args("mbf", embedding_size, input_size, MBF_STRIDE)
    return MobileFaceNet(embedding_size, input_size, blocks=(1, 4, 6, 2), scale=2, fp16=fp16)


@BACKBONES.register("mbf_large")
def mobilefacenet_large(embedding_size: int = 512, input_size: int = 112, fp16: bool = False) -> MobileFaceNet:
    """MobileFaceNet as in insightface ``mbf_large``: blocks (2, 8, 12, 4), scale 4.
    ``fp16``: CUDA autocast of the trunk."""
    check_backbone_args("mbf_large", embedding_size, input_size, MBF_STRIDE)
    return MobileFaceNet(embedding_size, input_size, blocks=(2, 8, 12, 4), scale=4, fp16=fp16)
