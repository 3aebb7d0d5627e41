"""Contract tests over every registered backbone, plus insightface state_dict compatibility.

The insightface expectations (key names, shapes, parameter counts) are written out here from the
naming rules of ``recognition/arcface_torch/backbones/iresnet.py`` and ``mobilefacenet.py``. They
are not derived from our modules, so a renamed layer or a changed shape fails here.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from bench.backbones import BACKBONES, build_backbone
from methods.registry import ConfigError

EXPECTED_BACKBONES = {"r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large", "small"}


def default_sizes(name: str) -> tuple[int, int]:
    """The builder's own defaults for ``(embedding_size, input_size)``."""
    params = inspect.signature(BACKBONES.get(name)).parameters
    return params["embedding_size"].default, params["input_size"].default


def train_step(model: nn.Module, input_size: int, batch: int = 2) -> torch.Tensor:
    """Forward a random batch in train mode and backpropagate a random projection of the output.

    A plain ``out.sum()`` would be useless here: after the train-mode BatchNorm1d at the end, the sum
    over the batch does not depend on the input, so every upstream gradient would be about zero.
    """
    model.train()
    out = model(torch.rand(batch, 3, input_size, input_size) * 2 - 1)
    (out * torch.randn_like(out)).sum().backward()
    return out


def test_registry_has_the_backbones() -> None:
    assert EXPECTED_BACKBONES <= set(BACKBONES.names())


# Deep backbones whose CPU training step at 112x112 takes over a second each: they train at
# 32x32 (all their layers and parameters still take part), and their default-size output shape is
# checked on the meta device, which computes shapes only.
TRAIN_STEP_SIZE_OVERRIDE = {"r100": 32, "r200": 32}


@pytest.mark.parametrize("name", BACKBONES.names())
def test_contract_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    embedding_size, input_size = default_sizes(name)
    input_size = TRAIN_STEP_SIZE_OVERRIDE.get(name, input_size)
    model = BACKBONES.get(name)(input_size=input_size)
    out = train_step(model, input_size)
    assert out.shape == (2, embedding_size)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, param_name
            continue
        assert param.grad is not None, f"{name}: no gradient for {param_name}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {param_name}"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient for {param_name}"
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, input_size, input_size)).shape == (1, embedding_size)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_output_shape_at_default_size(name: str) -> None:
    embedding_size, input_size = default_sizes(name)
    with torch.device("meta"):
        model = BACKBONES.get(name)()
        out = model(torch.empty(2, 3, input_size, input_size))
    assert out.shape == (2, embedding_size)


@pytest.mark.parametrize(("name", "input_size"), [("r18", 64), ("r50", 32), ("mbf", 64), ("small", 48), ("small", 112)])
def test_other_input_sizes(name: str, input_size: int) -> None:
    model = build_backbone(name, embedding_size=64, input_size=input_size)
    out = train_step(model, input_size)
    assert out.shape == (2, 64) and torch.isfinite(out).all()


# --- insightface compatibility -------------------------------------------------------------------


