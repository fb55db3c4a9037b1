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

from ..result import QuantizationResult
from .dispatch import KERNELS, set_kernel
from .manifest import (
    SCHEMA_VERSION,
    TENSORS_FILE,
    ArtifactError,
    Manifest,
    PackedLayers,
    block_spec,
    jsonable,
)
from .modules import QUANTIZED_TYPES, quantized_from_float
from .replace import install_packed, module_paths, modules_from_manifest, packed_alias, swap_in
from .temperature import logit_temperature, set_logit_temperature

MANIFEST_FILE = "bayesq.json"
HEADER_KEY = "bayesq"
OUTPUTS = (TENSORS_FILE, MANIFEST_FILE, "report.json", "allocation.png", "config.yaml")
"""The files an export directory may hold: the artifact and the report beside it."""
WHICH = ("save the model this result was computed for (pass the QuantizationResult that "
         "produced this model)")


def check_export_dir(directory: str | os.PathLike, overwrite: bool = False,
                     flag: str = "overwrite=True") -> Path:
    """Refuse, before any work, an export directory that cannot take a new artifact.

    Parameters
    ----------
    directory : str or os.PathLike
        Where the artifact is to go; need not exist.
    overwrite : bool
        Whether an artifact already there may be replaced.
    flag : str
        How the caller spells ``overwrite`` in the messages (``"--overwrite"`` for the command).

    Returns
    -------
    Path
        ``directory``.

    Raises
    ------
    FileExistsError
        ``directory`` holds an artifact and not ``overwrite``; or ``overwrite`` and it holds
        files that are not an artifact's (:data:`OUTPUTS`), which are never replaced.
    NotADirectoryError
        ``directory``, or the closest existing path above it, is a file.
    PermissionError
        ``directory`` (or the closest existing folder above it) is not writable.
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"export directory {str(path)!r} is a file; pass a directory")
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    ours = [n for n in present if n in OUTPUTS]
    others = [n for n in present if n not in OUTPUTS and not n.endswith(".tmp")]
    if ours and not overwrite:
        raise FileExistsError(f"{str(path)!r} already holds an artifact ({', '.join(ours)}); "
                              f"pass {flag} to replace it, or choose another directory")
    if overwrite and others:
        raise FileExistsError(f"{str(path)!r} holds files that are not a bayesq artifact "
                              f"({', '.join(others[:5])}); {flag} replaces only an artifact: "
                              "choose an empty or new directory")
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot create the export directory {str(path)!r}: "
                                 f"{str(existing)!r} is a file; choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the export directory {str(path)!r} ({str(existing)!r}"
                              " is not writable); choose a directory you can write")
    return path


def save_quantized(
    model: nn.Module, result: QuantizationResult, directory: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write the packed model and its manifest to ``directory``.

    Parameters
    ----------
    model : nn.Module
        The model to store. Layers named in ``result.layers`` may already be packed modules
        (:class:`~bayesq_lightning.artifact.QuantizedLinear` / ``QuantizedConv2d``) or still be
        float layers; float ones are packed from ``result.layers`` without modifying ``model``.
    result : QuantizationResult
        Per-layer blocks, budget and achieved bits, posterior info.
    directory : str or os.PathLike
        Created if missing; checked by :func:`check_export_dir` (whose errors this raises)
        before anything is written.
    overwrite : bool
        Replace an artifact already in ``directory``; without it that is refused. A directory
        holding files that are not an artifact's is refused either way.

    Returns
    -------
    Path
        ``directory``.
    """
    return write_artifact(model, result, check_export_dir(directory, overwrite))


