"""Ablation of BayesQ's design choices at equal stored bytes (metadata included).

For the digits CNN and a ResNet-style CNN on Fashion-MNIST, at 2.5 / 3.0 / 3.5 bits per weight:
uniform vs non-uniform vs auto quantizers; closed-form vs Monte-Carlo tables (K-FAC and diagonal
posteriors); posterior-whitened vs unweighted MSE (``method="mse"``: the same pipeline with unit
precision) vs min-max RTN, GPTQ and HAWQ; greedy vs exact (DP) allocation. Prints the table and writes benchmarks/results/ablation.{json,csv}.

Run with ``make bench`` (or ``python benchmarks/ablation.py [--models digits] [--bits 3.0]``).
Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import run_config, trained, write_table  # noqa: E402

from bayesq_lightning import BayesQConfig  # noqa: E402
from bayesq_lightning.metrics import evaluate  # noqa: E402

VARIANTS: dict[str, dict] = {
    "bayesq (default: kron, uniform)": {},
    "bayesq nonuniform": {"quantizer": "nonuniform"},
    "bayesq auto": {"quantizer": "auto"},
    "bayesq mc tables": {"tables": "mc"},
    "bayesq dp solver": {"solver": "dp"},
    "bayesq diag": {"structure": "diag"},
    "bayesq diag mc tables": {"structure": "diag", "tables": "mc"},
    "mse (no posterior)": {"method": "mse"},
    "mse nonuniform": {"method": "mse", "quantizer": "nonuniform"},
    "rtn min-max": {"method": "rtn"},
    "gptq": {"method": "gptq"},
    "hawq": {"method": "hawq"},
}


COLUMNS = ["model", "bits", "variant", "bits_per_weight", "accuracy", "nll", "ece", "seconds",
           "alloc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["digits", "fashion"])
    parser.add_argument("--bits", nargs="+", type=float, default=[2.5, 3.0, 3.5])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--name", default="ablation")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        model, dm = trained(name)
        calib, val = dm.calibration_dataloader(), dm.val_dataloader()
        n_data = len(dm.train_set)
        fp32 = evaluate(model, val)
        rows.append({"model": name, "variant": "fp32", "bits": 32.0, "bits_per_weight": 32.0,
                     "code_bits_per_weight": 32.0, **fp32, "seconds": 0.0, "alloc": ""})
        for bits in args.bits:
            for variant in args.variants:
                cfg = BayesQConfig(bits=bits, **VARIANTS[variant])
                row = run_config(model, calib, val, cfg, n_data, {"model": name, "variant": variant})
                rows.append(row)
                print(f"{name} {bits} {variant}: acc {row['accuracy']:.4f} "
                      f"nll {row['nll']:.4f} ({row['seconds']:.1f} s)", flush=True)
                write_table(rows, args.name, COLUMNS, quiet=True)  # partial results survive
    write_table(rows, args.name, COLUMNS)


if __name__ == "__main__":
    main()
