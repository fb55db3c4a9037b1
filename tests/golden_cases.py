r"""Golden fixtures: fingerprints of quantization runs on a trained digits CNN; their comparisons.

The trained weights are stored beside the fingerprints (``tests/golden/digits_cnn.safetensors``)
so that training noise never enters. Compared by ``tests/test_golden.py``.

A fingerprint of one run holds its allocation (every block's rows, width, quantizer and group
size), SHA-256 digests of its codes and metadata, of the artifact's tensors and of the
manifest's layer entries, the achieved bits per weight, every layer's expected loss and every
layer's relative weight error :math:`\|\hat W - W\|_F^2 / \|W\|_F^2` (float64, :math:`\hat W`
decoded from the codes). The callback's run also holds its report (accuracy, NLL, ECE).

Two comparisons:

* **strict** (in ``tests/test_golden.py``), where a recording of this environment exists
  (torch build, architecture, instruction set, CPU vendor: another CPU's floating-point kernels
  round differently, e.g. MKL takes other code paths on AMD than on Intel at the same
  instruction set): every field exact, the expected losses to 1e-5 relative and the weight
  errors (which the codes' digest pins) to float64 summation order.
* **tolerant** (:func:`deviations`), against any recording, from any environment: the
  allocation and the bits per weight exact; every other number :math:`x` within its window

  .. math:: |x - x_{ref}| \le \max(\rho\,|x_{ref}|,\ \kappa\,s(x)),

  where :math:`s(x)` is the range of :math:`x` over the stored recordings: the difference that
  a change of machine is measured to make. A layer's expected loss and weight error are
  compared only where its expected loss agreed across the recordings to :math:`\rho`: where it
  did not, the layer's codes move with the kernels' rounding, and on an emulated AVX2 machine
  such a loss moved up to 54 times its spread, so no window derived from the recordings bounds
  it. The Monte-Carlo cases (:data:`TOLERANT_SKIPPED`) are compared strictly only.
  :data:`RHO` and :data:`KAPPA` say how they are chosen; ``benchmarks/golden_effects.py``
  measures them against the recordings, an emulated foreign machine and small real changes.

Record (only when a change of behaviour is intended, and say so in the commit)::

    .venv/bin/python tests/golden_cases.py --record

``--record`` retrains and replaces every recording with this environment's (the intended change
cannot be checked elsewhere); ``--keep-weights`` keeps the stored weights; ``--record
--keep-weights --add`` adds or replaces only this environment's, for a new kind of machine
where nothing changed, or to add fields to this environment's recording (check first that the
strict test passes here). A recording lacks the fields added after it was made; both
comparisons compare the fields the recording holds.

An intended change confined to some cases (e.g. a solver step only Monte-Carlo tables reach)::

    .venv/bin/python tests/golden_cases.py --record --keep-weights --add --forget _mc@

records this environment and removes the cases whose names contain ``_mc@`` from the other
recordings, which cannot be re-recorded here: first check that ``git diff`` of the fingerprints
changes no other case's values.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset

HERE = Path(__file__).parent / "golden"
WEIGHTS = HERE / "digits_cnn.safetensors"
FINGERPRINTS = HERE / "fingerprints.json"
BUDGETS = (2.5, 3.0)

# name -> BayesQConfig fields (besides bits; "budgets" overrides BUDGETS, e.g. where group
# metadata alone costs 2 bits/weight); posteriors are fitted once per name and reused
# across budgets, as a user sweeping budgets would.
CASES: dict[str, dict] = {
    "rtn": {"method": "rtn"},
    "mse": {"method": "mse"},
    "gptq": {"method": "gptq"},
    "gptq_groups_blocks": {"method": "gptq", "group_size": 16, "block_rows": 16,
                           "budgets": (4.25, 4.5)},
    "hawq": {"method": "hawq"},
    "bayesq_diag": {"structure": "diag"},
    "bayesq_diag_expected": {"structure": "diag", "range_objective": "expected"},
    "bayesq_kron": {"structure": "kron"},
    "bayesq_lowrank": {"structure": "lowrank", "rank": 2},
    "bayesq_kron_mc": {"structure": "kron", "tables": "mc", "mc_samples": 2,
                       "mc_refine_top_k": 3},
    "bayesq_diag_mc": {"structure": "diag", "tables": "mc", "mc_samples": 2},
    "bayesq_kron_auto": {"structure": "kron", "quantizer": "auto"},
    "bayesq_kron_nonuniform": {"structure": "kron", "quantizer": "nonuniform"},
    "bayesq_diag_nonuniform_per_row": {"structure": "diag", "quantizer": "nonuniform",
                                       "per_row_codebook": True},
    "bayesq_kron_group16": {"structure": "kron", "group_size": 16, "budgets": (4.25, 4.5)},
    "bayesq_kron_blocks16": {"structure": "kron", "block_rows": 16},
    "bayesq_kron_dp_pins": {"structure": "kron", "solver": "dp",
                            "min_bits": {"features.0.*": 8}, "allowed_bits": (2, 3, 4, 8)},
    "bayesq_kron_checked": {"structure": "kron", "tables": "checked"},
}
# The cases above run under the closed form unless they name their tables (BayesQ's default
# "auto" means the checks, which have their own case): the recordings that predate the checks
# stay valid. A recording holds the cases that existed when it was made, less those an intended
# change elsewhere voided (``--forget``); both comparisons compare the cases it holds.
CASE_DEFAULTS = {"tables": "closed_form"}

# Tolerant comparison (see the module docstring). RHO: the floor of every window, ten times
# (rounded up to a power of ten) the largest relative difference between the recordings among
# runs whose codes agree on every recorded machine, i.e. float summation order alone
# (``test_golden.py`` checks that it still covers it). KAPPA: how many times the measured
# difference between recorded machines a new machine may differ from a recording;
# ``benchmarks/golden_effects.py`` measures it on an emulated machine (other instruction set).
RHO = 1e-4
KAPPA = 4.0
# Fields compared exactly in the tolerant comparison: they are discrete, and every recording
# agrees on them.
EXACT_FIELDS = ("allocation", "bits_per_weight")
# Cases left out of the tolerant comparison: their tables estimate each upgrade's loss from two
# posterior draws (``mc_samples=2``), a difference of near-equal KLs that another machine's
# rounding can reorder (on an emulated AVX2 machine one block of ``bayesq_kron_mc`` took
# another width). The non-Monte-Carlo cases cover the same posteriors.
# The checked case likewise: its grid choices compare measured KLs of near-equal grids.
TOLERANT_SKIPPED = tuple(name for name, fields in CASES.items()
                         if fields.get("tables") in ("mc", "checked"))


def environment() -> dict:
    """What the fingerprints depend on besides the code."""
    return {"torch": torch.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_vendor": cpu_vendor()}


def cpu_vendor() -> str:
    """``vendor_id`` of ``/proc/cpuinfo`` (e.g. GenuineIntel, AuthenticAMD), else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def recordings() -> list[dict]:
    """Every stored recording: ``{"environment", "cases", "callback"}``."""
    return json.loads(FINGERPRINTS.read_text())["recordings"]


