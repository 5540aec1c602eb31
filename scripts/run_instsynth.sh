#!/usr/bin/env bash
# InstSynth, the whole run: edit the variables below (or set them in the environment) and run
#   bash scripts/run_instsynth.sh
# or, on your own COCO / LVIS dataset:
#   bash scripts/run_instsynth.sh --coco ANNOTATIONS.json --images DIR [--val-coco JSON --val-images DIR] [--name mydata]
# Every stage is resumable: after a failure, fix the cause and run the script again; finished work
# is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

while [ $# -gt 0 ]; do
  case "$1" in
    --coco) COCO_JSON=$2; shift 2 ;;
    --images) COCO_IMAGES=$2; shift 2 ;;
    --val-coco) VAL_COCO_JSON=$2; shift 2 ;;
    --val-images) VAL_COCO_IMAGES=$2; shift 2 ;;
    --name) DATASET_NAME=$2; shift 2 ;;
    *) echo "unknown argument '$1' (use --coco JSON --images DIR [--val-coco JSON --val-images DIR] [--name NAME])" >&2; exit 2 ;;
  esac
done
COCO_JSON=${COCO_JSON:-}           # your own dataset: COCO / LVIS instances file (empty: Cityscapes)
COCO_IMAGES=${COCO_IMAGES:-}       # the folder its file_name entries are relative to
VAL_COCO_JSON=${VAL_COCO_JSON:-}   # optional: its val split, registered as ${DATASET_NAME}_val for evaluation
VAL_COCO_IMAGES=${VAL_COCO_IMAGES:-}
DATASET_NAME=${DATASET_NAME:-mydata}
if [ -n "$COCO_JSON" ] && [ -z "$COCO_IMAGES" ]; then echo "--coco needs --images DIR" >&2; exit 2; fi
if [ -n "$COCO_JSON" ]; then OUTPUT_DATASET_PATH=${OUTPUT_DATASET_PATH:-datasets/${DATASET_NAME}_instsynth}; fi

# ---- edit me ---------------------------------------------------------------------------------
DATASET_PATH=${DATASET_PATH:-datasets/cityscapes}                       # source Cityscapes tree
OUTPUT_DATASET_PATH=${OUTPUT_DATASET_PATH:-datasets/cityscapes_instsynth} # original + synthetic
WORK_DIR=${WORK_DIR:-${OUTPUT_DATASET_PATH}_work}   # stage-1 crops and generated samples
MODE=${MODE:-recolor}              # recolor | diffinpainting | bld | gligen | diffusers (any diffusers inpainting model)
MODEL_PATH=${MODEL_PATH:-}         # local folder or hub id; empty: the backend's default model
GUIDANCE_SCALE=${GUIDANCE_SCALE:-} # empty: 7.5 (FLUX.1 Fill: 30)
PIPELINE_OPTIONS=${PIPELINE_OPTIONS:-}  # MODE=diffusers: more pipeline call arguments, KEY=VALUE,...
K=${K:-3}                          # instances selected per image
NUM_SAMPLES=${NUM_SAMPLES:-1}      # generated samples per instance
BATCH_SIZE=${BATCH_SIZE:-4}        # images per diffusion call
STEPS=${STEPS:-50}                 # denoising steps
SEED=${SEED:-1}
BLEND=${BLEND:-hard}               # hard | feather | normalized
CROPS_PER_SAMPLE=${CROPS_PER_SAMPLE:-1}
CLIP_MODEL=${CLIP_MODEL:-}         # quality gate: CLIP folder or hub id; empty: gate off
MIN_CLIP_SCORE=${MIN_CLIP_SCORE:-0.2}  # used only with CLIP_MODEL
MIN_CLIP_MARGIN=${MIN_CLIP_MARGIN:-}   # CLIP class check (needs CLIP_MODEL); empty: off
MASK_MODEL=${MASK_MODEL:-}         # mask gate: train_net.py output folder / checkpoint / config, or sam:ID_OR_FOLDER; empty: off
MIN_MASK_IOU=${MIN_MASK_IOU:-0.5}  # used only with MASK_MODEL
FALLBACK=${FALLBACK:-drop}         # a sample failing the gate: drop | original (pair written with the original instance)
BALANCE=${BALANCE:-}               # per-class budgets: inverse_freq | ap (stage 1 and generation); empty: off
BASELINE_METRICS=${BASELINE_METRICS:-}  # BALANCE=ap: a baseline run's inference/metrics.json
K_PER_CLASS=${K_PER_CLASS:-}       # e.g. truck=6,bus=6 (instances per image); empty: --k for every class
SAMPLES_PER_CLASS=${SAMPLES_PER_CLASS:-}  # e.g. truck=4,bus=4 (samples per instance); empty: NUM_SAMPLES
TRAIN_CONFIG=${TRAIN_CONFIG:-}     # e.g. configs/cityscapes/instance-segmentation/fastinst_R50_ppm-fpn_x1_576_D1_instsynth.yaml; empty: no training
TRAIN_OPTS=${TRAIN_OPTS:-}         # extra "KEY VALUE" overrides for train_net.py
PYTHON=${PYTHON:-python}
# ----------------------------------------------------------------------------------------------

