"""Distillation core: teachers, the trainable student, the loss and their bad inputs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import TinyNet, assert_unchanged, make_data, snapshot, train_briefly
from torch import nn
from torch.utils.data import DataLoader

from bayesq_lightning import BayesQConfig, DistillConfig, quantize_model
from bayesq_lightning.distillation import (
    FP32Teacher,
    GLMTeacher,
    SampleTeacher,
    build_teacher,
    distill_loss,
    finish_student,
    fp32_reference,
    start_student,
)
from bayesq_lightning.posterior import fit_posterior


@pytest.fixture(scope="module")
def quantized():
    """TinyNet trained briefly, its FP32 copy, and a BayesQ kron result at 3 bits."""
    torch.manual_seed(0)
    model = TinyNet()
    loader = DataLoader(make_data(256), batch_size=32)
    train_briefly(model, loader)
    res = quantize_model(model, loader, BayesQConfig(bits=3.0, calib_batches=2), n_data=256,
                         progress=False)
    return model, res, loader


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"posterior_temperature": float("nan")}, "posterior_temperature"),
    ({"teacher": "ensemble"}, "teacher"),
    ({"predictive": "mc"}, "predictive"),
    ({"train": ()}, "train"),
    ({"train": ("weights",)}, "train"),
    ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"min_gain_se": -1.0}, "min_gain_se"),
    ({"min_gain_se": float("inf")}, "min_gain_se"),
])
def test_config_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)


def test_glm_teacher_matches_a_hand_computed_probit_predictive():
    """Linear softmax model: p = softmax(f / sqrt(1 + pi/8 * diag(J Sigma J^T))), dense Sigma."""
    torch.manual_seed(0)
    x = torch.randn(96, 5)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    model = nn.Sequential(nn.Linear(5, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]
    post = fit_posterior(model.eval(), batches, ["0"], n_data=96, structure="kron")
    lp = post.layers["0"]
    lam = torch.kron(lp.G.double(), lp.A.double()) + lp.prior_precision * torch.eye(15).double()
    sigma = torch.linalg.inv(lam) * 0.5  # posterior_temperature 0.5
    xt = torch.randn(7, 5)
    f = model(xt).detach().double()
    eye = torch.eye(3).double()
    var = torch.tensor([[float(torch.kron(eye[c], xt[b].double()) @ sigma
                               @ torch.kron(eye[c], xt[b].double())) for c in range(3)]
                        for b in range(7)], dtype=torch.float64)
    expected = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * var), -1)
    teacher = GLMTeacher(model, post, temperature=0.5)
    torch.testing.assert_close(teacher(xt).exp().double(), expected, rtol=1e-5, atol=1e-6)
    assert teacher.head == "0"
    # the variance is not negligible, so the test tells the probit from a plain softmax
    assert (expected - torch.softmax(f, -1)).abs().max() > 1e-3


def test_teachers_leave_the_model_alone_and_work_under_inference_mode(quantized):
    model, res, loader = quantized
    before = snapshot(model)
    x = next(iter(loader))[0]
    fp32 = FP32Teacher(model)
    samples = SampleTeacher(model, res.posterior, n_samples=3)
    glm = GLMTeacher(model, res.posterior)
    with torch.inference_mode():
        outs = {t.name: t(x) for t in (fp32, samples, glm)}
    assert_unchanged(model, before)
    for name, logp in outs.items():
        assert logp.shape == (32, 4), name
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(32), msg=name)
    torch.testing.assert_close(outs["fp32"], model(x).log_softmax(-1))
    torch.testing.assert_close(samples(x), outs["posterior-samples"])  # fixed draws
    assert glm.head == "fc2"
    # a vanishing temperature collapses both posterior predictives onto the FP32 softmax
    for t in (SampleTeacher(model, res.posterior, 2, temperature=1e-12),
              GLMTeacher(model, res.posterior, temperature=1e-12)):
        torch.testing.assert_close(t(x), outs["fp32"], rtol=1e-4, atol=1e-4)


def test_fp32_reference_rebuilds_the_float_model_from_the_posterior(quantized):
    model, res, loader = quantized
    x = next(iter(loader))[0]
    ref = fp32_reference(res.model, res.posterior)
    torch.testing.assert_close(ref(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="FP32 model"):
        fp32_reference(res.model, None)


def test_posterior_teacher_needs_a_posterior(quantized):
    model, _, _ = quantized
    with pytest.raises(ValueError, match="needs a fitted posterior"):
        build_teacher(DistillConfig(), model, None)
    assert isinstance(build_teacher(DistillConfig(teacher="fp32"), model, None), FP32Teacher)


def test_student_trains_only_the_selected_parameters(quantized):
    _, res, loader = quantized
    student = res.model
    before = {k: v.clone() for k, v in student.state_dict().items()}
    state = start_student(student, ("scale", "bias"))
    assert all(p.requires_grad for p in state.params)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("_scale_master", ".bias")) for n in trainable)
    assert not any(n.startswith("bn.") for n in trainable)
    x = next(iter(loader))[0]
    with torch.no_grad():
        out0 = student(x)
    target = torch.full((32, 4), 0.25).log()  # toward uniform predictions: every part moves
    opt = torch.optim.Adam(state.params, lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        distill_loss(student(x), target).backward()
        opt.step()
    finish_student(student, state, res)
    after = student.state_dict()
    assert after.keys() == before.keys()  # masters gone again
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("_scale", ".bias")) and not k.startswith("bn.")
                           for k in changed)
    for k in before:
        if k.endswith("_codes"):
            assert torch.equal(before[k], after[k]), k
    assert all(p.requires_grad for p in student.parameters())  # flags restored
    assert not torch.equal(student(x), out0)
    # the result's records follow the module
    torch.testing.assert_close(res.layers[0].blocks[0].scale,
                               student.get_submodule(res.layers[0].name).block0_scale)
    for k, v in before.items():  # undo for the other tests (module-scoped fixture)
        after[k].copy_(v)


def test_student_with_nothing_to_train_is_refused_unchanged(quantized):
    _, res, _ = quantized
    before = snapshot(res.model)
    with pytest.raises(ValueError, match="nothing to train"):
        start_student(res.model, ("codebook",))  # uniform layers have no codebook, no norms
    assert_unchanged(res.model, before)
    with pytest.raises(ValueError, match="no packed layers"):
        start_student(TinyNet(), ("scale",))


def test_loss_is_the_tempered_kl():
    torch.manual_seed(0)
    s, t = torch.randn(6, 4), torch.randn(6, 4).log_softmax(-1)
    for T in (1.0, 2.5):
        pt = (t / T).softmax(-1)
        expected = T * T * (pt * (pt.log() - (s / T).log_softmax(-1))).sum(-1).mean()
        torch.testing.assert_close(distill_loss(s, t, T), expected)
    assert float(distill_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="differ"):
        distill_loss(s, t[:, :3])


def test_glm_teacher_refuses_a_model_whose_head_has_no_posterior(quantized):
    model, res, loader = quantized
    post = dataclasses.replace(res.posterior, layers={
        k: v for k, v in res.posterior.layers.items() if k != "fc2"})
    with pytest.raises(ValueError, match="predictive='samples'"):
        GLMTeacher(model, post)(next(iter(loader))[0])


def test_glm_teacher_on_dict_batches():
    """A HuggingFace-style model taking keyword inputs; the teacher accepts the dict."""

    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, input_ids, attention_mask):
            h = (self.emb(input_ids) * attention_mask[..., None]).mean(1)
            return self.head(h)

    torch.manual_seed(0)
    model = KW().eval()
    ids = torch.randint(0, 20, (16, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones(16, 5), "labels": ids[:, 0] % 3}
    post = fit_posterior(model, [batch], ["head"], n_data=16, structure="diag")
    teacher = build_teacher(DistillConfig(), model, post)
    logp = teacher(batch)
    assert logp.shape == (16, 3)
    torch.testing.assert_close(teacher(**{k: v for k, v in batch.items() if k != "labels"}), logp)


@pytest.mark.parametrize("predictive", ["glm", "samples"])
def test_tuned_teacher_is_no_worse_than_fp32_on_the_calibration_labels(quantized, predictive):
    model, res, loader = quantized
    batches = list(loader)[:4]
    teacher = build_teacher(DistillConfig(predictive=predictive, n_samples=2), model,
                            res.posterior, batches)
    assert teacher.temperature in teacher.tuning
    assert teacher.tuning[teacher.temperature] == min(teacher.tuning.values())
    fp32 = FP32Teacher(model)
    nll = {t: sum(float(nn.functional.nll_loss(m(x), y, reduction="sum")) for x, y in batches)
           for t, m in (("tuned", teacher), ("fp32", fp32))}
    assert nll["tuned"] <= nll["fp32"] * (1 + 1e-3)
    fixed = build_teacher(DistillConfig(predictive=predictive, posterior_temperature=0.5), model,
                          res.posterior, batches)
    assert fixed.temperature == 0.5 and not fixed.tuning
