"""K-FAC and low-rank posteriors: exactness on tiny cases, scale, fallbacks, errors, reduce."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

from bayesq_lightning.batches import calibration_samples
from bayesq_lightning.layers import quantizable_layers
from bayesq_lightning.posterior import fit_posterior
from bayesq_lightning.posterior.base import KronLayerPosterior


def _mlp(seed: int = 0, d_in: int = 4, hidden: int = 3, classes: int = 5) -> nn.Sequential:
    """Bias-free two-layer MLP; in != out in both layers so kron(G, A) != kron(A, G)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden, bias=False), nn.Tanh(), nn.Linear(hidden, classes, bias=False)
    ).eval()


def _exact_ggn_block(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    r"""Sum over the rows of ``x`` of :math:`J^\top (\mathrm{diag}(p) - p p^\top) J` for one weight.

    ``J`` is the Jacobian of the logits w.r.t. ``<name>.weight`` flattened row-major, built
    with ``torch.func.jacrev`` (independent of laplace-torch and curvlinops).
    """
    key = f"{name}.weight"
    w = dict(model.named_parameters())[key].detach()
    total = torch.zeros(w.numel(), w.numel(), dtype=torch.float64)
    for xi in x:
        def logits(weight, xi=xi):
            return torch.func.functional_call(model, {key: weight}, (xi[None],))[0]

        jac = torch.func.jacrev(logits)(w).reshape(-1, w.numel()).double()
        p = torch.softmax(logits(w).double(), -1)
        total += jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    return total.detach()


def _gap_problem(n: int = 16) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """Inputs near one direction, in tanh's linear range: layer 0's GGN block is close to rank 2.

    Its block is about ``sum_n c_n^2 J^T Lambda_n J (x) u u^T`` with ``Lambda_n`` of rank
    ``C - 1 = 2``: two eigenvalues three orders of magnitude above the rest.
    """
    model = _mlp(seed=1, d_in=6, hidden=4, classes=3)
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(6, generator=g), dim=0)
    x = 0.5 * torch.randn(n, 1, generator=g) * direction + 1e-3 * torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


class _ThreadSum:
    """An all-reduce(sum) between threads standing in for processes (summed in rank order,
    written into the tensor passed in, as a real all-reduce does).

    torch.func keeps its transform levels per process, so the threads must not compute at the
    same time: each holds ``run`` while it computes and lets go only while it waits in
    ``reduce``.
    """

    def __init__(self, world: int) -> None:
        self.world, self.slots = world, {}
        self.run = threading.Lock()
        self.barrier = threading.Barrier(world)

    def reducer(self, rank: int):
        count = [0]

        def reduce(t: torch.Tensor) -> torch.Tensor:
            k = count[0]
            count[0] += 1
            self.slots.setdefault(k, [None] * self.world)[rank] = t.detach().clone()
            self.run.release()
            try:
                self.barrier.wait()
            finally:
                self.run.acquire()
            # in place, as torch.distributed.all_reduce (and Lightning's reduce) sums
            return t.copy_(sum(self.slots[k][1:], self.slots[k][0].clone()))

        return reduce


def _run_sharded(shards: list, **kwargs) -> list:
    hub, results, errors = _ThreadSum(len(shards)), [None] * len(shards), []

    def work(rank: int) -> None:
        with hub.run:
            try:
                results[rank] = fit_posterior(batches=shards[rank], reduce=hub.reducer(rank),
                                              **kwargs)
            except BaseException as exc:  # noqa: BLE001 - surfaced below
                errors.append(exc)
                hub.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


# --------------------------------------------------------------------------- kron


def test_kron_single_datum_equals_exact_ggn_and_diag():
    model = _mlp()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 4, generator=g), torch.tensor([2])
    n_data, delta = 10, 0.5
    kron = fit_posterior(model, [(x, y)], ["0", "2"], n_data=n_data, prior_precision=delta,
                         structure="kron")
    diag = fit_posterior(model, [(x, y)], ["0", "2"], n_data=n_data, prior_precision=delta)
    assert kron.structure == "kron" and kron.n_calib == 1 and kron.prior_precision == delta
    for name in ("0", "2"):
        lp = kron.layers[name]
        ggn = _exact_ggn_block(model, name, x)
        expected = n_data * ggn + delta * torch.eye(len(ggn), dtype=torch.float64)
        got = torch.kron(lp.G, lp.A).double() + delta * torch.eye(len(ggn), dtype=torch.float64)
        tol = 1e-5 * float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=tol)
        swapped = torch.kron(lp.A, lp.G).double() + delta * torch.eye(len(ggn), dtype=torch.float64)
        assert not torch.allclose(swapped, expected, rtol=1e-2, atol=tol)  # ordering matters here
        # scale: the K-FAC diagonal is the diagonal posterior's precision at the same n_data
        assert lp.precision.shape == lp.mean.shape
        torch.testing.assert_close(lp.precision, diag.layers[name].precision, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lp.precision.reshape(-1).double(), expected.diagonal(),
                                   rtol=1e-4, atol=tol)


