from __future__ import annotations

import pytest
import torch
from torch import nn

from bayesq_lightning.posterior import fit_posterior
from bayesq_lightning.quantizers import dequantize, design_uniform, storage_bits
from bayesq_lightning.result import BlockResult
from bayesq_lightning.tables import mc_tables


def test_storage_bits_is_exact():
    assert storage_bits(10, 3, 0) == 32  # 30 code bits round up to 4 bytes
    assert storage_bits(16, 2, 4) == 32 + 64
    assert storage_bits(1, 8, 2) == 8 + 32


def _linear_softmax_case(bits: tuple[int, ...]):
    torch.manual_seed(0)
    d, c, copies = 6, 3, 8
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(d, c, bias=False))
    with torch.no_grad():
        model.lin.weight.uniform_(-0.4, 0.4)
    x = (2.0 * torch.eye(d)).repeat(copies, 1)  # orthogonal inputs
    y = torch.randint(0, c, (len(x),))
    batches = [(x[i: i + 16], y[i: i + 16]) for i in range(0, len(x), 16)]
    post = fit_posterior(model, batches, ["lin"], n_data=4000, prior_precision=1.0)
    lp = post.layers["lin"]
    blocks, cands = [], []
    for r in range(c):  # one block per output row: the GGN is then exactly diagonal
        blocks.append(("lin", (r, r + 1)))
        cands.append([
            BlockResult((r, r + 1), b, "uniform", None, g.codes, g.scale, g.zero)
            for b in bits for g in [design_uniform(lp.mean[r: r + 1], b)]
        ])
    return model, batches, post, blocks, cands


def test_mc_tables_agree_with_closed_form_on_linear_softmax():
    model, batches, post, blocks, cands = _linear_softmax_case((2, 3, 4))
    mc = mc_tables(model, batches, post, blocks, cands, n_data=post.n_data, samples=200,
                   prior=False)
    lp = post.layers["lin"]
    n_checked = 0
    for (_, (r0, r1)), cs, losses, ses in zip(blocks, cands, mc.losses, mc.stderr, strict=True):
        ggn = (lp.precision[r0:r1] - lp.prior_precision).double()
        for cand, loss, se in zip(cs, losses, ses, strict=True):
            closed = float((ggn * (dequantize(cand, torch.float64) - lp.mean[r0:r1]) ** 2).sum())
            assert abs(loss - closed) <= 4 * se + 1e-9, (loss, closed, se)
            n_checked += 1
    assert n_checked == 9
    assert mc.forward_passes == 200 * (1 + 3 * (1 + 3)) * len(batches)


def test_mc_prior_term_and_sample_count_validation():
    """The prior term is delta ||q - mu||^2 exactly; fewer than one sample is refused."""
    model, batches, post, blocks, cands = _linear_softmax_case((4,))
    with_prior = mc_tables(model, batches, post, blocks, cands, n_data=post.n_data, samples=2,
                           prior=True)
    without = mc_tables(model, batches, post, blocks, cands, n_data=post.n_data, samples=2)
    lp = post.layers["lin"]
    for (_, (r0, r1)), cs, a, b in zip(blocks, cands, with_prior.losses, without.losses,
                                       strict=True):
        prior = lp.prior_precision * float(((dequantize(cs[0], torch.float64)
                                            - lp.mean[r0:r1]) ** 2).sum())
        assert a[0] - b[0] == pytest.approx(prior, rel=1e-6)
    with pytest.raises(ValueError, match="samples=0"):
        mc_tables(model, batches, post, blocks, cands, n_data=post.n_data, samples=0)
