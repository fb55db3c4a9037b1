"""Shared benchmark plumbing: cached trained models, evaluation, and table/JSON/CSV output."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from bayesq_lightning import BayesQConfig, quantize_model
from bayesq_lightning.datasets.fashion import FashionMNISTDataModule
from bayesq_lightning.lightning.data import DigitsDataModule
from bayesq_lightning.lightning.models import DigitsCNN, SmallResNet
from bayesq_lightning.metrics import evaluate

CACHE = Path(os.environ.get("BAYESQ_BENCH_CACHE", ".cache/bench"))  # as frontier.py's
RESULTS = Path("benchmarks/results")


def _train(model: pl.LightningModule, dm: pl.LightningDataModule, epochs: int) -> None:
    pl.seed_everything(0, workers=True)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, deterministic=True)
    trainer.fit(model, dm)


def trained(name: str) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The benchmark model ``name`` ("digits" | "fashion"), trained once and cached on disk."""
    if name == "digits":
        model, dm, epochs = DigitsCNN(), DigitsDataModule(batch_size=64), 15
    elif name == "fashion":
        model, dm, epochs = SmallResNet(), FashionMNISTDataModule(batch_size=128), 2
    else:
        raise ValueError(f"unknown benchmark model {name!r}")
    dm.setup()
    path = CACHE / f"{name}.safetensors"
    if path.exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path))
    else:
        t0 = time.perf_counter()
        _train(model, dm, epochs)
        CACHE.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        print(f"trained {name} in {time.perf_counter() - t0:.0f} s, cached at {path}")
    return model.eval(), dm


def run_config(
    model: torch.nn.Module, calib: DataLoader, val: DataLoader, cfg: BayesQConfig,
    n_data: int, tags: dict,
) -> dict:
    """Quantize with ``cfg`` and evaluate; one row of a benchmark table."""
    t0 = time.perf_counter()
    res = quantize_model(model, calib, cfg, n_data=n_data, progress=False)
    seconds = time.perf_counter() - t0
    metrics = evaluate(res.model, val)
    return {**tags, "bits": cfg.bits, "bits_per_weight": res.bits_per_weight,
            "code_bits_per_weight": res.code_bits_per_weight, **metrics, "seconds": seconds,
            "alloc": "/".join(str(b.bits) for x in res.layers for b in x.blocks)[:60]}


def write_table(rows: Sequence[dict], name: str, columns: Sequence[str],
                quiet: bool = False) -> str:
    """Print ``rows`` as a fixed-width table and write them to ``benchmarks/results/name.*``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(list(rows), indent=2))
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    fmt: dict[str, Callable] = {float: lambda v: f"{v:.4f}", int: str, str: str}
    cells = [[fmt.get(type(r.get(c)), str)(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    text = "\n".join(lines)
    if quiet:
        return text
    print(text)
    print(f"wrote {RESULTS / name}.json and .csv")
    return text
