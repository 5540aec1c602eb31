#!/usr/bin/env bash
# `make demo`: build the demo Cityscapes dataset and run the InstSynth stages on it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEMO_DIR=${DEMO_DIR:-demo_output}

"$PYTHON" -m instsynth.demo "$DEMO_DIR/cityscapes"
echo "Demo dataset written to $DEMO_DIR/cityscapes"
