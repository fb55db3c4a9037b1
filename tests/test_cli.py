"""The ``bayesq`` command: help, fit then quantize / distill on a tiny config, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from bayesq_lightning import load_quantized
from bayesq_lightning.lightning.cli import main
from bayesq_lightning.lightning.data import DigitsDataModule
from bayesq_lightning.lightning.models import DigitsCNN
from bayesq_lightning.metrics import evaluate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "limit_train_batches": 6,
                "enable_model_summary": False, "enable_progress_bar": False, "logger": False},
    "model": {"class_path": "bayesq_lightning.lightning.models.DigitsCNN",
              "init_args": {"channels": [4, 8, 8], "hidden": 16}},
    "data": {"class_path": "bayesq_lightning.lightning.data.DigitsDataModule",
             "init_args": {"calib_samples": 128}},
    "bayesq": {"config": {"bits": 3.0, "calib_batches": 2}, "progress": False},
}


def _config(tmp_path: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    for dotted, value in changes.items():
        node, *path, leaf = dotted.split(".")
        d = cfg[node]
        for p in path:
            d = d.setdefault(p, {})
        d[leaf] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """``bayesq fit`` on the tiny config: (config, checkpoint)."""
    tmp = tmp_path_factory.mktemp("cli")
    cfg = _config(tmp)
    main(["fit", "--config", str(cfg)])
    ckpts = sorted((tmp / "run").rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    return cfg, ckpts[-1]


def test_help_lists_the_subcommands_and_their_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "quantize" in out and "distill" in out and "fit" in out
    for sub, options in (("quantize", ("--ckpt_path", "--output_dir", "--bayesq.config.bits",
                                       "--bayesq.compare")),
                         ("distill", ("--distillation.epochs", "--distillation.teacher", "--ckpt_path"))):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        text = capsys.readouterr().out
        for opt in options:
            assert opt in text, (sub, opt)


def test_fit_then_quantize_writes_artifact_report_and_plot(fitted, tmp_path):
    cfg, ckpt = fitted
    out = tmp_path / "q"
    main(["quantize", "--config", str(cfg), "--ckpt_path", str(ckpt), "--output_dir", str(out)])
    for name in ("model.safetensors", "bayesq.json", "report.json", "allocation.png",
                 "config.yaml"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["bits_per_weight"] <= 3.0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["bayesq"]["config"]["bits"] == 3.0
    # the artifact evaluates to the reported quantized metrics
    dm = DigitsDataModule(calib_samples=128)
    dm.setup()
    model = load_quantized(DigitsCNN(channels=(4, 8, 8), hidden=16), out)
    got = evaluate(model, dm.val_dataloader())
    assert got["accuracy"] == pytest.approx(report["quantized"]["accuracy"])
    assert got["nll"] == pytest.approx(report["quantized"]["nll"], rel=1e-5)


def test_quantize_uses_the_checkpoint_weights(fitted, tmp_path):
    cfg, ckpt = fitted
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["head.3.bias"] = state["state_dict"]["head.3.bias"] + 3 * torch.arange(10)
    changed = tmp_path / "changed.ckpt"
    torch.save(state, changed)
    reports = []
    for path, sub in ((ckpt, "a"), (changed, "b")):
        main(["quantize", "--config", str(cfg), "--ckpt_path", str(path), "--output_dir",
              str(tmp_path / sub)])
        reports.append(json.loads((tmp_path / sub / "report.json").read_text()))
    assert reports[0]["fp32"] != reports[1]["fp32"]
    assert reports[0]["quantized"] != reports[1]["quantized"]


def test_distill_subcommand(fitted, tmp_path):
    cfg, ckpt = fitted
    out = tmp_path / "d"
    main(["distill", "--config", str(cfg), "--ckpt_path", str(ckpt), "--output_dir", str(out),
          "--distillation.epochs", "1"])
    report = json.loads((out / "report.json").read_text())
    assert {"fp32", "quantized", "distilled", "teacher", "distill"} <= set(report)
    assert report["distill"]["teacher"] == "posterior-glm"
    dm = DigitsDataModule(calib_samples=128)
    dm.setup()
    model = load_quantized(DigitsCNN(channels=(4, 8, 8), hidden=16), out)  # the distilled model
    assert evaluate(model, dm.val_dataloader())["nll"] == pytest.approx(
        report["distilled"]["nll"], rel=1e-5)
    assert yaml.safe_load((out / "config.yaml").read_text())["distillation"]["epochs"] == 1


def test_bundled_configs_parse():
    for path in sorted(CONFIGS.glob("*.yaml")):
        with pytest.raises(SystemExit) as e:
            main(["fit", "--config", str(path), "--print_config"])
        assert e.value.code in (None, 0), path


def test_unknown_option_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(_config(tmp_path, **{"bayesq.config.nope": 3}))])
    assert e.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_checkpoint_of_another_model_is_refused(fitted, tmp_path):
    cfg, _ = fitted
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": DigitsCNN(channels=(4, 8, 16), hidden=16).state_dict()}, wrong)
    with pytest.raises(ValueError, match="different model"):
        main(["quantize", "--config", str(cfg), "--ckpt_path", str(wrong)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["quantize", "--config", str(cfg), "--ckpt_path", str(tmp_path / "none.ckpt")])


def test_missing_data_and_model_directories_fail_before_work(tmp_path):
    fashion = _config(tmp_path, **{
        "data.class_path": "bayesq_lightning.datasets.fashion.FashionMNISTDataModule",
        "data.init_args": {"root": str(tmp_path / "no_fashion")}})
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        main(["fit", "--config", str(fashion)])
    hf = _config(tmp_path, **{
        "model.class_path": "bayesq_lightning.lightning.models.HFSequenceClassifier",
        "model.init_args": {"model_dir": str(tmp_path / "no_model")}})
    # jsonargparse re-raises the model's error as a ValueError carrying its message
    with pytest.raises((FileNotFoundError, ValueError), match="no_model' does not exist"):
        main(["fit", "--config", str(hf)])
