"""`make demo`: train a small CNN on scikit-learn's digits, quantize it, and show what BayesQ buys.

1. Trains a narrow digits CNN with ``BayesQCallback`` attached (calibration and curvature from the
   datamodule's hold-out split, which is neither trained on nor evaluated), at a tight budget,
   with round-to-nearest, MSE and GPTQ compared at the same bytes.
2. Distils the quantized model toward the posterior predictive on the calibration inputs alone
   (``distill`` after ``fit`` returns) and reports accuracy / NLL / ECE before and after.
3. Sweeps the budget from the cheapest feasible allocation up to 3 bits per weight for every
   method (the posterior is fitted once and reused) and prints the frontier: test accuracy with
   its bootstrap standard error, and the paired difference to GPTQ.

Writes ``artifacts/demo/{summary.json, frontier.png, allocation.png}`` and the packed artifact.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from bayesq_lightning import BayesQCallback, DistillConfig, distill
from bayesq_lightning.lightning.data import DigitsDataModule
from bayesq_lightning.lightning.models import DigitsCNN
from bayesq_lightning.report import plot_allocation, plot_frontier
from bayesq_lightning.sweep import paired_differences, sweep

METHODS = {"rtn": {"method": "rtn"}, "mse": {"method": "mse"}, "gptq": {"method": "gptq"},
           "bayesq kron": {}}


class KeepFP32(Callback):
    """Snapshot the trained FP32 weights before BayesQ packs the module (listed first)."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def format_frontier(rows: list[dict]) -> str:
    head = (f"{'method':<12} {'budget':>6} {'bits/w':>7} {'accuracy':>15} {'vs gptq (paired)':>18}"
            f" {'NLL':>7} {'ECE':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        budget = "" if r["method"] == "fp32" else f"{r['bits']:.2f}"
        d = (f"{100 * r['d_gptq']:+.1f} ± {100 * r['d_gptq_se']:.1f} pt"
             if "d_gptq" in r else "")
        lines.append(f"{r['method']:<12} {budget:>6} {r['bits_per_weight']:>7.3f} "
                     f"{r['accuracy']:>8.4f} ± {r['accuracy_se']:.3f} {d:>18} "
                     f"{r['nll']:>7.4f} {r['ece']:>7.4f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=float, default=2.15, help="the callback's budget")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("artifacts/demo"))
    args = parser.parse_args()
    pl.seed_everything(0, workers=True)

    dm = DigitsDataModule(batch_size=64)
    # a narrow CNN (23k weights in five layers): little redundancy, so 2-bit choices show
    model = DigitsCNN(channels=(8, 16, 32), hidden=32)
    keep = KeepFP32()
    cb = BayesQCallback(bits=args.bits, compare=("rtn", "mse", "gptq"),
                        export_dir=args.out / "model", overwrite=True)  # the demo's own output
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[keep, cb],
        logger=pl.loggers.CSVLogger(args.out, name="logs"), enable_checkpointing=False,
        deterministic=True, enable_model_summary=False,
    )
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    fit_seconds = time.perf_counter() - t0
    print("\nPer-layer allocation (BayesQ):")
    print(cb.result.table())
    info = cb.result.info
    # K-FAC's prior precision is solved when first read (here; the quantization never reads it)
    print(f"posterior: {info['structure']} Laplace ({info['backend']}), prior precision "
          f"{cb.result.posterior.prior_precision:.3g} by marginal likelihood, "
          f"n_data={info['n_data']}, "
          f"curvature on the {info['n_calib']}-image calibration hold-out; "
          f"quantize {info['seconds']:.1f} s")

    # calibration-only distillation toward the posterior predictive: a second Trainer.fit
    t2 = time.perf_counter()
    drep = distill(trainer, cb, DistillConfig(), enable_progress_bar=False)
    distill_seconds = time.perf_counter() - t2
    print(f"\nDistillation toward the posterior predictive ({drep['n_calibration']} calibration "
          f"images; the loss sees no label; teacher temperature {drep['teacher_temperature']:g}, kept epoch "
          f"{drep['best_epoch']} of {DistillConfig.epochs}; {distill_seconds:.1f} s), test split:")
    for key in ("fp32", "teacher", "quantized", "distilled"):
        m = cb.report[key]
        print(f"  {key:<10} accuracy {m['accuracy']:.4f}  NLL {m['nll']:.4f}  ECE {m['ece']:.4f}")

    fp32 = DigitsCNN(channels=(8, 16, 32), hidden=32)
    fp32.load_state_dict(keep.state)
    fp32.eval()
    cheapest = math.ceil(100 * cb.result.info["min_bits_per_weight"]) / 100
    budgets = sorted({b for b in (cheapest, 2.2, 2.5, 3.0) if b >= cheapest})
    t1 = time.perf_counter()
    rows = paired_differences(sweep(fp32, dm.calibration_dataloader(), dm.test_dataloader(),
                                    budgets, METHODS, n_data=len(dm.train_set)), "gptq")
    sweep_seconds = time.perf_counter() - t1
    n_test = len(dm.test_set)
    print(f"\nFrontier on the digits test split ({n_test} images; ± is the bootstrap standard "
          "error, 'vs gptq' the paired difference at the same budget, metadata included):")
    print(format_frontier(rows))

    args.out.mkdir(parents=True, exist_ok=True)
    plot_frontier(rows, args.out / "frontier.png")
    plot_allocation({"bayesq": cb.result, **cb.baselines}, args.out / "allocation.png",
                    f"Allocation at {args.bits} bits/weight (metadata included)")
    summary = {"bits": args.bits, "report": cb.report, "frontier": rows,
               "layers": [{"name": x.name, "bits": x.bits, "bits_per_weight": x.bits_per_weight,
                           "expected_loss": x.expected_loss} for x in cb.result.layers],
               "distill": drep, "seconds": {"train_and_quantize": fit_seconds,
                                            "distill": distill_seconds,
                                            "frontier_sweep": sweep_seconds}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\ntrain+quantize {fit_seconds:.1f} s, frontier sweep {sweep_seconds:.1f} s; wrote "
          f"{args.out / 'summary.json'}, {args.out / 'frontier.png'}, "
          f"{args.out / 'allocation.png'} and the packed artifact {args.out / 'model'} "
          "(load with bayesq_lightning.load_quantized)")


if __name__ == "__main__":
    main()
