"""Posterior structure benchmark: BayesQ diag vs kron vs low-rank vs GPTQ at equal bytes.

On the ResNet-style Fashion-MNIST CNN (trained and cached by ``benchmarks/common.py``), at
2.5 / 3.0 / 3.5 bits per weight (metadata included), every method on the same uniform quantizer,
the same knapsack and the same budget: accuracy, NLL, ECE, preprocessing seconds (the posterior
or GPTQ's Hessians, fitted once per method and reused across budgets, plus each budget's tables
and allocation; ``seconds`` counts both) and the peak resident memory. Each method runs in a
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


def _rows(args: tuple[str, str, list[float]]) -> list[dict]:
    """All budgets of one method in one fresh process (peak memory is the method's own)."""
    model_name, method, budgets = args
    import time

    import torch
    from common import trained

    from bayesq_lightning import BayesQConfig, quantize_model
    from bayesq_lightning.metrics import evaluate

    torch.manual_seed(0)
    model, dm = trained(model_name)
    calib, val, n_data = dm.calibration_dataloader(), dm.val_dataloader(), len(dm.train_set)
    rows, posterior = [], None
    for bits in budgets:
        t0 = time.perf_counter()
        res = quantize_model(model, calib, BayesQConfig(bits=bits, **METHODS[method]),
                             n_data=n_data, progress=False, posterior=posterior)
        seconds = time.perf_counter() - t0
        posterior = res.posterior
        info = res.info
        fit = info.get("posterior_seconds", info.get("hessian_seconds", 0.0))
        rows.append({
            "model": model_name, "method": method, "bits": bits,
            "bits_per_weight": res.bits_per_weight, **evaluate(res.model, val),
            # preprocessing: the posterior (or GPTQ's Hessians) once, plus this budget's tables
            "fit_seconds": fit, "tables_seconds": info["tables_seconds"],
            "seconds": (fit if info.get("posterior_reused") else 0.0) + seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="fashion")
    parser.add_argument("--bits", nargs="+", type=float, default=[2.5, 3.0, 3.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    from common import trained, write_table

    trained(args.model)  # train and cache once, outside the measured processes
    jobs = [(args.model, m, args.bits) for m in args.methods]
    rows = []
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for method_rows in pool.imap(_rows, jobs):
            for row in method_rows:
                print(f"{row['method']} {row['bits']}: acc {row['accuracy']:.4f} "
                      f"({row['seconds']:.1f} s, {row['peak_rss_mb']:.0f} MB)", flush=True)
            rows += method_rows
    rows.sort(key=lambda r: (r["bits"], list(METHODS).index(r["method"])))
    write_table(rows, "structures", ["model", "bits", "method", "bits_per_weight", "accuracy",
                                     "nll", "ece", "fit_seconds", "tables_seconds", "seconds",
                                     "peak_rss_mb"])


if __name__ == "__main__":
    main()
