r"""The ``"bayesq"`` entries of transformers' quantizer registry (imports transformers).

* :class:`BayesQHFConfig` -- ``config.json``'s ``quantization_config``: ``quant_method``,
  ``format_version`` and the JSON of a
  :class:`~bayesq_lightning.artifact.manifest.PackedLayers` (``bits_per_weight``, ``layers``
  with their blocks, ``tied`` layers), the schema of the artifact's manifest.
* :class:`BayesQHfQuantizer` -- before the weights load, checks the checkpoint's safetensors
  headers against the config (every packed tensor present with its dtype and shape, no dense
  weight for a packed layer) and swaps the empty model's float layers for empty packed ones;
  transformers then loads the packed tensors into them like any other buffer.

Every refusal is an :class:`~bayesq_lightning.artifact.ArtifactError` raised before any weight is
read.

This module is the adapter to transformers: the ``HfQuantizer`` hooks it overrides
(``_process_model_before_weight_loading`` / ``_process_model_after_weight_loading``) are
transformers' private protocol, written against transformers 5.25;
``tests/test_hf_pretrained.py``'s round trips fail loudly if it changes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from safetensors import safe_open
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..artifact.manifest import ArtifactError, PackedLayers
from ..artifact.replace import modules_from_manifest, swap_in
from ..artifact.temperature import set_logit_temperature
from . import FORMAT_VERSION, QUANT_METHOD

_DTYPES = {"codes": "U8"}  # every metadata tensor is fp16 ("F16")


class BayesQHFConfig(QuantizationConfigMixin):
    """``quantization_config`` of a bayesq-packed transformers model (plain JSON data)."""

    def __init__(self, layers: list[dict] | None = None, tied: list[dict] | None = None,
                 format_version: int = FORMAT_VERSION, bits_per_weight: float | None = None,
                 logit_temperature: float | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = list(layers or [])
        self.tied = list(tied or [])
        self.bits_per_weight = bits_per_weight
        self.logit_temperature = logit_temperature

    def to_dict(self) -> dict[str, Any]:
        out = {"quant_method": QUANT_METHOD, "format_version": self.format_version,
               "bits_per_weight": self.bits_per_weight, "layers": self.layers,
               "tied": self.tied}
        if self.logit_temperature is not None:
            out["logit_temperature"] = self.logit_temperature
        return out


class BayesQHfQuantizer(HfQuantizer):
    """Loads bayesq-packed checkpoints; it cannot quantize (that needs calibration data)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        where = Path(checkpoint_files[0]).parent / "config.json" if checkpoint_files else Path(
            "config.json")
        if not isinstance(cfg.format_version, int) or cfg.format_version > FORMAT_VERSION:
            raise ArtifactError(
                f"{where} has bayesq format_version {cfg.format_version!r}, newer than this "
                f"bayesq-lightning reads ({FORMAT_VERSION}); upgrade bayesq-lightning or re-save "
                "with this version")
        if not checkpoint_files:
            raise ArtifactError("a bayesq-packed model loads from its safetensors files "
                                "(from_pretrained(directory)); a state_dict cannot be checked "
                                "against its quantization_config")
        try:
            packed = PackedLayers.from_json(cfg.to_dict())
            _check_tensors(packed, checkpoint_files, where)
            new = modules_from_manifest(model, packed, where)
        except (KeyError, TypeError, IndexError) as e:
            raise ArtifactError(f"the bayesq quantization_config in {where} is malformed "
                                f"({e!r}); re-save the model with save_pretrained") from e
        swap_in(model, new)  # transformers keeps this config as the model's
        self._temperature = packed.logit_temperature
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Deployed, as :func:`~bayesq_lightning.load_quantized` returns it: no parameter
        requires grad (``model.requires_grad_(True)`` to train), the stored logit temperature on
        its outputs; transformers sets eval mode."""
        model.requires_grad_(False)
        set_logit_temperature(model, getattr(self, "_temperature", None))
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _check_tensors(packed: PackedLayers, files: list[str], where: Path) -> None:
    """Every packed tensor of ``packed`` in the checkpoint's headers, with its dtype and shape."""
    header: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            raise ArtifactError(f"{f} is not a safetensors file; bayesq checkpoints are saved "
                                "with safe_serialization (save_pretrained's default)")
        try:
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    sl = st.get_slice(key)
                    header[key] = (sl.get_dtype(), tuple(sl.get_shape()))
        except Exception as e:  # a corrupt or truncated file
            raise ArtifactError(f"{f} cannot be read ({e}): the checkpoint is corrupt or "
                                "incomplete; re-save it with save_pretrained") from e
    missing, wrong, dense = [], [], []
    for layer in packed.layers:
        if f"{layer.name}.weight" in header:
            dense.append(layer.name)
        for name, (role, shape) in layer.tensors().items():
            dtype = _DTYPES.get(role, "F16")
            if name not in header:
                missing.append(name)
            elif header[name] != (dtype, shape) and not (
                    header[name][0] == dtype and math.prod(header[name][1]) == 0 == math.prod(
                        shape)):
                wrong.append(f"{name}: {header[name]} instead of {(dtype, shape)}")
    if dense:
        raise ArtifactError(f"the checkpoint next to {where} holds dense weights for layers its "
                            f"bayesq quantization_config packs ({dense[:3]}...); the config and "
                            "the weights do not belong together: re-save with save_pretrained")
    if missing or wrong:
        raise ArtifactError(
            f"the checkpoint next to {where} does not match its bayesq quantization_config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, wrong {wrong[:3]}; the "
            "directory is incomplete or was edited: re-save the model with save_pretrained")


def register() -> None:
    """Add ``"bayesq"`` to transformers' registries (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BayesQHFConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(BayesQHfQuantizer)
