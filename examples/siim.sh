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
# strong:           the 2019 winners' recipe: 5 cross-validation folds at 512 px, bce-dice
#                   loss, positives oversampled 0.8 falling to 0.4, the top-3 epochs of each
#                   fold averaged into one model (measured better out of fold than their ensemble on the demo data), one post-processing gate tuned
#                   out of fold (each fold's model on its own fold), mirror TTA, and the
#                   ensemble scored once on the held-out test split.
#
# Time (strong). The CPU figures are extrapolated, not measured at 512 px: bf16 training ran at
# 14 images/s at 256 px on a 2-core AVX512-BF16 Xeon (README, Performance), so about 3.5 at
# 512 px (4x the pixels). A fold trains on about 8,700 images per epoch: some 40 minutes per
# epoch, and up to 60 epochs, i.e. on the order of 1-2 days per fold and a week or more for the
# sweep on such a CPU: use a GPU (GPUS=1; GPU speeds were not measured here). A killed sweep
# continues where it stopped when the same command runs again.
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
  strong) SIZE=${SIZE:-512}; EPOCHS=${EPOCHS:-60}; TTA=hflip; FOLDS=${FOLDS:-5}
          TRAIN_ARGS=(--loss bce-dice --patience 12 --batch-size 8 --pos-fraction 0.8:0.4
                      --reduce-lr-patience 4 --keep-top 3 --top-use average) ;;
  *) echo "RECIPE must be paper or strong" >&2; exit 2 ;;
esac
ENCODER=${ENCODER:-resnet34}
WEIGHTS=${WEIGHTS:-imagenet}   # none: random start (for a dry run without the weights file)

mkdir -p "$WORK"
cd "$WORK"

# 12,047 DICOMs -> cache of SIZE px PNGs with 80/10/10 patient-grouped, stratified splits
# (strong: the train and val images also dealt into FOLDS patient-grouped folds).
FOLD_ARGS=()
if [ "$RECIPE" = strong ]; then FOLD_ARGS=(--folds "$FOLDS"); fi
pneumo preprocess "$DATA/dicom-images-train" cache/ --rle "$DATA/train-rle.csv" --image-size "$SIZE" \
  "${FOLD_ARGS[@]}"

if [ "$RECIPE" = strong ]; then
  # One run per fold into runs/cv (fold0 ... fold4); the folder is the ensemble of its folds.
  pneumo train --cv --name cv --gpus "$GPUS" --encoder "$ENCODER" --encoder-weights "$WEIGHTS" \
    --lr 1e-4 --epochs "$EPOCHS" "${TRAIN_ARGS[@]}"
  # Out of fold: every train/val image scored once, by the fold model that did not train on it;
  # the gate tuned on all of them is saved as runs/cv/postprocess.json.
  pneumo evaluate --run runs/cv --tune --tta "$TTA"
  pneumo evaluate --run runs/cv --split test --tta "$TTA" --json > test-metrics.json
else
  pneumo train --gpus "$GPUS" --encoder "$ENCODER" --encoder-weights "$WEIGHTS" --lr 1e-4 \
    --epochs "$EPOCHS" "${TRAIN_ARGS[@]}"
  pneumo evaluate --split val
  pneumo evaluate --split test --tta "$TTA" --json > test-metrics.json
fi
python3 -c "import json; m = json.load(open('test-metrics.json')); print('test mean Dice (SIIM):', m['mean_dice'])"
