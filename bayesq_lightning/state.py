r"""Plain-data state of a quantization run: posterior and result as tensors and containers.

What a checkpoint carries so that a run can be resumed without refitting
(``BayesQCallback.state_dict``): the posterior's factors (``A``, ``G`` / ``U``, ``S``,
``residual`` / the diagonal) and mean, the allocation and the packed codes with their
metadata (each block's layout in the artifact manifest's schema,
:meth:`~bayesq_lightning.artifact.manifest.BlockSpec.layout_json`). Only tensors, numbers,
strings, lists, tuples and dicts, so a checkpoint holding it loads with ``torch.load(..., weights_only=True)``, all on the CPU. The tensors round-trip
exactly, so a restored result packs into the same model bit for bit and a restored posterior
given to ``quantize_model(..., posterior=...)`` reproduces the same codes; ``info`` dicts are
stored as JSON-like data (tuples come back as lists).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .artifact.manifest import BlockSpec, block_spec, jsonable
from .artifact.packing import pack_codes, unpack_codes
from .posterior import KronLayerPosterior, LayerPosterior, LowRankLayerPosterior, Posterior
from .result import BlockResult, LayerResult, QuantizationResult

STATE_VERSION = 1
LAYER_CLASSES: dict[str, type[LayerPosterior]] = {
    cls.structure: cls for cls in (LayerPosterior, KronLayerPosterior, LowRankLayerPosterior)}


class StateError(ValueError):
    """A saved state this version cannot restore (another version, missing or odd entries)."""


def posterior_state(posterior: Posterior) -> dict[str, Any]:
    """The posterior as plain CPU data: every init field of every layer record, except what
    the record derives from the others (K-FAC's ``curvature = outer(diag G, diag A)`` and
    ``precision = curvature + delta``: ``None`` in the state)."""
    layers = {}
    for name, lp in posterior.layers.items():
        derived = {"curvature", "precision"} if isinstance(lp, KronLayerPosterior) else set()
        fields = {f.name: None if f.name in derived else _cpu(getattr(lp, f.name))
                  for f in dataclasses.fields(lp) if f.init}
        layers[name] = {"structure": lp.structure, **fields}
    return {
        "layers": layers,
        **{k: getattr(posterior, k) for k in ("structure", "prior_precision", "n_data",
                                               "n_calib", "backend", "labels", "seconds")},
        "info": jsonable(posterior.info),
    }


def posterior_from_state(state: dict[str, Any]) -> Posterior:
    """The :class:`~bayesq_lightning.posterior.Posterior` saved by :func:`posterior_state`."""
    try:
        layers = {}
        for name, entry in state["layers"].items():
            entry = dict(entry)
            layers[name] = LAYER_CLASSES[entry.pop("structure")](**entry)
        return Posterior(layers=layers, **{k: state[k] for k in (
            "structure", "prior_precision", "n_data", "n_calib", "backend", "labels",
            "seconds")}, info=dict(state.get("info", {})))
    except (KeyError, TypeError) as e:
        raise StateError(f"the saved posterior is incomplete or of another version ({e!r}); "
                         "quantize again (posterior=None) to fit a new one") from e


def result_state(result: QuantizationResult) -> dict[str, Any]:
    """Allocation, packed codes and metadata of ``result`` (not its model or posterior)."""
    layers = []
    for x in result.layers:
        blocks = [{
            **block_spec(b).layout_json(),
            "codes": pack_codes(b.codes.reshape(-1).cpu(), b.bits).cpu(),
            **{k: getattr(b, k).cpu() for k in ("scale", "zero", "codebook")
               if getattr(b, k) is not None},
        } for b in x.blocks]
        layers.append({"name": x.name, "kind": x.kind, "weight_shape": tuple(x.weight_shape),
                       "blocks": blocks, "expected_loss": x.expected_loss, "bytes": x.bytes})
    return {
        "version": STATE_VERSION, "layers": layers,
        "bits_per_weight": result.bits_per_weight,
        "code_bits_per_weight": result.code_bits_per_weight,
        "budget_bits": int(result.budget_bits), "info": jsonable(result.info),
        "tied": dict(result.tied), "skipped": dict(result.skipped),
    }


def result_from_state(state: dict[str, Any], posterior: Posterior | None = None
                      ) -> QuantizationResult:
    """The :class:`~bayesq_lightning.QuantizationResult` saved by :func:`result_state`
    (``model=None``: pack it into a model with ``replace_quantized_layers``)."""
    if state.get("version") != STATE_VERSION:
        raise StateError(f"the saved quantization state has version {state.get('version')!r}, "
                         f"this bayesq-lightning reads {STATE_VERSION}; quantize again")
    try:
        layers = []
        for x in state["layers"]:
            blocks = []
            for b in x["blocks"]:
                meta = {k: b[k] for k in ("scale", "zero", "codebook") if k in b}
                s = BlockSpec.from_json(b, {k: tuple(t.shape) for k, t in meta.items()})
                codes = unpack_codes(b["codes"], s.bits, s.n_weights).reshape(s.n_rows, s.cols)
                blocks.append(BlockResult(s.rows, s.bits, s.quantizer, s.group_size, codes,
                                          **meta))
            layers.append(LayerResult(x["name"], x["kind"], tuple(x["weight_shape"]), blocks,
                                      x["expected_loss"], x["bytes"]))
        return QuantizationResult(
            model=None, layers=layers, bits_per_weight=state["bits_per_weight"],
            code_bits_per_weight=state["code_bits_per_weight"],
            budget_bits=state["budget_bits"], info=dict(state["info"]), posterior=posterior,
            tied=dict(state["tied"]), skipped=dict(state["skipped"]),
        )
    except (KeyError, TypeError, IndexError) as e:
        raise StateError(f"the saved quantization state is incomplete ({e!r}); quantize "
                         "again") from e


def fp32_weights(posterior: Posterior, model: torch.nn.Module | None = None
                 ) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": mean}``: the FP32 weights the posterior was fitted at (its means),
    e.g. to rebuild the float model from a checkpoint that holds only packed layers.

    With ``model`` (a float instance of the architecture), every name under which a fitted
    weight appears in its state dict is included: a layer registered twice, tied layers.
    """
    out = {f"{name}.weight": lp.mean.cpu() for name, lp in posterior.layers.items()}
    if model is not None:
        owner = {id(model.get_submodule(n).weight): n for n in posterior.layers}
        for path, m in model.named_modules(remove_duplicate=False):
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and id(w) in owner:
                out[f"{path}.weight"] = posterior.layers[owner[id(w)]].mean.cpu()
    return out


def _cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value
