"""Tests of AdaRound: the learned rounding, its place in the pipeline, and its options."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesq_lightning import BayesQConfig, quantize_model
from bayesq_lightning.adaround import (
    LAMBDA,
    Grid,
    _affine,
    _grad_V,
    learn_rounding,
    rectified_sigmoid,
)
from bayesq_lightning.quantizers import dequantize, design_uniform, expand_groups


def _correlated_layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out, cols, n = 64, 256, 2048
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5  # a random input covariance
    x = torch.randn(n, cols, generator=g) @ mix
    layer = nn.Linear(cols, out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, cols, generator=g) / cols ** 0.5)
    return layer, x


@pytest.mark.parametrize("beta", [None, 20.0, 2.0])
def test_written_out_gradient_matches_autograd(beta):
    # the learned V's gradient through h's clip, the grid's clip and the regulariser, against
    # autograd on the formula itself; V spans the clipped tails and some weights sit off the grid
    g = torch.Generator().manual_seed(0)
    rows, cols = 24, 40
    s = torch.rand(rows, 1, generator=g).add(0.5).expand(rows, cols)
    z = torch.full((rows, cols), 1.5)
    qmax = torch.full((rows, 1), 3.0)
    base = torch.randint(-2, 5, (rows, cols), generator=g).float()  # 0..3 on the grid
    V = torch.randn(rows, cols, generator=g) * 3
    dW = torch.randn(rows, cols, generator=g)

    ref = V.clone().requires_grad_(True)
    h = rectified_sigmoid(ref)
    W_t = s * (torch.minimum((base + h).clamp_min(0), qmax) - z)
    loss = (W_t * dW).sum()
    if beta is not None:
        loss = loss + LAMBDA * (1 - (2 * h - 1).abs().pow(beta)).sum()
    loss.backward()

    A, B = _affine(Grid(s, z, qmax), base)
    sig = torch.sigmoid(V)
    r = sig * 1.2 - 0.1
    assert torch.allclose(A + B * r.clamp(0, 1), W_t.detach(), atol=1e-6)
    ours = _grad_V(dW.clone(), B, sig, r, beta)
    assert (ref.grad == 0).float().mean() > 0.2  # the clipped cases are exercised
    assert torch.allclose(ours, ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("group_size", [None, 64])
def test_adaround_beats_nearest_and_ends_decided_on_the_grid(group_size):
    layer, x = _correlated_layer()
    W = layer.weight.detach()
    grid_ = design_uniform(W, 3, group_size=group_size)
    s = expand_groups(grid_.scale.float(), W.shape[1], group_size)
    z = expand_groups(grid_.zero.float(), W.shape[1], group_size)
    grid = Grid(s, z, torch.full((W.shape[0], 1), 7.0))
    codes, h = learn_rounding(layer, W, grid, x, x, None, iters=1000, batch=256)

    def output_error(Wq):
        return float(((x @ (Wq - W).T) ** 2).sum(1).mean())

    nearest = s * (grid_.codes.float() - z)
    assert output_error(s * (codes - z)) < 0.7 * output_error(nearest)
    decided = ((h < 1e-3) | (h > 1 - 1e-3)).float().mean()
    assert decided >= 0.99
    expected = ((W / s + z).floor() + (h >= 0.5).float()).clamp(0, 7)
    assert torch.equal(codes, expected)


class _ConvReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


def _data(n: int = 64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 4, (n,), generator=g)), batch_size=16)


def test_adaround_method_keeps_gptqs_widths_and_learns_codes():
    torch.manual_seed(0)
    model = _ConvReLU().eval()
    kw = dict(bits=3.0, allowed_bits=(2, 3, 4), calib_batches=4)
    gptq = quantize_model(model, _data(), BayesQConfig(method="gptq", **kw), progress=False)
    ada = quantize_model(model, _data(), BayesQConfig(method="adaround", adaround_iters=200,
                                                      adaround_batch=16, **kw), progress=False)
    assert [b.bits for x in ada.layers for b in x.blocks] == \
        [b.bits for x in gptq.layers for b in x.blocks]
    assert ada.bits_per_weight == gptq.bits_per_weight
    assert ada.info["adaround"]["conv"]["activation"] == "ReLU"
    assert ada.info["adaround"]["fc"]["activation"] is None
    changed = [not torch.equal(a.blocks[0].codes, g.blocks[0].codes)
               for a, g in zip(ada.layers, gptq.layers, strict=True)]
    assert any(changed)
    x = next(iter(_data()))[0]
    with torch.no_grad():  # the packed model computes with the learned codes
        dense = _ConvReLU().eval()
        dense.load_state_dict(model.state_dict())
        for layer in ada.layers:
            w = torch.cat([dequantize(b) for b in layer.blocks])
            dense.get_submodule(layer.name).weight.copy_(w.reshape(layer.weight_shape))
        torch.testing.assert_close(ada.model(x), dense(x), rtol=1e-5, atol=1e-5)


def test_a_small_calibration_set_clamps_the_batch_with_one_warning():
    model = _ConvReLU().eval()
    cfg = BayesQConfig(method="adaround", bits=4.5, allowed_bits=(4,), adaround_iters=5,
                       adaround_batch=1000, calib_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(model, _data(), cfg, progress=False)
    ours = [w for w in caught if "adaround_batch" in str(w.message)]
    assert len(ours) == 1
    assert "1000" in str(ours[0].message) and "32" in str(ours[0].message)


@pytest.mark.parametrize("kwargs, match", [
    (dict(quantizer="nonuniform"), "quantizer='uniform'"),
    (dict(quantizer="auto"), "quantizer='uniform'"),
    (dict(adaround_iters=0), "adaround_iters"),
    (dict(adaround_batch=-3), "adaround_batch"),
    (dict(adaround_iters=2.5), "adaround_iters"),
])
def test_bad_adaround_options_fail_when_the_config_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesQConfig(method="adaround", **kwargs)