case "$MODE" in
  recolor) MODE_NAME=Recolor ;; diffinpainting) MODE_NAME=DiffPainting ;;
  bld) MODE_NAME=BlendedDiff ;; gligen) MODE_NAME=gligen ;; diffusers) MODE_NAME=Diffusers ;;
  *) echo "MODE must be recolor, diffinpainting, bld, gligen or diffusers (got '$MODE')" >&2; exit 2 ;;
esac
SEL_DIR="$WORK_DIR/selection"
GEN_DIR="$WORK_DIR/generation/$MODE_NAME"
STAGE=""
stage() { STAGE="$*"; echo; echo "==> [$(date +%H:%M:%S)] $*"; }
trap 'echo "error: stage ${STAGE:-setup} failed (exit $?); fix the cause above and rerun: finished work is skipped" >&2' ERR

stage "1/7 instance selection"
if [ -n "$COCO_JSON" ]; then
  "$PYTHON" process_clean_ver.py --coco "$COCO_JSON" --images "$COCO_IMAGES" --k "$K" --out "$SEL_DIR" \
    ${BALANCE:+--balance "$BALANCE"} ${BASELINE_METRICS:+--baseline_metrics "$BASELINE_METRICS"} \
    ${K_PER_CLASS:+--k_per_class "$K_PER_CLASS"}
else
  "$PYTHON" process_clean_ver.py --train_folder "$DATASET_PATH" --k "$K" --out "$SEL_DIR" \
    ${BALANCE:+--balance "$BALANCE"} ${BASELINE_METRICS:+--baseline_metrics "$BASELINE_METRICS"} \
    ${K_PER_CLASS:+--k_per_class "$K_PER_CLASS"}
fi

stage "2/7 instance generation ($MODE)"
"$PYTHON" generation/instance_generation.py --mode "$MODE" --metadata "$SEL_DIR/metadata.json" \
  --folder "$WORK_DIR/generation" ${MODEL_PATH:+--model_path "$MODEL_PATH"} --num_samples "$NUM_SAMPLES" \
  --batch_size "$BATCH_SIZE" --steps "$STEPS" --seed "$SEED" \
  ${GUIDANCE_SCALE:+--guidance_scale "$GUIDANCE_SCALE"} ${PIPELINE_OPTIONS:+--pipeline_options "$PIPELINE_OPTIONS"} \
  ${BALANCE:+--balance "$BALANCE"} ${BASELINE_METRICS:+--baseline_metrics "$BASELINE_METRICS"} \
  ${SAMPLES_PER_CLASS:+--samples_per_class "$SAMPLES_PER_CLASS"}

GATE=()
SCORERS=()
if [ -n "$CLIP_MODEL" ]; then
  SCORERS+=(--clip "$CLIP_MODEL")
  GATE+=(--min_clip_score "$MIN_CLIP_SCORE" ${MIN_CLIP_MARGIN:+--min_clip_margin "$MIN_CLIP_MARGIN"})
fi
if [ -n "$MASK_MODEL" ]; then
  SCORERS+=(--mask_model "$MASK_MODEL")
  GATE+=(--min_mask_iou "$MIN_MASK_IOU")
