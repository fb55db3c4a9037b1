from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_unchanged, make_data, snapshot
from torch.utils.data import DataLoader

from bayesq_lightning import BayesQConfig, quantize_model
from bayesq_lightning.allocate import InfeasibleBudgetError
from bayesq_lightning.quantizers import block_storage_bits, dequantize


@pytest.mark.parametrize("method", ["bayesq", "rtn"])
@pytest.mark.parametrize("bits", [2.5, 3.0, 4.5])
def test_budget_is_honoured_and_weights_are_on_the_grid(trained, loader, method, bits):
    before = snapshot(trained)
    res = quantize_model(trained, loader, BayesQConfig(bits=bits, method=method,
                                                       prior_precision=1.0), progress=False)
    assert_unchanged(trained, before)
    assert res.bits_per_weight <= bits + 1e-12
    assert res.code_bits_per_weight < res.bits_per_weight
    total = sum(block_storage_bits(b) for x in res.layers for b in x.blocks)
    assert total == 8 * res.total_bytes and total <= res.budget_bits
    assert res.budget_bits == math.floor(bits * res.n_weights)
    modules = dict(res.model.named_modules())
    for layer in res.layers:
        (block,) = layer.blocks
        w = modules[layer.name].weight.detach()
        assert torch.equal(w, dequantize(block).reshape(w.shape))
        rows = w.reshape(w.shape[0], -1)
        assert max(r.unique().numel() for r in rows) <= 2**block.bits
    # the quantized model still works
    x, _ = next(iter(loader))
    assert torch.isfinite(res.model(x)).all()


def test_budget_bytes_and_rtn_without_data(trained):
    res = quantize_model(trained, None, BayesQConfig(method="rtn", budget_bytes=20_000),
                         progress=False)
    assert res.total_bytes <= 20_000


def test_more_bits_lower_expected_loss(trained, loader):
    losses = []
    for bits in (2.5, 3.0, 4.5, 8.5):
        res = quantize_model(trained, loader, BayesQConfig(bits=bits, prior_precision=1.0),
                             progress=False)
        losses.append(sum(x.expected_loss for x in res.layers))
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1]


def test_infeasible_budget_names_smallest_feasible(trained, loader):
    before = snapshot(trained)
    with pytest.raises(InfeasibleBudgetError, match=r"2\.\d+ bits/weight") as err:
        quantize_model(trained, loader, BayesQConfig(bits=1.5, prior_precision=1.0),
                       progress=False)
    assert "1.5" in str(err.value)
    assert_unchanged(trained, before)


def test_nan_weights_are_refused_and_model_kept(trained, loader):
    with torch.no_grad():
        trained.fc1.weight[0, 0] = float("nan")
    before = snapshot(trained)
    with pytest.raises(ValueError, match="'fc1' has 1 NaN/inf"):
        quantize_model(trained, loader, BayesQConfig(), progress=False)
    assert before["state"]["fc1.weight"].isnan().sum() == 1
    assert_unchanged(trained, before)


def test_empty_loader_is_refused(trained):
    with pytest.raises(ValueError, match="calibration loader yielded no samples"):
        quantize_model(trained, [], BayesQConfig(), progress=False)


def test_bayesq_ranks_layers_by_posterior(trained, loader):
    """With a tight budget BayesQ upgrades the layers that save the most loss per stored bit.

    With widths {2, 4} every layer has one upgrade; the greedy takes them in order of
    ``(D_2 - D_4) / (C_4 - C_2)``, so every upgraded layer's rate is at least every other one's.
    """
    cfg = BayesQConfig(bits=3.0, allowed_bits=(2, 4), structure="diag")
    res = quantize_model(trained, loader, cfg, progress=False)
    assert res.info["structure"] == "diag" and res.info["prior_precision"] > 0
    assert res.info["n_data"] == 256 and res.info["n_calib"] == 256
    by_bits = {}
    for width in (2, 4):  # each layer's loss and cost at both widths, same posterior
        pinned = BayesQConfig(bits=8.0, allowed_bits=(width,), structure="diag")
        other = quantize_model(trained, loader, pinned, progress=False, posterior=res.posterior)
        by_bits[width] = {x.name: (x.expected_loss, x.bytes) for x in other.layers}
    rate = {n: (by_bits[2][n][0] - by_bits[4][n][0]) / (by_bits[4][n][1] - by_bits[2][n][1])
            for n in by_bits[2]}
    up = [x.name for x in res.layers if x.bits == 4]
    down = [x.name for x in res.layers if x.bits == 2]
    assert up and down, "the budget must force a real choice"
    assert min(rate[n] for n in up) >= max(rate[n] for n in down)


