"""How preprocessing scales: seconds and peak memory of GPTQ and BayesQ against model size.

Models are configurations only, randomly initialised (no download): torchvision ResNet-18 / 50 /
101 on synthetic 224x224 images (1000 classes), and BERT-small / base / large
(``BertForSequenceClassification``, 2 classes) on synthetic 128-token sequences. Calibration sets
of 32 and 256 samples in batches of 8. Methods: a single-width (3-bit) GPTQ pass, and BayesQ
(3.0 bits) with the diag, kron (default) and lowrank posteriors. Every run is a
fresh process (``--one``), so its peak RSS is its own. BayesQ runs with its defaults (``backend="auto"``: the
Monte-Carlo GGN for 1000 classes, the exact GGN for 2). ``lowrank`` is skipped above
``LOWRANK_MAX_PARAMS`` parameters: its per-layer Lanczos on the GGN operator is many times a
K-FAC fit already at 0.7M parameters (``structures.csv``).

Writes ``benchmarks/results/scale.{json,csv,png}`` (the table; log-log time against
parameters) and ``scale_runs.json`` (every run with its stage timings and the total time).

Run: ``.venv/bin/python benchmarks/scale.py`` (the whole grid: about an hour on a 2-core Intel
Xeon, longer on a 2-core AMD EPYC; ``scale_runs.json`` is rewritten after every run);
``--models resnet18 bert-small --samples 32`` for a subset; ``--smoke`` for tiny models (what
``tests/test_scale.py`` runs); ``--profile bert-small kron 32`` for one run under cProfile
(``profile_bert-small_kron_32.txt``: the functions by cumulative and by own time).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

MODELS = ("resnet18", "resnet50", "resnet101", "bert-small", "bert-base", "bert-large")
METHODS = ("gptq", "diag", "kron", "lowrank")
# Not in the default grid: the default kron without its measured checks (``tables="checked"``
# through ``tables="auto"``), which prices the checks.
EXTRA_METHODS = ("kron-closed-form",)
LOWRANK_MAX_PARAMS = 5_000_000
BERT = {"bert-small": (4, 512, 8), "bert-base": (12, 768, 12), "bert-large": (24, 1024, 16),
        "bert-tiny": (1, 32, 2)}


def build(name: str) -> tuple[nn.Module, object]:
    """The model and a function ``batch(n, seed)`` of synthetic calibration samples."""
    torch.manual_seed(0)
    if name.startswith("resnet") or name == "tiny-cnn":
        if name == "tiny-cnn":
            model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
            size, classes = 16, 10
        else:
            import torchvision

            model = getattr(torchvision.models, name)(weights=None)
            size, classes = 224, 1000

        def batch(n: int, seed: int):
            g = torch.Generator().manual_seed(seed)
            return (torch.randn(n, 3, size, size, generator=g),
                    torch.randint(0, classes, (n,), generator=g))

        return model.eval(), batch
    import transformers

    layers, hidden, heads = BERT[name]
    # eager attention: the lowrank fit's forward-mode products have no rule for SDPA
    cfg = transformers.BertConfig(num_hidden_layers=layers, hidden_size=hidden,
                                  num_attention_heads=heads, intermediate_size=4 * hidden,
                                  num_labels=2, attn_implementation="eager")
    model = transformers.BertForSequenceClassification(cfg).eval()
    length = 16 if name == "bert-tiny" else 128

    def batch(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, cfg.vocab_size, (n, length), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 2, (n,), generator=g)}

    return model, batch


def config(name: str, method: str):
    from bayesq_lightning import BayesQConfig

    bits = 5.0 if name.startswith("tiny") else 3.0  # tiny layers: metadata is a bit per weight
    if method == "gptq":  # a single-width pass: no candidates beside 3 bits
        return BayesQConfig(method="gptq", bits=bits + 1, allowed_bits=(3,), calib_batches=10**6)
    if method == "kron-closed-form":
        return BayesQConfig(bits=bits, structure="kron", tables="closed_form", calib_batches=10**6)
    # backend "auto" (default): Monte-Carlo GGN for the ResNets' 1000 classes, exact for BERT's 2
    return BayesQConfig(bits=bits, structure=method, calib_batches=10**6)


def run_one(name: str, method: str, samples: int, batch_size: int = 8) -> dict:
    """One quantization in this process: seconds, peak RSS, parameters, stage timings."""
    from bayesq_lightning import quantize_model

    torch.set_num_threads(2)
    model, make = build(name)
    batches = [make(min(batch_size, samples - i), i) for i in range(0, samples, batch_size)]
    t0 = time.perf_counter()
    res = quantize_model(model, batches, config(name, method), n_data=10 * samples,
                         progress=False)
    seconds = time.perf_counter() - t0
    return {
        "model": name, "method": method, "samples": samples,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "bits_per_weight": res.bits_per_weight,
        **{k: res.info.get(k) for k in ("posterior_seconds", "hessian_seconds", "tables_seconds",
                                        "allocation_seconds", "check_seconds",
                                        "rounding_seconds")},
    }


def fresh(name: str, method: str, samples: int, timeout: float | None = None) -> dict:
    """:func:`run_one` in a new interpreter (its own peak RSS); ``timeout`` seconds at most."""
    try:
        out = subprocess.run([sys.executable, __file__, "--one", name, method, str(samples)],
                             capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "method": method, "samples": samples,
                "error": f"stopped after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"model": name, "method": method, "samples": samples,
                "error": out.stderr.strip().splitlines()[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile(name: str, method: str, samples: int, out: Path, top: int = 30) -> dict:
    """:func:`run_one` under cProfile; the ``top`` functions by cumulative and by own time go
    to ``profile_<model>_<method>_<samples>.txt``."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    row = prof.runcall(run_one, name, method, samples)
    text = io.StringIO()
    text.write(f"{json.dumps(row)}\n")
    for key in ("cumulative", "tottime"):
        pstats.Stats(prof, stream=text).strip_dirs().sort_stats(key).print_stats(top)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile_{name}_{method}_{samples}.txt"
    path.write_text(text.getvalue())
    print(f"{row}\nprofile: {path}")
    return row


