"""HuggingFace Transformers: ``save_pretrained`` / ``from_pretrained`` of packed models.

``import bayesq_lightning`` registers the ``"bayesq"`` quantization method with transformers'
quantizer registry, lazily: transformers is not imported for it (it would add about 1.4 s to
every import). If ``transformers.quantizers.auto`` is already loaded, registration happens at
once; otherwise an import hook registers right after transformers loads that module, which it
does before any ``from_pretrained`` can read a ``quantization_config``.

A model quantized by :func:`~bayesq_lightning.quantize_model` (or the callback, or loaded with
:func:`~bayesq_lightning.load_quantized` / ``restore_quantized``) that is, or contains, a
transformers ``PreTrainedModel`` gets ``config.quantization_config`` describing its packed layers
(:func:`attach_hf_config`), so ``model.save_pretrained(dir)`` writes a directory that
``AutoModelFor...from_pretrained(dir)`` rebuilds exactly (see :mod:`.quantizer`).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

QUANT_METHOD = "bayesq"
FORMAT_VERSION = 1
_TARGET = "transformers.quantizers.auto"


def _register_now() -> None:
    # runs inside transformers' own import: a failure here must not break transformers
    try:
        from .quantizer import register

        register()
    except Exception as exc:  # e.g. a transformers without register_quantizer (< 4.49)
        import warnings

        warnings.warn(f"bayesq-lightning could not register the 'bayesq' quantization method "
                      f"with transformers ({type(exc).__name__}: {exc}); save_pretrained / "
                      "from_pretrained of packed models need transformers >= 4.49",
                      stacklevel=2)


class _Loader(importlib.abc.Loader):
    """Runs the real loader of ``transformers.quantizers.auto``, then registers bayesq."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register_now()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # once: find the real spec without this finder
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register ``"bayesq"`` with transformers now if it is loaded, else when it loads."""
    if _TARGET in sys.modules:
        _register_now()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _pretrained_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost transformers ``PreTrainedModel`` submodules of ``model`` (with prefixes)."""
    if "transformers" not in sys.modules:  # then no module can be one
        return []
    from transformers import PreTrainedModel

    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(
                p == "" or name.startswith(p + ".") for p, _ in found):
            found.append((name, module))
    return found


def attach_hf_config(model: nn.Module, layer_names: Sequence[str],
                     tied: Mapping[str, str] | None = None, info: Mapping[str, Any] | None = None
                     ) -> None:
    """Set ``config.quantization_config`` of every transformers model in ``model`` to the
    ``"bayesq"`` description of its packed layers (names relative to that model)."""
    from ..artifact.export import layer_entry, tied_entry

    for prefix, hf_model in _pretrained_models(model):
        lead = prefix + "." if prefix else ""
        inner = [n for n in layer_names if n.startswith(lead)]
        if not inner:
            continue
        from .quantizer import BayesQHFConfig

        hf_model.config.quantization_config = BayesQHFConfig(
            layers=[layer_entry(n.removeprefix(lead), model.get_submodule(n)) for n in inner],
            tied=[tied_entry(a.removeprefix(lead), o.removeprefix(lead), model.get_submodule(a))
                  for a, o in (tied or {}).items() if a.startswith(lead)],
            bits_per_weight=(info or {}).get("bits_per_weight"),
        )
