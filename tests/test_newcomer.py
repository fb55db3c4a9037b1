"""What a new user meets: nothing lost, no silent overwrite, quiet output, the fast path on
loaded models, a plot by weight share. The command's own cases are in ``test_cli.py``."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyData, TinyNet, make_data
from torch.utils.data import DataLoader

from bayesq_lightning import (
    BayesQCallback,
    BayesQConfig,
    load_quantized,
    quantize_model,
    set_kernel,
)
from bayesq_lightning.artifact import kernels
from bayesq_lightning.artifact.export import check_export_dir
from bayesq_lightning.lightning import callback as callback_module
from bayesq_lightning.lightning.callback import EvaluationError
from bayesq_lightning.lightning.quiet import log_interval, quiet
from bayesq_lightning.report import allocation_geometry


class Unlabelled(TinyData):
    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_data(64, seed=1).tensors[0], batch_size=32)  # inputs only


class Steps(pl.Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_train_batch_start(self, *args) -> None:
        self.n += 1


def _fit(cb: BayesQCallback, data: pl.LightningDataModule, tmp_path: Path) -> Steps:
    steps = Steps()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", devices=1,
                         callbacks=[cb, steps], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(TinyNet(), data)
    return steps


def test_unlabelled_validation_fails_before_the_first_training_step(tmp_path):
    steps = Steps()
    cb = BayesQCallback(bits=3.0, method="rtn", calib_batches=2, progress=False)
    with pytest.raises(ValueError, match=r"without labels.*evaluate=False"):
        steps = _fit(cb, Unlabelled(), tmp_path)
    assert steps.n == 0 and cb.result is None
    cb = BayesQCallback(bits=3.0, method="rtn", calib_batches=2, progress=False,
                        evaluate=False)
    assert _fit(cb, Unlabelled(), tmp_path).n == 2 and cb.result is not None  # the fix works


class Unreadable(TinyData):
    def calibration_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(32, 3, 5, 5), batch_size=16)  # not the model's input


def test_unreadable_calibration_and_unwritable_export_fail_before_training(tmp_path):
    cb = BayesQCallback(bits=3.0, method="rtn", calib_batches=2, progress=False)
    with pytest.raises(ValueError, match="calibration batches do not fit the model"):
        _fit(cb, Unreadable(), tmp_path)
    (tmp_path / "file").write_text("x")
    steps = Steps()
    with pytest.raises(NotADirectoryError, match="is a file"):
        steps = _fit(BayesQCallback(bits=3.0, export_dir=tmp_path / "file" / "out"), TinyData(),
                     tmp_path)
    assert steps.n == 0


def test_an_existing_artifact_is_replaced_only_on_request(tmp_path):
    out = tmp_path / "artifact"
    _fit(BayesQCallback(bits=3.0, method="rtn", calib_batches=2, progress=False,
                        export_dir=out), TinyData(), tmp_path)
    before = (out / "model.safetensors").read_bytes()
    cb = BayesQCallback(bits=2.5, method="rtn", calib_batches=2, progress=False,
                        export_dir=out)
    steps = Steps()
    with pytest.raises(FileExistsError, match=r"overwrite=True"):
        steps = _fit(cb, TinyData(), tmp_path)
    assert steps.n == 0 and (out / "model.safetensors").read_bytes() == before
    cb = BayesQCallback(bits=2.5, method="rtn", calib_batches=2, progress=False,
                        export_dir=out, overwrite=True)
    _fit(cb, TinyData(), tmp_path)
    assert (out / "model.safetensors").read_bytes() != before


def test_overwrite_never_replaces_what_is_not_an_artifact(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not a bayesq artifact \(notes.txt\)"):
        check_export_dir(tmp_path, overwrite=True)
    assert check_export_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"


def test_failed_evaluation_keeps_the_quantized_model_and_its_artifact(tmp_path, monkeypatch):
    real, calls = callback_module.evaluate, []

    def fails_after_quantizing(model, loader, max_batches=None):
        calls.append(model)
        if len(calls) > 1:  # FP32 evaluates; the quantized model's evaluation breaks
            raise RuntimeError("injected evaluation failure")
        return real(model, loader, max_batches)

    monkeypatch.setattr(callback_module, "evaluate", fails_after_quantizing)
    out = tmp_path / "artifact"
    cb = BayesQCallback(bits=3.0, method="rtn", calib_batches=2, progress=False,
                        export_dir=out)
    with pytest.raises(EvaluationError, match=f"injected.*saved in '{re.escape(str(out))}'"):
        _fit(cb, TinyData(), tmp_path)
    assert cb.result is not None and "fp32" in cb.report
    model = load_quantized(TinyNet(), out)
    x = make_data(8, seed=4).tensors[0]
    assert torch.equal(model(x), cb.result.model.eval()(x))


def _loaded(tmp_path: Path, kernel: str) -> torch.nn.Module:
    from bayesq_lightning import save_quantized

    torch.manual_seed(0)
    model = TinyNet().eval()
    result = quantize_model(model, None, BayesQConfig(method="rtn", bits=4.5,
                                                      allowed_bits=(4,)), progress=False)
    if not (tmp_path / "model.safetensors").exists():
        save_quantized(result.model, result, tmp_path)
    return load_quantized(TinyNet(), tmp_path, kernel=kernel)


@pytest.mark.skipif(not kernels.available(), reason="no CPU weight-only kernels")
def test_loaded_models_take_the_kernel_without_no_grad(tmp_path, monkeypatch):
    model = _loaded(tmp_path, "auto")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *a: calls.append(1) or real(*a))
    x = make_data(4, seed=5).tensors[0]
    model(x)
    with torch.no_grad():
        model(x)
    assert len(calls) == 2  # fc1 each time (fc2's 4 outputs stay exact)
    model.requires_grad_(True)
    model(x).sum().backward()
    assert len(calls) == 2  # gradients wanted: the exact path only
    exact = _loaded(tmp_path, "exact").requires_grad_(True)
    exact(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), exact.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.skipif(not kernels.available(), reason="no CPU weight-only kernels")
def test_set_kernel_names_each_layers_path_and_warns_about_grad_once(tmp_path):
    model = _loaded(tmp_path, "exact")
    with pytest.warns(UserWarning, match="keep the exact path") as caught:
        paths = set_kernel(model, "auto")
    assert len(caught) == 1 and "no_grad" not in str(caught[0].message)  # nothing needs grad
    assert paths["fc1"] == "int4" and paths["fc2"].startswith("exact: out_features=4")
    assert paths["conv"].startswith("exact: a conv2d layer")
    model.requires_grad_(True)
    with pytest.warns(UserWarning, match="only under torch.no_grad") as caught:
        set_kernel(model, "auto")
    assert len(caught) == 1 and "keep the exact path" in str(caught[0].message)


def test_allocation_plot_geometry_follows_the_weights():
    model = TinyNet().eval()
    result = quantize_model(model, None, BayesQConfig(method="rtn", bits=3.0), progress=False)
    starts, widths, budget = allocation_geometry(result)
    sizes = [x.n_weights for x in result.layers]
    assert widths == pytest.approx([n / sum(sizes) for n in sizes])
    assert starts[0] == 0 and starts[-1] + widths[-1] == pytest.approx(1.0)
    assert budget == pytest.approx(result.budget_bits / result.n_weights)
    assert budget == pytest.approx(3.0, abs=1e-3)


def test_quiet_silences_only_inside_and_log_interval():
    tip = logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, "", 0,
                            "💡 Tip: install something", None, None)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning,
                          stacklevel=1)
            assert not logger.filter(tip)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning,
                      stacklevel=1)
    assert len(caught) == 1 and logger.filter(tip)
    assert log_interval(19, 50) == 19 and log_interval(200, 50) == 50
    assert log_interval(float("inf"), 50) == 50


def test_transformers_bars_follow_the_terminal_rule(monkeypatch):
    from transformers.utils import logging as hf_logging

    from bayesq_lightning import progress

    hf_logging.enable_progress_bar()
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    with progress.transformers_bars():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    with progress.transformers_bars():
        assert hf_logging.is_progress_bar_enabled()
