"""Calibration-only distillation: what it recovers, whether it ever hurts, and its temperature.

On the frontier benchmark's cases (``fashion_resnet``, ``minilm_sentiment``; see
``benchmarks/frontier.py``) at the tightest budget, 2.5 and 3.0 bits, every row is measured on
the same test split, disjoint from the calibration hold-out that provides curvature,
calibration and the distillation inputs:

* ``fp32``; the teachers ``teacher posterior-glm`` (last-layer GLM predictive, probit link) and
  ``teacher posterior-samples`` (mean softmax of posterior weight draws);
* ``bayesq`` (the default) before distillation; after distillation with the defaults
  (``DistillConfig()``: step size from the student's distance to the teacher, cross-fitted
  epoch choice), and the same student with its label-free logit temperature
  (``+ temperature``, ``fit_temperature=True``);
* optional ``--students`` rows (``rtn:posterior-glm``, ``bayesq:fp32``, ...).

Every difference is paired on the same test examples: accuracy and NLL against BayesQ before
distillation (bootstrap SE of the per-example differences), ECE against BayesQ and against FP32
(bootstrap SE of the ECE difference over the same resampled examples); ``ECE ± SE`` is the
bootstrap SE of the ECE itself. ``epoch`` is the kept epoch (0: undistilled), ``gain/SE`` the
hold-out KL gain in paired SEs, ``lr`` the step size used, ``tau`` the fitted temperature.

Usage::

    python benchmarks/distill.py                        # both cases, 3 budgets (see its JSON)
    python benchmarks/distill.py --cases fashion_resnet --budgets 3.0
    python benchmarks/distill.py --students rtn:posterior-glm bayesq:fp32 --name distill_controls
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

from bayesq_lightning import BayesQConfig, DistillConfig, distill_model, quantize_model  # noqa: E402
from bayesq_lightning.artifact.temperature import set_logit_temperature  # noqa: E402
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


def ece_se(a: dict, b: dict | None = None, n_boot: int = 200, seed: int = 0) -> float:
    """Bootstrap SE of ``ECE(a)``, or of ``ECE(a) - ECE(b)`` over the same resampled examples."""
    from torchmetrics.functional.classification import multiclass_calibration_error as ece

    g = torch.Generator().manual_seed(seed)
    n, c = a["_probs"].shape
    vals = []
    for _ in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=g)
        y = a["_labels"][idx]
        v = ece(a["_probs"][idx], y, c, n_bins=15)
        vals.append(float(v if b is None else v - ece(b["_probs"][idx], y, c, n_bins=15)))
    return float(np.std(vals, ddof=1))


def copy_result(res):
    """An independent copy of a QuantizationResult (model and block records)."""
    return dataclasses.replace(res, model=clone_module(res.model), layers=copy.deepcopy(res.layers))


def run_case(name: str, budgets: Sequence[float], config: dict, students: Sequence[str],
             ) -> tuple[list[dict], dict]:
    case = CASES[name]()
    torch.manual_seed(0)
    log = lambda s: print(f"[{name}] {s}", flush=True)  # noqa: E731
    rows, ev = [], {}

    def add(method: str, bits: float, model, **extra) -> dict:
        ev[(method, bits)] = e = evaluate_full(model, case.test)
        row = {"case": name, "method": method, "bits": bits, **{k: v for k, v in e.items()
                                                                if not k.startswith("_")},
               "accuracy_se": bootstrap_se(e["_correct"]), "ece_se": ece_se(e), **extra}
        rows.append(row)
        log(f"{method:>34} @ {bits:g}: acc {row['accuracy']:.4f} +- {row['accuracy_se']:.4f}, "
            f"nll {row['nll']:.4f}, ece {row['ece']:.4f} +- {row['ece_se']:.4f}")
        return row

    def distilled(base: str, teacher: str, src, bits: float) -> None:
        res = copy_result(src)
        # the temperature is fitted to be measured both ways: the same student, with and without
        cfg = DistillConfig(**{**config, **TEACHERS[teacher], "fit_temperature": True})
        t0 = time.perf_counter()
        rep = distill_model(case.model, res, case.calib, cfg, posterior=posterior,
                            enable_progress_bar=False, accelerator="cpu", devices=1)
        seconds = time.perf_counter() - t0
        info = {"bits_per_weight": res.bits_per_weight, "epoch": rep["best_epoch"],
                "lowest_epoch": rep["lowest_epoch"], "lr": rep["lr"], "kl0": rep["kl0"],
                "gain_z": (rep["holdout_gain"] / rep["holdout_gain_se"]
                           if rep["holdout_gain_se"] else 0.0),
                "nll_gain": rep["holdout_nll_gain"], "nll_gain_se": rep["holdout_nll_gain_se"],
                "tau": rep["student_temperature"],
                "distill_s": seconds}
        label = f"{base} + distill" + ("" if teacher == "posterior-glm" else f"({teacher})")
        tau = rep["student_temperature"]
        set_logit_temperature(res.model, None)
        add(label, bits, res.model, **{**info, "tau": None})
        set_logit_temperature(res.model, tau)
        add(f"{label} + temperature", bits, res.model, **info)

    add("fp32", 32.0, case.model, bits_per_weight=32.0)
    posterior = None
    reliability = {}
    for bits in budgets:
        t0 = time.perf_counter()
        bq = quantize_model(case.model, case.calib, BayesQConfig(bits=bits, **case.config),
                            n_data=case.n_data, progress=False, posterior=posterior)
        posterior = bq.posterior
        log(f"quantized at {bits} in {time.perf_counter() - t0:.0f} s")
        if bits == budgets[0]:
            for t in ("posterior-glm", "posterior-samples"):
                teacher = build_teacher(DistillConfig(**TEACHERS[t]), case.model, posterior,
                                        list(case.calib))
                add(f"teacher {t}", 32.0, teacher, bits_per_weight=32.0,
                    temperature=teacher.temperature)
        add("bayesq", bits, bq.model, bits_per_weight=bq.bits_per_weight)
        distilled("bayesq", "posterior-glm", bq, bits)
        for spec in students:
            base, teacher = spec.split(":")
            if base == "rtn":
                src = quantize_model(case.model, case.calib,
                                     BayesQConfig(bits=bits, method="rtn", **case.config),
                                     n_data=case.n_data, progress=False)
                add("rtn", bits, src.model, bits_per_weight=src.bits_per_weight)
            else:
                src = bq
            distilled(base, teacher, src, bits)
        if bits == budgets[0]:
            reliability[f"{name} @ {bits:g} bits"] = {
                m: (ev[(m, b)]["_probs"], ev[(m, b)]["_labels"])
                for m, b in (("fp32", 32.0), ("bayesq", bits), ("bayesq + distill", bits))}
    fp32 = ev[("fp32", 32.0)]
    for r in rows:  # paired comparisons on the same test examples
        e = ev[(r["method"], r["bits"])]
        ref = ev.get(("bayesq", r["bits"]))
        if ref is not None and r["method"] != "bayesq":
            c = e["_correct"] - ref["_correct"]
            r["d_bayesq"], r["d_bayesq_se"] = float(c.mean()), bootstrap_se(c)
            d = e["_nll"] - ref["_nll"]
            r["d_nll"], r["d_nll_se"] = float(d.mean()), bootstrap_se(d)
            r["d_ece"], r["d_ece_se"] = r["ece"] - float(ref["ece"]), ece_se(e, ref)
        if r["method"] != "fp32" and not r["method"].startswith("teacher"):
            r["ece_vs_fp32"] = r["ece"] - float(fp32["ece"])
            r["ece_vs_fp32_se"] = ece_se(e, fp32)
            r["nll_vs_fp32"] = r["nll"] / float(fp32["nll"])
    return rows, reliability


def markdown(rows: Sequence[dict]) -> str:
    def pm(r: dict, key: str, scale: float = 1.0, fmt: str = "+.4f") -> str:
        return (f"{scale * r[key]:{fmt}} ± {scale * r[key + '_se']:.4f}"
                if r.get(key) is not None else "")

    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        out += [f"### {case}", "",
                "| model | budget | bits/w | accuracy ± SE | vs BayesQ (pt) | NLL | vs BayesQ | "
                "NLL / FP32 | ECE ± SE | vs BayesQ | vs FP32 | epoch | gain/SE | lr | tau | s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["case"] != case:
                continue
            budget = "" if r["bits"] == 32.0 else f"{r['bits']:g}"
            acc = (f"{100 * r['d_bayesq']:+.2f} ± {100 * r['d_bayesq_se']:.2f}"
                   if "d_bayesq" in r else "")
            ratio = f"{r['nll_vs_fp32']:.3f}" if "nll_vs_fp32" in r else ""
            extra = [str(r["epoch"]) if "epoch" in r else "",
                     f"{r['gain_z']:.2f}" if "gain_z" in r else "",
                     f"{r['lr']:.2g}" if r.get("lr") is not None else "",
                     f"{r['tau']:.3f}" if r.get("tau") is not None else "",
                     f"{r['distill_s']:.0f}" if "distill_s" in r else ""]
            out.append(f"| {r['method']} | {budget} | {r['bits_per_weight']:.3f} | "
                       f"{r['accuracy']:.4f} ± {r['accuracy_se']:.4f} | {acc} | {r['nll']:.4f} | "
                       f"{pm(r, 'd_nll')} | {ratio} | {r['ece']:.4f} ± {r['ece_se']:.4f} | "
                       f"{pm(r, 'd_ece')} | {pm(r, 'ece_vs_fp32')} | " + " | ".join(extra) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["fashion_resnet", "minilm_sentiment"],
                   choices=["fashion_resnet", "minilm_sentiment", "tiny"])
    p.add_argument("--budgets", nargs="+", type=float, default=None,
                   help="default: each case's tightest frontier budget, 2.5 and 3.0")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="DistillConfig fields other than the defaults (e.g. lr_scale=2.5e-4)")
    p.add_argument("--students", nargs="*", default=[],
                   help="more BASE:TEACHER rows, e.g. rtn:posterior-glm bayesq:fp32")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="distill")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    config = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)}
    DistillConfig(**config)  # bad fields fail here, before any work
    rows, panels = [], {}
    for name in args.cases:
        budgets = args.budgets or [BUDGETS[name][0], 2.5, 3.0]
        r, rel = run_case(name, budgets, config, args.students)
        rows += r
        panels.update(rel)
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"seconds": seconds, "threads": args.threads,
            "config": DistillConfig(**config).to_dict(), "rows": rows}
    (args.out / f"{args.name}.json").write_text(json.dumps(meta, indent=1))
    text = markdown(rows)
    (args.out / f"{args.name}.md").write_text(text)
    plot_reliability(panels, args.out / f"{args.name}.png")
    print(text)
    print(f"{seconds:.0f} s on {args.threads} threads; wrote {args.out / args.name}.json/.md/.png")
    return rows


if __name__ == "__main__":
    main()