def test_kron_factors_normalised_and_scaled(tiny_net, loader):
    names = [n for n, _ in quantizable_layers(tiny_net)]
    tiny_net.bn.weight.requires_grad_(False)  # a user's frozen parameter stays frozen
    before = snapshot(tiny_net)
    batches, _ = calibration_samples(loader, 4)
    full = fit_posterior(tiny_net, batches, names, n_data=5000, structure="kron")
    half = fit_posterior(tiny_net, batches[:2], names, n_data=5000, prior_precision=1.0,
                         structure="kron")
    assert_unchanged(tiny_net, before)
    assert full.n_calib == 128 and half.n_calib == 64
    assert full.prior_precision > 0 and full.prior_precision != 1.0  # fitted by marglik
    modules = dict(tiny_net.named_modules())
    for name in names:
        lp, w = full.layers[name], modules[name].weight
        out, n_in = w.shape[0], w[0].numel()
        assert lp.structure == "kron" and torch.equal(lp.mean, w)
        assert lp.G.shape == (out, out) and lp.A.shape == (n_in, n_in)
        assert float(lp.G.diagonal().mean()) == pytest.approx(1.0, abs=1e-5)
        assert float(half.layers[name].G.diagonal().mean()) == pytest.approx(1.0, abs=1e-5)
        expected = torch.outer(lp.G.diagonal(), lp.A.diagonal()).reshape(w.shape) + lp.prior_precision
        torch.testing.assert_close(lp.precision, expected)
        # N handling: the curvature stands for n_data samples whatever the calibration size
        c_full = float(torch.kron(lp.G, lp.A).trace())
        c_half = float(torch.kron(half.layers[name].G, half.layers[name].A).trace())
        assert c_half == pytest.approx(c_full, rel=0.3)


def test_kron_on_bf16_model_fits_fp32_copy(tiny_net, loader):
    names = [n for n, _ in quantizable_layers(tiny_net)]
    model = tiny_net.to(torch.bfloat16)
    model.fc2.bias.requires_grad_(False)
    before = snapshot(model)
    batches, _ = calibration_samples(loader, 2)
    post = fit_posterior(model, batches, names, n_data=1000, prior_precision=2.0,
                         structure="kron")
    assert_unchanged(model, before)  # dtype (bf16), requires_grad, weights, modes
    assert next(model.parameters()).dtype == torch.bfloat16
    for name in names:
        lp = post.layers[name]
        assert lp.A.dtype == torch.float32 and torch.isfinite(lp.A).all()
        assert torch.equal(lp.mean, dict(model.named_modules())[name].weight.float())
        assert (lp.precision >= 2.0 * (1 - 1e-6)).all()


