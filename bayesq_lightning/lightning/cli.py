"""The ``bayesq`` command.

The full ``LightningCLI`` (``bayesq fit`` / ``bayesq quantize`` with YAML configs) is a later
milestone; today the command explains how to run BayesQ.
"""

from __future__ import annotations

import argparse
import sys

_USAGE = """\
BayesQ: uncertainty-guided mixed-precision quantization for PyTorch Lightning.

From Python, attach the callback to any Trainer:

    from bayesq_lightning import BayesQCallback
    trainer = L.Trainer(callbacks=[BayesQCallback(bits=3.0)])
    trainer.fit(model, datamodule)

or quantize a trained model directly:

    from bayesq_lightning import BayesQConfig, quantize_model
    result = quantize_model(model, calibration_loader, BayesQConfig(bits=3.0))

The `bayesq fit` / `bayesq quantize` subcommands are not available in this release yet.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bayesq", description=_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("subcommand", nargs="?", choices=["fit", "quantize"])
    args = parser.parse_args(argv)
    if args.subcommand is not None:
        print(f"bayesq {args.subcommand}: not available in this release yet.\n", file=sys.stderr)
        parser.print_help(sys.stderr)
        return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
