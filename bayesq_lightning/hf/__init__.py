"""HuggingFace Transformers: ``save_pretrained`` / ``from_pretrained`` of packed models.

``import bayesq_lightning`` registers the ``"bayesq"`` quantization method with transformers'
quantizer registry, lazily: transformers is not imported for it (it would slow every import).
If ``transformers.quantizers.auto`` is already loaded, registration happens at once; otherwise
an import hook registers right after transformers loads that module, which it does before any
``from_pretrained`` can read a ``quantization_config``.

:func:`install` also listens to the artifact's
:func:`~bayesq_lightning.artifact.replace.install_packed`, the one step through which packed
layers enter a model (``quantize_model``, ``load_quantized``, ``restore_quantized``): every
transformers ``PreTrainedModel`` in a model that receives packed layers gets
``config.quantization_config`` describing them (:func:`attach_hf_config`), so
``model.save_pretrained(dir)`` writes a directory that ``AutoModelFor...from_pretrained(dir)``
rebuilds exactly (see :mod:`.quantizer`).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from torch import nn

from ..artifact.manifest import PackedLayers
from ..artifact.replace import on_install
from ..artifact.temperature import logit_temperature, on_temperature

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
    """Register ``"bayesq"`` with transformers now if it is loaded, else when it loads; describe
    packed layers to the transformers models they enter (:func:`attach_hf_config`)."""
    on_install(attach_hf_config)
    on_temperature(attach_temperature)
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


def attach_hf_config(model: nn.Module, packed: PackedLayers) -> None:
    """Set ``config.quantization_config`` of every transformers model in ``model`` that holds
    some of the packed layers ``packed`` describes (named relative to that model)."""
    for prefix, hf_model in _pretrained_models(model):
        inner = packed.within(prefix)
        if not inner.layers:
            continue
        from .quantizer import BayesQHFConfig  # imports transformers, loaded already here

        # the temperature only of a transformers model that is the model: a wrapper's may
        # temper outputs an inner model does not return (the artifact carries the wrapper's)
        hf_model.config.quantization_config = BayesQHFConfig(
            **{**inner.to_json(), "logit_temperature": logit_temperature(model) if not prefix
               else None})


def attach_temperature(model: nn.Module, value: float | None) -> None:
    """Record the logit temperature of a transformers ``model`` in its bayesq
    ``quantization_config``, so ``save_pretrained`` stores it and ``from_pretrained`` applies it
    to the loaded model's logits. A wrapper's temperature is not written into the configs of
    the transformers models inside it (its artifact stores it)."""
    found = _pretrained_models(model)
    if found and found[0][0] == "":
        config = getattr(found[0][1].config, "quantization_config", None)
        if getattr(config, "quant_method", None) == QUANT_METHOD:
            config.logit_temperature = value