def test_blocks_groups_and_pins(trained, loader):
    cfg = BayesQConfig(bits=5.0, block_rows=8, pack_multiple=4, group_size=16,
                       min_bits={"conv": 8}, max_bits={"fc2": 4}, prior_precision=1.0)
    res = quantize_model(trained, loader, cfg, progress=False)
    assert res.bits_per_weight <= 5.0
    layers = {x.name: x for x in res.layers}
    assert [b.rows for b in layers["fc1"].blocks] == [(r, r + 8) for r in range(0, 32, 8)]
    assert [b.rows for b in layers["fc2"].blocks] == [(0, 4)]  # 4 rows: one short block
    assert all(b.bits == 8 for b in layers["conv"].blocks)
    assert all(b.bits <= 4 for b in layers["fc2"].blocks)
    fc1 = layers["fc1"].blocks[0]
    assert fc1.group_size == 16 and fc1.scale.shape == (8, 8)  # 128 columns / 16
    x, _ = next(iter(loader))
    assert torch.isfinite(res.model(x)).all()


def test_pins_that_the_bit_set_cannot_meet(trained, loader):
    cfg = BayesQConfig(allowed_bits=(2, 3), min_bits={"fc*": 4})
    with pytest.raises(ValueError, match="'fc1'.*no width within its pins"):
        quantize_model(trained, loader, cfg, progress=False)


@pytest.mark.parametrize("solver", ["greedy", "dp"])
def test_hawq_and_solvers(trained, loader, solver):
    res = quantize_model(trained, loader, BayesQConfig(bits=3.0, method="hawq", solver=solver,
                                                       prior_precision=1.0), progress=False)
    assert res.bits_per_weight <= 3.0


def test_mc_tables_end_to_end_with_refinement(trained, loader):
    cfg = BayesQConfig(bits=3.0, tables="mc", mc_samples=2, mc_refine_top_k=2, block_rows=16,
                       prior_precision=1.0)
    res = quantize_model(trained, loader, cfg, progress=False)
    assert res.bits_per_weight <= 3.0
    # S * (1 + sum over refined blocks of (1 + candidates)) passes over the 8 batches; under
    # error feedback each of the 4 widths has an unclipped and a clipped grid: 8 candidates
    assert res.info["mc_blocks"] == 2
    assert res.info["mc_forward_passes"] == 2 * (1 + 2 * (1 + 8)) * 8
    assert len(res.info["mc_stderr"]) == 2  # the chosen candidates' standard errors
    assert all(math.isfinite(se) and se >= 0 for se in res.info["mc_stderr"].values())


class GroupedNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.grouped = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = torch.nn.Linear(8 * 64, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.relu(self.grouped(h)) + self.depthwise(h)
        return self.fc(h.flatten(1))


def _output_error(res, model, name, loader):
    """Mean squared output error of layer `name` on the calibration inputs."""
    from bayesq_lightning.input_stats import layer_input_hessians

    H = layer_input_hessians(model, list(loader)[:4], [name])[name]
    w = dict(model.named_modules())[name].weight.detach().flatten(1)
    q = dict(res.model.named_modules())[name].weight.detach().flatten(1)
    dw = (q - w).double()
    if H.dim() == 3:
        per = dw.shape[0] // H.shape[0]
        return sum(float((dw[g * per:(g + 1) * per] @ H[g].double() * dw[g * per:(g + 1) * per])
                         .sum()) for g in range(H.shape[0]))
    return float((dw @ H.double() * dw).sum())


@pytest.mark.parametrize("net", ["tiny", "grouped"])
def test_gptq_lowers_output_error_on_the_same_grid(trained, loader, net):
    model = trained if net == "tiny" else GroupedNet().eval()
    cfg = dict(allowed_bits=(3,), bits=8.0, calib_batches=4)
    gptq = quantize_model(model, loader, BayesQConfig(method="gptq", **cfg), progress=False)
    rtn = quantize_model(model, loader, BayesQConfig(method="rtn", **cfg), progress=False)
    for layer in gptq.layers:
        cols = math.prod(layer.weight_shape[1:])
        if cols > 9:  # 9 input columns (first/depthwise conv): too little room for feedback
            assert _output_error(gptq, model, layer.name, loader) < 0.95 * _output_error(
                rtn, model, layer.name, loader), layer.name
        # the loss reported is that output error
        assert layer.expected_loss == pytest.approx(
            _output_error(gptq, model, layer.name, loader), rel=1e-3)
    assert gptq.info["n_calib"] == 128


def test_kron_rounds_with_feedback_and_scores_with_G(trained, loader):
    from bayesq_lightning.quantizers import round_uniform

    cfg = BayesQConfig(bits=8.0, allowed_bits=(3,), structure="kron")
    # the real n_data (256, the training set), marglik prior: the default damping has room
    res = quantize_model(trained, loader, cfg, progress=False)
    assert res.info["structure"] == "kron" and res.info["n_data"] == 256
    x = torch.cat([x for x, _ in loader])
    for layer in res.layers:
        lp = res.posterior.layers[layer.name]
        (block,) = layer.blocks
        mu = lp.mean.reshape(lp.mean.shape[0], -1).double()
        G, A = lp.G.double(), lp.A.double()

        def score(q, G=G, A=A, mu=mu):  # the curvature tr(G dW A dW^T): no prior term
            dw = q - mu
            return float(((G @ dw @ A) * dw).sum())

        q = dequantize(block, torch.float64)
        # (the pipeline forms the two products in fp32: to 1e-5, as the golden losses)
        assert layer.expected_loss == pytest.approx(score(q), rel=1e-5)
        nearest = block.__class__(**{**block.__dict__, "codes": round_uniform(
            mu.float(), block.scale, block.zero, 3)})
        if mu.shape[1] > 9:  # room for feedback beyond the 9-column first conv
            assert (block.codes != nearest.codes).float().mean() > 0.05, layer.name
            assert score(q) < 0.9 * score(dequantize(nearest, torch.float64)), layer.name
    # and the layer's output error on the data falls below round-to-nearest's
    fc1_in = torch.relu(trained.bn(trained.conv(x)))
    fc1_in = torch.nn.functional.max_pool2d(fc1_in, 2).flatten(1).detach()
    w = trained.fc1.weight.detach()
    (block,) = res.layer("fc1").blocks
    nearest = block.__class__(**{**block.__dict__, "codes": round_uniform(
        w, block.scale, block.zero, 3)})
    err = [float(((fc1_in @ (dequantize(b) - w).T) ** 2).mean()) for b in (block, nearest)]
    assert err[0] < 0.9 * err[1], err


def test_lowrank_end_to_end(trained, loader):
    cfg = BayesQConfig(bits=3.0, structure="lowrank", rank=2, prior_precision=1.0,
                       calib_batches=1, include=["fc*"])
    res = quantize_model(trained, loader, cfg, progress=False)
    assert res.info["structure"] == "lowrank" and res.bits_per_weight <= 3.0
    for layer in res.layers:
        lp = res.posterior.layers[layer.name]
        assert lp.U.shape[1] == 2
        dw = (dequantize(layer.blocks[0], torch.float64) - lp.mean.double()).reshape(-1)
        dense = (torch.diag(lp.residual.double().reshape(-1))  # curvature only: no prior
                 + lp.U.double() @ torch.diag(lp.S.double()) @ lp.U.double().T)
        assert layer.expected_loss == pytest.approx(float(dw @ dense @ dw), rel=1e-6)


def test_posterior_is_reused_across_budgets(trained, loader):
    first = quantize_model(trained, loader, BayesQConfig(bits=3.0), progress=False)
    again = quantize_model(trained, loader, BayesQConfig(bits=3.0), progress=False,
                           posterior=first.posterior)
    assert first.posterior.structure == "kron"  # the default
    assert again.info["posterior_reused"] and not first.info["posterior_reused"]
    assert [b.bits for x in again.layers for b in x.blocks] == [
        b.bits for x in first.layers for b in x.blocks]
    with pytest.raises(ValueError, match="does not match this run"):
        quantize_model(trained, loader, BayesQConfig(structure="diag"), progress=False,
                       posterior=first.posterior)
    other = type(trained)()
    other.fc1 = torch.nn.Linear(128, 16)  # same layer names, another shape
    other.fc2 = torch.nn.Linear(16, 4)
    with pytest.raises(ValueError, match=r"\['fc1', 'fc2'\] have other shapes"):
        quantize_model(other, loader, BayesQConfig(bits=3.0), progress=False,
                       posterior=first.posterior)
    with pytest.raises(ValueError, match="a given posterior skips"):
        quantize_model(trained, loader, BayesQConfig(bits=3.0), progress=False,
                       posterior=first.posterior, curvature_loader=loader)


@pytest.mark.parametrize(("quantizer", "per_row", "structure"),
                         [("nonuniform", False, "diag"), ("nonuniform", True, "kron"),
                          ("auto", False, "kron")])
def test_nonuniform_and_auto(trained, loader, quantizer, per_row, structure):
    cfg = BayesQConfig(bits=3.5, quantizer=quantizer, per_row_codebook=per_row,
                       structure=structure, prior_precision=1.0)
    res = quantize_model(trained, loader, cfg, progress=False)
    assert res.bits_per_weight <= 3.5
    if quantizer == "nonuniform":
        assert {b.quantizer for x in res.layers for b in x.blocks} == {"nonuniform"}
    modules = dict(res.model.named_modules())
    for layer in res.layers:
        block = layer.blocks[0]
        w = modules[layer.name].weight.detach()
        assert torch.equal(w, dequantize(block).reshape(w.shape))
        if block.quantizer == "nonuniform":
            assert block.codebook.dtype == torch.float16
            assert block.codebook.shape[-1] == 2**block.bits
            assert block.codebook.dim() == (2 if per_row else 1)
            # the codebook's metadata is what the allocator paid for
            assert block_storage_bits(block) == 8 * -(-block.n_weights * block.bits // 8) + \
                16 * block.codebook.numel()


def test_auto_never_worse_than_either_quantizer_alone(trained, loader):
    losses = {}
    for q in ("uniform", "nonuniform", "auto"):
        cfg = BayesQConfig(bits=3.0, quantizer=q, structure="diag", prior_precision=1.0,
                           solver="dp")
        res = quantize_model(trained, loader, cfg, progress=False)
        losses[q] = sum(x.expected_loss for x in res.layers)
    assert losses["auto"] <= min(losses["uniform"], losses["nonuniform"]) + 1e-9


# --------------------------------------------------------------------------- review findings
@pytest.mark.parametrize("method", ["rtn", "bayesq"])
def test_all_zero_rows_quantize(trained, loader, method):
    with torch.no_grad():
        trained.fc1.weight[3] = 0.0  # a pruned / dead channel
        trained.fc1.weight[5] = 1e-9
    res = quantize_model(trained, loader, BayesQConfig(bits=4.0, method=method,
                                                       structure="diag", prior_precision=1.0),
                         progress=False)
    w = dict(res.model.named_modules())["fc1"].weight
    assert torch.isfinite(w).all() and (w[3] == 0).all()


class _MixedNet(torch.nn.Module):
    """A bf16 model that keeps its norm in fp32 (as HF `_keep_in_fp32_modules` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 32).bfloat16()
        self.norm = torch.nn.LayerNorm(32)
        self.fc2 = torch.nn.Linear(32, 4).bfloat16()

    def forward(self, x):  # inputs follow each layer's dtype (its bias's, once packed)
        h = self.norm(self.fc1(x.flatten(1).to(self.fc1.bias.dtype)).float())
        return self.fc2(h.to(self.fc2.bias.dtype)).float()


@pytest.mark.parametrize("kwargs", [{"method": "gptq"}, {"tables": "mc", "mc_samples": 2,
                                                         "structure": "diag"}])
@pytest.mark.parametrize("mixed", [True, False])
def test_half_precision_models_and_inputs(loader, kwargs, mixed):
    torch.manual_seed(0)
    model = _MixedNet() if mixed else torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    ).bfloat16()  # bf16 inputs straight into the layers: the fp32 fits must cast them
    bf16_loader = [(x.bfloat16(), y) for x, y in list(loader)[:4]]
    res = quantize_model(model, bf16_loader, BayesQConfig(bits=4.0, prior_precision=1.0,
                                                          **kwargs), progress=False)
    if mixed:
        assert res.model.norm.weight.dtype == torch.float32  # dtypes kept, not recast
    out = res.model(bf16_loader[0][0])
    assert torch.isfinite(out.float()).all()


def test_root_layers_are_refused():
    with pytest.raises(ValueError, match="wrap it in a parent module"):
        quantize_model(torch.nn.Linear(4, 4), None, BayesQConfig(method="rtn"), progress=False)


def test_pin_patterns_and_byte_budgets_are_checked_before_work(trained):
    with pytest.raises(ValueError, match="'fc9' matches no quantized layer"):
        quantize_model(trained, None, BayesQConfig(method="rtn", min_bits={"fc9": 8}),
                       progress=False)
    with pytest.raises(InfeasibleBudgetError, match=r"budget_bytes=10 is infeasible.*\d+ bytes"):
        quantize_model(trained, None, BayesQConfig(method="rtn", budget_bytes=10),
                       progress=False)


# --------------------------------------------------------------------------- curvature scores
def _linear_softmax(d: int = 5, c: int = 3, n: int = 64):
    g = torch.Generator().manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(d, c, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(c, d, generator=g))
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return model.eval(), [(x[:32], y[:32]), (x[32:], y[32:])], x


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_scores_are_the_training_loss_curvature_without_prior(structure):
    """Linear softmax: GGN of W is sum_n (diag p - p p^T) (x) x x^T, known in closed form."""
    model, batches, x = _linear_softmax()
    n_data = 1000
    s = n_data / len(x)
    p = torch.softmax(model(x), -1).double().detach()
    lam = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (n, c, c)
    xd = x.double()
    losses = {}
    for delta in (0.5, 50.0):
        cfg = BayesQConfig(bits=16.0, allowed_bits=(2,), structure=structure,
                           prior_precision=delta, calib_batches=2)
        res = quantize_model(model, batches, cfg, n_data=n_data, progress=False)
        (layer,) = res.layers
        dW = (dequantize(layer.blocks[0], torch.float64) - model[0].weight.double()).detach()
        if structure == "diag":  # s * diag(GGN): p_k (1 - p_k) x_j^2 summed over samples
            curv = s * torch.einsum("nk,nj->kj", p * (1 - p), xd * xd)
            expected = float((curv * dW * dW).sum())
        else:  # K-FAC by hand: G = sum_n Lambda_n, A = (1/n) sum_n x x^T, scaled by s
            G, A = lam.sum(0), xd.T @ xd / len(x)
            expected = s * float(((G @ dW @ A) * dW).sum())
        assert layer.expected_loss == pytest.approx(expected, rel=1e-4)
        losses[delta] = layer.expected_loss
    assert losses[0.5] == losses[50.0]  # no prior term anywhere in the score


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_allocation_and_codes_do_not_depend_on_the_prior_precision(trained, loader, structure):
    runs = [quantize_model(trained, loader, BayesQConfig(bits=3.0, structure=structure,
                                                         prior_precision=delta),
                           progress=False) for delta in (0.1, 10.0)]
    for a, b in zip(runs[0].layers, runs[1].layers, strict=True):
        assert a.bits == b.bits
        for ba, bb in zip(a.blocks, b.blocks, strict=True):
            assert torch.equal(ba.codes, bb.codes) and torch.equal(ba.scale, bb.scale)
    # the old score keeps the prior, so there the prior does move the design
    old = [quantize_model(trained, loader, BayesQConfig(bits=3.0, structure=structure,
                                                        prior_precision=delta,
                                                        score="posterior_precision"),
                          progress=False) for delta in (0.1, 10.0)]
    assert any(x.expected_loss != y.expected_loss
               for x, y in zip(old[0].layers, old[1].layers, strict=True))


def test_curvature_loader_feeds_the_posterior_only(trained, loader):
    held_out = DataLoader(make_data(96, seed=7), batch_size=32)
    res = quantize_model(trained, loader, BayesQConfig(bits=3.0, calib_batches=8),
                         curvature_loader=held_out, progress=False)
    assert res.info["curvature_data"] == "curvature_loader"
    assert res.info["n_calib"] == 96 and res.info["n_data"] == 256  # the training set still
    with pytest.raises(ValueError, match="curvature loader yielded no samples"):
        quantize_model(trained, loader, BayesQConfig(), curvature_loader=[], progress=False)
    wrong = [(torch.randn(4, 3, 5, 5), torch.zeros(4, dtype=torch.long))]
    before = snapshot(trained)
    with pytest.raises(ValueError, match="do not fit the model.*RuntimeError"):
        quantize_model(trained, loader, BayesQConfig(), curvature_loader=wrong, progress=False)
    assert_unchanged(trained, before)
    with pytest.raises(ValueError, match="curvature_loader feeds the posterior fit"):
        quantize_model(trained, loader, BayesQConfig(method="gptq"), curvature_loader=held_out,
                       progress=False)


def test_result_model_shares_no_storage_and_leaves_the_model_as_it_was(trained, loader):
    # the clone reads the replaced layers' float weights instead of copying them
    before = snapshot(trained)
    res = quantize_model(trained, loader, BayesQConfig(bits=4.0, structure="diag",
                                                       prior_precision=1.0))
    assert_unchanged(trained, before)
    ours = {t.untyped_storage().data_ptr() for t in [*trained.parameters(), *trained.buffers()]}
    theirs = [t.untyped_storage().data_ptr() for t in [*res.model.parameters(),
                                                       *res.model.buffers()]]
    assert not ours.intersection(theirs)


def test_only_weights_no_kept_module_holds_are_read_by_the_clone():
    from bayesq_lightning.quantize import _replaced_weights

    emb, head, other = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10), torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(emb, other, head)
    assert _replaced_weights(model, ["1", "2"], {}) == [other.weight, head.weight]
    head.weight = emb.weight  # tied to a module that stays float: the copy needs its own
    assert _replaced_weights(model, ["1", "2"], {}) == [other.weight]
    emb.register_buffer("alias", other.weight)  # held as another module's buffer: the same
    assert _replaced_weights(model, ["1", "2"], {}) == []


@pytest.mark.parametrize("method", ["gptq", "bayesq"])
def test_no_factor_or_hessian_of_a_run_stays_referenced(monkeypatch, trained, loader, method):
    """Every cache of a run lives in objects the pipeline drops: after quantize_model returns,
    the rounding's factorisations, GPTQ's input Hessians and the blocks' inputs are freed."""
    import gc
    import weakref

    import bayesq_lightning.block_plan as block_plan
    import bayesq_lightning.quantize as quantize
    import bayesq_lightning.rounding as rounding

    refs: list[weakref.ref] = []
    factorise, hessians, open_ = (rounding._factorise, quantize.layer_input_hessians,
                                  block_plan.BlockPlan.open)

    def tracked_factorise(*args):
        perm, U = factorise(*args)
        refs.append(weakref.ref(U))
        return perm, U

    def tracked_hessians(*args, **kwargs):
        out = hessians(*args, **kwargs)
        refs.extend(weakref.ref(h) for h in out.values())
        return out

    def tracked_open(self, method):
        refs.append(weakref.ref(self))
        return open_(self, method)

    monkeypatch.setattr(rounding, "_factorise", tracked_factorise)
    monkeypatch.setattr(quantize, "layer_input_hessians", tracked_hessians)
    monkeypatch.setattr(block_plan.BlockPlan, "open", tracked_open)
    res = quantize_model(trained, loader, BayesQConfig(method=method, bits=3.0,
                                                       calib_batches=2), progress=False)
    gc.collect()
    assert res.layers and len(refs) > len(res.layers)
    assert [r for r in refs if r() is not None] == []
