#!/usr/bin/env bash
# `make demo`: build the demo Cityscapes dataset, run the full InstSynth pipeline on it with the
# weightless recolor backend, and draw a few pictures under visualization/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python}
DEMO_DIR=${DEMO_DIR:-demo_output}
VIS_DIR=${VIS_DIR:-visualization/demo}

"$PYTHON" -m instsynth.demo "$DEMO_DIR/cityscapes"
DATASET_PATH="$DEMO_DIR/cityscapes" OUTPUT_DATASET_PATH="$DEMO_DIR/cityscapes_instsynth" \
  WORK_DIR="$DEMO_DIR/work" MODE=recolor NUM_SAMPLES=${NUM_SAMPLES:-2} bash scripts/run_instsynth.sh

echo; echo "==> pictures in $VIS_DIR/"
"$PYTHON" visualization/visualize.py sheets --manifest "$DEMO_DIR/work/generation/Recolor/generation.json" \
  --out "$VIS_DIR/sheets" --max-pages 2
"$PYTHON" visualization/visualize.py overlay \
  --coco "$DEMO_DIR/cityscapes_instsynth/annotations/instancesonly_filtered_gtFine_train.json" \
  --image-root "$DEMO_DIR/cityscapes_instsynth/leftImg8bit/train" --out "$VIS_DIR/overlays" --max-images 4 --match _syn
"$PYTHON" visualization/visualize.py stats \
  --coco "$DEMO_DIR/work/coco_original/instancesonly_filtered_gtFine_train.json" \
  --coco "$DEMO_DIR/cityscapes_instsynth/annotations/instancesonly_filtered_gtFine_train.json" \
  --out "$VIS_DIR/class_stats.png"
ls -1 "$VIS_DIR"/*/*.png "$VIS_DIR"/*.png | head -20
