"""Shared input statistics: layers that read one input tensor share its ``X^T X`` product (and
GPTQ's ``H``), with sums bit-identical to separate ones; views and other layouts never share."""

from __future__ import annotations

import torch
from torch import nn

from bayesq_lightning.input_stats import (
    InputStats,
    SharedProducts,
    finish_input_hessians,
    layer_input_hessians,
)


class FanOut(nn.Module):
    """q / k / v read one tensor; ``cls`` reads a view of it (same storage, other values);
    two convolutions read one image with different strides."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 8)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.cls = nn.Linear(8, 8)
        self.conv_a = nn.Conv2d(1, 2, 3, padding=1)
        self.conv_b = nn.Conv2d(1, 2, 3, stride=2)
        self.head = nn.Linear(8 + 2 + 2, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        h = self.embed(batch["tokens"])                      # (B, T, 8)
        mixed = self.q(h) + self.k(h) * self.v(h)
        first = self.cls(h[:, 0])                            # a view: shares storage, not values
        img = batch["image"]
        convs = torch.cat([self.conv_a(img).mean((2, 3)), self.conv_b(img).mean((2, 3))], 1)
        return self.head(torch.cat([mixed.mean(1) + first, convs], 1))


NAMES = ["embed", "q", "k", "v", "cls", "conv_a", "conv_b", "head"]


def batches() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    # sequence lengths and image sizes vary across batches: shared products are per call
    return [{"tokens": torch.randn(4, t, 6, generator=g), "image": torch.randn(4, 1, s, s,
                                                                               generator=g)}
            for t, s in ((5, 8), (3, 6), (7, 9))]


def separate(model: nn.Module, data: list[dict]) -> dict[str, torch.Tensor]:
    """Each layer's H from its own products (no sharing), by the same code path."""
    stats = {n: InputStats(model.get_submodule(n)) for n in NAMES}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, s=stats[n]: s.add(args)) for n in NAMES]
    with torch.no_grad():
        for b in data:
            model(b)
    for h in hooks:
        h.remove()
    return finish_input_hessians(stats, data)


def test_shared_hessians_equal_separate_ones_and_fan_out_shares_one_tensor(monkeypatch):
    model, data = FanOut().eval(), batches()
    want = separate(model, data)
    calls = []
    real = InputStats._product
    monkeypatch.setattr(InputStats, "_product",
                        lambda self, x: calls.append(self.key) or real(self, x))
    got = layer_input_hessians(model, data, NAMES)
    for n in NAMES:
        assert torch.equal(got[n], want[n]), n
    assert got["q"] is got["k"] is got["v"]  # one H: GPTQ factorises it once
    assert got["cls"] is not got["q"] and not torch.equal(got["cls"], got["q"])
    assert got["conv_a"] is not got["conv_b"]
    # per batch: embed, q (shared by k and v), cls, conv_a, conv_b, head
    assert len(calls) == 6 * len(data)


def test_an_input_edited_in_place_between_two_layers_is_not_shared():
    x = torch.randn(5, 4)
    a, b = InputStats(nn.Linear(4, 2)), InputStats(nn.Linear(4, 3))
    shared = SharedProducts()
    a.add((x,), shared)
    x.mul_(2)  # the version counter moves: a new input
    b.add((x,), shared)
    assert a.products != b.products
    assert torch.allclose(b.S, 4 * a.S)


def test_kfac_input_factors_are_unchanged_by_sharing(monkeypatch):
    from bayesq_lightning.posterior import fit_posterior

    model, data = FanOut().eval(), batches()
    labelled = [(b, torch.randint(0, 3, (4,))) for b in data]

    def factors() -> dict[str, torch.Tensor]:
        post = fit_posterior(model, labelled, structure="kron", layer_names=NAMES, n_data=12,
                             prior_precision=1.0, kfac_batches=1)
        return {n: post.layers[n].A.clone() for n in NAMES}

    shared = factors()
    monkeypatch.setattr(SharedProducts, "product",
                        lambda self, x, key, compute: (0, compute()))
    alone = factors()
    for n in NAMES:
        assert torch.equal(shared[n], alone[n]), n
