"""IResNet backbones ``r18``, ``r34``, ``r50``, ``r100`` and ``r200``.

Papers:
- Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
  CVPR 2019, arXiv:1801.07698. Its network settings give the improved residual unit
  BN-Conv-BN-PReLU-Conv-BN, the 3x3 stride-1 input stem (setting "L": a 112x112 face ends at 7x7)
  and the output head BN-Dropout-FC-BN (setting "E").
- Duta, Liu, Zhu, Shao, "Improved Residual Networks for Image and Video Recognition", ICPR 2020,
  arXiv:2004.04989. It uses the same name, iResNet, for a related redesign of the residual unit.
  The networks here follow ArcFace and insightface, not Duta's stage layout.

Layer naming credits insightface ``recognition/arcface_torch/backbones/iresnet.py``
(github.com/deepinsight/insightface, MIT licence). Every parameter and buffer has that file's
name and shape, so a model-zoo ``state_dict`` loads with ``load_state_dict(strict=True)`` at
``input_size=112``. The code here is written independently. Facts taken from that file:

- Conv init N(0, 0.1); BatchNorm2d weight 1, bias 0; ``fc`` keeps PyTorch's default Linear init.
- Every BatchNorm uses eps=1e-5 and PyTorch's default momentum 0.1. The MXNet original used
  eps=2e-5 (its momentum 0.9 is the same running-average rate in MXNet's convention); we follow
  the PyTorch port, whose checkpoints we load.
- ``features`` is a BatchNorm1d whose weight is fixed at 1 with ``requires_grad=False``. Only the
  bias and running statistics are learned.
- ``zero_init_residual`` zeroes each block's *bn2* weight, the BN before the PReLU, as upstream
  does. torchvision zeroes the last BN of a block instead. Both make every residual branch output
  0 at the start, but upstream's choice also leaves ``conv1`` without a gradient on the first step.
- ``fp16``: the trunk (stem, stages, bn2, flatten, dropout) runs under CUDA autocast and ``fc``
  runs in float32. Upstream's ``torch.cuda.amp.autocast`` does nothing for CPU tensors, and the
  same holds here, so ``fp16=True`` has no effect on CPU inputs.

Where we differ from upstream (parameters are unaffected):
- ``fc``'s input is ``512 * (input_size / 16) ** 2``, so sizes other than 112 work. At 112 this is
  upstream's ``512 * 7 * 7 = 25088``.
- Dropout is not in-place (upstream's is); the values are the same.
- Upstream's unused ``groups``/``width_per_group``/dilation arguments and its global
  gradient-checkpointing switch are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from bench.backbones import BACKBONES
from methods.registry import ConfigError

# eps of every BatchNorm in insightface arcface_torch iresnet.py (PyTorch's default, written out there).
BN_EPS = 1e-5
# std of the N(0, std) conv init in insightface arcface_torch iresnet.py.
CONV_INIT_STD = 0.1
# Output channels of the four IResNet stages (insightface iresnet.py).
IRESNET_WIDTHS = (64, 128, 256, 512)
# Blocks per stage (insightface arcface_torch iresnet.py, iresnet18 ... iresnet200).
IRESNET_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}


def check_backbone_args(
    backbone: str, embedding_size: int, input_size: int, size_multiple: int, dropout: float = 0.0
) -> None:
    """Raise ``ConfigError`` (one line naming the backbone) for a bad size or dropout rate.

    ``size_multiple`` is the total stride of the network: the input side must be a positive
    multiple of it so that every stride-2 stage halves the feature map exactly.
    """
    for key, value in (("embedding_size", embedding_size), ("input_size", input_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"backbone '{backbone}': {key} must be a positive integer, got {value!r}")
    if input_size % size_multiple:
        raise ConfigError(
            f"backbone '{backbone}': input_size must be a positive multiple of {size_multiple}, got {input_size}"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"backbone '{backbone}': dropout must be in [0, 1), got {dropout!r}")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias; the BN after it provides the shift."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Improved residual unit: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut.

    The shortcut is the identity, or ``downsample`` (conv1x1(stride) -> BN) when the shape
    changes. The stride is on the second conv, as in insightface, so ``conv1`` runs at the input
    resolution. There is no activation after the addition (ArcFace paper, improved residual unit).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels, stride)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def make_stage(in_channels: int, out_channels: int, num_blocks: int, stride: int = 2) -> nn.Sequential:
    """``num_blocks`` IBasicBlocks; the first changes width and applies ``stride``."""
    blocks = [IBasicBlock(in_channels, out_channels, stride)]
    blocks += [IBasicBlock(out_channels, out_channels) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class IResNet(nn.Module):
    """IResNet trunk with the ArcFace "E" head; stage ``i`` (1-based) is the attribute ``layer{i}``.

    Layout: conv1 (3x3, stride ``stem_stride``: 1 for the r-models) -> bn1 -> prelu -> layer1..layerN (each starts with stride 2)
    -> bn2 -> flatten -> dropout -> fc -> features (BatchNorm1d, weight fixed at 1).

    ``depths`` and ``widths`` give the blocks and channels of each stage. The r-models use four
    stages of (64, 128, 256, 512) channels after a 64-channel stride-1 stem; ``small`` uses a
    narrower, strided stem and fewer stages. ``input_size`` must be a multiple of
    ``stem_stride * 2 ** len(depths)``; builders check this and raise ``ConfigError``.
    """

    def __init__(
        self,
        depths: Sequence[int],
        embedding_size: int = 512,
        input_size: int = 112,
        *,
        widths: Sequence[int] = IRESNET_WIDTHS,
        stem_width: int = 64,
        stem_stride: int = 1,
        dropout: float = 0.0,
        fp16: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"IResNet: {len(depths)} stage depths but {len(widths)} stage widths")
        self.fp16 = fp16
        self.conv1 = conv3x3(3, stem_width, stem_stride)
        self.bn1 = nn.BatchNorm2d(stem_width, eps=BN_EPS)
        self.prelu = nn.PReLU(stem_width)
        self.stage_names: tuple[str, ...] = tuple(f"layer{i + 1}" for i in range(len(depths)))
        in_channels = stem_width
        for name, depth, width in zip(self.stage_names, depths, widths):
            self.add_module(name, make_stage(in_channels, width, depth, stride=2))
            in_channels = width
        self.bn2 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        final_side = input_size // (stem_stride * 2 ** len(depths))
        self.fc = nn.Linear(in_channels * final_side * final_side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, CONV_INIT_STD)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, IBasicBlock):
                    nn.init.zeros_(module.bn2.weight)  # bn2, not bn3: as upstream (module docstring)
        # The embedding BN normalises with batch statistics and learns only a shift; its per-dimension
        # scale is fixed at 1 (insightface iresnet.py).
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> flattened, dropped-out feature map ``[B, C * h * w]``."""
        x = self.prelu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.dropout(torch.flatten(self.bn2(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp16 and x.is_cuda:
            with torch.autocast(device_type="cuda", dtype=torch.float16):
                x = self.trunk(x)
            x = x.float()  # fc and the embedding BN run in float32, as upstream
        else:
            x = self.trunk(x)
        return self.features(self.fc(x))


def _make_iresnet_builder(name: str) -> Callable[..., IResNet]:
    """The registered builder of ``name``; one per entry of ``IRESNET_DEPTHS``."""
    depths = IRESNET_DEPTHS[name]

    def build(
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        fp16: bool = False,
        zero_init_residual: bool = False,
    ) -> IResNet:
        check_backbone_args(name, embedding_size, input_size, 2 ** len(depths), dropout)
        return IResNet(
            depths,
            embedding_size,
            input_size,
            dropout=dropout,
            fp16=fp16,
            zero_init_residual=zero_init_residual,
        )

    build.__name__ = build.__qualname__ = f"iresnet{name[1:]}"
    build.__doc__ = (
        f"IResNet-{name[1:]}, blocks {depths}. Options: ``dropout`` before ``fc`` (insightface default 0); "
        "``fp16`` CUDA autocast of the trunk; ``zero_init_residual`` zeroes each block's bn2 weight."
    )
    return build


for _name in IRESNET_DEPTHS:
    BACKBONES.register(_name, _make_iresnet_builder(_name))
