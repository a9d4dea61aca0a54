#!/usr/bin/env bash
# The paper's recipe on the real SIIM-ACR Pneumothorax data, and a stronger variant.
#
#   bash examples/siim.sh /data/siim            # expects the Kaggle layout below
#   RECIPE=strong bash examples/siim.sh /data/siim
#
# /data/siim/dicom-images-train/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm
# /data/siim/train-rle.csv
#
# paper  (default): 256 px, resnet34 with ImageNet encoder, Adam 1e-4, binary cross-entropy,
#                   early stopping, one 0.5 threshold, no test-time augmentation.
# strong:           512 px, bce-dice loss, positives oversampled 0.8 falling to 0.4 (as the
#                   2019 winner did), the post-processing gate tuned on val, mirror TTA.
#
# The ImageNet weights are downloaded into ~/.keras/models on first use; offline, place
# resnet34_imagenet_1000_no_top.h5 (md5 8caaa0ad39d927cb8ba5385bf945d582) there yourself.
set -euo pipefail

DATA=${1:?usage: examples/siim.sh DATA_DIR (with dicom-images-train/ and train-rle.csv)}
RECIPE=${RECIPE:-paper}
GPUS=${GPUS:-1}        # 0 = CPU
WORK=${WORK:-siim-$RECIPE}

case "$RECIPE" in
  paper)  SIZE=${SIZE:-256}; EPOCHS=${EPOCHS:-50}; TTA=none
          TRAIN_ARGS=(--loss bce --patience 10 --batch-size 16) ;;
  strong) SIZE=${SIZE:-512}; EPOCHS=${EPOCHS:-60}; TTA=hflip
          TRAIN_ARGS=(--loss bce-dice --patience 12 --batch-size 8 --pos-fraction 0.8:0.4
                      --reduce-lr-patience 4) ;;
  *) echo "RECIPE must be paper or strong" >&2; exit 2 ;;
esac
ENCODER=${ENCODER:-resnet34}
WEIGHTS=${WEIGHTS:-imagenet}   # none: random start (for a dry run without the weights file)

mkdir -p "$WORK"
cd "$WORK"

# 12,047 DICOMs -> cache of SIZE px PNGs with 80/10/10 patient-grouped, stratified splits.
pneumo preprocess "$DATA/dicom-images-train" cache/ --rle "$DATA/train-rle.csv" --image-size "$SIZE"

pneumo train --gpus "$GPUS" --encoder "$ENCODER" --encoder-weights "$WEIGHTS" --lr 1e-4 \
  --epochs "$EPOCHS" "${TRAIN_ARGS[@]}"

if [ "$RECIPE" = strong ]; then
  pneumo evaluate --split val --tune --tta "$TTA"      # writes runs/latest/postprocess.json
else
  pneumo evaluate --split val
fi
pneumo evaluate --split test --tta "$TTA" --json > test-metrics.json
python3 -c "import json; m = json.load(open('test-metrics.json')); print('test mean Dice (SIIM):', m['mean_dice'])"
