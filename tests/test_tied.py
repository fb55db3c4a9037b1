"""Shared and tied weights: quantized once, stored once, counted once."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_unchanged, snapshot
from safetensors import safe_open
from torch import nn

from bayesq_lightning import BayesQConfig, quantize_model
from bayesq_lightning.artifact import load_quantized, save_quantized
from bayesq_lightning.artifact.export import TENSORS_FILE
from bayesq_lightning.layers import quantizable_layers, split_tied
from bayesq_lightning.posterior import KronLayerPosterior, LayerPosterior, LowRankLayerPosterior

WIDTH = 32


class Shared(nn.Module):
    """Two Linear layers holding one weight tensor (their biases differ)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.h = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.h(torch.relu(self.b(torch.relu(self.a(x)))))


class Aliased(nn.Module):
    """One Linear registered under two names and called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.h = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 4)
        self.b = self.a

    def forward(self, x):
        return self.h(torch.relu(self.b(torch.relu(self.a(x)))))


class TiedEmbedding(nn.Module):
    """Input embedding and output projection share one matrix (a language model's tie)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid = nn.Embedding(4, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, 4, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.relu(self.mid(x)))


def _batches() -> list:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, WIDTH, generator=g), torch.randint(0, 4, (64,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]


@pytest.mark.parametrize("structure", ["diag", "kron", "lowrank"])
def test_shared_weight_is_quantized_stored_and_counted_once(structure, tmp_path):
    torch.manual_seed(0)
    model = Shared()
    before = snapshot(model)
    r = quantize_model(model, _batches(), BayesQConfig(bits=4, structure=structure),
                       progress=False)
    assert_unchanged(model, before)
    assert r.tied == {"b": "a"} and [x.name for x in r.layers] == ["a", "h"]
    assert r.n_weights == WIDTH * WIDTH + 4 * WIDTH  # the shared matrix counted once
    assert "shared with 'b'" in r.posterior.layers["a"].note
    qa, qb = r.model.a, r.model.b
    assert qa.block0_codes is qb.block0_codes and not torch.equal(qa.bias, qb.bias)
    assert torch.equal(qa.dequantize(), qb.dequantize())

    save_quantized(r.model, r, tmp_path)
    with safe_open(str(tmp_path / TENSORS_FILE), "pt") as f:
        stored = list(f.keys())
    assert "a.block0_codes" in stored and "b.block0_codes" not in stored  # stored once
    torch.manual_seed(1)
    skeleton = Shared()
    load_quantized(skeleton, tmp_path)
    x = _batches()[0][0]
    assert torch.equal(skeleton(x), r.model(x))
    assert skeleton.b.block0_codes is skeleton.a.block0_codes


def test_module_registered_twice_is_replaced_under_both_names(tmp_path):
    torch.manual_seed(0)
    r = quantize_model(Aliased(), _batches(), BayesQConfig(bits=4, structure="diag"),
                       progress=False)
    assert [x.name for x in r.layers] == ["a", "h"] and r.model.b is r.model.a
    save_quantized(r.model, r, tmp_path)
    skeleton = Aliased()
    load_quantized(skeleton, tmp_path)
    assert skeleton.b is skeleton.a
    x = _batches()[0][0]
    assert torch.equal(skeleton(x), r.model(x))


@pytest.mark.parametrize("method", ["bayesq", "gptq"])
def test_weight_tied_to_an_embedding_stays_float_and_is_listed(method):
    torch.manual_seed(0)
    r = quantize_model(TiedEmbedding(), _batches(), BayesQConfig(bits=4, method=method),
                       progress=False)
    assert [x.name for x in r.layers] == ["mid"]
    assert "tied to 'emb' (Embedding)" in r.skipped["out"]
    assert type(r.model.out) is nn.Linear and r.model.out.weight is r.model.emb.weight
    assert r.info["skipped"] == r.skipped


def test_only_tied_layers_selected_is_an_error():
    model = TiedEmbedding()
    with pytest.raises(ValueError, match="tied to a module that stays in floating point.*include"):
        split_tied(model, quantizable_layers(model, include=["out"]))


def test_transformer_tied_word_embeddings_stay_float():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
    model = transformers.BertForMaskedLM(cfg)
    decoder = model.cls.predictions.decoder
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight
    r = quantize_model(model, None, BayesQConfig(bits=4, method="rtn"), progress=False)
    assert "cls.predictions.decoder" in r.skipped
    assert "cls.predictions.decoder" not in [x.name for x in r.layers]
    q = r.model
    assert q.cls.predictions.decoder.weight is q.bert.embeddings.word_embeddings.weight


def _dense(p: LayerPosterior) -> torch.Tensor:
    """The layer's curvature as a dense (n, n) matrix over ``W.flatten()``."""
    if isinstance(p, KronLayerPosterior):
        return torch.kron(p.G.double(), p.A.double())
    if isinstance(p, LowRankLayerPosterior):
        return torch.diag(p.residual.reshape(-1).double()) + p.U.double() @ torch.diag(
            p.S.double()) @ p.U.double().T
    return torch.diag(p.curvature.reshape(-1).double())


def test_tied_posteriors_sum_the_uses_curvature():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, generator=g)

    def spd(n):
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        return m @ m.T + n * torch.eye(n, dtype=torch.float64)

    d1, d2 = torch.rand(3, 4, generator=g), torch.rand(3, 4, generator=g)
    diag = LayerPosterior("a", mean, d1 + 0.1, 0.1).tied_with(LayerPosterior("b", mean, d2 + 0.1, 0.1))
    torch.testing.assert_close(diag.curvature, d1 + d2)
    torch.testing.assert_close(diag.precision, d1 + d2 + 0.1)

    U1, U2 = (torch.linalg.qr(torch.randn(12, 2, generator=g))[0] for _ in range(2))
    S1, S2 = torch.rand(2, generator=g) + 1, torch.rand(2, generator=g) + 1
    lr1 = LowRankLayerPosterior("a", mean, torch.zeros(3, 4), 0.1, U=U1, S=S1, residual=d1)
    lr2 = LowRankLayerPosterior("b", mean, torch.zeros(3, 4), 0.1, U=U2, S=S2, residual=d2)
    merged = lr1.tied_with(lr2)
    torch.testing.assert_close(_dense(merged), _dense(lr1) + _dense(lr2))  # exact
    torch.testing.assert_close(merged.U.T.double() @ merged.U.double(), torch.eye(4, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(merged.precision, merged.curvature + 0.1)

    G = spd(3)
    G = G / G.diagonal().mean()
    A1, A2 = spd(4), spd(4)
    k1 = KronLayerPosterior("a", mean, None, 0.1, A=A1, G=G)
    k2 = KronLayerPosterior("b", mean, None, 0.1, A=A2, G=G)
    torch.testing.assert_close(_dense(k1.tied_with(k2)), _dense(k1) + _dense(k2))  # same G: exact
    dead = KronLayerPosterior("b", mean, None, 0.1, A=A2, G=torch.zeros(3, 3))
    torch.testing.assert_close(_dense(k1.tied_with(dead)), _dense(k1))
    mixed = k1.tied_with(LayerPosterior("b", mean, d2 + 0.1, 0.1))  # diag fallback
    torch.testing.assert_close(mixed.curvature.double(), k1.curvature.double() + d2.double())


def test_distillation_keeps_the_tie():
    from bayesq_lightning import DistillConfig, distill_model
    from bayesq_lightning.distillation.student import finish_student, start_student

    torch.manual_seed(0)
    model = Shared()
    r = quantize_model(model, _batches(), BayesQConfig(bits=3, structure="diag"), progress=False)
    scale = r.model.a.block0_scale.clone()
    distill_model(model, r, _batches(), DistillConfig(epochs=2, lr=1e-2, holdout=0.0,
                                                       teacher="fp32"),
                  accelerator="cpu", devices=1, enable_progress_bar=False, logger=False)
    qa, qb = r.model.a, r.model.b
    assert not torch.equal(qa.block0_scale, scale)  # trained ...
    assert qb.block0_scale is qa.block0_scale and qb.block0_codes is qa.block0_codes  # ... once

    state = start_student(r.model, ("scale", "zero"))  # one master per shared tensor
    assert qb.block0_scale_master is qa.block0_scale_master
    assert len(state.params) == len({id(p) for p in state.params}) == 4  # a and h: scale, zero
    finish_student(r.model, state)


class SharedConv(nn.Module):
    """Two Conv2d layers holding one weight with different padding (a weight-shared pyramid)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=0)
        self.b.weight = self.a.weight
        self.h = nn.Linear(4 * 4 * 4, 4)

    def forward(self, x):
        return self.h(torch.relu(self.b(torch.relu(self.a(x)))).flatten(1))


class SharedTwice(Shared):
    """``Shared`` whose alias is also registered under a second name."""

    def __init__(self) -> None:
        super().__init__()
        self.c = self.b


@pytest.mark.parametrize("make", [Aliased, SharedTwice], ids=["aliased", "shared-registered-twice"])
def test_saving_the_float_model_with_its_result(make, tmp_path):
    """``save_quantized(float_model, result)`` packs every registration of every layer."""
    torch.manual_seed(0)
    model = make()
    r = quantize_model(model, _batches(), BayesQConfig(bits=4, structure="diag"), progress=False)
    save_quantized(model, r, tmp_path)  # the float model: packed on the fly
    skeleton = make()
    load_quantized(skeleton, tmp_path)
    x = _batches()[0][0]
    assert torch.equal(skeleton(x), r.model(x))


def test_tied_convolutions_keep_their_own_options(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, 6, 6, generator=g), torch.randint(0, 4, (32,), generator=g)
    r = quantize_model(SharedConv(), [(x[:16], y[:16]), (x[16:], y[16:])],
                       BayesQConfig(bits=4, structure="kron"), progress=False)
    assert r.tied == {"b": "a"} and r.model.b.padding == (0, 0)
    save_quantized(r.model, r, tmp_path)
    manifest = json.loads((tmp_path / "bayesq.json").read_text())
    assert manifest["n_weights"] == r.n_weights  # the shared matrix counted once
    skeleton = SharedConv()
    load_quantized(skeleton, tmp_path)
    assert torch.equal(skeleton(x[:4]), r.model(x[:4]))
