"""Model zoo: every common architecture against GPTQ, BayesQ (default: kron), diag and lowrank.

Random-init models with 2-class heads on random inputs (no download, no training):

* torchvision: ResNet-18, MobileNetV2, MobileNetV3-small, EfficientNet-B0, ShuffleNetV2 x0.5,
  RegNetX-400MF, ConvNeXt-tiny (64 x 64 images), a small ViT and a small Swin (32 x 32);
* transformers, tiny random configs with a sequence-classification head: BERT, DistilBERT,
  RoBERTa, GPT-2 (``pad_token_id`` set), ViT and T5 (``T5ForSequenceClassification``).

Before quantizing, each CNN's BatchNorm statistics are recalibrated with train-mode, no-grad
passes over the calibration inputs (at their initial statistics a random MobileNetV3's logits
have a standard deviation of about 2e-10); the FP32 logits' standard deviation is reported.

Each (model, method) runs in a process of its own (its peak memory is its own), both widths
(3.0 and 4.0 bits) in it, sharing one posterior. ``lowrank`` runs only on models with at most
12 quantized layers and 2M parameters (other rows: "skipped: size"). Per run: ``status`` ("ok"
or the error), seconds, peak resident memory (``peak_mb``) and its growth during quantization
(``quant_mb``: the peak minus the resident memory before it, the model and inputs held),
bits per weight, the share of matrix weights quantized (embeddings aside, from
``result.info["coverage"]``) and the KL divergence of the quantized model's output
distribution from FP32's, on other random inputs. Writes ``benchmarks/results/zoo{tag}.{json,csv}``
and prints the table with the run time.

    nice -n 10 python benchmarks/zoo.py                      # the whole matrix
    python benchmarks/zoo.py --models mobilenet_v2 --calib 128 --tag _calib128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

TORCHVISION = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
               "shufflenet_v2_x0_5", "regnet_x_400mf", "convnext_tiny", "vit_small",
               "swin_small")
HF = ("hf_bert", "hf_distilbert", "hf_roberta", "hf_gpt2", "hf_vit", "hf_t5")
MODELS = TORCHVISION + HF
METHODS = {"gptq": {"method": "gptq"}, "bayesq": {}, "diag": {"structure": "diag"},
           "lowrank": {"structure": "lowrank"}}
WIDTHS = (3.0, 4.0)
LOWRANK_MAX_LAYERS, LOWRANK_MAX_PARAMS = 12, 2_000_000
SEQ, VOCAB, BATCH = 16, 1000, 8


def _torchvision(name: str):
    import torchvision.models as tvm

    if name == "vit_small":
        return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                     hidden_dim=64, mlp_dim=128, num_classes=2), 32
    if name == "swin_small":
        return tvm.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2],
                                   num_heads=[2, 4], window_size=[4, 4], num_classes=2), 32
    return getattr(tvm, name)(weights=None, num_classes=2), 64


def _hf(name: str):
    import transformers as tf

    bert = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
    configs = {
        "hf_bert": (tf.BertConfig(**bert), tf.BertForSequenceClassification),
        "hf_distilbert": (tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2,
                                              hidden_dim=64, max_position_embeddings=64),
                          tf.DistilBertForSequenceClassification),
        "hf_roberta": (tf.RobertaConfig(**bert, pad_token_id=1),
                       tf.RobertaForSequenceClassification),
        "hf_gpt2": (tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                  n_positions=64, pad_token_id=0),
                    tf.GPT2ForSequenceClassification),
        "hf_vit": (tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64),
                   tf.ViTForImageClassification),
        "hf_t5": (tf.T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2, num_heads=2,
                              d_kv=16, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
                  tf.T5ForSequenceClassification),
    }
    config, cls = configs[name]
    config.num_labels = 2
    # eager attention: lowrank's eigsh needs forward-mode derivatives of every op
    return cls._from_config(config, attn_implementation="eager")


def _batches(name: str, n: int, seed: int, image: int) -> list:
    """``n`` random inputs of the model's form, in batches of ``BATCH``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, BATCH):
        b = min(BATCH, n - i)
        if name in TORCHVISION:
            out.append(torch.randn(b, 3, image, image, generator=g))
        elif name == "hf_vit":
            out.append({"pixel_values": torch.randn(b, 3, 32, 32, generator=g)})
        else:
            ids = torch.randint(2, VOCAB, (b, SEQ), generator=g)
            if name == "hf_t5":
                ids[:, -1] = 1  # one end-of-sequence token per row, as T5's head needs
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _logits(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return getattr(out, "logits", out)


def _recalibrate_batchnorm(model, batches) -> bool:
    """Train-mode, no-grad passes over ``batches`` with cumulative BatchNorm statistics."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the passes
    model.train()
    with torch.no_grad():
        for b in batches:
            _logits(model, b)
    model.eval()
    return bool(norms)


def _kl(fp_model, q_model, batches) -> float:
    """Mean KL(p_fp32 || p_quantized) over the rows of ``batches``."""
    import torch

    total, rows = 0.0, 0
    with torch.no_grad():
        for b in batches:
            p = _logits(fp_model, b).float().log_softmax(-1)
            q = _logits(q_model, b).float().log_softmax(-1)
            total += float((p.exp() * (p - q)).sum())
            rows += len(p)
    return total / rows


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(name: str, method: str, calib: int, threads: int) -> list[dict]:
    """Both widths of one (model, method), in this process."""
    import torch

    from bayesq_lightning import BayesQConfig, quantize_model
    from bayesq_lightning.layers import quantizable_layers
    from bayesq_lightning.posterior.fit import import_laplace

    import_laplace()  # its import (about 45 MB) in every method's baseline, not in quant_mb
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, image = _torchvision(name) if name in TORCHVISION else (_hf(name), 32)
    calib_batches = _batches(name, calib, seed=0, image=image)
    test_batches = _batches(name, 32, seed=1, image=image)
    recal = name in TORCHVISION and _recalibrate_batchnorm(model, calib_batches)
    model.eval()
    with torch.no_grad():
        std = float(torch.cat([_logits(model, b) for b in test_batches]).std())
    n_params = sum(p.numel() for p in model.parameters())
    n_layers = len(quantizable_layers(model))
    base = {"model": name, "method": method, "params": n_params, "layers": n_layers,
            "logit_std": std, "bn_recalibrated": recal}
    if method == "lowrank" and (n_layers > LOWRANK_MAX_LAYERS or n_params > LOWRANK_MAX_PARAMS):
        rows = [{**base, "bits": b, "status": "skipped: size"} for b in WIDTHS]
        print("ZOO-ROWS " + json.dumps(rows), flush=True)
        return rows
    rows, posterior = [], None
    for bits in WIDTHS:
        rss0, t0 = _rss_mb(), time.perf_counter()
        try:
            cfg = BayesQConfig(bits=bits, calib_batches=len(calib_batches), **METHODS[method])
            res = quantize_model(model, calib_batches, cfg, progress=False, posterior=posterior)
        except Exception as exc:  # a failing run is a row of the matrix
            rows.append({**base, "bits": bits, "status": f"{type(exc).__name__}: {exc}"[:300],
                         "seconds": time.perf_counter() - t0,
                         "where": traceback.format_exc().splitlines()[-3].strip()[:200]})
            print("ZOO-ROWS " + json.dumps(rows[-1:]), flush=True)
            continue
        seconds = time.perf_counter() - t0
        posterior = res.posterior
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append({**base, "bits": bits, "status": "ok", "seconds": seconds,
                     "peak_mb": peak, "quant_mb": peak - rss0,
                     "bits_per_weight": res.bits_per_weight,
                     "quantized_share": res.info["coverage"]["quantized_share"],
                     "skipped": len(res.skipped), "kl": _kl(model, res.model, test_batches),
                     "posterior_reused": bool(res.info.get("posterior_reused"))})
        print("ZOO-ROWS " + json.dumps(rows[-1:]), flush=True)  # kept should a width time out
    return rows


def _write(rows: list[dict], tag: str, quiet: bool) -> None:
    from common import write_table

    keys = list(dict.fromkeys(k for r in rows for k in r))
    write_table([{k: r.get(k) for k in keys} for r in rows], f"zoo{tag}",  # one set of columns
                ["model", "method", "bits", "status", "seconds", "peak_mb", "quant_mb",
                 "bits_per_weight", "quantized_share", "kl", "logit_std"], quiet=quiet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--calib", type=int, default=32, help="calibration inputs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds per process")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # prints its rows as it goes
        run_one(*args.one, args.calib, args.threads)
        return
    t_start, rows = time.perf_counter(), []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    for name in args.models:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--one", name, method, "--calib", str(args.calib),
                   "--threads", str(args.threads)]
            t0 = time.perf_counter()
            try:
                out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env,
                                     timeout=args.timeout)
                stdout, failed = out.stdout, (out.stderr.strip().splitlines() or ["?"])[-1]
            except subprocess.TimeoutExpired as exc:
                stdout, failed = exc.stdout or "", f"timeout ({args.timeout:.0f} s)"
                stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
            got = [r for x in stdout.splitlines() if x.startswith("ZOO-ROWS ")
                   for r in json.loads(x[9:])]
            done = {r["bits"] for r in got}
            got += [{"model": name, "method": method, "bits": b, "status": failed[:200]}
                    for b in WIDTHS if b not in done]
            for r in got:
                r["process_seconds"] = time.perf_counter() - t0
                print(f"{name:20s} {method:8s} {r['bits']}: {r['status'][:90]} "
                      f"({r.get('seconds', 0):.1f} s, {r.get('peak_mb', 0):.0f} MB)", flush=True)
            rows += got
            _write(rows, args.tag, quiet=True)  # what has run so far, should the run stop
    _write(rows, args.tag, quiet=False)
    print(f"zoo: {len(rows)} runs in {time.perf_counter() - t_start:.0f} s "
          f"({args.threads} threads, {args.calib} calibration inputs)")


if __name__ == "__main__":
    main()
