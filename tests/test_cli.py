"""The ``bayesq`` command: help, fit then quantize / distill on a tiny config, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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


def _fails(args: list[str], capsys, code: int = 1) -> str:
    """The one line ``main(args)`` prints before exiting with ``code``."""
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == code
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1, err
    return err[0]


def test_checkpoint_of_another_model_is_refused(fitted, tmp_path, capsys):
    cfg, ckpt = fitted
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": DigitsCNN(channels=(4, 8, 16), hidden=16).state_dict()}, wrong)
    args = ["quantize", "--config", str(cfg), "--ckpt_path", str(wrong), "--output_dir",
            str(tmp_path / "out")]
    line = _fails(args, capsys)
    assert "different model" in line and "features.3.0.weight" in line  # the key named
    with pytest.raises(ValueError, match="different model"):  # the flag shows the traceback
        main([*args, "--traceback"])
    line = _fails(["quantize", "--config", str(cfg), "--ckpt_path", "model.ckpt"], capsys)
    assert "'model.ckpt' does not exist" in line and str(ckpt) in line  # where fit saved
    assert not (tmp_path / "out").exists()


def test_quantize_never_overwrites_without_the_flag(fitted, tmp_path, capsys):
    cfg, ckpt = fitted
    main(["quantize", "--config", str(cfg)])  # the newest checkpoint, into its version dir
    out = ckpt.parent.parent / "quantize-3b"
    assert json.loads((out / "report.json").read_text())["checkpoint"] == str(ckpt)
    printed = capsys.readouterr().out
    for text in ("fp32", "quantized", "bits/weight", str(ckpt), str(out / "report.json")):
        assert text in printed, text
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = _fails(["quantize", "--config", str(cfg)], capsys)
    assert "already holds an artifact" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written
    line = _fails(["distill", "--config", str(cfg), "--output_dir", str(out)], capsys)
    assert "--overwrite" in line
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    line = _fails(["quantize", "--config", str(cfg), "--output_dir", str(other), "--overwrite"],
                  capsys)
    assert "not a bayesq artifact" in line and sorted(os.listdir(other)) == ["notes.txt"]
    main(["quantize", "--config", str(cfg), "--overwrite", "--bayesq.config.method", "rtn"])
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert json.loads((out / "report.json").read_text())["info"]["method"] == "rtn"


@pytest.mark.parametrize(("options", "named", "not_named"), [
    ((), "--bayesq.config.bits", "allow"),  # 2 bits allowed: only a larger budget helps
    (("--bayesq.config.allowed_bits", "[4, 8]"), "--bayesq.config.allowed_bits", "`bits`"),
], ids=["every-width-allowed", "narrow-widths-excluded"])
def test_an_infeasible_budget_names_the_options_to_type(fitted, tmp_path, capsys, options,
                                                        named, not_named):
    cfg, ckpt = fitted
    out = tmp_path / "q"
    line = _fails(["quantize", "--config", str(cfg), "--output_dir", str(out),
                   "--bayesq.config.method", "rtn", "--bayesq.config.bits", "1.0", *options],
                  capsys)
    assert "infeasible" in line and "raise --bayesq.config.bits to at least" in line
    assert named in line and not_named not in line and not out.exists()


def test_no_checkpoint_names_the_places_searched(tmp_path, capsys):
    cfg = _config(tmp_path)
    line = _fails(["quantize", "--config", str(cfg)], capsys)
    assert "no --ckpt_path given" in line and str(tmp_path / "run") in line


def test_help_reads_on_one_screen(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    assert not re.search(r":[a-z]+:`|``|\\[a-z]+\{", text), "reStructuredText or LaTeX in help"
    head = "\n".join(text.splitlines()[:40])
    assert "Quantize a trained checkpoint" in head and "example:" in head
    for option in ("--config", "--ckpt_path", "--output_dir", "--bayesq.config.bits"):
        entry = re.search(rf"^  (-c CONFIG, )?{re.escape(option)} \S+\n +\S", head, re.M)
        assert entry, f"{option} and its description are not in the first 40 lines"


@pytest.mark.parametrize(("option", "suggested"), [
    ("--bayesq.config.bit", "--bayesq.config.bits"),  # an abbreviation is not accepted
    ("--bayesq.config.bitz", "--bayesq.config.bits"),
    ("--trainer.max_epoch", "--trainer.max_epochs")])
def test_unknown_or_abbreviated_option_gets_one_line_and_a_suggestion(option, suggested,
                                                                      capsys):
    line = _fails(["fit", option, "3"], capsys, code=2)
    assert f"did you mean {suggested}?" in line
    assert "usage" not in capsys.readouterr().err


def test_missing_data_and_model_directories_fail_before_work(tmp_path, capsys):
    fashion = _config(tmp_path, **{
        "data.class_path": "bayesq_lightning.datasets.fashion.FashionMNISTDataModule",
        "data.init_args": {"root": str(tmp_path / "no_fashion")}})
    assert "dataset-fashion-mnist" in _fails(["fit", "--config", str(fashion)], capsys)
    hf = _config(tmp_path, **{
        "model.class_path": "bayesq_lightning.lightning.models.HFSequenceClassifier",
        "model.init_args": {"model_dir": str(tmp_path / "no_model")}})
    assert "no_model' does not exist" in _fails(["fit", "--config", str(hf)], capsys)


SCRIPT = """import logging
from bayesq_lightning.lightning.cli import main
main()
print("root logging handlers:", len(logging.root.handlers))
"""


def test_fit_on_the_digits_config_prints_results_and_no_warning(tmp_path):
    """The console command as a user runs it, output not a terminal; importing laplace-torch on
    the way left the root logger without a handler (through which records would print twice)."""
    env = {**os.environ, "PYTHONPATH": str(CONFIGS.parent), "COLUMNS": "100"}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, "fit",
         "--config", str(CONFIGS / "digits_cnn.yaml"), "--trainer.max_epochs", "2",
         "--trainer.default_root_dir", str(tmp_path), "--bayesq.compare", "[rtn]"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    out = run.stdout + run.stderr
    version = tmp_path / "lightning_logs" / "version_0"
    ckpt = next((version / "checkpoints").glob("*.ckpt"))
    for text in ("accuracy", "fp32", "quantized", "rtn", f"checkpoint: {ckpt}",
                 f"artifact:   {version / 'bayesq'}", f"report:     {version / 'bayesq'}"):
        assert text in out, text
    assert not re.search(r"Warning|warn\(|\.py:\d+: |Tip:", out), out
    assert not list(CONFIGS.parent.glob("lightning_logs"))  # nothing inside the checkout
    assert (version / "bayesq" / "allocation.png").is_file()
    assert "root logging handlers: 0" in run.stdout
