"""Cross-check of this project's AdaRound and GPTQ against Brevitas' on the Fashion CNN.

Every Conv2d and Linear layer of the Fashion-MNIST ResNet-style CNN (``frontier.py``'s
``fashion_resnet`` case, the first conv and the classifier included) is quantized at one width
(2, 3 or 4 bits), weights only, one scale per output channel, from the same trained model and
the same 512-image calibration hold-out:

* ``adaround``: ``BayesQConfig(method="adaround", allowed_bits=(b,), bits=16.0)`` against
  Brevitas' learned round (``brevitas_examples.common.learned_round``, the layer-wise
  ``hard_sigmoid`` AdaRound of its ImageNet PTQ example);
* ``gptq``: ``BayesQConfig(method="gptq", ...)`` against ``brevitas.graph.gptq.gptq_mode``;
* ``rtn``: nearest rounding on the same grids (``method="rtn"``; Brevitas' quantizer alone),
  the anchor that separates the grids from the rounding algorithms.

Brevitas runs in a virtual environment of its own (``--brevitas-python``) as a subprocess of
this script (``--worker`` mode imports only torch and Brevitas): it receives the model as a
``torch.fx`` trace and the calibration images, and sends back each layer's fake-quantized
weight (``quant_weight().value``). Both sides' weights are evaluated by the same code
(:func:`bayesq_lightning.sweep.evaluate`) on the 10k test images; ``acc_se`` is the bootstrap
standard error, ``d_brevitas`` the accuracy difference ours minus Brevitas with its *paired*
bootstrap standard error. The Brevitas weights are checked to hold at most ``2**b`` levels
per output channel.

Setup of the Brevitas side, chosen to match ours (``SETUP`` below lists what still differs):
``ShiftedUint8WeightPerChannelFloat`` at ``bit_width=b``, ``narrow_range=False``, with the
ImageNet example's ``ParameterFromStatsFromParameterScaling`` / ``...ZeroPoint`` (asymmetric
min-max grid fixed from the FP32 weights), no input, output or bias quantizer, BatchNorm not
folded (as ours). Learned round: ``regularised_mse`` loss (round regulariser weight 0.01,
beta 20 -> 2 after a 20 % warm-up), Adam on the rounding parameters at our learning rate,
``--iters`` iterations of ``--batch`` calibration images per layer (the same on our side),
fp32 (the example's float16 autocast is off), the last iterate kept (``use_best_model=False``,
as the example). Two changes make it run as intended: Brevitas 0.13.4 rounds an asymmetric
quantizer's zero point with the weight quantizer's own rounding, so once that rounding is the
learned one the zero point turns into ``floor(z) + h(V)`` per weight and the soft weights no
longer start at ``W`` (:func:`_insert_learned_round` gives the zero point a plain copy); and
accelerate's device dispatch around each layer is skipped (one CPU; accelerate 1.16's
``remove_hooks`` fails on Brevitas' quantizer injectors).

Usage (``make bench`` builds Brevitas' venv at ``.cache/brevitas-venv``: ``python3 -m venv``,
then ``pip install brevitas accelerate "setuptools<81"``)::

    python benchmarks/crosscheck.py --brevitas-python .cache/brevitas-venv/bin/python

Run time: 31 minutes wall (13 minutes of CPU) on one thread of a 2-core machine shared with
other jobs, at the default ``--iters 1000 --batch 32``; the table states each row's seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path("benchmarks/results")
BITS = (2, 3, 4)
METHODS = ("rtn", "gptq", "adaround")
CALIB_BATCH = 128  # the case's calibration loader: 4 batches of 128 images

SETUP = {
    "grid": "both: asymmetric, per output channel, min-max of the FP32 weights (no clipping "
            "search), codes 0..2^b-1; ours: fp16 scale and fp16 (fractional) zero point; "
            "Brevitas: fp32 scale, zero point rounded to an integer",
    "layers": "both: every Conv2d and Linear (first conv and classifier included) at b bits; "
              "BatchNorm not folded; activations, biases and BatchNorm in FP32",
    "calibration": "both: the same 512 hold-out images",
    "rtn": "both: nearest rounding on the grid above (ours: method='rtn'; Brevitas: the "
           "quantizer alone)",
    "gptq": "both: damp 0.01 * mean(diag H), no act-order, one scale per row fixed before "
            "rounding; ours: every layer's H from the FP32 model's inputs (one pass); "
            "Brevitas: layers in turn, H from inputs of the model whose earlier layers are "
            "already quantized",
    "adaround": "both: rectified sigmoid (zeta 1.1, gamma -0.1), V initialised at the "
                "fractional part, loss = sum over channels of the squared output error, "
                "averaged, + 0.01 * rounding regulariser after 20 % warm-up, inputs from the "
                "model with earlier layers quantized, targets from the FP32 model, batches "
                "drawn with replacement, same Adam learning rate, iterations and batch; "
                "beta 20 -> 2 on a cosine (ours) vs linearly (Brevitas); ours reconstructs "
                "after a directly following activation module (none in this model: each conv "
                "feeds a BatchNorm), Brevitas the layer output; layer order: forward (ours) vs "
                "module registration (Brevitas), the same for this model; Brevitas in fp32 "
                "(its example's float16 autocast off), its zero point kept on plain rounding "
                "(0.13.4 otherwise rounds it with the learned rounding)",
}


# --------------------------------------------------------------------------- Brevitas side


def _brevitas_model(gm: nn.Module, bits: int) -> nn.Module:
    """``gm`` with every Conv2d/Linear a Brevitas layer quantizing its weight at ``bits``."""
    import brevitas.nn as qnn
    from brevitas.core.scaling.standalone import ParameterFromStatsFromParameterScaling
    from brevitas.core.zero_point import ParameterFromStatsFromParameterZeroPoint
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas.quant.shifted_scaled_int import ShiftedUint8WeightPerChannelFloat

    wq = ShiftedUint8WeightPerChannelFloat.let(
        bit_width=bits, narrow_range=False, scaling_impl=ParameterFromStatsFromParameterScaling,
        zero_point_impl=ParameterFromStatsFromParameterZeroPoint)
    kw = {"weight_quant": wq, "input_quant": None, "output_quant": None, "bias_quant": None,
          "return_quant_tensor": False}
    layer_map = {nn.Conv2d: (qnn.QuantConv2d, kw), nn.Linear: (qnn.QuantLinear, kw)}
    model = layerwise_quantize(copy.deepcopy(gm), compute_layer_map=layer_map).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear)):
                m.quant_weight()  # fixes the scale and zero point from the FP32 weights
    return model


def _brevitas_gptq(model: nn.Module, loader) -> None:
    from brevitas.graph.gptq import gptq_mode

    with torch.no_grad(), gptq_mode(model, act_order=False, use_quant_activations=False,
                                    create_weight_orig=False) as gptq:
        for _ in range(gptq.num_layers):
            for x, _y in loader:
                gptq.model(x)
            gptq.update()


def _insert_learned_round(model: nn.Module) -> None:
    """Brevitas' hard-sigmoid learned-round quantizers, each zero point kept integer.

    In Brevitas 0.13.4 the zero point is rounded by the weight quantizer's own ``IntQuant``
    (``_ScaleShiftZeroPoint.int_quant``), so once its rounding is the learned one the zero point
    becomes ``floor(z) + h(V)`` per weight and the soft weights no longer start at ``W``. The
    zero point gets a copy of the ``IntQuant`` from before the insertion (plain rounding).
    """
    from brevitas.inject.enum import LearnedRoundImplType
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
    from brevitas_examples.common.learned_round.learned_round_method import (
        insert_learned_round_quantizers,
    )

    layers = [m for m in model.modules() if isinstance(m, QuantWeightBiasInputOutputLayer)]
    plain = [copy.deepcopy(m.weight_quant.tensor_quant.int_quant) for m in layers]
    insert_learned_round_quantizers(model, LearnedRoundImplType.HARD_SIGMOID)
    for m, int_quant in zip(layers, plain, strict=True):
        m.weight_quant.tensor_quant.zero_point_impl.scale_shift_zero_point.int_quant = int_quant


def _brevitas_learned_round(model: nn.Module, loader, iters: int, batch: int, lr: float) -> None:
    import functools

    from brevitas_examples.common.learned_round import learned_round_trainer as trainer_module
    from brevitas_examples.common.learned_round.learned_round_args import (
        LossArgs,
        OptimizerArgs,
        TrainerConfig,
        TrainingArgs,
    )
    from brevitas_examples.common.learned_round.learned_round_trainer import (
        LearnedRoundTrainer,
        get_blocks,
    )
    from brevitas_examples.imagenet_classification.ptq.learned_round_utils import (
        CacheVision,
        is_layer,
        vision_block_forward,
        vision_forward,
    )

    # the ImageNet example's parse_args_to_dataclass, in fp32 and with the schedule's length
    # (the regulariser's max_count, 1000 by default) at --iters
    training = TrainingArgs(
        optimizers_args=[OptimizerArgs(target_params="learned_round", optimizer_cls="Adam",
                                       lr=lr, optimizer_kwargs={})],
        batch_size=batch, iters=iters,
        losses_args=[LossArgs(cls="round_reg", kwargs={"max_count": iters}),
                     LossArgs(cls="mse", kwargs={"reduction": "none", "dim": 1})],
        loss_scaling_factor=1.0, use_best_model=False, use_amp=False, fast_update=False)
    # accelerate's device dispatch is a no-op on one CPU, and accelerate 1.16's remove_hooks
    # fails on Brevitas' quantizer injectors (getattr raises DependencyError): both skipped
    trainer_module.offload_model = lambda model: model
    trainer_module.remove_hooks = lambda model: None
    _insert_learned_round(model)  # in place of the example's HandlerSpec("learned_round")
    config = TrainerConfig(training_args=training)
    LearnedRoundTrainer(config=config).train(
        model=model, model_forward=vision_forward, block_forward=vision_block_forward,
        data_loader=loader, cache=CacheVision(),
        get_blocks_fn=functools.partial(get_blocks, block_check_fn=is_layer), keep_gpu=True)


def worker(inp: Path, out: Path, bits: list[int], iters: int, batch: int, lr: float) -> None:
    """The Brevitas side: each method at each width, the layers' fake-quantized weights."""
    import brevitas
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    blob = torch.load(inp, weights_only=False)
    loader = DataLoader(TensorDataset(blob["calib_x"], blob["calib_y"]), CALIB_BATCH)
    results = {"version": brevitas.__version__, "torch": torch.__version__, "runs": {}}
    for b in bits:
        for method in METHODS:
            model = _brevitas_model(blob["model"], b)
            t0 = time.perf_counter()
            if method == "rtn":
                pass  # the quantizer alone: nearest rounding on the min-max grid
            elif method == "gptq":
                _brevitas_gptq(model, loader)
            else:
                _brevitas_learned_round(model, loader, iters, batch, lr)
            seconds = time.perf_counter() - t0
            model.eval()
            with torch.no_grad():
                weights = {f"{n}.weight": m.quant_weight().value.detach().clone()
                           for n, m in model.named_modules()
                           if isinstance(m, QuantWeightBiasInputOutputLayer)}
            results["runs"][f"{method}/{b}"] = {"weights": weights, "seconds": seconds}
            print(f"brevitas {method} {b} bits: {seconds:.0f} s", flush=True)
    torch.save(results, out)


