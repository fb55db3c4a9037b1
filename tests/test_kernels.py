"""The fast path of packed Linear layers (stock int4 / int8 CPU kernels) against the exact path."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bayesq_lightning import BayesQConfig, quantize_model, save_quantized, set_kernel
from bayesq_lightning.artifact import kernels
from bayesq_lightning.artifact.dispatch import fast_weight
from bayesq_lightning.artifact.export import TENSORS_FILE

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no CPU weight-only kernels")


def packed(width: int = 96, out: int = 48, **cfg) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, out), nn.ReLU(), nn.Linear(out, 16)).eval()
    bits = cfg.pop("bits")
    fields = {"method": "rtn", "bits": bits + 2.0, "allowed_bits": (bits,), **cfg}
    return quantize_model(model, None, BayesQConfig(**fields), progress=False).model


def outputs(model: nn.Module, x: torch.Tensor, kernel: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        set_kernel(model, kernel)
    with torch.no_grad():
        return model(x)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = {  # every width and group size the kernels take, and an odd in_features
    "2-bit": {"bits": 2}, "3-bit": {"bits": 3}, "4-bit": {"bits": 4}, "8-bit": {"bits": 8},
    "4-bit-g32": {"bits": 4, "group_size": 32}, "3-bit-g64": {"bits": 3, "group_size": 64,
                                                               "width": 128},
    "4-bit-g128": {"bits": 4, "group_size": 128, "width": 256},
    "3-bit-k160": {"bits": 3, "width": 160}, "4-bit-blocks": {"bits": 4, "block_rows": 16},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rows", [1, 8])
def test_fast_path_agrees_with_the_exact_path(case, rows):
    fields = dict(CASES[case])
    model = packed(width=fields.pop("width", 96), **fields)
    x = torch.randn(rows, model[0].in_features, generator=torch.Generator().manual_seed(1))
    exact = outputs(model, x, "exact")
    fast = outputs(model, x, "auto")
    assert fast_weight(model[0])[0] is not None  # the first layer takes a kernel
    assert not torch.equal(fast, exact)  # it really ran (bf16 activations)
    assert rel(fast, exact) < kernels.RTOL


def test_three_dimensional_inputs_and_many_rows():
    model = packed(bits=4)
    x = torch.randn(2, 3, 96)  # 6 rows: the kernel
    assert rel(outputs(model, x, "auto"), outputs(model, x, "exact")) < kernels.RTOL
    many = torch.randn(64, 96)  # more rows than the kernel wins at: the exact path, bit for bit
    assert torch.equal(outputs(model, many, "auto"), outputs(model, many, "exact"))


@pytest.mark.parametrize(("fields", "why"), [
    ({"bits": 4, "out": 40}, "not divisible by 16"),
    ({"bits": 4, "group_size": 16}, "group sizes"),
    ({"bits": 3, "quantizer": "nonuniform"}, "codebook"),
    ({"bits": 4, "width": 100}, "not divisible by 32"),
], ids=["odd-out", "group-16", "codebook", "odd-in"])
def test_unsupported_layers_fall_back_and_say_so_once(fields, why):
    model = packed(**fields)
    x = torch.randn(4, model[0].in_features)
    exact = outputs(model, x, "exact")
    with pytest.warns(UserWarning, match="keep the exact path") as caught:
        exact_layers = set_kernel(model, "auto")
    assert len(caught) == 1 and why in exact_layers["0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no further warning on forward
        with torch.no_grad():
            assert torch.equal(model(x), exact)  # both layers fall back: exact, bit for bit


def test_mixed_8_and_4_bit_layer_falls_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 32)).eval()
    q = quantize_model(model, None, BayesQConfig(method="rtn", bits=7.0, block_rows=16,
                                                 allowed_bits=(4, 8)), progress=False).model
    assert {s.bits for s in q[0].specs} == {4, 8}
    with pytest.warns(UserWarning, match="8-bit blocks beside lower widths"):
        set_kernel(q, "auto")


def test_fast_path_never_changes_the_artifact(tmp_path):
    x = torch.randn(2, 96)
    r = quantize_model(nn.Sequential(nn.Linear(96, 48)).eval(), None,
                       BayesQConfig(method="rtn", bits=5.0, allowed_bits=(3,)), progress=False)
    save_quantized(r.model, r, tmp_path / "before")
    keys = set(r.model.state_dict())
    outputs(r.model, x, "auto")  # repacks
    assert r.model[0]._fast is not None and set(r.model.state_dict()) == keys
    save_quantized(r.model, r, tmp_path / "after")
    assert (tmp_path / "before" / TENSORS_FILE).read_bytes() == (
        tmp_path / "after" / TENSORS_FILE).read_bytes()


def test_gradients_take_the_exact_path():
    model = packed(bits=4)
    set_kernel(model, "auto")
    x = torch.randn(2, 96, requires_grad=True)
    y = model(x)
    y.sum().backward()  # the kernels have no backward: autograd inputs decode exactly
    assert x.grad is not None
    with torch.no_grad():
        set_kernel(model, "exact")
        assert torch.equal(y.detach(), model(x))


def test_set_kernel_refuses_unknown_modes():
    with pytest.raises(ValueError, match="kernel='fast' is not one of"):
        set_kernel(packed(bits=4), "fast")


def test_int8_needs_in_features_divisible_by_32():
    model = packed(bits=8, width=72)  # the stock int8 kernel reads out of bounds at K = 72
    with pytest.warns(UserWarning, match="keep the exact path"):
        exact_layers = set_kernel(model, "auto")
    assert "in_features=72 is not divisible by 32 (int8 kernel)" in exact_layers["0"]


def test_non_contiguous_and_bf16_inputs():
    model = packed(bits=4)
    x = torch.randn(96, 3).t()  # a transposed (non-contiguous) batch of 3
    assert rel(outputs(model, x, "auto"), outputs(model, x.contiguous(), "exact")) < kernels.RTOL
    xb = torch.randn(3, 2, 96).to(torch.bfloat16)[:, 0]  # bf16, strided rows
    assert outputs(model.to(torch.bfloat16), xb, "auto").dtype == torch.bfloat16


def test_inference_mode_then_no_grad_and_moves_invalidate():
    model = packed(bits=3)
    x = torch.randn(64, 96)  # the exact path: decodes into the shared buffer
    model[0].decode_buffer.release()
    with torch.inference_mode():
        a = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), a)  # the buffer made in inference mode still serves
    set_kernel(model, "auto")
    assert model[0]._fast is not None
    model.to(torch.float32)  # any _apply drops the repacked and cached weights
    assert model[0]._fast is None and model[0]._fast_why is None


def test_repacked_weights_are_not_pickled(tmp_path):
    model = packed(bits=4)
    set_kernel(model, "auto")
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded[0]._fast is None and loaded[0].kernel == "auto"  # repacked on this CPU
    x = torch.randn(2, 96)
    with torch.no_grad():
        assert rel(loaded(x), outputs(model, x, "exact")) < kernels.RTOL
