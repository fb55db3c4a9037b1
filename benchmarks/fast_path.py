"""Should the loaders switch the kernel on? Agreement and latency of a loaded model's paths.

A four-block 768-3072-768 MLP stack with a 10-class head (random initialisation: the bytes
and the arithmetic do not depend on training), round-to-nearest at 4 bits, saved with
``save_quantized`` and loaded with ``load_quantized(kernel="exact")`` and ``kernel="auto"``:

* latency on 2 threads of FP32, the exact path and the kernel, at 1, 8 and 64 activation rows
  (the kernel serves at most 16), each with and without ``torch.no_grad()`` (a loaded model has
  no parameter requiring grad, so both take the kernel): the median over repeated forward
  passes, the models taking turns, and the ratio of the minima (robust to other processes);
* agreement of the kernel with the exact path on 256 single-row inputs: top-1 of the head,
  and the relative L2 error of the logits (median and maximum).

Prints the tables and writes ``benchmarks/results/fast_path.json`` / ``.csv`` and
``fast_path_agreement.json`` / ``.csv``. About 3 minutes on 2 shared CPU cores.

    python benchmarks/fast_path.py
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import write_table  # noqa: E402

from bayesq_lightning import (  # noqa: E402
    BayesQConfig,
    load_quantized,
    quantize_model,
    save_quantized,
)
from bayesq_lightning.artifact import kernels  # noqa: E402

WIDTH, HIDDEN, BLOCKS, CLASSES = 768, 3072, 4, 10


def stack(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, WIDTH),
                   nn.LayerNorm(WIDTH)]
    return nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES)).eval()


def timings_ms(models: dict[str, nn.Module], x: torch.Tensor, grad: bool, runs: int
               ) -> dict[str, tuple[float, float]]:
    """``{name: (median, minimum)}`` ms per forward pass; the models take turns on every run, so
    load from other processes falls on all of them alike."""
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    times: dict[str, list[float]] = {name: [] for name in models}
    with ctx:
        for m in models.values():
            m(x)  # warm-up: repacks for the kernel, grows the decode buffer
        for _ in range(runs):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append(1000 * (time.perf_counter() - t0))
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def main() -> None:
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    fp32 = stack()
    result = quantize_model(fp32, None, BayesQConfig(method="rtn", bits=4.2, allowed_bits=(4,)),
                            progress=False)
    with tempfile.TemporaryDirectory() as d:
        save_quantized(result.model, result, d)
        exact = load_quantized(stack(1), d, kernel="exact")
        fast = load_quantized(stack(1), d, kernel="auto")
    fp32.requires_grad_(False)
    rows = []
    models = {"fp32": fp32, "exact": exact, "kernel": fast}
    for n in (1, 8, 64):
        x = torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(n))
        for grad in (True, False):
            ms = timings_ms(models, x, grad, 20 if n < 64 else 5)
            row = {"rows": n, "grad mode": "on" if grad else "no_grad"}
            for name, (med, _) in ms.items():
                row[f"{name} ms"] = med
            row["exact / fp32"] = ms["exact"][0] / ms["fp32"][0]
            row["kernel / fp32"] = ms["kernel"][0] / ms["fp32"][0]
            row["kernel / fp32 (min)"] = ms["kernel"][1] / ms["fp32"][1]
            rows.append(row)
    write_table(rows, "fast_path", list(rows[0]))

    xs = torch.randn(256, 1, WIDTH, generator=torch.Generator().manual_seed(7))
    same, errors = 0, []
    with torch.no_grad():
        for x in xs:
            a, b = exact(x), fast(x)
            same += int(a.argmax(-1) == b.argmax(-1))
            errors.append(float((a - b).norm() / a.norm()))
    agreement = [{"inputs": len(xs), "top-1 agreement": same / len(xs),
                  "median rel. error": statistics.median(errors),
                  "max rel. error": max(errors), "kernel RTOL": kernels.RTOL,
                  "cpu capability": torch.backends.cpu.get_cpu_capability(),
                  "seconds": time.perf_counter() - t_start}]
    write_table(agreement, "fast_path_agreement", list(agreement[0]))


if __name__ == "__main__":
    main()
