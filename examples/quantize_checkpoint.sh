#!/usr/bin/env bash
# Quantize a checkpoint you already have, from the shell (digits CNN; about a minute on 2 cores).
#   bash examples/quantize_checkpoint.sh
set -euo pipefail
BAYESQ=${BAYESQ:-.venv/bin/bayesq}
CONFIG=configs/digits_cnn.yaml

# 1. an ordinary training run (BayesQ also quantizes at its end; the checkpoint holds FP32 weights)
$BAYESQ fit --config $CONFIG
CKPT=$(ls -t artifacts/digits_cnn/lightning_logs/version_*/checkpoints/*.ckpt | head -1)

# 2. quantize that checkpoint at another budget: artifact, report.json, allocation.png, config.yaml
$BAYESQ quantize --config $CONFIG --ckpt_path "$CKPT" --bayesq.config.bits 3.0 \
    --output_dir artifacts/digits_cnn/q3

# 3. quantize at 2.5 bits and distil toward the posterior predictive on the calibration inputs
$BAYESQ distill --config $CONFIG --ckpt_path "$CKPT" --distillation.epochs 5 \
    --output_dir artifacts/digits_cnn/distilled
