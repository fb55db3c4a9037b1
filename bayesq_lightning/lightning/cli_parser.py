"""The ``bayesq`` command's argument parser: plain-text help, key options first, short errors.

:class:`BayesQParser` is LightningCLI's parser with four changes:

* help strings are plain text: Sphinx roles, double backticks and ``:math:`` LaTeX are rewritten
  (:func:`plain`), in our docstrings and in the Trainer's alike;
* a subcommand's help starts with what it does, an example and its key options
  (:data:`KEY_OPTIONS`), then lists every option;
* no option is matched by a prefix (``--bayesq.config.bit`` is not ``bits``);
* a command line it cannot parse gets one line, with the closest option when one is near,
  instead of the usage of every option.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import NoReturn

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser

from ..adapters.argparse import actions, help_sections, option_strings

KEY_OPTIONS = ("--config", "--ckpt_path", "--output_dir", "--overwrite", "--bayesq.config.bits",
               "--bayesq.compare", "--distillation.epochs", "--trainer.max_epochs")
"""Listed first, in this order, in a subcommand's help (those the subcommand has)."""

_LATEX = {"sim": "~", "cdot": "*", "times": "x", "le": "<=", "leq": "<=", "ge": ">=",
          "geq": ">=", "approx": "~", "to": "->", "infty": "inf", "mid": "|", "log": "log",
          "exp": "exp", "mathbb": "", "mathrm": "", "operatorname": "", "text": "",
          "top": "T", "ne": "!=", "in": "in", "sum": "sum", "frac": ""}
_ROLE = re.compile(r":(?:py:)?[a-z]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]+?)\s*<([^>]+)>`_+")
_LITERAL = re.compile(r"``([^`]*)``")
_DEFAULT_ROLE = re.compile(r"(?<![\w`])`([^`\s][^`]*)`(?![\w`])")


def _math(tex: str) -> str:
    tex = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", tex)
    tex = re.sub(r"\\[,;:! ]", " ", tex)
    tex = re.sub(r"\\([A-Za-z]+)", lambda m: _LATEX.get(m.group(1), m.group(1)), tex)
    return re.sub(r"\s+", " ", tex.replace("{", "").replace("}", "")).strip()


def _role(match: re.Match) -> str:
    body = match.group(0)
    text = match.group(1)
    if body.startswith(":math:"):
        return _math(text)
    text = re.sub(r"\s*<[^>]*>$", "", text)  # :func:`title <target>`
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return text


def plain(text: str | None) -> str | None:
    """``text`` with reStructuredText markup (roles, literals, links, ``:math:``) as plain text."""
    if not text:
        return text
    text = _ROLE.sub(_role, text)
    text = _LINK.sub(r"\1 (\2)", text)
    text = _LITERAL.sub(r"\1", text)
    return _DEFAULT_ROLE.sub(r"\1", text)


