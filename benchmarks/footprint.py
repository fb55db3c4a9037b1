"""Memory footprint and CPU latency of packed BayesQ models at 3.0 bits per weight.

For the digits CNN, the Fashion-MNIST ResNet-style CNN (BayesQ, trained and cached by
``benchmarks/common.py``) and torchvision's ResNet-18 / ResNet-50 architectures (random
initialisation, no download; round-to-nearest, since a random network has no posterior worth
fitting — the bytes do not depend on the method): FP32 state-dict bytes, artifact bytes and
their ratio; the bytes of the quantized-layer tensors in the artifact against the allocator's
accounted cost; median CPU latency of a forward pass, FP32 vs packed, with and without the
dequantized-weight cache. Prints the table and writes benchmarks/results/footprint.{json,csv}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import trained, write_table  # noqa: E402

from bayesq_lightning import BayesQConfig, quantize_model, save_quantized  # noqa: E402
from bayesq_lightning.artifact.modules import QUANTIZED_TYPES  # noqa: E402


def _median_ms(model: nn.Module, x: torch.Tensor, runs: int) -> float:
    times = []
    with torch.no_grad():
        model(x)  # warm-up (and fills the cache where enabled)
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _state_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _set_cache(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, tuple(QUANTIZED_TYPES.values())):
            m.cache_dequantized = on
            m.clear_cache()


def measure(name: str, model: nn.Module, result, x: torch.Tensor, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        save_quantized(result.model, result, d)
        artifact = sum(p.stat().st_size for p in Path(d).iterdir())
        manifest = json.loads((Path(d) / "bayesq.json").read_text())
    quantized_tensor_bytes = sum(
        b["code_bytes"] + b["meta_bytes"] for layer in manifest["layers"] for b in layer["blocks"]
    )
    fp32 = _state_bytes(model)
    qmodel = result.model.eval()
    _set_cache(qmodel, False)
    lat_packed = _median_ms(qmodel, x, runs)
    _set_cache(qmodel, True)
    lat_cached = _median_ms(qmodel, x, runs)
    _set_cache(qmodel, False)
    return {
        "model": name, "bits": result.info["config"]["bits"],
        "method": result.info["method"], "quantized_weights": result.n_weights,
        "bits_per_weight": result.bits_per_weight, "fp32_bytes": fp32,
        "artifact_bytes": artifact, "ratio": fp32 / artifact,
        "quantized_tensor_bytes": quantized_tensor_bytes,
        "accounted_bytes": result.total_bytes,
        "accounting_match": quantized_tensor_bytes == result.total_bytes,
        "fp32_ms": _median_ms(model.eval(), x, runs), "packed_ms": lat_packed,
        "cached_ms": lat_cached,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--models", nargs="+",
                        default=["digits", "fashion", "resnet18", "resnet50"])
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        if name in ("digits", "fashion"):
            model, dm = trained(name)
            x = next(iter(dm.val_dataloader()))[0][:64]
            result = quantize_model(model, dm.calibration_dataloader(),
                                    BayesQConfig(bits=args.bits), n_data=len(dm.train_set),
                                    progress=False)
        else:
            import torchvision

            model = getattr(torchvision.models, name)(weights=None).eval()
            x = torch.randn(1, 3, 224, 224)
            result = quantize_model(model, None, BayesQConfig(bits=args.bits, method="rtn"),
                                    progress=False)
        rows.append(measure(name, model, result, x, args.runs))
        print(rows[-1], flush=True)
    write_table(rows, "footprint", ["model", "method", "bits_per_weight", "fp32_bytes",
                                    "artifact_bytes", "ratio", "quantized_tensor_bytes",
                                    "accounted_bytes", "accounting_match", "fp32_ms",
                                    "packed_ms", "cached_ms"])


if __name__ == "__main__":
    main()