def test_kron_grouped_conv_has_an_input_factor_per_group():
    """One sample at one output position: K-FAC is exact, so each group's ``G_gg (x) A_g`` is
    the dense GGN's block of that group (curvlinops' shared ``A`` would mix the groups)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten()).eval()
    x = torch.randn(1, 4, 3, 3)
    kron = fit_posterior(model, [(x, torch.tensor([0]))], ["0"], n_data=1, prior_precision=1.5,
                         structure="kron")
    conv = kron.layers["0"]
    assert conv.structure == "kron" and conv.A.shape == (2, 18, 18) and conv.G.shape == (6, 6)
    dense = _exact_ggn_block(model, "0", x).reshape(6, 18, 6, 18)
    for g in range(2):
        rows = slice(3 * g, 3 * g + 3)
        torch.testing.assert_close(
            torch.kron(conv.G[rows, rows], conv.A[g]).double(),
            dense[rows, :, rows, :].reshape(54, 54), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(conv.curvature.reshape(6, 18).double(),
                               dense.reshape(108, 108).diagonal().reshape(6, 18),
                               rtol=1e-4, atol=1e-6)
    dW = torch.randn(6, 18)  # the block loss is the groups' own terms
    parts = sum(float(dW[3 * g:3 * g + 3].reshape(-1).double()
                      @ dense[3 * g:3 * g + 3, :, 3 * g:3 * g + 3, :].reshape(54, 54)
                      @ dW[3 * g:3 * g + 3].reshape(-1).double()) for g in range(2))
    assert conv.quad_form(dW, (0, 6)) == pytest.approx(parts, rel=1e-4)
    assert conv.rounding_matrix((0, 6)).shape == (2, 18, 18)
    assert conv.row_terms((0, 6)) is None  # each row its group's A: every row scored
    assert conv.sample(3).shape == (3, 6, 2, 3, 3)


@pytest.mark.parametrize("prior", ["marglik", 1.0])
def test_kron_eigh_failure_is_a_clear_error(tiny_net, loader, monkeypatch, prior):
    def failing_eigvalsh(M):
        raise torch.linalg.LinAlgError("failed to converge")

    names = [n for n, _ in quantizable_layers(tiny_net)]
    before = snapshot(tiny_net)
    batches, _ = calibration_samples(loader, 1)
    if prior == "marglik":  # the eigenvalues the prior is fitted on fail
        monkeypatch.setattr(torch.linalg, "eigvalsh", failing_eigvalsh)
    else:  # a fixed prior needs no eigenvalues: overflowing factors are caught before
        batches = [(x * 1e30, y) for x, y in batches]
    match = "K-FAC fit.*curvature is probably not finite"
    if prior == "marglik":  # the eigenvalues are taken when delta is first read
        post = fit_posterior(tiny_net, batches, names, n_data=100, structure="kron",
                             prior_precision=prior)
        with pytest.raises(RuntimeError, match=match):
            post.prior_precision  # noqa: B018
    else:
        with pytest.raises(RuntimeError, match=match):
            fit_posterior(tiny_net, batches, names, n_data=100, structure="kron",
                          prior_precision=prior)
    assert_unchanged(tiny_net, before)


def test_kron_refuses_models_without_kfac_layers():
    depthwise = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()).eval()
    x = torch.randn(4, 2, 3, 3)
    post = fit_posterior(depthwise, [x], ["0"], n_data=10, structure="kron")
    assert post.layers["0"].A.shape == (2, 9, 9)  # depthwise: one A per channel
    norm_only = nn.Sequential(nn.LayerNorm(5)).eval()
    with pytest.raises(ValueError, match=r"needs at least one nn.Linear.*LayerNorm"):
        fit_posterior(norm_only, [torch.randn(4, 5)], [], n_data=10, structure="kron")
    with pytest.raises(ValueError, match="not one of"):
        fit_posterior(depthwise, [x], ["0"], n_data=10, structure="full")


# --------------------------------------------------------------------------- lowrank


def test_lowrank_matches_dense_eigendecomposition():
    model, x, y = _gap_problem()
    n_data, k = 48, 2
    post = fit_posterior(model, [(x[:8], y[:8]), (x[8:], y[8:])], ["0", "2"], n_data=n_data,
                         prior_precision=1.0, structure="lowrank", rank=k)
    assert post.structure == "lowrank" and post.n_calib == 16
    dense = n_data / 16 * _exact_ggn_block(model, "0", x)
    vals, vecs = torch.linalg.eigh(dense)
    vals, vecs = vals.flip(0), vecs.flip(1)
    assert vals[k - 1] > 500 * vals[k].abs()  # the premise: a clear spectral gap after k
    lp = post.layers["0"]
    assert lp.U.shape == (24, k) and lp.S.shape == (k,)
    largest = float(vals[0])
    assert (lp.S.double() - vals[:k]).abs().max() <= 1e-4 * largest
    proj = lp.U.double() @ lp.U.double().T
    assert (proj - vecs[:, :k] @ vecs[:, :k].T).abs().max() <= 1e-4


def test_lowrank_residual_completes_the_ggn_diagonal():
    model, x, y = _gap_problem()
    post = fit_posterior(model, [(x, y)], ["0", "2"], n_data=32, prior_precision=0.25,
                         structure="lowrank", rank=2)
    diag = fit_posterior(model, [(x, y)], ["0", "2"], n_data=32, prior_precision=0.25)
    for name in ("0", "2"):
        lp = post.layers[name]
        ggn_diag = (diag.layers[name].precision - 0.25).reshape(-1).double()
        exact = (32 / 16 * _exact_ggn_block(model, name, x)).diagonal()
        torch.testing.assert_close(ggn_diag, exact, rtol=1e-4, atol=1e-6 * float(exact.max()))
        low = (lp.U.double().square() * lp.S.double()).sum(1)
        assert (lp.residual >= 0).all() and lp.residual.shape == lp.mean.shape
        total = lp.residual.reshape(-1).double() + low
        torch.testing.assert_close(total, ggn_diag, rtol=1e-4, atol=1e-5 * float(exact.max()))
        torch.testing.assert_close(lp.precision, diag.layers[name].precision, rtol=1e-4,
                                   atol=1e-5 * float(exact.max()))


def test_lowrank_rank_limits():
    model = _mlp(classes=2)  # layer "2" has 3 x 2 = 6 weights
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match=r"rank=6 .* layer '2'"):
        fit_posterior(model, [(x, y)], ["0", "2"], n_data=6, structure="lowrank", rank=6)
    with pytest.raises(ValueError, match="applies to structure='lowrank'"):
        fit_posterior(model, [(x, y)], ["0"], n_data=6, structure="kron", rank=2)
    post = fit_posterior(model, [(x, y)], ["0", "2"], n_data=6, prior_precision=1.0,
                         structure="lowrank")
    assert post.layers["0"].U.shape == (12, 8)
    assert post.layers["2"].U.shape == (6, 5) and "clamped" in post.layers["2"].note


# --------------------------------------------------------------------------- several processes


def test_reduce_across_shards_equals_single_fit():
    model, x, y = _gap_problem(n=16)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]
    # unequal shards: the K-FAC input factor must be re-weighted by each shard's size
    shards = [batches[:1], batches[1:]]
    common = dict(model=model, layer_names=["0", "2"], n_data=64)
    single = fit_posterior(batches=batches, structure="kron", **common)
    for post in _run_sharded(shards, structure="kron", **common):
        assert post.n_calib == 16
        assert post.prior_precision == pytest.approx(single.prior_precision, rel=1e-4)
        for name in ("0", "2"):
            a, b = post.layers[name], single.layers[name]
            torch.testing.assert_close(a.A, b.A, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(a.G, b.G, rtol=1e-4, atol=1e-6)
    # biases: a bias block shares its weight's G, which must be summed across shards once
    torch.manual_seed(1)
    biased = nn.Sequential(nn.Linear(x.shape[1], 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    yb = y % 3
    sb = [[(x[:4], yb[:4])], [(x[4:], yb[4:])]]
    ref = fit_posterior(biased, [(x, yb)], ["0", "2"], n_data=64, structure="kron")
    for post in _run_sharded(sb, model=biased, layer_names=["0", "2"], n_data=64,
                             structure="kron"):
        assert post.prior_precision == pytest.approx(ref.prior_precision, rel=1e-4)
        for name in ("0", "2"):
            torch.testing.assert_close(post.layers[name].G, ref.layers[name].G, rtol=1e-4,
                                       atol=1e-6)
            torch.testing.assert_close(post.layers[name].A, ref.layers[name].A, rtol=1e-4,
                                       atol=1e-6)
    single = fit_posterior(batches=batches, structure="lowrank", rank=2, prior_precision=1.0,
                           **common)
    for post in _run_sharded(shards, structure="lowrank", rank=2, prior_precision=1.0, **common):
        for name in ("0", "2"):
            a, b = post.layers[name], single.layers[name]
            torch.testing.assert_close(a.S, b.S, rtol=1e-4, atol=1e-5 * float(b.S[0]))
            torch.testing.assert_close(a.U @ a.U.T, b.U @ b.U.T, rtol=0, atol=1e-4)
            torch.testing.assert_close(a.precision, b.precision, rtol=1e-4, atol=1e-4)


def test_dict_batches_for_kron_and_lowrank():
    class DictNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, features):
            return self.lin(features)

    torch.manual_seed(0)
    model = DictNet().eval()
    batch = {"features": torch.randn(6, 4), "labels": torch.randint(0, 3, (6,))}
    as_tuple = [(batch["features"], batch["labels"])]
    for structure, extra in (("kron", {}), ("lowrank", {"rank": 2})):
        a = fit_posterior(model, [batch], ["lin"], n_data=12, prior_precision=1.0,
                          structure=structure, **extra)
        b = fit_posterior(model, as_tuple, ["lin"], n_data=12, prior_precision=1.0,
                          structure=structure, **extra)
        torch.testing.assert_close(a.layers["lin"].precision, b.layers["lin"].precision)


# --------------------------------------------------------------------------- the interface


def _dense_precision(lp) -> torch.Tensor:
    """Lambda over W.flatten() (row-major), built from the structure's fields by hand."""
    n = lp.mean.numel()
    if lp.structure == "kron":
        return torch.kron(lp.G.double(), lp.A.double()) + lp.prior_precision * torch.eye(
            n, dtype=torch.float64)
    if lp.structure == "lowrank":
        return (torch.diag(lp.residual.double().reshape(-1) + lp.prior_precision)
                + lp.U.double() @ torch.diag(lp.S.double()) @ lp.U.double().T)
    return torch.diag(lp.precision.double().reshape(-1))


