"""The on-disk artifact: ``model.safetensors``, self-describing, plus a ``bayesq.json`` copy.

The manifest travels inside the safetensors header (metadata key ``"bayesq"``) with a digest of
the tensors, so the one file is the whole artifact and its ``os.replace`` is the commit: an
interrupted save leaves the previous artifact loadable, whatever the point of interruption.
``bayesq.json`` is a readable copy written just after; the loader reads the header and warns
when the copy disagrees (a save interrupted between the two). Tensors that share storage (tied
weights) are stored once and the other names are recorded as aliases. No pickle is involved.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..quantizers import storage_bits
from ..result import QuantizationResult
from .modules import (
    FLOAT_TYPES,
    QUANTIZED_TYPES,
    BlockSpec,
    block_spec,
    conv_options,
    module_paths,
    packed_alias,
    quantized_from_float,
    set_submodule,
    tie_packed,
)

SCHEMA_VERSION = 2  # 2: the manifest moved into the safetensors header
TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "bayesq.json"
HEADER_KEY = "bayesq"
WHICH = ("save the model this result was computed for (pass the QuantizationResult that "
         "produced this model)")


class ArtifactError(ValueError):
    """An artifact that cannot be loaded: corrupt, of another schema, or for another model."""


def save_quantized(
    model: nn.Module, result: QuantizationResult, directory: str | os.PathLike
) -> Path:
    """Write the packed model and its manifest to ``directory``.

    Parameters
    ----------
    model : nn.Module
        The model to store. Layers named in ``result.layers`` may already be packed modules
        (:class:`~bayesq_lightning.modules.QuantizedLinear` / ``QuantizedConv2d``) or still be
        float layers; float ones are packed from ``result.layers`` without modifying ``model``.
    result : QuantizationResult
        Per-layer blocks, budget and achieved bits, posterior info.
    directory : str or os.PathLike
        Created if missing; ``model.safetensors`` and ``bayesq.json`` are replaced.

    Returns
    -------
    Path
        ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, packed = _packed_state(model, result)
    tensors, aliases = _dedupe(state)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "tensors_file": TENSORS_FILE,
        "tensors_sha256": tensors_digest(tensors),
        "aliases": aliases,
        "layers": [layer_entry(name, packed[name]) for name in (x.name for x in result.layers)],
        "tied": [tied_entry(alias, owner, packed[alias]) for alias, owner in result.tied.items()],
        "budget_bits": int(result.budget_bits),
        "n_weights": sum(math.prod(packed[x.name].weight_shape) for x in result.layers),
        "bits_per_weight": float(result.bits_per_weight),
        "code_bits_per_weight": float(result.code_bits_per_weight),
        "posterior": {
            "structure": jsonable(result.info.get("structure")),
            "prior_precision": jsonable(result.info.get("prior_precision")),
        },
        "method": jsonable(result.info.get("method")),
        "versions": {
            "torch": torch.__version__,  # includes the build tag (e.g. +cu130)
            **{
                name: _version(name)
                for name in ("laplace-torch", "bayesq-lightning", "safetensors")
            },
        },
    }
    text = json.dumps(manifest, indent=1)
    # the commit: until this rename the previous model.safetensors (with its own manifest) holds
    _atomic_write(directory / TENSORS_FILE,
                  lambda p: save_file(tensors, str(p), metadata={HEADER_KEY: text}))
    _atomic_write(directory / MANIFEST_FILE, lambda p: p.write_text(text, encoding="utf-8"))
    return directory