def expected_iresnet_state(depths: tuple[int, ...], embedding_size: int = 512) -> dict[str, tuple[int, ...]]:
    """The insightface IResNet state_dict at 112x112: every key and shape, from its naming rules."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, channels: int) -> None:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{suffix}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 3, 3)
    bn("bn1", 64)
    shapes["prelu.weight"] = (64,)
    in_channels = 64
    for stage, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512)), start=1):
        for index in range(depth):
            block = f"layer{stage}.{index}"
            block_in = in_channels if index == 0 else width
            bn(f"{block}.bn1", block_in)
            shapes[f"{block}.conv1.weight"] = (width, block_in, 3, 3)
            bn(f"{block}.bn2", width)
            shapes[f"{block}.prelu.weight"] = (width,)
            shapes[f"{block}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{block}.bn3", width)
            if index == 0:  # every stage starts with stride 2, so its first block has a projection
                shapes[f"{block}.downsample.0.weight"] = (width, block_in, 1, 1)
                bn(f"{block}.downsample.1", width)
        in_channels = width
    bn("bn2", 512)
    shapes["fc.weight"] = (embedding_size, 512 * 7 * 7)
    shapes["fc.bias"] = (embedding_size,)
    bn("features", embedding_size)
    return shapes


@pytest.mark.parametrize(("name", "depths"), [("r18", (2, 2, 2, 2)), ("r50", (3, 4, 14, 3))])
def test_iresnet_state_dict_matches_insightface(name: str, depths: tuple[int, ...]) -> None:
    expected = expected_iresnet_state(depths)
    model = build_backbone(name, embedding_size=512, input_size=112)
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert set(got) - set(expected) == set(), "keys insightface does not have"
    assert set(expected) - set(got) == set(), "insightface keys we lack"
    assert got == expected
    assert expected["fc.weight"] == (512, 25088)
    # A checkpoint with exactly these keys and shapes loads strictly.
    checkpoint = {key: torch.rand(shape) if shape else torch.tensor(0) for key, shape in expected.items()}
    checkpoint["features.weight"] = torch.ones(512)
    model.load_state_dict(checkpoint, strict=True)


def test_r50_parameter_count() -> None:
    # insightface r50 with a 512-d embedding: 43,590,848 parameters ("43.6M"), counted by hand.
    # A block with c_in -> c channels has bn1 2*c_in + conv1 9*c_in*c + bn2 2*c + prelu c
    # + conv2 9*c*c + bn3 2*c, and the first block of a stage adds downsample c_in*c + 2*c.
    #   stem    conv1 1728 + bn1 128 + prelu 64                        =      1,920
    #   layer1  64 ch,  3 blocks: 78,400 + 2 * 74,176                   =    226,752
    #   layer2 128 ch,  4 blocks: 230,400 + 3 * 295,808                 =  1,117,824
    #   layer3 256 ch, 14 blocks: 919,552 + 13 * 1,181,440              = 16,278,272
    #   layer4 512 ch,  3 blocks: 3,674,112 + 2 * 4,722,176             = 13,118,464
    #   head    bn2 1024 + fc 25088*512 + 512 + features 1024           = 12,847,616
    #   total                                                            = 43,590,848
    # parameters() includes the frozen features.weight (512); counting trainable ones gives 512 fewer.
    model = build_backbone("r50", embedding_size=512, input_size=112)
    assert sum(p.numel() for p in model.parameters()) == 43_590_848
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 43_590_848 - 512


def test_mobilefacenet_state_dict_matches_insightface() -> None:
    """Spot checks of the insightface mbf naming (scale 2: widths 128/256, fixed hidden widths)."""
    state = build_backbone("mbf", embedding_size=512, input_size=112).state_dict()
    expected = {
        "layers.0.layers.0.weight": (128, 3, 3, 3),  # stem ConvBlock: conv, BN, PReLU
        "layers.0.layers.1.running_var": (128,),
        "layers.0.layers.2.weight": (128,),
        "layers.1.layers.0.weight": (128, 2, 3, 3),  # 3x3 conv with groups=64 on 128 channels
        "layers.2.layers.0.layers.0.weight": (128, 128, 1, 1),  # DepthWise: expand
        "layers.2.layers.1.layers.0.weight": (128, 1, 3, 3),  # depthwise 3x3
        "layers.2.layers.2.layers.0.weight": (128, 128, 1, 1),  # linear projection
        "layers.3.layers.3.layers.2.layers.1.bias": (128,),  # 4th bottleneck of Residual(4)
        "layers.4.layers.0.layers.0.weight": (256, 128, 1, 1),
        "layers.4.layers.2.layers.0.weight": (256, 256, 1, 1),
        "layers.5.layers.5.layers.1.layers.0.weight": (256, 1, 3, 3),  # 6th of Residual(6)
        "layers.6.layers.0.layers.0.weight": (512, 256, 1, 1),
        "layers.7.layers.1.layers.2.layers.0.weight": (256, 256, 1, 1),  # 2nd of Residual(2)
        "conv_sep.layers.0.weight": (512, 256, 1, 1),
        "features.layers.0.layers.0.weight": (512, 1, 7, 7),  # GDC
        "features.layers.2.weight": (512, 512),  # Linear, no bias
        "features.layers.3.running_mean": (512,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "layers.3.layers.4.layers.0.layers.0.weight" not in state
    assert "features.layers.2.bias" not in state
    # Keys per unit: ConvBlock = conv 1 + BN 5 + PReLU 1 = 7; LinearBlock = 6; DepthWise = 7 + 7 + 6.
    # mbf layers: ConvBlock, ConvBlock, DepthWise, 4 DW, DepthWise, 6 DW, DepthWise, 2 DW.
    assert len([key for key in state if key.startswith("layers.")]) == 7 + 7 + 20 * (1 + 4 + 1 + 6 + 1 + 2)


def test_mobilefacenet_large_layout() -> None:
    state = build_backbone("mbf_large", embedding_size=512, input_size=112).state_dict()
    # blocks[0] == 2: the second layer is a Residual of two bottlenecks with hidden width 128.
    assert tuple(state["layers.1.layers.1.layers.0.layers.0.weight"].shape) == (128, 256, 1, 1)
    assert tuple(state["layers.5.layers.11.layers.2.layers.0.weight"].shape) == (512, 256, 1, 1)
    assert tuple(state["conv_sep.layers.0.weight"].shape) == (512, 512, 1, 1)


@pytest.mark.parametrize("name", ["r18", "r50", "small"])  # r100/r200: same class, slower to build
def test_features_weight_is_fixed_at_one(name: str) -> None:
    model = BACKBONES.get(name)()
    weight = model.features.weight
    assert not weight.requires_grad
    assert torch.equal(weight, torch.ones_like(weight))
    assert "features.weight" not in {n for n, p in model.named_parameters() if p.requires_grad}


def test_features_weight_stays_one_after_sgd_step() -> None:
    model = build_backbone("small", embedding_size=32, input_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    train_step(model, 32, batch=4)
    optimizer.step()
    assert torch.equal(model.features.weight, torch.ones(32))


# --- options and bad values ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED_BACKBONES))
def test_bad_input_size_is_a_one_line_config_error(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_backbone(name, input_size=100)
    message = str(info.value)
    assert "\n" not in message
    assert name in message and "100" in message and "multiple of" in message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"embedding_size": 0}, "embedding_size"),
        ({"input_size": -16}, "input_size"),
        ({"input_size": 112.0}, "input_size"),
        ({"dropout": 1.0}, "dropout"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_bad_options_are_config_errors(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        build_backbone("r18", **kwargs)
    assert "\n" not in str(info.value) and "r18" in str(info.value)


def test_fp16_flag_is_a_no_op_on_cpu() -> None:
    torch.manual_seed(0)
    plain = build_backbone("small", embedding_size=32, input_size=32).eval()
    half = build_backbone("small", embedding_size=32, input_size=32, fp16=True).eval()
    half.load_state_dict(plain.state_dict())
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = half(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, plain(x), rtol=0, atol=0)


def test_zero_init_residual_zeroes_bn2_as_insightface() -> None:
    model = build_backbone("r18", embedding_size=64, input_size=32, zero_init_residual=True)
    assert all(torch.count_nonzero(model.get_submodule(f"layer{s}.{b}.bn2").weight) == 0 for s in (1, 2, 3, 4) for b in (0, 1))
    assert torch.equal(model.layer1[0].bn3.weight, torch.ones(64))


def test_dropout_option() -> None:
    model = build_backbone("r18", embedding_size=64, input_size=32, dropout=0.4)
    assert model.dropout.p == 0.4


def test_small_layout() -> None:
    model = build_backbone("small", embedding_size=128, input_size=32)
    assert [name for name, _ in model.named_children() if name.startswith("layer")] == ["layer1", "layer2"]
    assert model.conv1.stride == (2, 2)
    assert model.fc.in_features == 96 * 4 * 4  # 32 / 8 = 4
    assert sum(p.numel() for p in model.parameters()) == 572_800