def write_artifact(model: nn.Module, result: QuantizationResult,
                   directory: str | os.PathLike) -> Path:
    """:func:`save_quantized` without the directory check: replaces an artifact there.

    For a caller that replaces the artifact it wrote itself (distillation re-exports the
    distilled model over the quantized one).
    """
    state, packed = _packed_state(model, result)
    tensors, aliases = _dedupe(state)
    owners = [x.name for x in result.layers]
    layers = PackedLayers.describe(packed, owners, result.tied, float(result.bits_per_weight),
                                   logit_temperature(model))
    manifest = Manifest(
        packed=layers,
        tensors_sha256=tensors_digest(tensors),
        aliases=aliases,
        budget_bits=int(result.budget_bits),
        n_weights=layers.n_weights,
        code_bits_per_weight=float(result.code_bits_per_weight),
        posterior={
            "structure": jsonable(result.info.get("structure")),
            "prior_precision": jsonable(result.info.get("prior_precision")),
        },
        method=jsonable(result.info.get("method")),
        versions={
            "torch": torch.__version__,  # includes the build tag (e.g. +cu130)
            **{
                name: _version(name)
                for name in ("laplace-torch", "bayesq-lightning", "safetensors")
            },
        },
    )
    text = json.dumps(manifest.to_json(), indent=1)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # the commit: until this rename the previous model.safetensors (with its own manifest) holds
    _atomic_write(directory / TENSORS_FILE,
                  lambda p: save_file(tensors, str(p), metadata={HEADER_KEY: text}))
    _atomic_write(directory / MANIFEST_FILE, lambda p: p.write_text(text, encoding="utf-8"))
    return directory


def load_quantized(model_skeleton: nn.Module, directory: str | os.PathLike,
                   kernel: str = "exact") -> nn.Module:
    """Load an artifact written by :func:`save_quantized` into a float model of the same class.

    Everything is checked and loaded into a copy first; only when that succeeded are the packed
    layers swapped into ``model_skeleton`` and its other tensors overwritten, so on any error the
    skeleton is left as it was. The model comes back deployed: in eval mode, with
    ``requires_grad=False`` on every parameter (``model.requires_grad_(True)`` to train it), and
    with the stored logit temperature of a distilled model on its outputs
    (:mod:`~bayesq_lightning.artifact.temperature`).

    Parameters
    ----------
    model_skeleton : nn.Module
        A fresh instance of the saved model's architecture (its float values are overwritten).
    directory : str or os.PathLike
        Holds ``bayesq.json`` and ``model.safetensors``.
    kernel : {"exact", "auto"}
        How the packed Linear layers multiply (:func:`~bayesq_lightning.set_kernel`):
        ``"exact"`` decodes the stored weights, bit for bit the model that was saved;
        ``"auto"`` takes stock PyTorch's CPU integer kernels where they serve (few rows, bf16
        activations).

    Returns
    -------
    nn.Module
        ``model_skeleton``, now holding the packed layers and the stored tensors.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {KERNELS}")
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    tensors_path = directory / TENSORS_FILE
    if not tensors_path.is_file():
        if manifest_path.is_file():
            raise FileNotFoundError(f"no tensor file {tensors_path} next to {manifest_path}: "
                                    "the export did not finish; re-export the model")
        raise FileNotFoundError(f"no artifact in {directory} (neither {TENSORS_FILE} nor "
                                f"{MANIFEST_FILE}); export it with save_quantized")
    data, text, state = _read_artifact(tensors_path)
    if manifest_path.is_file() and manifest_path.read_bytes() != text.encode("utf-8"):
        warnings.warn(f"{manifest_path} does not match the manifest inside {tensors_path} (a save "
                      "interrupted between the two?); loading what the tensor file describes",
                      stacklevel=2)
    try:
        manifest = Manifest.from_json(data)
        if tensors_digest(state) != manifest.tensors_sha256:
            raise ArtifactError(
                f"{tensors_path} does not match the digest of its manifest: the artifact is "
                "corrupt or was interrupted; re-export"
            )
        replacements = modules_from_manifest(model_skeleton, manifest.packed, tensors_path)
        for alias, target in manifest.aliases.items():
            state[alias] = state[target]
    except (KeyError, TypeError, IndexError) as e:
        raise ArtifactError(f"the manifest of {tensors_path} is malformed ({e!r}); re-export "
                            "the model") from e

    trial = copy.deepcopy(model_skeleton)
    swap_in(trial, replacements)
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
    install_packed(model_skeleton, {name: trial.get_submodule(name) for name in replacements},
                   manifest.packed)
    model_skeleton.load_state_dict(state, strict=True)
    set_logit_temperature(model_skeleton, manifest.packed.logit_temperature)
    model_skeleton.eval().requires_grad_(False)
    if kernel != "exact":
        set_kernel(model_skeleton, kernel)
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