def load_quantized(model_skeleton: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an artifact written by :func:`save_quantized` into a float model of the same class.

    Everything is checked and loaded into a copy first; only when that succeeded are the packed
    layers swapped into ``model_skeleton`` and its other tensors overwritten, so on any error the
    skeleton is left as it was.

    Parameters
    ----------
    model_skeleton : nn.Module
        A fresh instance of the saved model's architecture (its float values are overwritten).
    directory : str or os.PathLike
        Holds ``bayesq.json`` and ``model.safetensors``.

    Returns
    -------
    nn.Module
        ``model_skeleton``, now holding the packed layers and the stored tensors.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    tensors_path = directory / TENSORS_FILE
    if not tensors_path.is_file():
        if manifest_path.is_file():
            raise FileNotFoundError(f"no tensor file {tensors_path} next to {manifest_path}: "
                                    "the export did not finish; re-export the model")
        raise FileNotFoundError(f"no artifact in {directory} (neither {TENSORS_FILE} nor "
                                f"{MANIFEST_FILE}); export it with save_quantized")
    manifest, text, state = _read_artifact(tensors_path)
    if manifest_path.is_file() and manifest_path.read_bytes() != text.encode("utf-8"):
        warnings.warn(f"{manifest_path} does not match the manifest inside {tensors_path} (a save "
                      "interrupted between the two?); loading what the tensor file describes",
                      stacklevel=2)
    try:
        if tensors_digest(state) != manifest["tensors_sha256"]:
            raise ArtifactError(
                f"{tensors_path} does not match the digest of its manifest: the artifact is "
                "corrupt or was interrupted; re-export"
            )
        replacements = packed_modules(model_skeleton, manifest["layers"],
                                      manifest.get("tied", []), tensors_path)
        for alias, target in manifest["aliases"].items():
            state[alias] = state[target]
    except (KeyError, TypeError, IndexError) as e:
        raise ArtifactError(f"the manifest of {tensors_path} is malformed ({e!r}); re-export "
                            "the model") from e

    trial = copy.deepcopy(model_skeleton)
    for name, module in replacements.items():
        set_submodule(trial, name, module)
    try:
        missing, unexpected = trial.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ArtifactError(
            f"{tensors_path} does not fit the skeleton: {e}; build the skeleton with the "
            f"configuration of the saved model"
        ) from e
    if missing or unexpected:
        raise ArtifactError(
            f"{tensors_path} does not fit the skeleton: missing {sorted(missing)}, unexpected "
            f"{sorted(unexpected)}; build the skeleton with the configuration of the saved model"
        )

    # Everything fitted on the copy; the same structure cannot fail now.
    for name in replacements:
        set_submodule(model_skeleton, name, trial.get_submodule(name))
    model_skeleton.load_state_dict(state, strict=True)
    from ..hf import attach_hf_config  # a transformers skeleton can then save_pretrained

    attach_hf_config(model_skeleton, [e["name"] for e in manifest["layers"]],
                     {t["name"]: t["owner"] for t in manifest.get("tied", [])},
                     {"bits_per_weight": manifest.get("bits_per_weight")})
    return model_skeleton


def _packed_state(
    model: nn.Module, result: QuantizationResult
) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """The state dict of ``model`` with every result layer packed, and the packed modules.

    Float layers are packed into new modules whose state replaces theirs in the dict; ``model``
    is not modified.
    """
    names = [x.name for x in result.layers] + list(result.tied)
    quantized_types = tuple(QUANTIZED_TYPES.values())
    stray = [
        n for n, m in model.named_modules() if isinstance(m, quantized_types) and n not in names
    ]
    if stray:
        raise ValueError(
            f"model holds packed layers {stray} that result.layers does not describe; "
            f"pass the QuantizationResult that produced this model"
        )
    state = model.state_dict()
    packed = {}
    for layer in result.layers:
        try:
            module = model.get_submodule(layer.name)
        except AttributeError as e:
            raise KeyError(f"result layer {layer.name!r} is not a submodule of the model; {WHICH}"
                           ) from e
        if isinstance(module, quantized_types):
            specs = [block_spec(b) for b in layer.blocks]
            if type(module) is not QUANTIZED_TYPES.get(layer.kind) or module.specs != specs:
                raise ValueError(
                    f"packed layer {layer.name!r} does not match its LayerResult; pass the "
                    f"QuantizationResult that produced this model"
                )
            packed[layer.name] = module
            continue
        try:
            packed[layer.name] = q = quantized_from_float(module, layer)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e}; {WHICH}") from e
        _swap_state(state, model, module, q)
    for alias, owner in result.tied.items():
        module = model.get_submodule(alias)
        if not isinstance(module, quantized_types):
            q = packed_alias(module, result.layer(owner), packed[owner], alias)
            _swap_state(state, model, module, q)
            module = q
        packed[alias] = module
    return state, packed


