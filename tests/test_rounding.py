from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bayesq_lightning.input_stats import InputStats, input_hessian, layer_input_hessians
from bayesq_lightning.quantizers import dequantize, design_uniform, expand_groups, round_uniform
from bayesq_lightning.result import BlockResult
from bayesq_lightning.rounding import (
    FeedbackFactors,
    error_feedback_round,
    feedback_round_blocks,
    gptq_gamma,
    output_error,
    uniform_column_quantizer,
)


def round_uniform_with_feedback(W, H, scale, zero, bits, group_size=None, gamma=None,
                                act_order=False, block_size=128):
    """Error feedback onto a fixed uniform grid (GPTQ with static groups), 2-D ``H``."""
    gamma = gptq_gamma(H) if gamma is None else gamma
    return error_feedback_round(W, H, uniform_column_quantizer(scale, zero, bits, group_size),
                                gamma, block_size, act_order)


def _layer(rows: int, cols: int, n: int, seed: int, dtype=torch.float32):
    """Random weights and H = X X^T / n from correlated inputs X = (Z M)^T."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    X = (torch.randn(n, cols, generator=g, dtype=dtype)
         @ torch.randn(cols, cols, generator=g, dtype=dtype)).T
    return W, X @ X.T / n


def _rtn(W: torch.Tensor, grid, bits: int, group_size: int | None):
    cols = W.shape[1]
    s, z = expand_groups(grid.scale, cols, group_size), expand_groups(grid.zero, cols, group_size)
    codes = round_uniform(W, s, z, bits)
    return codes, (codes.float() - z.float()) * s.float()


def _objective(dW: torch.Tensor, H: torch.Tensor) -> float:
    dW = dW.double()
    return float(((dW @ H.double()) * dW).sum())


@pytest.mark.parametrize("group_size", [None, 8])
def test_identity_H_equals_round_to_nearest(group_size):
    W, _ = _layer(16, 40, 1, seed=0)
    grid = design_uniform(W, 3, group_size=group_size)
    for H, gamma, act in [(torch.eye(40), 0.0, False), (torch.eye(40), 1e-6, False),
                          # diagonal H: no feedback either, but act-order really permutes
                          (torch.diag(torch.rand(40) + 0.5), 1e-3, True)]:
        codes, Q, obj = round_uniform_with_feedback(W, H, grid.scale, grid.zero, 3, group_size,
                                                    gamma=gamma, act_order=act, block_size=8)
        assert torch.equal(codes, grid.codes)
        rtn_codes, rtn_q = _rtn(W, grid, 3, group_size)
        assert torch.equal(codes, rtn_codes) and torch.equal(Q, rtn_q)
        assert obj == pytest.approx(_objective(Q - W, H), rel=1e-12)


def test_beats_round_to_nearest_on_correlated_inputs():
    ours, rtn = [], []
    for seed in range(20):
        W, H = _layer(16, 48, 192, seed=seed)
        grid = design_uniform(W, 3)
        _, _, obj = round_uniform_with_feedback(W, H, grid.scale, grid.zero, 3,
                                                gamma=gptq_gamma(H), block_size=16)
        ours.append(obj)
        rtn.append(_objective(_rtn(W, grid, 3, None)[1] - W, H))
    ours_m, rtn_m = sum(ours) / 20, sum(rtn) / 20
    assert ours_m < 0.9 * rtn_m, (ours_m, rtn_m)


def _reference(W, H, quantize_column, gamma, act_order):
    """Textbook column-by-column OBS rounding: no lazy blocks, explicit inverse."""
    cols = W.shape[1]
    perm = (torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order
            else torch.arange(cols))
    Wp, Hp = W[:, perm].clone(), H[perm][:, perm]
    Hinv = torch.linalg.cholesky(torch.linalg.inv(Hp + gamma * torch.eye(cols, dtype=H.dtype)),
                                 upper=True)
    codes = torch.empty(W.shape, dtype=torch.uint8)
    Q = torch.empty_like(W)
    for i in range(cols):
        c, q = quantize_column(Wp[:, i].clone(), int(perm[i]))
        codes[:, perm[i]], Q[:, perm[i]] = c, q
        err = (Wp[:, i] - q) / Hinv[i, i]
        Wp[:, i + 1 :] -= torch.outer(err, Hinv[i, i + 1 :])
    return codes, Q, _objective(Q - W, H)


@pytest.mark.parametrize("act_order", [False, True])
def test_matches_column_by_column_reference_float64(act_order):
    W, _ = _layer(12, 40, 1, seed=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    X = (torch.randn(100, 40, generator=g, dtype=torch.float64)
         @ torch.randn(40, 40, generator=g, dtype=torch.float64)).T
    X[7] = -X[5]  # exact tie in diag(H): the stable sort keeps column 5 first
    H = X @ X.T / 100
    assert H[5, 5] == H[7, 7]
    grid = design_uniform(W, 3, group_size=10)
    qc = uniform_column_quantizer(grid.scale, grid.zero, 3, group_size=10)
    gamma = gptq_gamma(H)
    codes, Q, obj = error_feedback_round(W, H, qc, gamma, block_size=8, act_order=act_order)
    ref_codes, ref_Q, ref_obj = _reference(W, H, qc, gamma, act_order)
    assert Q.dtype == torch.float64
    assert torch.equal(codes, ref_codes) and torch.equal(Q, ref_Q)
    assert obj == pytest.approx(ref_obj, rel=1e-10)
    # feedback really moved codes away from round-to-nearest
    assert not torch.equal(codes, grid.codes)
    if act_order:  # the permutation matters: plain order gives other codes
        plain, _, _ = error_feedback_round(W, H, qc, gamma, block_size=8)
        assert not torch.equal(codes, plain)


def test_codes_round_trip_through_block_result():
    W, H = _layer(10, 40, 80, seed=5)
    grid = design_uniform(W, 4, group_size=16)  # 3 groups, the last one short
    codes, Q, _ = round_uniform_with_feedback(W, H, grid.scale, grid.zero, 4, group_size=16,
                                              act_order=True, block_size=8)
    block = BlockResult((0, 10), 4, "uniform", 16, codes, grid.scale, grid.zero)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 16
    assert torch.equal(dequantize(block), Q)


def test_dead_columns_round_to_nearest():
    W, H = _layer(8, 20, 60, seed=6, dtype=torch.float64)
    H[:, 4] = 0.0
    H[4, :] = 0.0
    grid = design_uniform(W, 2)
    # gamma=0: only the H[d, d] = 1 fix makes the factorisation exist
    codes, _, _ = round_uniform_with_feedback(W, H, grid.scale, grid.zero, 2, gamma=0.0,
                                              block_size=8)
    assert torch.equal(codes[:, 4], grid.codes[:, 4])


def test_non_finite_H_raises():
    W, H = _layer(4, 10, 30, seed=7)
    H[2, 3] = float("nan")
    grid = design_uniform(W, 3)
    with pytest.raises(ValueError, match="not positive definite.*non-finite"):
        error_feedback_round(W, H, uniform_column_quantizer(grid.scale, grid.zero, 3), gamma=0.0)


def test_H_far_from_psd_rounds_to_nearest_with_a_warning():
    W, _ = _layer(4, 10, 30, seed=7)
    H = torch.diag(torch.tensor([1.0] * 5 + [-1.0] + [1.0] * 4))  # past every retry's damping
    grid = design_uniform(W, 3)
    qc = uniform_column_quantizer(grid.scale, grid.zero, 3)
    with pytest.warns(RuntimeWarning, match="layer 'fc'.*far from positive semi-definite"):
        codes, _, _ = error_feedback_round(W, H, qc, gamma=0.0, layer="fc")
    assert torch.equal(codes, grid.codes)  # no feedback: round to nearest
    error_feedback_round(W, H, qc, gamma=1.5)  # enough damping of its own: no retry


def test_round_off_negative_eigenvalue_is_damped_in_float64():
    """``H = X X^T / n`` of rank 6 < 16 columns, its null space pushed to -1e-6 of its scale
    (round-off): the undamped fp32 factorisation fails, the retry damps tenfold per step."""
    W, H = _layer(8, 16, 6, seed=3)
    _, V = torch.linalg.eigh(H.double())
    null = V[:, :10]  # H's null space (its 10 smallest eigenvalues are 0)
    scale = float(H.diagonal().mean())
    H = (H.double() - 1e-6 * scale * null @ null.T).float()
    assert float(torch.linalg.eigvalsh(H.double())[0]) < -5e-7 * scale
    grid = design_uniform(W, 3)
    qc = uniform_column_quantizer(grid.scale, grid.zero, 3)
    factors = FeedbackFactors()
    with pytest.warns(RuntimeWarning) as caught:
        codes, Q, objective = error_feedback_round(W, H, qc, gamma=0.0, factors=factors,
                                                   layer="conv")
        error_feedback_round(W, H.clone(), qc, gamma=0.0, factors=factors, layer="conv")
    (warning,) = [w for w in caught if "not positive definite" in str(w.message)]
    assert "layer 'conv'" in str(warning.message) and "1e-05 * mean(diag H)" in str(
        warning.message)  # 1e-8, 1e-7, 1e-6 fail; one warning for the layer
    rtn = dequantize(BlockResult((0, 8), 3, "uniform", None, grid.codes, grid.scale, grid.zero))
    assert torch.isfinite(Q).all() and objective < _objective(rtn - W, H)


def test_input_hessian_linear_is_mean_output_error():
    torch.manual_seed(0)
    lin = nn.Linear(12, 5, bias=False)
    xs = [torch.randn(3, 7, 12), torch.randn(4, 7, 12)]
    H = input_hessian(lin, xs)
    X = torch.cat([x.reshape(-1, 12) for x in xs])
    torch.testing.assert_close(H, X.T @ X / X.shape[0])
    dW = torch.randn(5, 12)
    assert _objective(dW, H) == pytest.approx(float((X @ dW.T).pow(2).sum()) / X.shape[0],
                                              rel=1e-5)


def _unfold(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    u = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                 stride=conv.stride)  # (N, C*kh*kw, L)
    return u.permute(1, 0, 2).flatten(1)  # (C*kh*kw, N*L)


def test_input_hessian_conv_matches_unfold():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=2)
    xs = [torch.randn(2, 3, 9, 9), torch.randn(3, 3, 9, 9)]
    X = torch.cat([_unfold(conv, x) for x in xs], dim=1)
    torch.testing.assert_close(input_hessian(conv, xs), X @ X.T / X.shape[1])
    # the objective is the mean squared output error per output position
    dW = torch.randn(6, 27) * 0.1
    out = F.conv2d(torch.cat(xs), dW.view(6, 3, 3, 3), stride=2, padding=1, dilation=2)
    per_patch = float(out.pow(2).sum()) / (5 * out.shape[2] * out.shape[3])
    assert _objective(dW, input_hessian(conv, xs)) == pytest.approx(per_patch, rel=1e-5)


@pytest.mark.parametrize(("padding", "mode"), [("same", "zeros"), (1, "reflect")])
def test_input_hessian_conv_padding_variants(padding, mode):
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=padding, padding_mode=mode, bias=False)
    x = torch.randn(2, 2, 6, 6)
    xp = F.pad(x, (1, 1, 1, 1), mode="constant" if mode == "zeros" else mode)
    X = F.unfold(xp, 3).permute(1, 0, 2).flatten(1)
    H = input_hessian(conv, [(x,)])
    torch.testing.assert_close(H, X @ X.T / X.shape[1])
    dW = torch.randn(3, 18)
    out = F.conv2d(xp, dW.view(3, 2, 3, 3))
    assert _objective(dW, H) == pytest.approx(float(out.pow(2).sum()) / (2 * 36), rel=1e-5)


@pytest.mark.parametrize(("cin", "cout", "groups"), [(4, 6, 2), (4, 4, 4)])
def test_grouped_and_depthwise_conv(cin, cout, groups):
    torch.manual_seed(2)
    conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(6, cin, 7, 7)
    # correlate channels within a group
    x = x + 0.8 * x.roll(1, dims=1)
    H = input_hessian(conv, [x])
    cpg, cols = cin // groups, cin // groups * 9
    assert H.shape == (groups, cols, cols)
    for g in range(groups):
        Xg = _unfold(conv, x[:, g * cpg : (g + 1) * cpg])
        torch.testing.assert_close(H[g], Xg @ Xg.T / Xg.shape[1])
    # a group's H only depends on its own input channels
    x2 = x.clone()
    x2[:, cpg:] = torch.randn_like(x2[:, cpg:]) * 5
    torch.testing.assert_close(input_hessian(conv, [x2])[0], H[0])

    W = conv.weight.detach().flatten(1)
    grid = design_uniform(W, 2)
    cand = BlockResult((0, cout), 2, "uniform", None, grid.codes, grid.scale, grid.zero)
    codes = feedback_round_blocks([cand], W, H, cout)[0].codes
    Q = dequantize(dataclasses.replace(cand, codes=codes))
    obj = output_error(Q - W, H, (0, cout), cout)
    # each group is error_feedback_round on its own rows under its own H
    per = cout // groups
    for g in range(groups):
        rows = slice(g * per, (g + 1) * per)
        qc = uniform_column_quantizer(grid.scale[rows], grid.zero[rows], 2)
        c_g, q_g, _ = error_feedback_round(W[rows], H[g], qc, gptq_gamma(H[g]))
        assert torch.equal(codes[rows], c_g) and torch.equal(Q[rows], q_g)
    # a block of rows 1..cout-1 rounds each group's part under that group's H
    part = feedback_round_blocks([dataclasses.replace(cand, rows=(1, cout), codes=grid.codes[1:],
                                                      scale=grid.scale[1:], zero=grid.zero[1:])],
                                 W[1:], H, cout)[0].codes
    qc = uniform_column_quantizer(grid.scale[1:per], grid.zero[1:per], 2)
    assert torch.equal(part[: per - 1], error_feedback_round(W[1:per], H[0], qc,
                                                             gptq_gamma(H[0]))[0])
    # objective = mean squared output error of the quantized conv per output position
    out = F.conv2d(x, (Q - W).view_as(conv.weight), padding=1, groups=groups)
    assert obj == pytest.approx(float(out.pow(2).sum()) / (6 * 49), rel=1e-4)
    block = BlockResult((0, cout), 2, "uniform", None, codes, grid.scale, grid.zero)
    assert torch.equal(dequantize(block), Q)
    if groups == 2:  # feedback under per-group H beats rounding to nearest
        assert obj < _objective_grouped(_rtn(W, grid, 2, None)[1] - W, H)


def _objective_grouped(dW: torch.Tensor, H: torch.Tensor) -> float:
    per = dW.shape[0] // H.shape[0]
    return sum(_objective(dW[g * per : (g + 1) * per], H[g]) for g in range(H.shape[0]))


def test_act_order_lowers_output_error_on_correlated_inputs():
    """256 x 512 layer, 2048 inputs from a Gaussian with a random covariance (GPTQ's setting)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 512, generator=g) * 0.05
    M = torch.randn(512, 512, generator=g) * torch.linspace(0.05, 2.0, 512)  # uneven scales
    X = torch.randn(2048, 512, generator=g) @ M
    H = X.T @ X / len(X)
    grid = design_uniform(W, 3)
    objective = {}
    for act in (False, True):
        _, Q, obj = round_uniform_with_feedback(W, H, grid.scale, grid.zero, 3, act_order=act)
        objective[act] = obj
        assert obj == pytest.approx(float(((X @ (Q - W).T) ** 2).sum()) / len(X), rel=1e-3)
    assert objective[True] < objective[False], objective


class _SeqModel(nn.Module):
    """Token inputs of any length: a Linear applied per token, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.h = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.h(torch.relu(self.a(x)).mean(1))


def test_streaming_statistics_equal_all_at_once_with_an_uneven_last_batch():
    torch.manual_seed(0)
    model = _SeqModel()
    x = torch.randn(11, 4, 6)
    batches = [x[:4], x[4:8], x[8:]]  # the last batch is short
    H = layer_input_hessians(model, batches, ["a", "h"])
    rows_a = x.reshape(-1, 6).double()
    torch.testing.assert_close(H["a"], (rows_a.T @ rows_a / len(rows_a)).float())
    hidden = torch.relu(model.a(x)).mean(1).double()
    torch.testing.assert_close(H["h"], (hidden.T @ hidden / len(hidden)).float())


def test_processes_with_other_sequence_lengths_combine_by_rows():
    """Two shards of different sequence lengths, summed through ``reduce``, give the
    statistics of one pass over both (weighting by rows, not samples)."""
    torch.manual_seed(0)
    model = _SeqModel()
    short, long = [torch.randn(3, 2, 6)], [torch.randn(3, 7, 6)]
    recorded: list[torch.Tensor] = []

    def record(t: torch.Tensor) -> torch.Tensor:  # the other "rank": same call order
        recorded.append(t.clone())
        return t

    layer_input_hessians(model, long, ["a"], reduce=record)
    calls = iter(recorded)
    combined = layer_input_hessians(model, short, ["a"], reduce=lambda t: t + next(calls))
    rows = torch.cat([short[0].reshape(-1, 6), long[0].reshape(-1, 6)]).double()
    torch.testing.assert_close(combined["a"], (rows.T @ rows / len(rows)).float())


def test_one_factorisation_per_layer_for_all_candidates(monkeypatch, trained, loader):
    """Every width, grid and block of a layer shares one Cholesky factorisation of its H."""
    import bayesq_lightning.rounding as rounding
    from bayesq_lightning import BayesQConfig, quantize_model

    calls = []
    real = rounding._upper_cholesky_of_inverse
    monkeypatch.setattr(rounding, "_upper_cholesky_of_inverse",
                        lambda H: calls.append(H.shape) or real(H))
    cfg = BayesQConfig(method="gptq", bits=4.0, block_rows=8, calib_batches=2)
    res = quantize_model(trained, loader, cfg, progress=False)
    blocks = sum(len(x.blocks) for x in res.layers)
    assert len(calls) == len(res.layers) < blocks * len(cfg.allowed_bits)


@pytest.mark.parametrize("stack", [1 << 24, 100, 300])  # one pass, chunks of one, of two
@pytest.mark.parametrize("groups", [1, 2])
def test_candidates_rounded_together_equal_each_alone(monkeypatch, stack, groups):
    """All widths and grids of a block in one stacked pass give each candidate's own codes."""
    import bayesq_lightning.rounding as rounding
    from bayesq_lightning.quantizers import design_nonuniform

    monkeypatch.setattr(rounding, "STACK_ELEMENTS", stack)
    g = torch.Generator().manual_seed(3)
    rows, cols = 10, 12
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(groups, 50, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    H = X.transpose(1, 2) @ X / 50
    H = H[0] if groups == 1 else H
    block_rows = (1, rows)  # a block starting inside the first group
    Wb = W[1:]
    cands = []
    for bits in (2, 3, 4, 8):
        grid = design_uniform(Wb, bits, group_size=4)
        cands.append(BlockResult(block_rows, bits, "uniform", 4, grid.codes, grid.scale,
                                 grid.zero))
    book = design_nonuniform(Wb, 3)
    cands.append(BlockResult(block_rows, 3, "nonuniform", None, book.codes,
                             codebook=book.codebook))
    calls = []  # the uniform widths share one vectorised grid, the codebook has its own
    real = rounding._stacked_quantizer
    monkeypatch.setattr(rounding, "_stacked_quantizer",
                        lambda c, a, b: calls.append(len(c)) or real(c, a, b))
    together = rounding.feedback_round_blocks(cands, Wb, H, rows, act_order=True)
    if stack == 1 << 24:
        assert sorted(calls) == [1] * groups + [4] * groups
    per = rows // groups
    for cand, got in zip(cands, together, strict=True):
        expected = []  # each group's rows of the block, rounded alone under that group's H
        for grp, (a, b) in rounding.group_pieces(block_rows, per):
            Hg = H if groups == 1 else H[grp]
            qc = rounding.block_column_quantizer(cand, a, b)
            expected.append(error_feedback_round(Wb[a:b], Hg, qc, gptq_gamma(Hg),
                                                 act_order=True)[0])
        assert torch.equal(got.codes, torch.cat(expected)), (cand.bits, cand.quantizer)
    with pytest.raises(ValueError, match="rows differ"):
        rounding.feedback_round_blocks([cands[0], dataclasses.replace(cands[1], rows=(0, 9))],
                                       Wb, H, rows)


def test_round_uniform_with_a_width_per_row_equals_each_width():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g) * 4
    s, z = torch.full((6, 1), 0.5), torch.full((6, 1), 3.0)
    bits = torch.tensor([2, 2, 3, 3, 8, 8]).unsqueeze(1)
    got = round_uniform(w, s, z, bits)
    for r in range(6):
        assert torch.equal(got[r], round_uniform(w[r], s[r], z[r], int(bits[r])))


def test_releasing_the_sum_gives_the_same_h_and_frees_it():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    stats = [InputStats(lin), InputStats(lin)]
    for st in stats:
        st.add(torch.randn(5, 6, generator=torch.Generator().manual_seed(1)))
    stats[1].sum_in_float32()
    kept = stats[0].hessian()
    assert stats[0].S is not None
    for st in stats:  # float64 and fp32 sums alike
        torch.testing.assert_close(st.hessian(release=True), kept)
        assert st.S is None and st.n == 0