class BayesQParser(LightningArgumentParser):
    """LightningCLI's parser with plain-text help, key options first, no abbreviations and
    one-line errors (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def _clean_help(self) -> None:
        self.description = plain(self.description)
        for action in actions(self):
            action.help = plain(action.help)
        for group in help_sections(self):
            group.title = plain(group.title)
            group.description = plain(group.description)

    def format_help(self, *args, **kwargs) -> str:
        self.prog = self.prog.replace(" [options]", "")  # "bayesq quantize", as it is typed
        self._clean_help()
        text = super().format_help(*args, **kwargs)
        present = [o for o in KEY_OPTIONS if o in option_strings(self)]
        if "--bayesq.config.bits" not in present:  # the top-level parser: subcommands only
            return text
        if "--output_dir" in present:  # quantize / distill: no training
            present.remove("--trainer.max_epochs")
        elif "--ckpt_path" in present:  # fit's resumes training: not a key option
            present.remove("--ckpt_path")
        return _key_options_first(text, present)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        hint = _suggestion(message, parser)
        prog = parser.prog.replace(" [options]", "")
        first, *rest = message.strip().splitlines() or [""]
        detail = " ".join(line.strip() for line in rest[:3])
        sys.stderr.write(f"{prog}: error: {first}{' (' + detail + ')' if detail else ''}{hint} "
                         f"(`{prog} --help` lists the options)\n")
        self.exit(2)


def _suggestion(message: str, parser) -> str:
    """``"; did you mean --x?"`` for the first unknown option in ``message``, or ``""``."""
    found = re.search(r"(--[\w.\-+]+)", message)
    if found is None:
        return ""
    given = found.group(1).split("=", 1)[0]
    options = [o for o in option_strings(parser) if o.startswith("--")]
    if given in options:
        return ""
    close = difflib.get_close_matches(given, options, n=1, cutoff=0.75)
    if not close:
        prefixed = sorted(o for o in options if o.startswith(given))
        close = prefixed[:1]
    return f"; did you mean {close[0]}?" if close else ""


def _key_options_first(text: str, keys: list[str]) -> str:
    """``text`` (argparse help) with an extra section listing the entries of ``keys`` placed
    right after the description; every option still appears in its own group below."""
    lines = text.splitlines()
    entries = {}
    i = 0
    while i < len(lines):
        m = re.match(r"^  (-\w( \S+)?, )?(--[\w.\-]+)", lines[i])
        if m and m.group(3) in keys and m.group(3) not in entries:
            j = i + 1
            while j < len(lines) and lines[j].startswith(" " * 6):
                j += 1
            entries[m.group(3)] = lines[i:j]
            i = j
        else:
            i += 1
    first_group = next((k for k, line in enumerate(lines)
                        if line in ("options:", "optional arguments:")), len(lines))
    block = ["key options:"] + [line for k in keys if k in entries for line in entries[k]] + [""]
    return "\n".join(lines[:first_group] + block + lines[first_group:]) + "\n"


DESCRIPTION = """BayesQ: uncertainty-guided mixed-precision quantization of Lightning models.

subcommands: fit (train, quantize at the end), quantize (a trained checkpoint), distill
(quantize, then distil toward the posterior predictive).

example:
  bayesq fit --config configs/digits_cnn.yaml
  bayesq quantize --config configs/digits_cnn.yaml --bayesq.config.bits 3.0"""

SUBCOMMANDS = {
    "fit": """Train the model; at the end of fit BayesQ quantizes it to the budget.

Prints FP32, quantized and baseline accuracy / NLL / ECE, then the checkpoint, artifact and
report paths, all inside the run's version directory (checkpoints/ and bayesq/ in
<trainer.default_root_dir>/lightning_logs/version_N/).

example:
  bayesq fit --config configs/digits_cnn.yaml --bayesq.config.bits 3.0""",
    "quantize": """Quantize a trained checkpoint at the budget, evaluate it, and export it.

Writes the artifact, report.json, allocation.png and config.yaml to --output_dir (default:
quantize-<bits>b/ in the checkpoint's version directory) and prints the summary. Without
--ckpt_path, the newest checkpoint under trainer.default_root_dir (the last `bayesq fit`).
An existing artifact is replaced only with --overwrite.

example:
  bayesq quantize --config configs/digits_cnn.yaml --bayesq.config.bits 3.0""",
    "distill": """Quantize a trained checkpoint, then distil it toward the posterior predictive.

Distillation trains the quantizers' scales, zeros, biases and norms on the calibration inputs
alone; the artifact holds the distilled model, in --output_dir (default: distill-<bits>b/ in
the checkpoint's version directory). An existing artifact is replaced only with --overwrite.

example:
  bayesq distill --config configs/digits_cnn.yaml --distillation.epochs 5""",
}
USAGE = ("%(prog)s [--config FILE] [--ckpt_path CKPT] [--output_dir DIR] "
         "[--bayesq.config.bits BITS] [options]")


class _Formatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Descriptions as written (their examples keep their lines); options as jsonargparse's."""


def parser_kwargs() -> dict:
    """``LightningCLI(parser_kwargs=...)``: the command's and each subcommand's help texts."""
    kwargs: dict = {"description": DESCRIPTION, "formatter_class": _Formatter}
    for name in ("validate", "test", "predict"):
        kwargs[name] = {"formatter_class": _Formatter}
    for name, text in SUBCOMMANDS.items():
        usage = USAGE if name != "fit" else USAGE.replace(
            " [--ckpt_path CKPT] [--output_dir DIR]", "")
        kwargs[name] = {"description": text, "usage": usage, "formatter_class": _Formatter}
    return kwargs