def _swap_state(state: dict[str, torch.Tensor], model: nn.Module, old: nn.Module,
                new: nn.Module) -> None:
    """Replace ``old``'s entries in ``state`` by ``new``'s, under every name ``old`` has."""
    for path in module_paths(model, old):
        prefix = path + "."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state.update(new.state_dict(prefix=prefix))


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors to store, and ``{alias: stored name}`` for tensors seen twice.

    Two names for the same view of the same storage (tied weights) are stored once. Different
    views of one storage are stored as separate copies, as safetensors refuses shared storage.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, t in state.items():
        t = t.detach()
        if t.numel() == 0:
            tensors[name] = t.cpu().contiguous()
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        shared = storage in storages
        storages.add(storage)
        t = t.cpu().contiguous()
        tensors[name] = t.clone() if shared or t.untyped_storage().nbytes() != t.nbytes else t
    return tensors, aliases


def _read_artifact(path: Path) -> tuple[dict[str, Any], str, dict[str, torch.Tensor]]:
    """The checked manifest in the header of ``path``, its JSON text, and the tensors: all
    through one open handle, so a save replacing the file meanwhile cannot mix two artifacts."""
    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(HEADER_KEY)
            manifest = _check_manifest(path, text)  # before any tensor is read
            state = {k: f.get_tensor(k) for k in f.keys()}
    except ArtifactError:
        raise
    except Exception as e:  # a corrupt or truncated file (safetensors' own error types)
        raise ArtifactError(f"{path} cannot be read ({e}): the artifact is corrupt or was "
                            "interrupted; re-export") from e
    return manifest, text, state


def _check_manifest(path: Path, text: str | None) -> dict[str, Any]:
    """The manifest parsed from ``text`` (the header of ``path``), of this schema version."""
    if text is None:
        raise ArtifactError(f"{path} carries no bayesq manifest: it was not written by "
                            "save_quantized (or by a version before schema 2); re-export")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"the manifest in {path} is not valid JSON ({e}); re-export") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"the manifest in {path} is not a bayesq manifest; re-export")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        versions = manifest.get("versions")
        writer = versions.get("bayesq-lightning") if isinstance(versions, dict) else None
        raise ArtifactError(
            f"{path} has schema version {version!r} (written by bayesq-lightning {writer}); "
            f"this bayesq-lightning reads version {SCHEMA_VERSION}: re-export with this version "
            "or load with the version that wrote it"
        )
    return manifest


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tied_entry(alias: str, owner: str, module: nn.Module) -> dict[str, Any]:
    """Manifest entry of a layer sharing ``owner``'s codes: its own bias and conv options."""
    entry = {"name": alias, "owner": owner, "bias": module.bias is not None}
    if module.kind == "conv2d":
        entry["conv"] = conv_options(module)
    return entry


def layer_entry(name: str, module: nn.Module) -> dict[str, Any]:
    """Manifest entry of one packed layer."""
    blocks = []
    for i, s in enumerate(module.specs):
        n_meta = sum(math.prod(shape) for shape in s.meta_shapes.values())
        blocks.append(
            {
                "rows": list(s.rows),
                "bits": s.bits,
                "quantizer": s.quantizer,
                "group_size": s.group_size,
                "shape": [s.n_rows, s.cols],
                "code_bytes": s.code_bytes,
                "meta_bytes": s.meta_bytes,
                "storage_bits": storage_bits(s.n_weights, s.bits, n_meta),
                "tensors": {
                    "codes": f"{name}.block{i}_codes",
                    **{m: f"{name}.block{i}_{m}" for m in s.meta_shapes},
                },
                "meta_shapes": {m: list(shape) for m, shape in s.meta_shapes.items()},
            }
        )
    entry = {
        "name": name,
        "kind": module.kind,
        "weight_shape": list(module.weight_shape),
        "bias": module.bias is not None,
        "code_bytes": sum(b["code_bytes"] for b in blocks),
        "meta_bytes": sum(b["meta_bytes"] for b in blocks),
        "blocks": blocks,
    }
    if module.kind == "conv2d":
        entry["conv"] = conv_options(module)
    return entry


