"""Tests of the packed QuantizedLinear / QuantizedConv2d layers."""

from __future__ import annotations

import copy

import pytest
import torch
from _quant_helpers import dequantized_float_model, rtn_block, rtn_layer, rtn_layers
from torch import nn

from bayesq_lightning.artifact import QuantizedConv2d, QuantizedLinear, replace_quantized_layers
from bayesq_lightning.artifact.manifest import block_spec
from bayesq_lightning.quantizers import block_storage_bits, dequantize
from bayesq_lightning.result import LayerResult


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 10, bias=False))


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # depthwise
        nn.ReLU(),
        nn.Conv2d(8, 6, 1, bias=False),
        nn.Conv2d(6, 6, (3, 1), padding="same", dilation=(2, 1)),
    )


def mixed_layers(model: nn.Module) -> list[LayerResult]:
    """Several blocks per layer with different widths, a grouped scale and codebook blocks."""
    layers = []
    for i, (name, m) in enumerate(
        (n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ):
        if i % 3 == 0:
            layers.append(rtn_layer(name, m, [2, 3, 4, 8][: min(4, m.weight.shape[0])]))
        elif i % 3 == 1:
            layers.append(rtn_layer(name, m, [3, 4], nonuniform=(1,), group_size=4))
        else:
            layers.append(rtn_layer(name, m, [2, 3], nonuniform=(0,), per_row_codebook=True))
    return layers


@pytest.mark.parametrize(
    ("build", "shape"), [(mlp, (5, 24)), (cnn, (2, 4, 9, 11))], ids=["linear", "conv2d"]
)
def test_outputs_equal_float_model_with_dequantized_weights(build, shape):
    model = build()
    layers = mixed_layers(model)
    assert any(len(x.blocks) > 1 and len({b.bits for b in x.blocks}) > 1 for x in layers)
    assert any(b.quantizer == "nonuniform" for x in layers for b in x.blocks)
    reference = dequantized_float_model(model, layers)
    packed = replace_quantized_layers(copy.deepcopy(model), layers)
    types = (QuantizedLinear, QuantizedConv2d)
    assert sum(isinstance(m, types) for m in packed.modules()) == len(layers)
    x = torch.randn(*shape)
    with torch.no_grad():
        out, ref = packed(x), reference(x)
    assert torch.equal(out, ref)
    # And they differ from the unquantized model: the test can tell a no-op from a decoder.
    assert not torch.equal(out, model(x))


def test_dequantize_and_blocks_round_trip():
    model = cnn()
    layers = mixed_layers(model)
    packed = replace_quantized_layers(copy.deepcopy(model), layers)
    for layer in layers:
        q = packed.get_submodule(layer.name)
        expect = torch.cat([dequantize(b) for b in layer.blocks]).reshape(layer.weight_shape)
        assert torch.equal(q.dequantize(), expect)
        assert torch.equal(q.weight, expect)
        for got, want in zip(q.blocks(), layer.blocks, strict=True):
            assert (got.rows, got.bits, got.quantizer, got.group_size) == (
                want.rows,
                want.bits,
                want.quantizer,
                want.group_size,
            )
            for f in ("codes", "scale", "zero", "codebook"):
                a, b = getattr(got, f), getattr(want, f)
                assert (a is None and b is None) or torch.equal(a, b), f


def test_buffer_bytes_match_storage_bits():
    model = cnn()
    layers = mixed_layers(model)
    packed = replace_quantized_layers(copy.deepcopy(model), layers)
    for layer in layers:
        q = packed.get_submodule(layer.name)
        for i, block in enumerate(layer.blocks):
            codes = getattr(q, f"block{i}_codes")
            assert codes.dtype == torch.uint8
            assert codes.numel() == -(-block.n_weights * block.bits // 8)
            meta = [
                t
                for n, t in q.named_buffers()
                if n.startswith(f"block{i}_") and n != f"block{i}_codes"
            ]
            assert all(t.dtype == torch.float16 for t in meta)
            assert 2 * sum(t.numel() for t in meta) == 16 * block.n_meta // 8
            assert (
                codes.numel() + 2 * sum(t.numel() for t in meta) == block_storage_bits(block) // 8
            )


def test_state_dict_names():
    torch.manual_seed(0)
    lin = nn.Linear(12, 9)
    layer = rtn_layer("fc", lin, [2, 4], group_size=5, nonuniform=(1,))
    assert [b.rows for b in layer.blocks] == [(0, 4), (4, 9)]
    model = nn.Sequential()
    model.add_module("fc", lin)
    replace_quantized_layers(model, [layer])
    sd = model.state_dict()
    assert list(sd) == [
        "fc.bias",
        "fc.block0_codes",
        "fc.block0_scale",
        "fc.block0_zero",
        "fc.block1_codes",
        "fc.block1_codebook",
    ]
    assert sd["fc.block0_scale"].shape == (4, 3)  # 12 columns in groups of 5: 5, 5, 2
    assert sd["fc.block1_codebook"].shape == (16,)
    # A fresh module built from the specs loads that state and computes the same thing.
    fresh = QuantizedLinear((9, 12), model.fc.specs)
    fresh.load_state_dict({k.removeprefix("fc."): v for k, v in sd.items()})
    x = torch.randn(3, 12)
    assert torch.equal(fresh(x), model(x))


def test_other_activation_dtypes():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    layer = rtn_layer("", lin, [3, 4])
    q = QuantizedLinear.from_float(lin, layer)
    for dtype in (torch.float64, torch.bfloat16):
        x = torch.randn(4, 16, dtype=dtype)
        w = torch.cat([dequantize(b, dtype) for b in layer.blocks])
        out = q(x)
        assert out.dtype == dtype
        assert torch.equal(out, nn.functional.linear(x, w, lin.bias.detach().to(dtype)))


def test_cache_dequantized():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    layer = rtn_layer("", lin, 4)
    x = torch.randn(2, 16)
    plain = QuantizedLinear.from_float(lin, layer)
    plain(x)
    assert plain._cached is None  # off by default
    cached = QuantizedLinear.from_float(lin, layer, cache_dequantized=True)
    out = cached(x)
    w = cached._cached
    assert w is not None and torch.equal(out, plain(x))
    cached(x)
    assert cached._cached is w  # reused, not recomputed
    # Loading new buffers drops the stale decoded weight.
    lin2 = nn.Linear(16, 8)
    other = QuantizedLinear.from_float(lin2, rtn_layer("", lin2, 4))
    cached.load_state_dict(other.state_dict())
    assert torch.equal(cached(x), other(x))


def test_from_float_rejects_mismatches():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    layer = rtn_layer("fc", lin, [2, 4])
    with pytest.raises(ValueError, match="weight shape"):
        QuantizedLinear.from_float(nn.Linear(16, 9), layer)
    with pytest.raises(TypeError, match="expected nn.Conv2d"):
        QuantizedConv2d.from_float(lin, layer)
    bad = copy.deepcopy(layer)
    bad.blocks[0].scale = bad.blocks[0].scale.float()
    with pytest.raises(TypeError, match="float16"):
        QuantizedLinear.from_float(lin, bad)
    shapes = copy.deepcopy(layer)
    shapes.blocks[0].scale = shapes.blocks[0].scale[:1]
    shapes.blocks[0].zero = shapes.blocks[0].zero[:1]
    with pytest.raises(ValueError, match="metadata shapes"):
        QuantizedLinear.from_float(lin, shapes)
    gap = copy.deepcopy(layer)
    gap.blocks[1].rows = (5, 8)
    with pytest.raises(ValueError, match="tile the output channels"):
        QuantizedLinear.from_float(lin, gap)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(NotImplementedError, match="padding_mode='reflect'"):
        QuantizedConv2d.from_float(conv, rtn_layer("c", conv, 4))


def test_replace_is_all_or_nothing():
    model = mlp()
    layers = rtn_layers(model, 4)
    before = copy.deepcopy(model.state_dict())
    layers[1] = rtn_layer("0", model[0], 4)  # a result for the wrong layer shape
    layers[1].name = "2"
    with pytest.raises(ValueError, match="weight shape"):
        replace_quantized_layers(model, layers)
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(KeyError, match="no layer named 'nope'"):
        replace_quantized_layers(model, [rtn_layer("nope", model[0], 4)])


def test_block_spec_byte_counts():
    torch.manual_seed(0)
    w = torch.randn(7, 13)
    block = rtn_block(w, (0, 7), 3, group_size=4)
    spec = block_spec(block)
    assert spec.code_bytes * 8 + spec.meta_bytes * 8 == block_storage_bits(block)