def _spd(n: int, g: torch.Generator) -> torch.Tensor:
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    return M @ M.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("structure", ["diag", "kron", "lowrank"])
@pytest.mark.parametrize("rows", [(0, 5), (1, 4), (3, 5)])
def test_quad_form_is_the_blocks_diagonal_block_of_the_precision(structure, rows):
    from bayesq_lightning.posterior import (
        KronLayerPosterior,
        LayerPosterior,
        LowRankLayerPosterior,
    )

    g = torch.Generator().manual_seed(3)
    out, cols, delta = 5, 6, 0.7
    mean = torch.randn(out, cols, generator=g)
    if structure == "kron":
        G, A = _spd(out, g), _spd(cols, g)
        lam = torch.outer(G.diagonal(), A.diagonal()) + delta
        lp = KronLayerPosterior("l", mean, None, delta, A=A.float(), G=G.float())
    elif structure == "lowrank":
        U = torch.linalg.qr(torch.randn(out * cols, 3, generator=g, dtype=torch.float64))[0]
        S = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
        res = torch.rand(out, cols, generator=g, dtype=torch.float64)
        lam = res + (U.square() * S).sum(1).view(out, cols) + delta
        lp = LowRankLayerPosterior("l", mean, lam.float(), delta, U=U.float(), S=S.float(),
                                   residual=res.float())
    else:
        lp = LayerPosterior("l", mean, torch.rand(out, cols, generator=g) + delta, delta)
    r0, r1 = rows
    dW = torch.randn(r1 - r0, cols, generator=g, dtype=torch.float64)
    idx = slice(r0 * cols, r1 * cols)
    dense = _dense_precision(lp)[idx, idx]
    v = dW.reshape(-1)
    # the posterior precision's block with prior=True, the likelihood curvature's without
    assert lp.quad_form(dW, rows, prior=True) == pytest.approx(float(v @ dense @ v), rel=1e-6)
    curvature = dense - delta * torch.eye(len(v), dtype=torch.float64)
    assert lp.quad_form(dW, rows) == pytest.approx(float(v @ curvature @ v), rel=1e-6)
    torch.testing.assert_close(lp.curvature.double(), (lp.precision - delta).double(),
                               rtol=1e-5, atol=1e-5)
    H = lp.rounding_matrix(rows)
    if structure == "kron":  # error feedback under A (damped by the rounding, relative to A)
        torch.testing.assert_close(H, lp.A)
    else:
        assert H is None


