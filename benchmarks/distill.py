"""Calibration-only distillation: what it recovers, and which teacher it should follow.

On the frontier benchmark's cases (``fashion_resnet``, ``minilm_sentiment``; see
``benchmarks/frontier.py``) at the tight budget (where BayesQ loses at least 2 points to FP32)
and at 3.0 bits, every row is measured on the same test split, disjoint from the calibration
hold-out that provides curvature, calibration and the distillation inputs:

* ``fp32``; the teachers ``teacher posterior-glm`` (last-layer GLM predictive, probit link) and
  ``teacher posterior-samples`` (mean softmax of posterior weight draws);
* ``bayesq`` before distillation, after distillation toward each posterior teacher and toward
  the FP32 teacher;
* ``rtn`` before and after the same distillation toward the posterior teacher (so a gain is
  attributed to distillation, not to BayesQ's allocation).

Accuracy carries its bootstrap SE; ``d_bayesq`` is the accuracy difference to BayesQ before
distillation at the same budget, with its paired bootstrap SE. ``post_vs_fp32_*`` compares the
two teachers' students on NLL and ECE, paired (same resampled examples). ``s/epoch`` is the
median seconds per distillation epoch.

Usage::

    python benchmarks/distill.py                        # both cases (about 15 min on 2 threads)
    python benchmarks/distill.py --cases fashion_resnet --epochs 5
    python benchmarks/distill.py --posterior-temperature 1 --name distill_t1   # untuned teachers
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from frontier import BUDGETS, CASES  # noqa: E402
from frontier import markdown as frontier_markdown  # noqa: E402

from bayesq_lightning import BayesQConfig, DistillConfig, distill_model, quantize_model  # noqa: E402
from bayesq_lightning.batches import clone_module  # noqa: E402
from bayesq_lightning.distillation import build_teacher  # noqa: E402
from bayesq_lightning.metrics import bootstrap_se, metrics_from_logits, predict  # noqa: E402
from bayesq_lightning.report import plot_reliability  # noqa: E402

TEACHERS = {"posterior-glm": {"teacher": "posterior", "predictive": "glm"},
            "posterior-samples": {"teacher": "posterior", "predictive": "samples"},
            "fp32": {"teacher": "fp32"}}


def evaluate_full(model: torch.nn.Module, loader) -> dict:
    """Metrics plus per-example correctness / NLL and the probabilities (for paired SEs)."""
    for m in model.modules():  # decode packed weights once per pass (same outputs)
        if hasattr(m, "cache_dequantized"):
            m.cache_dequantized = True
    logits, labels = predict(model, loader)
    logp = logits.log_softmax(-1)
    return {**metrics_from_logits(logits, labels),
            "_correct": (logits.argmax(-1) == labels).double().numpy(),
            "_nll": (-logp.gather(1, labels[:, None])[:, 0]).double().numpy(),
            "_probs": logp.exp(), "_labels": labels}


def paired_ece_se(a: dict, b: dict, n_boot: int = 200, seed: int = 0) -> float:
    """Bootstrap SE of ``ECE(a) - ECE(b)`` over the same resampled examples."""
    from torchmetrics.functional.classification import multiclass_calibration_error as ece

    g = torch.Generator().manual_seed(seed)
    n, c = a["_probs"].shape
    diffs = []
    for _ in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=g)
        y = a["_labels"][idx]
        diffs.append(float(ece(a["_probs"][idx], y, c, n_bins=15) -
                           ece(b["_probs"][idx], y, c, n_bins=15)))
    return float(np.std(diffs, ddof=1))


def copy_result(res):
    """An independent copy of a QuantizationResult (model and block records)."""
    return dataclasses.replace(res, model=clone_module(res.model), layers=copy.deepcopy(res.layers))


def run_case(name: str, budgets: Sequence[float], epochs: int, lr: float,
             students: Sequence[str], posterior_temperature: float | None = None
             ) -> tuple[list[dict], dict]:
    case = CASES[name]()
    torch.manual_seed(0)
    log = lambda s: print(f"[{name}] {s}", flush=True)  # noqa: E731
    rows, ev = [], {}

    def add(method: str, bits: float, model, **extra) -> dict:
        ev[(method, bits)] = e = evaluate_full(model, case.test)
        row = {"case": name, "method": method, "bits": bits, **{k: v for k, v in e.items()
                                                                if not k.startswith("_")},
               "accuracy_se": bootstrap_se(e["_correct"]), **extra}
        rows.append(row)
        log(f"{method:>34} @ {bits:g}: acc {row['accuracy']:.4f} +- {row['accuracy_se']:.4f}, "
            f"nll {row['nll']:.4f}, ece {row['ece']:.4f}")
        return row

    add("fp32", 32.0, case.model, bits_per_weight=32.0)
    posterior = None
    reliability = {}
    for bits in budgets:
        t0 = time.perf_counter()
        bq = quantize_model(case.model, case.calib, BayesQConfig(bits=bits, **case.config),
                            n_data=case.n_data, progress=False, posterior=posterior)
        posterior = bq.posterior
        rtn = quantize_model(case.model, case.calib,
                             BayesQConfig(bits=bits, method="rtn", **case.config),
                             n_data=case.n_data, progress=False)
        log(f"quantized at {bits} in {time.perf_counter() - t0:.0f} s")
        if bits == budgets[0]:
            for t in ("posterior-glm", "posterior-samples"):
                teacher = build_teacher(
                    DistillConfig(**TEACHERS[t], posterior_temperature=posterior_temperature),
                    case.model, posterior, list(case.calib))
                add(f"teacher {t}", 32.0, teacher, bits_per_weight=32.0,
                    temperature=teacher.temperature)
        add("bayesq", bits, bq.model, bits_per_weight=bq.bits_per_weight)
        add("rtn", bits, rtn.model, bits_per_weight=rtn.bits_per_weight)
        for spec in students:
            base, teacher = spec.split(":")
            src = bq if base == "bayesq" else rtn
            res = copy_result(src)
            cfg = DistillConfig(epochs=epochs, lr=lr, posterior_temperature=posterior_temperature,
                                **TEACHERS[teacher])
            t0 = time.perf_counter()
            rep = distill_model(case.model, res, case.calib, cfg, posterior=posterior,
                                enable_progress_bar=False, accelerator="cpu", devices=1)
            add(f"{base} + distill({teacher})", bits, res.model,
                bits_per_weight=res.bits_per_weight, s_per_epoch=rep["seconds_per_epoch"],
                distill_s=time.perf_counter() - t0)
        if bits == budgets[0]:
            best = f"bayesq + distill({students[0].split(':')[1]})"
            reliability[f"{name} @ {bits:g} bits"] = {
                m: (ev[(m, b)]["_probs"], ev[(m, b)]["_labels"])
                for m, b in (("fp32", 32.0), ("bayesq", bits), (best, bits))}
    # paired comparisons, same budget
    for r in rows:
        ref = ev.get(("bayesq", r["bits"]))
        if ref is not None and r["method"] != "bayesq":
            c = ev[(r["method"], r["bits"])]["_correct"]
            r["d_bayesq"] = float((c - ref["_correct"]).mean())
            r["d_bayesq_se"] = bootstrap_se(c - ref["_correct"])
    for bits in budgets:
        a, b = (ev.get((f"bayesq + distill({t})", bits)) for t in ("posterior-glm", "fp32"))
        if a is not None and b is not None:
            row = next(r for r in rows if r["method"] == "bayesq + distill(posterior-glm)"
                       and r["bits"] == bits)
            row["post_vs_fp32_nll"] = float((a["_nll"] - b["_nll"]).mean())
            row["post_vs_fp32_nll_se"] = bootstrap_se(a["_nll"] - b["_nll"])
            row["post_vs_fp32_ece"] = a["ece"] - b["ece"]
            row["post_vs_fp32_ece_se"] = paired_ece_se(a, b)
    return rows, reliability


def markdown(rows: Sequence[dict]) -> str:
    def paired(case: str) -> list[str]:
        return [f"\nAt {r['bits']:g} bits, posterior-teacher student minus FP32-teacher "
                f"student: NLL {r['post_vs_fp32_nll']:+.4f} ± {r['post_vs_fp32_nll_se']:.4f}, "
                f"ECE {r['post_vs_fp32_ece']:+.4f} ± {r['post_vs_fp32_ece_se']:.4f} (paired SE)."
                for r in rows if r["case"] == case and "post_vs_fp32_nll" in r]

    s_per_epoch = ("s/epoch", lambda r: f"{r['s_per_epoch']:.2f}" if r.get("s_per_epoch") else "")
    return frontier_markdown(rows, "bayesq", "model", s_per_epoch, paired)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["fashion_resnet", "minilm_sentiment"],
                   choices=["fashion_resnet", "minilm_sentiment", "tiny"])
    p.add_argument("--budgets", nargs="+", type=float, default=None,
                   help="default: each case's tight frontier budget, then 3.0")
    p.add_argument("--epochs", type=int, default=DistillConfig.epochs)
    p.add_argument("--lr", type=float, default=DistillConfig.lr)
    p.add_argument("--students", nargs="+",
                   default=["bayesq:posterior-glm", "bayesq:fp32", "rtn:posterior-glm"],
                   help="BASE:TEACHER pairs; the first one's student enters the reliability plot")
    p.add_argument("--posterior-temperature", type=float, default=None,
                   help="fixed teacher temperature (default: tuned on the calibration NLL)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="distill")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows, panels = [], {}
    for name in args.cases:
        budgets = args.budgets or [BUDGETS[name][0], 3.0]
        r, rel = run_case(name, budgets, args.epochs, args.lr, args.students,
                          args.posterior_temperature)
        rows += r
        panels.update(rel)
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"seconds": seconds, "threads": args.threads, "epochs": args.epochs, "lr": args.lr,
            "posterior_temperature": args.posterior_temperature, "rows": rows}
    (args.out / f"{args.name}.json").write_text(json.dumps(meta, indent=1))
    text = markdown(rows)
    (args.out / f"{args.name}.md").write_text(text)
    plot_reliability(panels, args.out / f"{args.name}.png")
    print(text)
    print(f"{seconds:.0f} s on {args.threads} threads; wrote {args.out / args.name}.json/.md/.png")
    return rows


if __name__ == "__main__":
    main()