fi
if [ ${#SCORERS[@]} -gt 0 ]; then
  stage "2b/7 quality gate (${SCORERS[*]}; ${GATE[*]}; fallback $FALLBACK)"
  "$PYTHON" generation/filter_generation.py --manifest "$GEN_DIR/generation.json" "${SCORERS[@]}"
  GATE+=(--fallback "$FALLBACK")
fi

stage "3/7 integration: paste samples, cut new image/label pairs"
"$PYTHON" inpainted_integration.py --inpainting_dir "$GEN_DIR" --metadata_path "$SEL_DIR/metadata.json" \
  --cropped_region_coordinates "$SEL_DIR/cropped_region_coordinates.json" \
  --output_folder_name "$OUTPUT_DATASET_PATH" --crops_per_sample "$CROPS_PER_SAMPLE" --blend "$BLEND" \
  --seed "$SEED" ${GATE[@]+"${GATE[@]}"}

if [ -n "$COCO_JSON" ]; then
  # your own dataset: integration wrote OUT/images and OUT/annotations/instances_train_instsynth.json;
  # register the datasets by name for train_net.py
  CATALOG="$OUTPUT_DATASET_PATH/catalog.yaml"
  stage "4/7 catalog: $CATALOG"
  "$PYTHON" -m instsynth.data.catalog add "$CATALOG" "${DATASET_NAME}_train_instsynth" \
    "$OUTPUT_DATASET_PATH/annotations/instances_train_instsynth.json" "$OUTPUT_DATASET_PATH/images"
  "$PYTHON" -m instsynth.data.catalog add "$CATALOG" "${DATASET_NAME}_train" "$COCO_JSON" "$COCO_IMAGES"
  TEST_NAME="${DATASET_NAME}_train"
  if [ -n "$VAL_COCO_JSON" ]; then
    "$PYTHON" -m instsynth.data.catalog add "$CATALOG" "${DATASET_NAME}_val" "$VAL_COCO_JSON" "$VAL_COCO_IMAGES"
    TEST_NAME="${DATASET_NAME}_val"
  fi
  stage "5-6/7 label crops and COCO conversion: not needed (the merged COCO file is written by integration)"
  if [ -n "$TRAIN_CONFIG" ]; then
    stage "7/7 training ($TRAIN_CONFIG) on ${DATASET_NAME}_train_instsynth, evaluated on $TEST_NAME"
    NUM_CLASSES=$("$PYTHON" -c "import json, sys; print(len(json.load(open(sys.argv[1]))['categories']))" "$COCO_JSON")
    # shellcheck disable=SC2086
    INSTSYNTH_CATALOG="$CATALOG" "$PYTHON" train_net.py --config-file "$TRAIN_CONFIG" --resume \
      DATASETS.TRAIN "('${DATASET_NAME}_train_instsynth',)" DATASETS.TEST "('$TEST_NAME',)" \
      MODEL.FASTINST.NUM_CLASSES "$NUM_CLASSES" MODEL.ONE_FORMER.NUM_CLASSES "$NUM_CLASSES" $TRAIN_OPTS
  else
    stage "7/7 training skipped (TRAIN_CONFIG is empty)"
  fi
  "$PYTHON" -m instsynth.summary run --work_dir "$WORK_DIR" --output "$OUTPUT_DATASET_PATH" --mode_name "$MODE_NAME" \
    --json "$WORK_DIR/summary.json"
  exit 0
fi

stage "4/7 assembly: original splits into the output dataset"
"$PYTHON" move_folder_clean_ver.py --src_path "$DATASET_PATH" --des_path "$OUTPUT_DATASET_PATH"

stage "5/7 label crops: labelIds and color of the new pairs"
"$PYTHON" drop_color_and_labelIds_clean_ver.py \
  --cropped_region_coordinates_path "$OUTPUT_DATASET_PATH/cropped_region_coordinates.json"

stage "6/7 COCO conversion"
"$PYTHON" cityscapes-to-coco-conversion/main_defined_clean_ver.py --dataset cityscapes --datadir "$OUTPUT_DATASET_PATH"

if [ -n "$TRAIN_CONFIG" ]; then
  stage "7/7 training ($TRAIN_CONFIG)"
  # the dataset names of the configs resolve to this run's trees
  export INSTSYNTH_CITYSCAPES="$DATASET_PATH" INSTSYNTH_CITYSCAPES_INSTSYNTH="$OUTPUT_DATASET_PATH"
  # shellcheck disable=SC2086
  "$PYTHON" train_net.py --config-file "$TRAIN_CONFIG" --resume $TRAIN_OPTS
else
  stage "7/7 training skipped (TRAIN_CONFIG is empty)"
fi

"$PYTHON" -m instsynth.summary run --work_dir "$WORK_DIR" --output "$OUTPUT_DATASET_PATH" --mode_name "$MODE_NAME" \
  --json "$WORK_DIR/summary.json" --write-before "$WORK_DIR/coco_original"