def test_samples_follow_the_diagonal_of_the_precision():
    from bayesq_lightning.posterior import LayerPosterior

    lam = torch.tensor([[4.0, 100.0], [1.0, 25.0]])
    lp = LayerPosterior("l", torch.tensor([[1.0, -2.0], [0.0, 3.0]]), lam, 0.5)
    draws = lp.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (20_000, 2, 2)
    torch.testing.assert_close(draws.mean(0), lp.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(draws.var(0), 1 / lam, rtol=0.05, atol=0)
    hot = lp.sample(20_000, temperature=4.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hot.var(0), 4 / lam, rtol=0.05, atol=0)


@pytest.mark.parametrize("structure", ["kron", "lowrank"])
def test_structured_samples_have_the_posterior_covariance(structure):
    from bayesq_lightning.posterior import KronLayerPosterior, LowRankLayerPosterior

    g = torch.Generator().manual_seed(5)
    out, cols, delta = 2, 3, 0.5
    mean = torch.randn(out, cols, generator=g)
    if structure == "kron":
        G, A = _spd(out, g), _spd(cols, g)
        lp = KronLayerPosterior("l", mean, None, delta, A=A.float(), G=G.float())
    else:
        U = torch.linalg.qr(torch.randn(out * cols, 2, generator=g, dtype=torch.float64))[0]
        S = torch.tensor([3.0, 1.5], dtype=torch.float64)
        res = torch.rand(out, cols, generator=g, dtype=torch.float64) + 0.2
        lp = LowRankLayerPosterior("l", mean, (res + delta).float(), delta, U=U.float(),
                                   S=S.float(), residual=res.float())
    for T in (1.0, 2.0):
        draws = lp.sample(40_000, temperature=T, generator=torch.Generator().manual_seed(1))
        d = (draws - mean).reshape(len(draws), -1).double()
        cov = d.T @ d / len(d)
        expected = T * torch.linalg.inv(_dense_precision(lp))
        torch.testing.assert_close(cov, expected, atol=0.03 * float(expected.diagonal().max()),
                                   rtol=0)


def test_design_weights_dead_rows_fall_back_to_a_constant():
    from bayesq_lightning.posterior import LayerPosterior

    curv = torch.tensor([[0.0, 0.0, 0.0], [2.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    lp = LayerPosterior("l", torch.zeros(3, 3), curv + 0.5, 0.5, curvature=curv)
    w = lp.design_weights((0, 3))
    # a dead row weighs its own errors alike (MSE), and barely moves a shared codebook
    assert torch.equal(w[1:], curv[1:]) and (w[0] == w[0, 0]).all()
    assert 0 < float(w[0, 0]) < 1e-5 * float(curv[curv > 0].mean())
    assert torch.equal(lp.design_weights((0, 1)), torch.ones(1, 3))  # a whole dead block
    torch.testing.assert_close(lp.design_weights((0, 3), prior=True), curv + 0.5)


@pytest.mark.parametrize("structure", ["diag", "kron"])
@pytest.mark.parametrize("classes, stochastic", [(3, False), (11, True)])
def test_auto_backend_follows_the_class_count(structure, classes, stochastic):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, classes)).eval()
    x, y = torch.randn(16, 5), torch.randint(0, classes, (16,))
    post = fit_posterior(model, [(x, y)], ["0", "2"], n_data=16, structure=structure)
    assert f"stochastic={stochastic}" in post.backend
    assert f"auto: {classes} classes" in post.backend
    explicit = fit_posterior(model, [(x, y)], ["0", "2"], n_data=16, structure=structure,
                             backend="asdl")
    assert "stochastic=False" in explicit.backend and "auto" not in explicit.backend


def test_kfac_batches_fit_g_on_a_prefix_and_a_on_every_batch():
    """G from the first batches' backward passes, A from every batch's inputs (GPTQ's streamed
    statistics, the same row mean K-FAC's own input factor is)."""
    from bayesq_lightning.input_stats import layer_input_hessians

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 16, 4)).eval()
    batches = [(torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))) for _ in range(3)]
    names = ["0", "3"]
    prefix = fit_posterior(model, batches[:2], names, n_data=50, prior_precision=1.0,
                           structure="kron")
    split = fit_posterior(model, batches, names, n_data=50, prior_precision=1.0,
                          structure="kron", kfac_batches=2)
    whole = fit_posterior(model, batches, names, n_data=50, prior_precision=1.0,
                          structure="kron", kfac_batches=3)
    every = fit_posterior(model, batches, names, n_data=50, prior_precision=1.0,
                          structure="kron")
    assert split.info["kfac_batches"] == 2 and split.info["input_factor_batches"] == 3
    assert split.n_calib == prefix.n_calib == 10
    H_first = layer_input_hessians(model, batches[:2], names)
    H_all = layer_input_hessians(model, batches, names)
    for n in names:
        torch.testing.assert_close(split.layers[n].G, prefix.layers[n].G)
        # K-FAC's A over the prefix is the streamed row mean over it, up to the scale c * s
        cs = float(prefix.layers[n].A[0, 0] / H_first[n][0, 0])
        torch.testing.assert_close(prefix.layers[n].A, cs * H_first[n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(split.layers[n].A, cs * H_all[n], rtol=1e-4, atol=1e-6)
        assert torch.equal(whole.layers[n].A, every.layers[n].A)
    with pytest.raises(ValueError, match="kfac_batches=0 must be a positive integer"):
        fit_posterior(model, batches, names, n_data=50, structure="kron", kfac_batches=0)


def test_uneven_shards_stream_input_factors_together():
    """One process has more batches than kfac_batches, the other not: both stream (the reduce
    calls pair up), G sums the first batch of each shard and A averages every batch's rows."""
    from bayesq_lightning.input_stats import layer_input_hessians

    model, x, y = _gap_problem(n=12)
    b = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]
    common = dict(model=model, layer_names=["0", "2"], n_data=48, prior_precision=1.0)
    posts = _run_sharded([[b[0], b[1]], [b[2]]], structure="kron", kfac_batches=1, **common)
    ref = fit_posterior(batches=[b[0], b[2]], structure="kron", **common)
    H_kfac = layer_input_hessians(model, [b[0], b[2]], ["0", "2"])
    H_all = layer_input_hessians(model, b, ["0", "2"])
    for post in posts:
        assert post.n_calib == 8 and post.info["input_factor_batches"] in (1, 2)
        for name in ("0", "2"):
            cs = float(ref.layers[name].A[0, 0] / H_kfac[name][0, 0])
            torch.testing.assert_close(post.layers[name].G, ref.layers[name].G, rtol=1e-4,
                                       atol=1e-6)
            torch.testing.assert_close(post.layers[name].A, cs * H_all[name], rtol=1e-4,
                                       atol=1e-6)


def test_streamed_layers_skip_kfacs_own_input_factor(monkeypatch):
    """With the input factors streamed, the K-FAC operator never forms its own A for them, and
    its batches' inputs reach the streamed sums from its own forward passes."""
    from curvlinops import KFACLinearOperator

    seen: list[str] = []
    hook = KFACLinearOperator._hook_accumulate_input_covariance

    def spy(self, module, inputs, module_name):
        seen.append(module_name)
        return hook(self, module, inputs, module_name)

    monkeypatch.setattr(KFACLinearOperator, "_hook_accumulate_input_covariance", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(3)]
    fit_posterior(model, batches, ["0", "2"], n_data=30, prior_precision=1.0, structure="kron")
    assert len(seen) == 6  # two layers, three batches: no stream
    seen.clear()
    passes = []
    model[0].register_forward_hook(lambda *_: passes.append(1))  # the fp32 copy shares hooks
    fit_posterior(model, batches, ["0", "2"], n_data=30, prior_precision=1.0, structure="kron",
                  kfac_batches=1)
    assert seen == []
    # one probe of the outputs, then each batch once: the K-FAC fit's batch is not streamed
    assert len(passes) == 1 + 3


def test_kron_marglik_counts_bias_blocks_like_laplace_torch():
    """Bias blocks enter delta's spectrum as s G (taken before G is normalised in place): the
    same delta as the spectrum of laplace-torch's own K-FAC fit, biases included."""
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    from bayesq_lightning.posterior.marglik import marglik_prior_precision

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).eval()
    x, y = torch.randn(48, 6), torch.randint(0, 3, (48,))
    post = fit_posterior(model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)],
                         ["0", "2"], n_data=96, structure="kron")  # s = 96 / 48 = 2
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    spectrum = [(torch.linalg.eigvalsh(F[0]), 2 * torch.linalg.eigvalsh(F[1])) if len(F) == 2
                else 2 * torch.linalg.eigvalsh(F[0]) for F in la.H_facs.kfacs]
    theta_sq = sum(float(p.detach().double().square().sum()) for p in model.parameters())
    ref = marglik_prior_precision(spectrum, theta_sq, la.n_params)
    assert post.prior_precision == pytest.approx(ref, rel=1e-4)


