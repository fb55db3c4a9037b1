#!/usr/bin/env bash
# Quantize a checkpoint you already have, from the shell (digits CNN; about a minute on 2 cores).
#   bash examples/quantize_checkpoint.sh            (outputs in a new temporary directory)
set -euo pipefail
BAYESQ=${BAYESQ:-.venv/bin/bayesq}
CONFIG=configs/digits_cnn.yaml
ROOT=${ROOT:-$(mktemp -d)}  # trainer.default_root_dir: lightning_logs/version_N/ lands here

# 1. an ordinary training run (BayesQ also quantizes at its end; the checkpoint holds FP32
#    weights); the summary names the checkpoint, the artifact (version_0/bayesq) and the report
$BAYESQ fit --config $CONFIG --trainer.default_root_dir "$ROOT"

# 2. that checkpoint (the newest under ROOT) at another budget: artifact, report.json,
#    allocation.png and config.yaml in version_0/quantize-3b/
$BAYESQ quantize --config $CONFIG --trainer.default_root_dir "$ROOT" --bayesq.config.bits 3.0

# 3. at the config's 2.5 bits, distilled toward the posterior predictive on the calibration
#    inputs: version_0/distill-2.5b/ (an explicit --ckpt_path and --output_dir work too)
$BAYESQ distill --config $CONFIG --trainer.default_root_dir "$ROOT" --distillation.epochs 5
