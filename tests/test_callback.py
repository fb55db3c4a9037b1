from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, make_data
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from bayesq_lightning import BayesQCallback, load_quantized
from bayesq_lightning.artifact import QuantizedConv2d, QuantizedLinear
from bayesq_lightning.metrics import evaluate
from bayesq_lightning.quantizers import dequantize


class TinyData(pl.LightningDataModule):
    def __init__(self, with_calibration: bool) -> None:
        super().__init__()
        self.with_calibration = with_calibration
        self.calls = 0

    def train_dataloader(self):
        return DataLoader(make_data(256, seed=0), batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(make_data(128, seed=1), batch_size=64)

    def __getattr__(self, name):
        if name == "calibration_dataloader" and self.__dict__.get("with_calibration"):
            def calibration_dataloader():
                self.calls += 1
                return DataLoader(make_data(64, seed=2), batch_size=16)
            return calibration_dataloader
        return super().__getattr__(name)


def _trainer(cb, tmp_path, **kw):
    return pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, callbacks=[cb], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        logger=CSVLogger(tmp_path, name="logs"), **kw,
    )


@pytest.mark.parametrize("with_calibration", [False, True])
def test_callback_quantizes_the_trained_module(tmp_path, with_calibration):
    torch.manual_seed(0)
    model, dm = TinyNet(), TinyData(with_calibration)
    cb = BayesQCallback(bits=3.0, compare=("rtn",), calib_batches=4, progress=False,
                        export_dir=tmp_path / "artifact")
    trainer = _trainer(cb, tmp_path)
    trainer.fit(model, dm)

    res = cb.result
    assert res is not None and res.bits_per_weight <= 3.0
    assert dm.calls == 2 * int(with_calibration)  # probed when training starts, then used
    # calibration: 4 batches of the train loader (128 samples) or the 64 calibration samples
    assert res.info["n_calib"] == (64 if with_calibration else 128)
    assert res.info["n_data"] == 256  # the training set the posterior stands for
    modules = dict(model.named_modules())
    for layer in res.layers:  # the user's module now holds the quantized weights
        w = modules[layer.name].weight.detach()
        assert torch.equal(w, dequantize(layer.blocks[0]).reshape(w.shape))
    for key in ("fp32", "quantized"):
        assert set(cb.report[key]) == {"accuracy", "nll", "ece"}
    # the report is the quantized module's metrics on the validation data, recomputed here
    val = dm.val_dataloader()
    assert cb.report["quantized"] == evaluate(model, val)
    assert cb.report["baselines"]["rtn"] == evaluate(cb.baselines["rtn"].model, val)
    assert cb.report["fp32"]["accuracy"] > 0.5
    assert set(cb.report["baselines"]) == {"rtn"}
    assert cb.baselines["rtn"].bits_per_weight <= 3.0

    trainer.loggers[0].save()
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    for name in ("bayesq/quantized/accuracy", "bayesq/fp32/ece", "bayesq/rtn/nll",
                 "bayesq/bits_per_weight", "bayesq/layers/fc1/bits_per_weight"):
        assert name in metrics

    # the module is really packed, and the artifact reloads into a fresh instance exactly
    assert isinstance(model.fc1, QuantizedLinear) and isinstance(model.conv, QuantizedConv2d)
    fresh = load_quantized(TinyNet(), tmp_path / "artifact")
    x = make_data(16, seed=3).tensors[0]
    model.eval()
    assert torch.equal(fresh.eval()(x), model(x))

    state = cb.state_dict()
    assert [x["name"] for x in state["result"]["layers"]] == [x.name for x in res.layers]
    ckpt = tmp_path / "after.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = torch.load(ckpt, weights_only=True)
    assert any("BayesQCallback" in k for k in loaded["callbacks"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": -1.0}, "positive finite"),
        ({"allowed_bits": (2, 6)}, "unsupported bit-width 6"),
        ({"compare": ("bayesq",)}, "other than method"),
        ({"compare": ("nope",)}, "each entry must be a method"),
        ({"calib_batches": 0}, "positive integer"),
    ],
)
def test_callback_validates_arguments_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BayesQCallback(**kwargs)


def test_callback_infeasible_budget_fails_loudly(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    cb = BayesQCallback(bits=1.0, progress=False, evaluate=False)
    with pytest.raises(ValueError, match="infeasible"):
        _trainer(cb, tmp_path).fit(model, TinyData(False))