def test_the_kron_fit_skips_laplace_torchs_zero_factors_and_its_factory_never_picks_it():
    # the zero factors of every layer (the size of G and A) are never allocated
    from laplace import Laplace
    from laplace.baselaplace import KronLaplace

    from bayesq_lightning.adapters.laplace import KronLaplaceWithoutFactors
    from bayesq_lightning.posterior.fit import Prepared, laplace_fit

    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    assert issubclass(KronLaplaceWithoutFactors, KronLaplace)
    assert KronLaplaceWithoutFactors._key != KronLaplace._key
    assert KronLaplaceWithoutFactors(model, "classification").H is None
    assert type(Laplace(model, "classification", subset_of_weights="all",
                        hessian_structure="kron")) is KronLaplace
    prep = Prepared(model, [(torch.randn(4, 6), torch.randint(0, 3, (4,)))], None)
    with pytest.raises(ValueError, match="only supported for K-FAC"):
        laplace_fit(prep, [model[0]], hessian_structure="diag", backend_cls=None,
                    stochastic=False, prior_precision=1.0, n_data=4, rescale=None,
                    spectrum=None, abort="", fit=lambda la: None)


@pytest.mark.parametrize("classes", [2, 3])
def test_kron_exact_ggn_of_two_classes_takes_one_backward_pass(monkeypatch, classes):
    """Two classes: one backward pass per batch along the rank-one square root of the loss
    Hessian, the same factors as laplace-torch's own fit (two passes); other counts unchanged."""
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, classes)).eval()
    x, y = torch.randn(48, 6), torch.randint(0, classes, (48,))
    real, calls = torch.autograd.grad, []
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    post = fit_posterior(model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)],
                         ["0", "2"], n_data=48, prior_precision=1.0, structure="kron")
    assert len(calls) == (3 if classes == 2 else 0)  # curvlinops' own path: its own grad
    monkeypatch.setattr(torch.autograd, "grad", real)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=16))
    for name, F in zip(["0", "2"], la.H_facs.kfacs[::2], strict=True):  # weight blocks
        ref = torch.kron(F[0], F[1])
        ours = torch.kron(post.layers[name].G, post.layers[name].A)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("fisher", ["type-2", "mc"])
