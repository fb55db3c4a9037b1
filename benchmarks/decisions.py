"""Which decision loses to GPTQ: the allocation, the grid choice or the rounding.

BayesQ and GPTQ each make three decisions per layer: its width (the knapsack over each method's
losses), its grid (GPTQ: the weights' min-max range; BayesQ: ``range_objective="auto"``, min-max
or a clipped range, whichever its closed-form loss prefers) and its codes (error feedback under
GPTQ's ``H = X X^T / n``, or under the K-FAC input factor ``A``). Every BayesQ row runs
``tables="closed_form"``: the closed form's own decisions, before the default's checks. Each
row swaps some of them; widths are swapped by pinning every layer (``min_bits = max_bits``) to
the other method's allocation at the same budget, so the bytes are the same:

==========================  ==========  ======  ============
row                         widths      grid    rounding
==========================  ==========  ======  ============
gptq                        GPTQ        minmax  H
gptq @ bayesq widths        BayesQ      minmax  H
bayesq minmax @ gptq widths GPTQ        minmax  A
bayesq @ gptq widths        GPTQ        auto    A
bayesq minmax               BayesQ mm   minmax  A
bayesq                      BayesQ      auto    A
==========================  ==========  ======  ============

``gptq`` against ``gptq @ bayesq widths`` isolates the allocation, ``gptq`` against ``bayesq
minmax @ gptq widths`` the rounding matrix, and that row against ``bayesq @ gptq widths`` the
grid choice. Differences are paired against ``gptq`` (same test examples).

Usage::

    python benchmarks/decisions.py --case fashion_resnet --budgets 2.125 2.25 2.5 3.0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from frontier import CASES, markdown  # noqa: E402

from bayesq_lightning import BayesQConfig, quantize_model  # noqa: E402
from bayesq_lightning.sweep import evaluate, paired_differences  # noqa: E402


def _widths(result) -> dict[str, int]:
    """Each layer's width as exact-name pins (one block per layer)."""
    return {layer.name: layer.bits for layer in result.layers}


def run(case, budgets, log=print) -> list[dict]:
    rows = [{"method": "fp32", "bits": 32.0, "bits_per_weight": 32.0,
             **evaluate(case.model, case.test), "prep_s": 0.0}]
    posterior = None

    def one(name: str, bits: float, **fields):
        nonlocal posterior
        t0 = time.perf_counter()
        # the closed form's decisions are what is swapped (the default's checks overrule them)
        cfg = BayesQConfig(bits=bits, **{"tables": "closed_form", **case.config, **fields})
        res = quantize_model(case.model, case.calib, cfg, n_data=case.n_data, progress=False,
                             posterior=posterior if cfg.method == "bayesq" else None)
        if cfg.method == "bayesq":
            posterior = res.posterior
        row = {"method": name, "bits": bits, "bits_per_weight": res.bits_per_weight,
               **evaluate(res.model, case.test), "prep_s": time.perf_counter() - t0}
        rows.append(row)
        log(f"{name:>28} @ {bits:g}: acc {row['accuracy']:.4f} {res.bits_per_weight:.3f} b/w")
        return res

    for bits in budgets:
        gptq = one("gptq", bits, method="gptq")
        bayesq = one("bayesq", bits)
        one("bayesq minmax", bits, range_objective="minmax")
        g, b = _widths(gptq), _widths(bayesq)
        one("gptq @ bayesq widths", bits, method="gptq", min_bits=b, max_bits=b)
        one("bayesq minmax @ gptq widths", bits, range_objective="minmax", min_bits=g,
            max_bits=g)
        one("bayesq @ gptq widths", bits, min_bits=g, max_bits=g)
    return [{"case": case.name, **r} for r in paired_differences(rows, "gptq")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="fashion_resnet", choices=list(CASES))
    p.add_argument("--budgets", nargs="+", type=float, default=[2.125, 2.25, 2.5, 3.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(CASES[args.case](), args.budgets)
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"decisions_{args.case}"
    (args.out / f"{name}.json").write_text(json.dumps(
        {"seconds": seconds, "threads": args.threads, "rows": rows}, indent=1))
    table = markdown(rows)
    (args.out / f"{name}.md").write_text(table + f"\n{seconds:.0f} s on {args.threads} threads\n")
    print(table)
    print(f"{seconds:.0f} s on {args.threads} threads; wrote {args.out / name}.json/.md")


if __name__ == "__main__":
    main()
