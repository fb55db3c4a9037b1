"""`make demo`: train a small CNN on scikit-learn's digits, quantize it with BayesQ at 3 bits.

Prints the per-layer allocation and FP32 / BayesQ / round-to-nearest / GPTQ at the same budget
(accuracy, NLL, ECE, stored bits per weight with metadata); writes the summary as JSON and the
allocation as a bar chart under ``artifacts/demo``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from bayesq_lightning import BayesQCallback
from bayesq_lightning.lightning.data import DigitsDataModule
from bayesq_lightning.lightning.models import DigitsCNN


def summary_rows(cb: BayesQCallback) -> list[dict]:
    rep = cb.report
    rows = [{"method": "fp32", "bits_per_weight": 32.0, "code_bits_per_weight": 32.0,
             **rep["fp32"]}]
    rows.append({"method": "bayesq", "bits_per_weight": cb.result.bits_per_weight,
                 "code_bits_per_weight": cb.result.code_bits_per_weight, **rep["quantized"]})
    for name, res in cb.baselines.items():
        rows.append({"method": name, "bits_per_weight": res.bits_per_weight,
                     "code_bits_per_weight": res.code_bits_per_weight,
                     **rep["baselines"][name]})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'method':<8} {'bits/w (meta incl.)':>19} {'code bits/w':>11} {'accuracy':>9} " \
           f"{'NLL':>7} {'ECE':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<8} {r['bits_per_weight']:>19.3f} "
                     f"{r['code_bits_per_weight']:>11.3f} {r['accuracy']:>9.4f} "
                     f"{r['nll']:>7.4f} {r['ece']:>7.4f}")
    return "\n".join(lines)


def plot_allocation(cb: BayesQCallback, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {"bayesq": cb.result, **cb.baselines}
    names = [x.name for x in cb.result.layers]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(results)
    for i, (method, res) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(names))],
               [x.bits_per_weight for x in res.layers], width, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=20)
    ax.set_ylabel("stored bits / weight")
    ax.set_title(f"Allocation at {cb.config.bits} bits/weight (metadata included)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("artifacts/demo"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pl.seed_everything(0, workers=True)

    dm = DigitsDataModule(batch_size=64)
    model = DigitsCNN()
    cb = BayesQCallback(bits=args.bits, compare=("rtn", "gptq"), export_dir=args.out / "model")
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[cb],
        logger=pl.loggers.CSVLogger(args.out, name="logs"), enable_checkpointing=False,
        deterministic=True, enable_model_summary=False,
    )
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - t0

    rows = summary_rows(cb)
    print("\nPer-layer allocation (BayesQ):")
    print(cb.result.table())
    print(f"\nDigits CNN, budget {args.bits} bits/weight (metadata included), "
          f"{cb.result.n_weights} quantized weights, validation set of 360 images:")
    print(format_rows(rows))
    info = cb.result.info
    print(f"\nposterior: {info['structure']} Laplace ({info['backend']}), prior precision "
          f"{info['prior_precision']:.3g} by marginal likelihood, n_data={info['n_data']}, "
          f"n_calib={info['n_calib']}; fit+quantize took {info['seconds']:.1f} s; "
          f"train+quantize {seconds:.1f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"bits": args.bits, "rows": rows,
               "layers": [{"name": x.name, "bits": x.bits, "bits_per_weight": x.bits_per_weight,
                           "expected_loss": x.expected_loss} for x in cb.result.layers],
               "info": {k: v for k, v in info.items() if k != "config"}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_allocation(cb, args.out / "allocation.png")
    print(f"wrote {args.out / 'summary.json'}, {args.out / 'allocation.png'} and the packed "
          f"artifact {args.out / 'model'} (load with bayesq_lightning.load_quantized)")


if __name__ == "__main__":
    main()