def test_kfac_backward_asks_for_bias_gradients_not_weights(monkeypatch, fisher):
    """The K-FAC backward passes differentiate each layer's bias where it has one (no weight
    gradient), its weight otherwise: the output factors equal those of differentiating every
    parameter, bit for bit."""
    from bayesq_lightning.adapters.curvlinops import KFACOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2, bias=False)).eval()
    data = [(torch.randn(16, 6), torch.randint(0, 2, (16,))) for _ in range(3)]
    params = list(model.parameters())
    real, asked = torch.autograd.grad, []
    monkeypatch.setattr(torch.autograd, "grad", lambda out, inputs, **k: asked.append(
        list(inputs)) or real(out, inputs, **k))

    def factors(cls):
        op = cls(model, nn.CrossEntropyLoss(reduction="sum"), params, data, fisher_type=fisher,
                 separate_weight_and_bias=True, check_deterministic=False)
        op.compute_kronecker_factors()
        return op.output_factors()

    class OnEveryParameter(KFACOperator):
        def backward_for_factors(self, scalar, retain_graph):
            real(scalar, params, retain_graph=retain_graph)

    ours = factors(KFACOperator)
    assert len(asked) == 3 and all(
        len(a) == 2 and a[0] is model[0].bias and a[1] is model[2].weight for a in asked)
    ref = factors(OnEveryParameter)
    assert set(ours) == set(ref) == {"0", "2"}
    for name in ref:
        assert torch.equal(ours[name], ref[name])


def test_kron_spectrum_falls_back_to_float64_where_fp32_lapack_fails(monkeypatch):
    """MKL's fp32 eigensolver can fail to converge on a low-rank factor (many classes, few
    samples, depending on the thread count): the float64 solve takes over and delta is the same."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(2)]
    ref = fit_posterior(model, batches, ["0", "2"], n_data=30, structure="kron")
    real = torch.linalg.eigvalsh
    calls: list[torch.dtype] = []

    def flaky(f):
        calls.append(f.dtype)
        if f.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(f)

    monkeypatch.setattr(torch.linalg, "eigvalsh", flaky)
    post = fit_posterior(model, batches, ["0", "2"], n_data=30, structure="kron")
    delta = post.prior_precision  # solved on this read (deferred)
    assert torch.float64 in calls
    assert delta == pytest.approx(ref.prior_precision, rel=1e-5)
def test_kron_diagonals_are_derived_from_the_factors_not_stored():
    """K-FAC's precision and curvature diagonals are formed when read (no weight-sized copies
    held by the record) and equal the factors' outer product (plus delta), row blocks too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(2)]
    lp = fit_posterior(model, batches, ["0", "2"], n_data=30, structure="kron").layers["0"]
    curvature = torch.outer(lp.G.diagonal(), lp.A.diagonal()).reshape(lp.mean.shape)
    assert torch.equal(lp.curvature, curvature)
    assert torch.equal(lp.precision, curvature + lp.prior_precision)
    assert torch.equal(lp.precision_rows((1, 4)), lp.precision[1:4])
    assert not {"precision", "curvature"} & set(vars(lp))


@pytest.mark.parametrize("g, a, finite", [(1.0, 2.0, True), (math.inf, 2.0, False),
                                           (math.nan, 2.0, False), (1e30, 1e30, False)])
def test_kron_finiteness_from_the_factors(g, a, finite):
    G, A = torch.eye(3), torch.eye(4)
    G[1, 1], A[2, 2] = g, a
    lp = KronLayerPosterior("fc", torch.zeros(3, 4), None, 0.5, A=A, G=G)
    assert lp.is_finite() is finite
    curvature_finite = bool(torch.isfinite(lp.curvature).all())
    assert lp.is_finite() is (curvature_finite and bool(torch.isfinite(lp.precision).all()))