# --------------------------------------------------------------------------- our side


def _run_brevitas(model: nn.Module, calib_x: torch.Tensor, calib_y: torch.Tensor,
                  args: argparse.Namespace, lr: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save({"model": torch.fx.symbolic_trace(model), "calib_x": calib_x,
                    "calib_y": calib_y}, inp)
        cmd = [args.brevitas_python, __file__, "--worker", str(inp), str(out),
               "--bits", *map(str, args.bits), "--iters", str(args.iters),
               "--batch", str(args.batch), "--lr", str(lr)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "TQDM_DISABLE": "1", "PYTHONPATH": ""}
        subprocess.run(cmd, check=True, env=env)
        return torch.load(out, weights_only=False)


def _levels(w: torch.Tensor) -> int:
    """Most distinct values in one output channel of ``w``."""
    rows = w.reshape(w.shape[0], -1)
    return max(int(torch.unique(r).numel()) for r in rows)


def _with_weights(model: nn.Module, weights: dict[str, torch.Tensor], bits: int) -> nn.Module:
    """A copy of ``model`` holding ``weights``, each checked to hold ``<= 2**bits`` levels."""
    quantized = copy.deepcopy(model)
    state = quantized.state_dict()
    for key, w in weights.items():
        if _levels(w) > 2 ** bits:
            raise RuntimeError(f"Brevitas weight {key} has {_levels(w)} levels > 2^{bits}")
        state[key] = w.to(state[key].dtype).reshape(state[key].shape)
    quantized.load_state_dict(state)
    return quantized


def _row(method: str, impl: str, bits: int, metrics: dict, seconds: float) -> dict:
    return {"method": method, "impl": impl, "bits": bits, "accuracy": metrics["accuracy"],
            "acc_se": metrics["accuracy_se"], "seconds": seconds,
            "_correct": metrics["_correct"]}


def _paired(rows: list[dict]) -> None:
    from bayesq_lightning.metrics import bootstrap_se

    theirs = {(r["method"], r["bits"]): r["_correct"] for r in rows if r["impl"] == "brevitas"}
    for r in rows:
        other = theirs.get((r["method"], r["bits"]))
        if r["impl"] == "bayesq" and other is not None:
            diff = r["_correct"] - other
            r["d_brevitas"], r["d_brevitas_se"] = float(diff.mean()), bootstrap_se(diff)
    for r in rows:
        del r["_correct"]


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = ["| method | implementation | bits | accuracy ± SE | ours − Brevitas (paired SE) "
             "| seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        d = (f"{100 * r['d_brevitas']:+.2f} ± {100 * r['d_brevitas_se']:.2f} pt"
             if "d_brevitas" in r else "")
        lines.append(f"| {r['method']} | {r['impl']} | {r['bits']} | {100 * r['accuracy']:.2f} "
                     f"± {100 * r['acc_se']:.2f} % | {d} | {r['seconds']:.0f} |")
    lines += ["", "Setup (both sides weight-only, per output channel, same width everywhere):", ""]
    lines += [f"* **{k}**: {v}" for k, v in SETUP.items()]
    lines += ["", f"AdaRound / learned round: {meta['iters']} iterations of {meta['batch']} "
              f"images per layer, Adam lr {meta['lr']}. Brevitas {meta['brevitas']} on torch "
              f"{meta['brevitas_torch']}; ours on torch {meta['torch']}. Wall time "
              f"{meta['wall_s'] / 60:.1f} min on one thread.", "",
              f"Command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from frontier import fashion_case

    from bayesq_lightning import BayesQConfig, quantize_model
    from bayesq_lightning.adaround import LR
    from bayesq_lightning.sweep import evaluate

    torch.set_num_threads(1)
    start = time.perf_counter()
    case = fashion_case()
    model = case.model.eval()
    calib = list(case.calib)
    calib_x, calib_y = torch.cat([x for x, _ in calib]), torch.cat([y for _, y in calib])
    theirs = _run_brevitas(model, calib_x, calib_y, args, LR)
    rows = [_row("fp32", "-", 32, evaluate(model, case.test), 0.0)]
    for b in args.bits:
        for method in METHODS:
            cfg = BayesQConfig(method=method, allowed_bits=(b,), bits=16.0,
                               adaround_iters=args.iters, adaround_batch=args.batch,
                               **case.config)
            t0 = time.perf_counter()
            res = quantize_model(model, case.calib, cfg, n_data=case.n_data, progress=False)
            rows.append(_row(method, "bayesq", b, evaluate(res.model, case.test),
                             time.perf_counter() - t0))
            run = theirs["runs"][f"{method}/{b}"]
            rows.append(_row(method, "brevitas", b,
                             evaluate(_with_weights(model, run["weights"], b), case.test),
                             run["seconds"]))
            print(f"{method} {b} bits: ours {rows[-2]['accuracy']:.4f}, "
                  f"brevitas {rows[-1]['accuracy']:.4f}", flush=True)
    _paired(rows)
    meta = {"iters": args.iters, "batch": args.batch, "lr": LR, "torch": torch.__version__,
            "brevitas": theirs["version"], "brevitas_torch": theirs["torch"],
            "wall_s": time.perf_counter() - start, "setup": SETUP,
            "command": "BAYESQ_BENCH_CACHE=/work/main/.cache/bench OMP_NUM_THREADS=1 "
                       "PYTHONPATH=$PWD nice -n 10 python " + " ".join(sys.argv)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "crosscheck.json").write_text(json.dumps({"rows": rows, **meta}, indent=2))
    text = _markdown(rows, meta)
    (RESULTS / "crosscheck.md").write_text(text)
    print(text)
    print(f"wrote {RESULTS}/crosscheck.json and .md")


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--brevitas-python", default=".cache/brevitas-venv/bin/python",
                   help="python of a venv with brevitas and accelerate installed")
    p.add_argument("--bits", type=int, nargs="+", default=list(BITS))
    p.add_argument("--iters", type=int, default=1000, help="AdaRound iterations per layer")
    p.add_argument("--batch", type=int, default=32, help="AdaRound images per iteration")
    p.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, type=Path, metavar=("IN", "OUT"),
                   help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    ARGS = _parse()
    if ARGS.worker:
        worker(*ARGS.worker, ARGS.bits, ARGS.iters, ARGS.batch, ARGS.lr)
    else:
        main(ARGS)
