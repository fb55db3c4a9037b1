"""PosteriorDistillModule, ``distill`` after a callback run and ``distill_model``: codes frozen,
labels unused, metrics, export, bad inputs; and a 2-process DDP run against one process."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import (
    TinyData,
    TinyNet,
    assert_unchanged,
    make_data,
    snapshot,
    train_briefly,
)
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from bayesq_lightning import (
    BayesQCallback,
    BayesQConfig,
    DistillConfig,
    PosteriorDistillModule,
    distill,
    distill_model,
    load_quantized,
    quantize_model,
    save_quantized,
)
from bayesq_lightning.artifact.temperature import logit_temperature
from bayesq_lightning.distillation import build_teacher
from bayesq_lightning.metrics import evaluate

SCRIPT = Path(__file__).parent / "ddp" / "run_distill.py"
QUIET = {"enable_progress_bar": False, "accelerator": "cpu", "devices": 1}


def _codes(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_codes")}


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = TinyNet()
    train_briefly(model, DataLoader(make_data(256, seed=0), batch_size=32, shuffle=True))
    calib = DataLoader(make_data(64, seed=2), batch_size=16)
    test = DataLoader(make_data(128, seed=1), batch_size=64)
    res = quantize_model(model, calib, BayesQConfig(bits=2.5, calib_batches=4), n_data=256,
                         progress=False)
    return model, res, calib, test


def test_distill_model_tunes_metadata_only_and_exports(setup, tmp_path):
    model, res, calib, test = setup
    fp32 = snapshot(model)
    codes = _codes(res.model)
    before = {k: v.clone() for k, v in res.model.state_dict().items()}
    rep = distill_model(model, res, calib, DistillConfig(epochs=3, lr=1e-3, holdout=0.0,
                                                         fit_temperature=True),
                        eval_loader=test,
                        **QUIET)
    assert_unchanged(model, fp32)  # the teacher's source is copied, never trained
    after = res.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(codes[k], after[k]) for k in codes)  # integer codes bit-identical
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith("_scale") for k in changed) and any(k.endswith("_zero") for k in changed)
    assert all(k.endswith(("_scale", "_zero", ".bias", ".weight")) for k in changed)
    assert not any(k.startswith("bn.running") for k in changed)  # BatchNorm statistics frozen
    assert all(after[k].dtype == torch.float16 for k in changed if k.endswith(("_scale", "_zero")))
    # the report is the rounded model's metrics; the last logged epoch is the same model
    assert rep["distilled"] == evaluate(res.model, test)
    for k in ("accuracy", "nll"):
        assert rep["logged"][f"student/{k}"] == pytest.approx(rep["distilled"][k], rel=1e-6)
    assert rep["fp32"] == evaluate(model, test)
    assert rep["teacher"] == "posterior-glm" and rep["seconds_per_epoch"] > 0
    # the distilled artifact reloads with identical outputs
    save_quantized(res.model, res, tmp_path / "a")
    fresh = load_quantized(TinyNet(), tmp_path / "a").eval()
    x = make_data(16, seed=5).tensors[0]
    assert torch.equal(fresh(x), res.model.eval()(x))
    # with its label-free temperature, fitted, applied and stored
    t = rep["student_temperature"]
    assert isinstance(t, float) and logit_temperature(res.model) == t == logit_temperature(fresh)


def test_training_step_never_reads_labels(setup):
    model, res, calib, _ = setup
    teacher = build_teacher(DistillConfig(), model, res.posterior)
    x, y = next(iter(calib))
    losses, grads = [], []
    for batch in ((x, y), x, (x, torch.zeros_like(y))):
        module = PosteriorDistillModule(res.model, teacher, DistillConfig(), n_classes=4)
        loss = module.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in module._state.params])
        module.finish()
        res.model.zero_grad(set_to_none=True)  # biases and norms persist across modules
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], g, strict=True))


@pytest.mark.parametrize(("case", "match"), [
    ("no_posterior", "needs a fitted posterior"),
    ("nothing_to_train", "nothing to train"),
    ("bad_inputs", "do not fit the model"),
    ("class_mismatch", "same model"),
    ("unlabelled_eval", "labelled batches"),
    ("bad_trainer_argument", "max_epochz"),
    ("probabilities", "returns probabilities"),
    ("tuple_outputs", "returns tuple, not logits"),
])
def test_bad_input_is_refused_before_training(setup, case, match):
    model, res, calib, test = setup
    cfg, loader, teacher_model, posterior = DistillConfig(), calib, model, res.posterior
    extra = {}
    if case == "unlabelled_eval":
        test = [x for x, _ in test]
    elif case == "bad_trainer_argument":
        extra = {"max_epochz": 3}
    elif case == "no_posterior":
        res.posterior = None
        posterior = None
    elif case == "nothing_to_train":
        cfg = DistillConfig(train=("codebook",))
    elif case == "bad_inputs":
        loader = [(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))]  # labelled, wrong shape
    elif case in ("probabilities", "tuple_outputs"):
        raw = res.model.forward
        res.model.forward = ((lambda x: raw(x).softmax(-1)) if case == "probabilities"
                             else (lambda x: (raw(x), raw(x))))
        extra = {"callbacks": [_NoTraining()]}
    else:
        teacher_model = TinyNet()
        teacher_model.fc2 = nn.Linear(32, 5)
        cfg = DistillConfig(teacher="fp32")
    before = snapshot(res.model)
    with pytest.raises((ValueError, TypeError), match=match):
        distill_model(teacher_model, res, loader, cfg, eval_loader=test, posterior=posterior,
                      **QUIET, **extra)
    assert_unchanged(res.model, before)
    res.model.__dict__.pop("forward", None)


class _NoTraining(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        raise AssertionError("training started")


def test_distill_after_the_callback_fills_the_report(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    cb = BayesQCallback(bits=2.5, calib_batches=4, progress=False, export_dir=tmp_path / "art")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, callbacks=[cb],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, logger=CSVLogger(tmp_path, name="logs"))
    dm = TinyData()
    trainer.fit(model, dm)
    val = dm.val_dataloader()
    codes = _codes(model)
    rep = distill(trainer, cb, DistillConfig(epochs=2, lr=1e-3, holdout=0.0))
    x = make_data(16, seed=5).tensors[0]  # the export_dir artifact is the distilled model
    assert torch.equal(load_quantized(TinyNet(), tmp_path / "art").eval()(x), model.eval()(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in codes.items())
    assert cb.report["distilled"] == evaluate(model, val)  # installed in the user's module
    assert set(cb.report["teacher"]) == {"accuracy", "nll", "ece"}
    assert cb.report["distill"]["teacher"] == "posterior-glm" == rep["teacher"]
    trainer.loggers[0].save()
    logs = list((tmp_path / "logs").rglob("metrics.csv"))
    assert any("student/accuracy" in p.read_text() for p in logs)
    assert any("bayesq/teacher/ece" in p.read_text() for p in logs)
    with pytest.raises(ValueError, match="run trainer.fit"):
        distill(trainer, BayesQCallback(bits=3.0), DistillConfig())
    with pytest.raises(ValueError, match="already distilled"):
        distill(trainer, cb, DistillConfig())


def test_a_failure_during_training_puts_the_student_back(setup):
    model, res, calib, test = setup
    before = snapshot(res.model)

    class Boom(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        distill_model(model, res, calib, DistillConfig(epochs=2, lr=1e-2, holdout=0.0),
                      callbacks=[Boom()], **QUIET)
    assert_unchanged(res.model, before)
    assert BayesQCallback(2.5).config.bits == 2.5  # a number is the budget


def test_two_process_ddp_students_agree_and_metrics_match_one_process(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # identical students on both ranks
    logged = json.loads((tmp_path / "rank0.json").read_text())
    # one process, same student, same 128 test samples
    fresh = load_quantized(TinyNet(), tmp_path / "artifact").eval()
    test = DataLoader(make_data(128, seed=1), batch_size=64)
    single = evaluate(fresh, test)
    for k in ("accuracy", "nll"):
        assert logged[f"student/{k}"] == pytest.approx(single[k], rel=1e-6)
    assert abs(logged["student/ece"] - single["ece"]) <= 1 / 128


@pytest.mark.parametrize("cross_fit", [False, True])
def test_holdout_keeps_the_undistilled_student_when_training_only_hurts(setup, cross_fit):
    model, res, calib, _ = setup
    res.model.train()  # as a module is after Trainer.fit: no pass may move its BatchNorm
    before = {k: v.clone() for k, v in res.model.state_dict().items()}
    rep = distill_model(model, res, calib, DistillConfig(epochs=2, lr=0.5, holdout=0.25,
                                                         cross_fit=cross_fit,
                                                         fit_temperature=False), **QUIET)
    assert rep["n_holdout"] == (64 if cross_fit else 16) and len(rep["holdout_kl"]) == 3
    assert rep["cross_fit"] is cross_fit
    assert rep["best_epoch"] == 0 and min(rep["holdout_kl"]) == rep["holdout_kl"][0]
    after = res.model.state_dict()
    for k, v in before.items():  # every trained tensor is back (fp16 round trip is exact)
        assert torch.equal(after[k], v), k  # BatchNorm's running statistics included
    assert res.model.training and res.model.bn.training  # its modes put back


def test_a_small_holdout_warns_and_changes_nothing(setup):
    model, res, calib, _ = setup
    before = {k: v.clone() for k, v in res.model.state_dict().items()}
    with pytest.warns(UserWarning, match=r"hold-out has 12 calibration inputs.*fewer than "
                      r"the 16.*kept undistilled.*at least 85"):
        rep = distill_model(model, res, calib, DistillConfig(epochs=2, lr=0.5, holdout=0.19,
                                                             cross_fit=False), **QUIET)
    assert rep["best_epoch"] == 0 and rep["holdout_kl"] == []
    assert rep["student_temperature"] is None
    for k, v in before.items():
        assert torch.equal(res.model.state_dict()[k], v), k


class RandomLogits(nn.Module):
    """A teacher of input-independent random logits: a fresh draw for every input."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(seed)
        self.anchor = nn.Parameter(torch.zeros(()))  # a device to read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.randn(len(x), 4, generator=self.g)