def packed_modules(skeleton: nn.Module, layers: list[dict[str, Any]], tied: list[dict[str, Any]],
                   where: Path) -> dict[str, nn.Module]:
    """Empty packed modules for manifest ``layers`` and ``tied`` entries (aliases sharing their
    owner's buffers), each checked against the skeleton (:func:`module_for`)."""
    new = {entry["name"]: module_for(skeleton, entry, where) for entry in layers}
    entries = {entry["name"]: entry for entry in layers}
    for tie in tied:  # the owner's blocks with the alias's own bias and conv options
        new[tie["name"]] = module_for(skeleton, {**entries[tie["owner"]], **tie}, where)
        tie_packed(new[tie["name"]], new[tie["owner"]])
    return new


def module_for(skeleton: nn.Module, entry: dict[str, Any], manifest_path: Path) -> nn.Module:
    """An empty packed module for one manifest layer, checked against the skeleton's layer."""
    name, kind = entry["name"], entry["kind"]
    fix = "build the skeleton with the configuration of the saved model"
    try:
        current = skeleton.get_submodule(name)
    except AttributeError as e:
        raise ArtifactError(
            f"layer {name!r} of {manifest_path} is not in the skeleton; {fix}"
        ) from e
    cls = QUANTIZED_TYPES.get(kind)
    if cls is None:
        raise ArtifactError(
            f"layer {name!r} of {manifest_path} has unknown kind {kind!r}; re-export"
        )
    if not isinstance(current, (FLOAT_TYPES[kind], cls)):
        raise ArtifactError(
            f"layer {name!r} is {kind} in {manifest_path} but {type(current).__name__} in the "
            f"skeleton; {fix}"
        )
    shape = tuple(entry["weight_shape"])
    have = tuple(current.weight_shape if isinstance(current, cls) else current.weight.shape)
    if have != shape:
        raise ArtifactError(
            f"layer {name!r} has weight shape {shape} in {manifest_path} but {have} in the "
            f"skeleton; {fix}"
        )
    if (current.bias is not None) != entry["bias"]:
        raise ArtifactError(
            f"layer {name!r} {'has' if entry['bias'] else 'lacks'} a bias in {manifest_path} but "
            f"not in the skeleton; {fix}"
        )
    kwargs = {}
    if kind == "conv2d":
        kwargs = entry["conv"]
        if conv_options(current) != kwargs:
            raise ArtifactError(
                f"conv layer {name!r} has options {kwargs} in {manifest_path} but "
                f"{conv_options(current)} in the skeleton; {fix}"
            )
    specs = [
        BlockSpec(
            rows=tuple(b["rows"]),
            bits=b["bits"],
            quantizer=b["quantizer"],
            group_size=b["group_size"],
            cols=b["shape"][1],
            meta_shapes={m: tuple(s) for m, s in b["meta_shapes"].items()},
        )
        for b in entry["blocks"]
    ]
    ref = next(current.parameters(), None)
    bias = current.bias
    try:
        module = cls(
            shape,
            specs,
            bias=bias is not None,
            dtype=bias.dtype if bias is not None else torch.float32,
            device=ref.device if ref is not None else None,
            **kwargs,
        )
    except (ValueError, NotImplementedError) as e:
        raise ArtifactError(f"layer {name!r} of {manifest_path}: {e}; re-export") from e
    module.train(current.training)
    return module


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` through a temporary file in its directory, fsync'ed, then renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; not every platform can open a directory, so it is best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def jsonable(value: Any) -> Any:
    """Plain JSON data for info values (tensors and numpy values become numbers or lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return str(value)