def recording_here() -> dict | None:
    """The recording made in this environment, if any."""
    env = environment()
    return next((r for r in recordings() if r["environment"] == env), None)


def run_of(recording: dict, key: str) -> dict:
    """One run's fingerprint in a recording: ``key`` is ``"case@bits"`` or ``"callback"``."""
    return recording["callback"] if key == "callback" else recording["cases"][key]


def _digits():
    from bayesq_lightning.lightning.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return dm


def _model():
    from bayesq_lightning.lightning.models import DigitsCNN

    torch.manual_seed(0)
    return DigitsCNN()


def train_weights() -> dict[str, torch.Tensor]:
    """A few epochs of plain-loop training (recording only; the test loads the stored file)."""
    dm = _digits()
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(4):
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def trained_model():
    model = _model()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()


def calibration_loader() -> DataLoader:
    dm = _digits()
    return DataLoader(Subset(dm.train_set, list(range(128))), batch_size=64)


def float_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every module's weight as float64 ``(rows, prod(rest))``, by module name."""
    return {name: m.weight.detach().double().reshape(m.weight.shape[0], -1)
            for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)}


def _sha(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
        else:
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
    return h.hexdigest()


def weight_errors(result, weights: dict[str, torch.Tensor]) -> list[float]:
    r"""Per layer :math:`\|\hat W - W\|_F^2 / \|W\|_F^2`, :math:`\hat W` decoded from the codes.

    Elementwise decoding of the same codes gives the same floats on every IEEE machine, so this
    differs between machines by float64 summation order alone unless a code moved.
    """
    from bayesq_lightning.quantizers import dequantize

    out = []
    for layer in result.layers:
        w = weights[layer.name]
        err = sum(float((dequantize(b).double() - w[b.rows[0]:b.rows[1]]).square().sum())
                  for b in layer.blocks)
        out.append(err / float(w.square().sum()))
    return out


def fingerprint(result, model_for_artifact, workdir: Path,
                weights: dict[str, torch.Tensor] | None = None) -> dict:
    """Allocation, codes + metadata and artifact hashes of one result, plus its metrics.

    ``weights`` (:func:`float_weights` of the model that was quantized) adds the layers'
    weight errors.
    """
    from bayesq_lightning import save_quantized

    allocation = [[x.name, [[list(b.rows), b.bits, b.quantizer, b.group_size] for b in x.blocks]]
                  for x in result.layers]
    codes = _sha(*[t for x in result.layers for b in x.blocks
                   for t in (b.codes, b.scale, b.zero, b.codebook)])
    save_quantized(model_for_artifact, result, workdir, overwrite=True)  # one dir per case
    manifest = json.loads((workdir / "bayesq.json").read_text())
    fp = {
        "allocation": allocation,
        "codes_sha256": codes,
        # every stored tensor's bytes; not the file, whose header names library versions
        "artifact_tensors_sha256": manifest["tensors_sha256"],
        "manifest_layers_sha256": hashlib.sha256(
            json.dumps(manifest["layers"], sort_keys=True).encode()).hexdigest(),
        "bits_per_weight": result.bits_per_weight,
        "expected_loss": [x.expected_loss for x in result.layers],
    }
    if weights is not None:
        fp["weight_error"] = weight_errors(result, weights)
    return fp


def quantize_case(model, loader, name: str, bits: float, posterior=None, **overrides):
    """``quantize_model`` on one case at one budget; ``overrides`` replace the case's fields."""
    from bayesq_lightning import BayesQConfig, quantize_model

    fields = {**CASE_DEFAULTS, **{k: v for k, v in CASES[name].items() if k != "budgets"}}
    cfg = BayesQConfig(bits=bits, calib_batches=2, **{**fields, **overrides})
    return quantize_model(model, loader, cfg, n_data=1437, progress=False, posterior=posterior)


def run_cases(names=None) -> dict:
    """Fingerprints of every case (or those in ``names``) at each of its budgets."""
    torch.set_num_threads(2)
    out: dict = {}
    model = trained_model()
    weights = float_weights(model)
    loader = calibration_loader()
    with tempfile.TemporaryDirectory() as tmp:
        for name, fields in CASES.items():
            if names is not None and name not in names:
                continue
            posterior = None
            for bits in fields.get("budgets", BUDGETS):
                res = quantize_case(model, loader, name, bits, posterior=posterior)
                posterior = res.posterior
                out[f"{name}@{bits}"] = fingerprint(res, res.model, Path(tmp) / name, weights)
    return out


def run_callback() -> dict:
    """One ``BayesQCallback`` run: one epoch from the stored weights, 3.0 bits, RTN compared.

    No weight errors: the callback quantizes the trained module in place.
    """
    import lightning.pytorch as pl

    from bayesq_lightning import BayesQCallback

    torch.set_num_threads(2)
    pl.seed_everything(0, verbose=False)
    model = trained_model()
    dm = _digits()
    with tempfile.TemporaryDirectory() as tmp:
        cb = BayesQCallback(bits=3.0, compare=("rtn",), calib_batches=2, export_dir=tmp,
                            progress=False, **CASE_DEFAULTS)
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, callbacks=[cb], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", devices=1)
        trainer.fit(model, dm)
        fp = fingerprint(cb.result, model, Path(tmp))
    fp["report"] = {k: cb.report[k] for k in ("fp32", "quantized", "baselines")}
    fp["rtn_codes_sha256"] = fingerprint(cb.baselines["rtn"], cb.baselines["rtn"].model,
                                         Path(tempfile.mkdtemp()))["codes_sha256"]
    return fp


def numbers(fp: dict) -> dict[str, float]:
    """The fingerprint's continuous values by path: ``expected_loss[2]``, ``report.fp32.nll``."""
    out = {f"{k}[{i}]": float(v) for k in ("expected_loss", "weight_error")
           for i, v in enumerate(fp.get(k, ()))}

    def walk(prefix: str, d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}.{k}", v)
            else:
                out[f"{prefix}.{k}"] = float(v)

    walk("report", fp.get("report", {}))
    return out


def spreads(runs: list[dict]) -> dict[str, float]:
    """Per value path, its range over ``runs`` (one run's fingerprints in several recordings)."""
    values: dict[str, list[float]] = {}
    for fp in runs:
        for path, v in numbers(fp).items():
            values.setdefault(path, []).append(v)
    return {path: max(v) - min(v) for path, v in values.items()}


def _blocks_differing(got: list, want: list) -> int:
    """How many blocks of two allocations differ (a layer of another shape counts all its)."""
    if [x[0] for x in got] != [x[0] for x in want]:
        return max(sum(len(x[1]) for x in got), 1)
    return sum(len(a[1]) + len(b[1]) if len(a[1]) != len(b[1])
               else sum(p != q for p, q in zip(a[1], b[1], strict=True))
               for a, b in zip(got, want, strict=True))


def deviations(got: dict, want: dict, spread: dict[str, float]) -> list[tuple[str, float, float]]:
    """``(field, |got - want|, window)`` for every field the tolerant comparison checks.

    ``want`` is a recorded fingerprint and ``spread`` the range of each value over the
    recordings (:func:`spreads`). The allocation's deviation is the number of blocks that
    differ; it and the bits per weight have window 0. A value lies outside its window, or a
    field is missing from ``got``, when the deviation exceeds the window (missing: ``inf``).
    """
    out = [("allocation", float(_blocks_differing(got["allocation"], want["allocation"])), 0.0),
           ("bits_per_weight", abs(got["bits_per_weight"] - want["bits_per_weight"]), 0.0)]
    have, ref = numbers(got), numbers(want)
    for path, r in ref.items():
        el = path.replace("weight_error", "expected_loss")
        if el.startswith("expected_loss") and spread.get(el, 0.0) > RHO * abs(ref.get(el, 0.0)):
            continue  # the layer's codes move with the machine's kernels: nothing bounds them
        window = max(RHO * abs(r), KAPPA * spread.get(path, 0.0))
        out.append((path, abs(have[path] - r) if path in have else math.inf, window))
    return out


def tolerant_diff(got: dict, want: dict, spread: dict[str, float]) -> list[str]:
    """The fields of ``got`` outside their windows around ``want`` (empty: within tolerance)."""
    return [f"{path}: deviation {d:.3g} > window {w:.3g}"
            for path, d, w in deviations(got, want, spread) if d > w]


# Small real changes of one case, each of which the tolerant comparison must reject: the
# error-feedback damping 1% larger, one code one level further from its float weight (in a layer
# whose codes agree between machines), and one 8-bit layer capped at 4 bits (one block moved
# to another width; the bits it frees buy no other upgrade).
PERTURBED_CASE = ("gptq", 3.0)
FLIP_LAYER = "features.3.0"
NARROWED = {"features.0.0": 4}
DAMP, FLIP, NARROW = "damp x 1.01", f"one flipped code in {FLIP_LAYER}", "one block narrowed"


def flip_code(result, weights: dict[str, torch.Tensor], layer: str, index: int = 0) -> None:
    """Move code ``index`` of the layer's first block one level further from its float weight.

    Up when the decoded weight is at or above the float weight ``weights[layer]`` (down at the
    top level, up at the bottom), so the change is never a tie; ``result`` is modified in
    place.
    """
    from bayesq_lightning.quantizers import dequantize

    block = next(x for x in result.layers if x.name == layer).blocks[0]
    codes = block.codes.view(-1)
    w = weights[layer][block.rows[0]:block.rows[1]].reshape(-1)
    up = float(dequantize(block).reshape(-1)[index]) >= float(w[index])
    top = 2 ** block.bits - 1
    k = int(codes[index])
    codes[index] = k + 1 if (up and k < top) or k == 0 else k - 1


def perturbed_runs(case: tuple[str, float] = PERTURBED_CASE, damp: bool = True,
                   flip_layers: tuple[str, ...] = (FLIP_LAYER,)) -> dict[str, dict]:
    """Fingerprints of one case unperturbed (``"none"``) and under each small real change.

    Keys: ``"none"``, :data:`DAMP` (if ``damp``), :data:`NARROW`, and ``"one flipped code in
    <layer>"`` for each of ``flip_layers`` (each flip on its own copy of the unperturbed result).
    """
    from bayesq_lightning import BayesQConfig

    torch.set_num_threads(2)
    name, bits = case
    model, loader = trained_model(), calibration_loader()
    weights = float_weights(model)
    with tempfile.TemporaryDirectory() as tmp:
        def fp(res, label: str) -> dict:
            return fingerprint(res, res.model, Path(tmp) / label.replace(" ", "_"), weights)

        base = quantize_case(model, loader, name, bits)
        out = {"none": fp(base, "none")}
        if damp:
            res = quantize_case(model, loader, name, bits, damp=BayesQConfig().damp * 1.01)
            out[DAMP] = fp(res, "damp")
        out[NARROW] = fp(quantize_case(model, loader, name, bits, max_bits=NARROWED), "narrow")
        for layer in flip_layers:
            flipped = copy.deepcopy(base)
            flip_code(flipped, weights, layer)
            out[f"one flipped code in {layer}"] = fp(flipped, f"flip {layer}")
    return out


def record(retrain: bool = True, add: bool = False, forget: str | None = None) -> None:
    """Re-record the fingerprints; ``retrain=False`` (``--keep-weights``) keeps the stored
    weights, e.g. after an intended artifact format change, so only what changed moves.
    ``add=True`` keeps the other environments' recordings (new weights void them), less the
    cases whose names contain ``forget``."""
    HERE.mkdir(exist_ok=True)
    if retrain:
        save_file(train_weights(), str(WEIGHTS))
    here = {"environment": environment(), "cases": run_cases(), "callback": run_callback()}
    others = [r for r in recordings() if r["environment"] != here["environment"]] \
        if add and not retrain and FINGERPRINTS.exists() else []
    for r in others if forget else []:
        r["cases"] = {k: v for k, v in r["cases"].items() if forget not in k}
    FINGERPRINTS.write_text(json.dumps({"recordings": [*others, here]}, indent=1) + "\n")
    print(f"wrote {FINGERPRINTS}: {len(here['cases'])} cases + callback for "
          f"{here['environment']}; {len(others)} other recording(s) kept")


if __name__ == "__main__":
    if "--record" in sys.argv:
        forget = sys.argv[sys.argv.index("--forget") + 1] if "--forget" in sys.argv else None
        record(retrain="--keep-weights" not in sys.argv, add="--add" in sys.argv, forget=forget)
    else:
        print(__doc__)
