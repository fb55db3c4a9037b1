"""MiniLM with its embeddings quantized (``quantize_embeddings=True``) or kept in floating point.

The embeddings hold 52% of MiniLM-L6's parameters (word embeddings 30522 x 384, position 512 x
384, token type 2 x 384). On the frontier's ``minilm_sentiment`` case (fine-tuned MiniLM,
256-sentence calibration hold-out, 1244 test sentences), each method at each budget runs twice:
embeddings in floating point, and embeddings quantized (counted in the budget; the blocks with
rows the calibration sentences never look up held at the floor width). Per run: the artifact's
bytes on disk (``save_quantized``: packed layers plus every float tensor left, fp32), the bits per
quantized weight, the share of the model's parameters quantized, test accuracy and NLL. A
method's posterior is fitted once per layer selection and reused across budgets.

Usage::

    BAYESQ_BENCH_CACHE=/path/to/.cache/bench python benchmarks/embeddings.py
    python benchmarks/embeddings.py --methods gptq --budgets 3.0   # a subset
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import RESULTS, write_table  # noqa: E402
from frontier import minilm_case  # noqa: E402

from bayesq_lightning import BayesQConfig, quantize_model, save_quantized  # noqa: E402
from bayesq_lightning.sweep import evaluate  # noqa: E402

METHODS = {"gptq": {"method": "gptq"}, "bayesq kron": {}}
COLUMNS = ("method", "embeddings", "bits", "bits_per_weight", "quantized_share",
           "artifact_mb", "accuracy", "nll", "embedding_floor", "seconds")


def _artifact_bytes(model: torch.nn.Module, result) -> int:
    with tempfile.TemporaryDirectory() as d:
        save_quantized(model, result, d)
        return sum(f.stat().st_size for f in Path(d).iterdir())


def _metrics(model: torch.nn.Module, loader) -> dict:
    """Test accuracy, its standard error, NLL and ECE (per-example arrays left out)."""
    return {k: v for k, v in evaluate(model, loader).items() if not k.startswith("_")}


def _fp32_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def run(methods: Sequence[str], budgets: Sequence[float]) -> list[dict]:
    case = minilm_case()
    n_params = sum(p.numel() for p in case.model.parameters())
    rows = [{"method": "fp32", "embeddings": "float", "bits": 32.0, "bits_per_weight": 32.0,
             "quantized_share": 0.0, "artifact_mb": _fp32_bytes(case.model) / 2**20,
             **_metrics(case.model, case.test), "embedding_floor": "", "seconds": 0.0}]
    print(rows[0])
    for name in methods:
        for embeddings in (False, True):
            posterior = None
            for bits in budgets:
                cfg = BayesQConfig(bits=bits, quantize_embeddings=embeddings, **case.config,
                                   **METHODS[name])
                t0 = time.perf_counter()
                res = quantize_model(case.model, case.calib, cfg, n_data=case.n_data,
                                     progress=False, posterior=posterior)
                seconds = time.perf_counter() - t0 + (res.info.get("posterior_seconds", 0.0)
                                                      if posterior is not None else 0.0)
                posterior = res.posterior
                floor = res.info.get("embedding_floor", {})
                row = {"method": name, "embeddings": "quantized" if embeddings else "float",
                       "bits": bits, "bits_per_weight": res.bits_per_weight,
                       "quantized_share": sum(x.n_weights for x in res.layers) / n_params,
                       "artifact_mb": _artifact_bytes(res.model, res) / 2**20,
                       **_metrics(res.model, case.test),
                       "embedding_floor": "" if not floor else
                       f"{floor['bits']} bits, {len(floor['blocks'])} blocks",
                       "seconds": seconds}
                print(row)
                rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--budgets", nargs="+", type=float, default=[3.0, 4.0])
    p.add_argument("--name", default="embeddings_minilm")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.methods, args.budgets)
    seconds = time.perf_counter() - t0
    print(write_table(rows, args.name, COLUMNS, quiet=True))
    meta = {"seconds": seconds, "threads": torch.get_num_threads(), "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(meta, indent=1))
    print(f"run time: {seconds:.0f} s on {torch.get_num_threads()} thread(s); wrote "
          f"{RESULTS / args.name}.json and .csv")
    return rows


if __name__ == "__main__":
    main()
