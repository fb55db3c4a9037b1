"""Grouped and depthwise convolutions, an SE block with a dead channel, near-singular inputs and
the matrix-weight coverage warning, end to end."""

from __future__ import annotations

import warnings

import pytest
import torch
from _quant_helpers import dequantized_float_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesq_lightning import BayesQConfig, quantize_model
from bayesq_lightning.input_stats import layer_input_hessians
from bayesq_lightning.posterior import fit_posterior
from bayesq_lightning.quantizers import dequantize
from bayesq_lightning.rounding import output_error


def _dense_ggn_diagonal(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_n \mathrm{diag}(J_n^\top (\mathrm{diag}(p_n) - p_n p_n^\top) J_n)` of one
    weight, from per-sample Jacobians by ``torch.func`` (no ASDL, no curvlinops)."""
    key = f"{name}.weight"
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits(w: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, {**params, key: w}, (xi[None],))[0]

    J = torch.func.vmap(torch.func.jacrev(logits), in_dims=(None, 0))(params[key], x)
    J = J.reshape(len(x), J.shape[1], -1).double()
    p = model(x).softmax(-1).double()
    lam = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return torch.einsum("ncp,nck,nkp->p", J, lam, J).reshape(params[key].shape)


@pytest.mark.parametrize(("cin", "cout", "groups", "size", "saving"), [
    (2, 4, 2, 4, False),    # the case: ASDL's per-sample branch, silently wrong
    (8, 16, 2, 5, True),    # ASDL's memory-saving branch: a shape error
    (32, 32, 32, 4, True),  # depthwise, memory-saving branch
    (6, 6, 6, 7, False),    # depthwise, per-sample branch
])
def test_grouped_conv_diagonal_matches_the_dense_ggn(cin, cout, groups, size, saving):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, groups=groups), nn.ReLU(), nn.Flatten(),
                          nn.Linear(cout * (size - 2) ** 2, 3)).eval()
    cols, positions = cin // groups * 9, (size - 2) ** 2
    assert (positions * (cout + cols) < cout * cols) == saving  # ASDL's switch
    x = torch.randn(6, cin, size, size)
    batches = [(x[:3], torch.zeros(3, dtype=torch.long)), (x[3:], torch.ones(3, dtype=torch.long))]
    post = fit_posterior(model, batches, ["0"], n_data=6, prior_precision=1.0)
    torch.testing.assert_close(post.layers["0"].curvature.double(),
                               _dense_ggn_diagonal(model, "0", x), rtol=1e-4, atol=1e-9)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(channels, 4), nn.Linear(4, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * w[:, :, None, None]


def _net(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    first = nn.Conv2d(3, 16, 3, padding=1)
    if kind == "grouped":
        body = [nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU()]
    elif kind == "depthwise":
        body = [nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 16, 1),
                nn.ReLU()]
    else:  # SE block after a channel that is always zero
        with torch.no_grad():
            first.bias[0] = -1e3
        body = [_SqueezeExcite(16)]
    return nn.Sequential(first, nn.ReLU(), *body, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 2)).eval()


LAYER = {"grouped": "2", "depthwise": "2", "se": "2.fc1"}
METHODS = {"gptq": {"method": "gptq"}, "diag": {"structure": "diag"},
           "kron": {"structure": "kron"}}


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(LAYER))
def test_every_method_quantizes_the_layer_better_than_rtn(calibration, kind):
    model = _net(kind)
    loader = DataLoader(TensorDataset(calibration, model(calibration).argmax(1)), batch_size=16)
    name = LAYER[kind]
    W = model.get_submodule(name).weight.detach().flatten(1)
    H = layer_input_hessians(model, list(loader), [name])[name]
    base = {"bits": 8.0, "allowed_bits": (3,), "calib_batches": 4, "n_data": 64}

    def error(res) -> float:
        (layer,) = [x for x in res.layers if x.name == name]
        Q = torch.cat([dequantize(b) for b in layer.blocks]).float()
        return output_error(Q - W, H, (0, len(W)), len(W))

    rtn = error(quantize_model(model, loader, BayesQConfig(method="rtn", **base), progress=False))
    for method, kw in METHODS.items():
        res = quantize_model(model, loader, BayesQConfig(**base, **kw), progress=False)
        assert name not in res.skipped and not res.skipped, method
        assert error(res) < 0.95 * rtn, method
        if method == "kron" and kind != "se":
            assert res.posterior.layers[name].A.dim() == 3  # one input factor per group
        with torch.no_grad():
            torch.testing.assert_close(res.model(calibration), dequantized_float_model(
                model, res.layers)(calibration), rtol=1e-5, atol=1e-6)


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@pytest.mark.parametrize("method", ["gptq", "kron"])
def test_near_zero_activations_round_with_more_damping(method):
    """Activations of 1e-10, then 1e-20 (no bias lifts them): the last layer's ``H`` is about
    1e-42, below fp32's normal range, and its first factorisation fails (K-FAC's ``A`` carries
    the scale of ``G`` too, which is as small for the first layers)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16, bias=False), _Scale(1e-10), nn.ReLU(),
                          nn.Linear(16, 16, bias=False), _Scale(1e-10), nn.ReLU(),
                          nn.Linear(16, 2)).eval()
    x = torch.randn(64, 12)
    loader = DataLoader(TensorDataset(x, torch.randint(0, 2, (64,))), batch_size=16)
    cfg = BayesQConfig(bits=8.0, allowed_bits=(4,), calib_batches=4, n_data=64,
                       **METHODS[method])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = quantize_model(model, loader, cfg, progress=False)
    damped = [str(w.message) for w in caught if "not positive definite" in str(w.message)]
    named = [m.split("'")[1] for m in damped]
    assert "6" in named and len(named) == len(set(named))  # one warning per layer
    assert all("damping of 0.01 * mean(diag H) in float64" in m for m in damped)
    W = model[6].weight.detach()
    (layer,) = [x for x in res.layers if x.name == "6"]
    Q = torch.cat([dequantize(b) for b in layer.blocks]).float()
    assert torch.isfinite(Q).all() and (Q - W).abs().max() < W.abs().max() / 4


def test_coverage_warns_when_an_unsupported_layer_holds_most_weights():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(1000, 16)   # embeddings: counted aside
            self.seq = nn.Conv1d(16, 64, 5)     # unsupported: most of the matrix weights
            self.head = nn.Linear(64, 2)
            self.pos = nn.Parameter(torch.zeros(1, 16))  # not a matrix weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.emb(x) + self.pos
            return self.head(self.seq(h.transpose(1, 2)).mean(-1))

    model = Mixed().eval()
    with pytest.warns(RuntimeWarning, match=r"9\d\.\d% of the model's matrix weights.*Conv1d"):
        res = quantize_model(model, None, BayesQConfig(method="rtn", bits=8.0),
                             progress=False)
    cov = res.info["coverage"]
    assert cov["matrix_weights"] == 16 * 64 * 5 + 64 * 2 and cov["embedding_weights"] == 16000
    assert cov["quantized_share"] == pytest.approx(128 / (5120 + 128))
    assert cov["embedding_quantized_share"] == 0.0 and list(cov["left_out"]) == ["Conv1d"]
    with warnings.catch_warnings():  # a model quantized whole: no warning
        warnings.simplefilter("error")
        full = quantize_model(_net("grouped"), None, BayesQConfig(method="rtn", bits=8.0),
                              progress=False)
    assert full.info["coverage"]["quantized_share"] == 1.0