def add_ratios(rows: list[dict]) -> None:
    """Each row's time and memory over the GPTQ pass of the same model and sample count."""
    base = {(r["model"], r["samples"]): r for r in rows if r["method"] == "gptq" and "seconds" in r}
    for r in rows:
        b = base.get((r["model"], r["samples"]))
        if b is not None and "seconds" in r:
            r["time_vs_gptq"] = r["seconds"] / b["seconds"]
            r["memory_vs_gptq"] = r["peak_rss_gb"] / b["peak_rss_gb"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    counts = sorted({r["samples"] for r in rows})
    colors = dict(zip(METHODS, ("C0", "C1", "C2", "C3"), strict=True))
    for method in METHODS:  # one line per method and calibration size, one marker per family
        for samples in counts:
            sel = [r for r in rows if r["method"] == method and r["samples"] == samples
                   and "seconds" in r]
            if not sel:
                continue
            style = "-" if samples == counts[-1] else "--"
            for family, marker in (("resnet", "o"), ("bert", "s"), ("tiny", "^")):
                pts = sorted((r["params"], r["seconds"]) for r in sel
                             if r["model"].startswith(family))
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=marker, linestyle=style,
                            color=colors[method],
                            label=f"{method}, {samples} samples" if family == "resnet"
                            or not any(r["model"].startswith("resnet") for r in sel) else None)
    ax.set(xscale="log", yscale="log", xlabel="parameters (o ResNet, s BERT)", ylabel="seconds",
           title="preprocessing time (2 threads)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_runs(rows: list[dict], path: Path, seconds: float, done: bool) -> None:
    """Every run so far with the grid's seconds; ``complete`` is false while the grid runs."""
    path.write_text(json.dumps({"seconds": seconds, "complete": done, "rows": rows}, indent=1))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--one", nargs=3, metavar=("MODEL", "METHOD", "SAMPLES"))
    p.add_argument("--profile", nargs=3, metavar=("MODEL", "METHOD", "SAMPLES"),
                   help="one run under cProfile: where the time goes")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   choices=[*METHODS, *EXTRA_METHODS])
    p.add_argument("--name", default=None, help="output name (default: scale, scale_smoke)")
    p.add_argument("--samples", nargs="+", type=int, default=[32, 256])
    p.add_argument("--smoke", action="store_true", help="tiny models, 8 samples")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per run at most")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.one:
        row = run_one(args.one[0], args.one[1], int(args.one[2]))
        print(json.dumps(row))
        return [row]
    if args.profile:
        return [profile(*args.profile[:2], int(args.profile[2]), Path(args.out))]
    if args.smoke:
        args.models, args.samples = ["tiny-cnn", "bert-tiny"], [8]
    t0 = time.perf_counter()
    rows: list[dict] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("scale_smoke" if args.smoke else "scale")
    for model_name in args.models:
        model, _ = build(model_name)
        params = sum(q.numel() for q in model.parameters())
        del model
        for samples in args.samples:
            for method in args.methods:
                if method == "lowrank" and params > LOWRANK_MAX_PARAMS:
                    rows.append({"model": model_name, "method": method, "samples": samples,
                                 "params": params,
                                 "skipped": f"lowrank above {LOWRANK_MAX_PARAMS:,} parameters"})
                    continue
                rows.append(fresh(model_name, method, samples, args.timeout))
                rows[-1].setdefault("params", params)
                print(rows[-1], flush=True)
                # after every run: a grid stopped part-way keeps what it measured
                save_runs(rows, out / f"{name}_runs.json", time.perf_counter() - t0, done=False)
    add_ratios(rows)
    seconds = time.perf_counter() - t0
    save_runs(rows, out / f"{name}_runs.json", seconds, done=True)
    from common import write_table

    cols = ["model", "method", "samples", "params", "seconds", "peak_rss_gb", "time_vs_gptq",
            "memory_vs_gptq"]
    if args.out == "benchmarks/results":
        write_table([{c: r.get(c, r.get("skipped", r.get("error", ""))) for c in cols}
                     for r in rows], name, cols)
    plot(rows, out / f"{name}.png")
    print(f"scale benchmark: {seconds:.0f} s")
    return rows


if __name__ == "__main__":
    main()
