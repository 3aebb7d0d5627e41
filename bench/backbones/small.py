"""``small``: a compact IResNet for training on a CPU with 32x32 faces (the synthetic-data default).

It is the IResNet of ``bench.backbones.iresnet`` at a smaller size, with the same blocks and head:
Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019,
arXiv:1801.07698 (improved residual unit BN-Conv-BN-PReLU-Conv-BN; output head
BN-Dropout-FC-BN). The layer naming is insightface's (``recognition/arcface_torch``), so the
parameter names match the r-models (``conv1``, ``layer1``, ..., ``fc``, ``features``).

Layout at 32x32 (the widths and depths are ours, not from a paper):
    conv1 3x3 stride 2, 32 ch (16x16) -> bn1 -> prelu
    layer1: 2 IBasicBlocks, 48 ch, first with stride 2 (8x8)
    layer2: 2 IBasicBlocks, 96 ch, first with stride 2 (4x4)
    bn2 -> flatten (1536) -> dropout -> fc -> features (BatchNorm1d, weight fixed at 1)
The total stride is 8, so ``input_size`` must be a multiple of 8.

Why this layout. The target was forward+backward of a batch of 128 at 32x32 (embedding 128) in
about 40-80 ms on a 2-core CPU with ``torch.set_num_threads(2)``. Median step times measured on that
machine (``tests/benchmarks/test_bench_backbones.py`` measures the first):
- this layout (572,800 parameters): 66-79 ms in NCHW across runs, 53-62 ms in channels_last;
- a stride-1 stem with three stages of 32/64/128 channels, one block each: about 200 ms, because
  the first block's 3x3 conv runs at the full 32x32;
- the same with 16/32/64 channels: about 85 ms.
With the first stride in the stem, the budget goes to depth (four residual blocks) instead of
resolution. We checked learning with one short proxy run (seed 0): 300 CosFace steps on 500
procedurally jittered identities, then 1-NN accuracy on 200 unseen identities. This layout scored
0.43, the 16/32/64 stride-1 layout 0.36 and the 32/64/128 one 0.10.
"""

from __future__ import annotations

from bench.backbones import BACKBONES
from bench.backbones.iresnet import IResNet, check_backbone_args

SMALL_STEM_WIDTH = 32
SMALL_STEM_STRIDE = 2
SMALL_WIDTHS = (48, 96)
SMALL_DEPTHS = (2, 2)
# Total stride: the stem, then one stride-2 block per stage.
SMALL_STRIDE = SMALL_STEM_STRIDE * 2 ** len(SMALL_DEPTHS)


@BACKBONES.register("small")
def small(
    embedding_size: int = 128,
    input_size: int = 32,
    dropout: float = 0.0,
    fp16: bool = False,
    zero_init_residual: bool = False,
) -> IResNet:
    """Compact IResNet for 32x32 CPU training (module docstring). The options are those of ``r18``:
    ``dropout`` before ``fc``, ``fp16`` CUDA autocast of the trunk, ``zero_init_residual``."""
    check_backbone_args("small", embedding_size, input_size, SMALL_STRIDE, dropout)
    return IResNet(
        SMALL_DEPTHS,
        embedding_size,
        input_size,
        widths=SMALL_WIDTHS,
        stem_width=SMALL_STEM_WIDTH,
        stem_stride=SMALL_STEM_STRIDE,
        dropout=dropout,
        fp16=fp16,
        zero_init_residual=zero_init_residual,
    )