def test_the_selection_keeps_the_undistilled_student_when_training_only_adds_noise():
    # The student's logits are near zero: the uniform prediction that is the population
    # optimum against iid random teacher logits. Training can only fit the draws' noise.
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        model.fc2.weight.mul_(1e-3)
        model.fc2.bias.zero_()
    calib = DataLoader(torch.utils.data.TensorDataset(make_data(64, seed=2).tensors[0]),
                       batch_size=16)  # inputs only: the KL rule alone decides
    res = quantize_model(model, calib, BayesQConfig(bits=4.0, method="rtn", calib_batches=4),
                         progress=False)
    kept = lowered = 0
    for seed in range(20):
        r = dataclasses.replace(res, model=copy.deepcopy(res.model),
                                layers=copy.deepcopy(res.layers))
        rep = distill_model(RandomLogits(seed), r, calib,
                            DistillConfig(teacher="fp32", epochs=2, holdout=0.5, seed=seed,
                                          fit_temperature=False), **QUIET)
        assert rep["cross_fit"] and rep["n_holdout"] == 64
        kept += rep["best_epoch"] == 0
        lowered += rep["lowest_epoch"] > 0
    assert lowered >= 5, lowered  # some epoch does look better by chance in many seeds...
    assert kept >= 19, (kept, lowered)  # ...and the paired standard error sees through it


def test_a_kept_cross_fitted_epoch_is_reported_with_an_evaluation_loader(setup):
    model, res, calib, test = setup
    rep = distill_model(model, res, calib, DistillConfig(epochs=2, min_gain_se=0.0),
                        eval_loader=test, **QUIET)
    assert rep["cross_fit"] and rep["n_holdout"] == 64 and len(rep["holdout_kl"]) == 3
    kept = rep["holdout_gain"] > 0 and rep["holdout_nll_gain"] > 0
    assert kept and rep["best_epoch"] == rep["lowest_epoch"] > 0  # the refit's epochs