@pytest.mark.parametrize("structure", ["diag", "kron", "lowrank"])
def test_the_fit_reads_the_models_weights_and_the_means_get_their_own(trained, loader,
                                                                      monkeypatch, structure):
    """No second model in memory during the fit; afterwards the means are the posterior's."""
    import bayesq_lightning.posterior.fit as fit_module

    before = snapshot(trained)
    storages = {p.untyped_storage().data_ptr() for p in trained.parameters()}
    seen = []
    original = fit_module.Prepared.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.extend(p.untyped_storage().data_ptr() in storages for p in self.net.parameters())

    monkeypatch.setattr(fit_module.Prepared, "__init__", spy)
    batches, _ = calibration_samples(loader, 2)
    names = [n for n, _ in quantizable_layers(trained)]
    post = fit_posterior(trained, batches, names, n_data=256, structure=structure,
                         prior_precision=1.0)
    assert seen and all(seen)  # the fit's copy shares the model's weights
    assert_unchanged(trained, before)  # and leaves them (and their flags and grads) alone
    for name in names:
        mean = post.layers[name].mean
        assert mean.untyped_storage().data_ptr() not in storages
        assert torch.equal(mean, trained.get_submodule(name).weight.detach())


def test_a_check_forward_runs_once_per_input_form():
    # batches like a checked one (another size included) fit as it does: only the first of
    # each form costs a forward pass before the fit
    from bayesq_lightning.posterior.fit import Prepared

    shapes = []

    class Pooled(nn.Module):  # global pooling: every image size fits
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shapes.append(tuple(x.shape))
            return self.fc(self.conv(x).mean((2, 3)))

    g = torch.Generator().manual_seed(0)

    def batch(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 1, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)

    prep = Prepared(Pooled(), [batch(4, 8), batch(4, 8), batch(3, 8), batch(4, 10),
                               batch(2, 10)], None)
    assert shapes == [(4, 1, 8, 8), (4, 1, 10, 10)] and prep.n_classes == 3 and prep.n_calib == 17


def test_kron_factors_combine_and_normalise_by_hand():
    """Two processes' factors summed as one fit over all samples (A re-weighted by each
    process's count, each tensor reduced once, a streamed A left alone), then normalised with
    the bias block's spectrum taken before its weight's G is."""
    from bayesq_lightning.posterior.kron_factors import KronFactors

    g = torch.Generator().manual_seed(0)

    def spd(n: int) -> torch.Tensor:
        m = torch.randn(n, n, generator=g)
        return m @ m.T + torch.eye(n)

    G0, G1, A0, A1, S0, S1 = spd(2), spd(2), spd(3), spd(3), spd(1), spd(1)
    streamed = spd(4)
    mine = [[G0.clone(), A0.clone()], None, [S0.clone()], [spd(2), streamed]]
    mine[1] = [mine[0][0]]  # the bias block holds its weight's G
    theirs = iter([G1, A1 * 3, S1, None, torch.tensor(3.0)])
    calls: list[torch.Tensor] = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        other = next(theirs)
        return t + (other if other is not None else t)  # the streamed block's G: doubled

    factors = KronFactors(mine, 2, combined_inputs=[3])
    assert factors.weight_of_bias == {1: 0}
    factors.combine(reduce)
    assert len(calls) == 5 and factors.n_samples == 5
    G, A = factors.blocks[0]
    torch.testing.assert_close(G, G0 + G1)
    torch.testing.assert_close(A, (2 * A0 + 3 * A1) / 5)
    assert factors.blocks[1][0] is G and factors.blocks[3][1] is streamed
    torch.testing.assert_close(factors.blocks[2][0], S0 + S1)
    c = float(G.diagonal().mean())
    factors.normalise(10)  # s = 10 / 5
    assert float(G.diagonal().mean()) == pytest.approx(1.0)
    torch.testing.assert_close(factors.blocks[0][1], c * 2 * (2 * A0 + 3 * A1) / 5)
    torch.testing.assert_close(factors.blocks[2][0], 2 * (S0 + S1))
    spectrum = factors.spectrum()
    torch.testing.assert_close(spectrum[0][0], torch.linalg.eigvalsh(G))
    # the bias's curvature s G, from the weight's normalised G and one eigensolve
    torch.testing.assert_close(spectrum[1], torch.linalg.eigvalsh(2 * (G0 + G1)))
    assert len(spectrum) == 4


def test_kron_diagonals_come_from_the_factors_and_cannot_be_set():
    from bayesq_lightning.posterior import KronLayerPosterior

    G, A = torch.eye(3) * 2.0, torch.eye(4)
    lp = KronLayerPosterior("l", torch.zeros(3, 4), None, 0.5, A=A, G=G)
    torch.testing.assert_close(lp.precision, torch.full((3, 4), 2.5))
    with pytest.raises(TypeError, match="formed from its factors G and A"):
        KronLayerPosterior("l", torch.zeros(3, 4), torch.ones(3, 4), 0.5, A=A, G=G)
    with pytest.raises(TypeError, match="curvature is formed"):
        lp.curvature = torch.ones(3, 4)
