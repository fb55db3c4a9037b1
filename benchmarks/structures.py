"""Posterior structure benchmark: BayesQ diag vs kron vs low-rank vs GPTQ at equal bytes.

On the ResNet-style Fashion-MNIST CNN (trained and cached by ``benchmarks/common.py``), at
2.5 / 3.0 / 3.5 bits per weight (metadata included), every method on the same uniform quantizer,
the same knapsack and the same budget: accuracy, NLL, ECE, preprocessing seconds (posterior or
Hessians, tables, allocation) and the peak resident memory of the process. Each row runs in a
fresh process so that its peak memory is its own. Writes benchmarks/results/structures.{json,csv}.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

METHODS = {
    "bayesq diag": {"structure": "diag"},
    "bayesq kron": {"structure": "kron"},
    "bayesq lowrank": {"structure": "lowrank"},
    "gptq": {"method": "gptq"},
    "rtn": {"method": "rtn"},
}


def _row(args: tuple[str, str, float]) -> dict:
    model_name, method, bits = args
    import torch
    from common import run_config, trained

    from bayesq_lightning import BayesQConfig

    torch.manual_seed(0)
    model, dm = trained(model_name)
    row = run_config(model, dm.calibration_dataloader(), dm.val_dataloader(),
                     BayesQConfig(bits=bits, **METHODS[method]), len(dm.train_set),
                     model=model_name, method=method)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="fashion")
    parser.add_argument("--bits", nargs="+", type=float, default=[2.5, 3.0, 3.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    from common import trained, write_table

    trained(args.model)  # train and cache once, outside the measured processes
    jobs = [(args.model, m, b) for b in args.bits for m in args.methods]
    rows = []
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for row in pool.imap(_row, jobs):
            print(f"{row['method']} {row['bits']}: acc {row['accuracy']:.4f} "
                  f"({row['seconds']:.1f} s, {row['peak_rss_mb']:.0f} MB)", flush=True)
            rows.append(row)
    write_table(rows, "structures", ["model", "bits", "method", "bits_per_weight", "accuracy",
                                     "nll", "ece", "seconds", "peak_rss_mb"])


if __name__ == "__main__":
    main()
