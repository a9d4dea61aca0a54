#!/usr/bin/env bash
# pneumo quickstart: the whole pipeline on a synthetic SIIM-style dataset, with the public CLI only.
#
#   bash examples/quickstart.sh            # or: make demo
#
# Everything is written under ./demo (or $DEMO_DIR). The commands inside that folder are the ones a
# team types on the real Kaggle data: `pneumo preprocess raw/ cache/`, `pneumo train`,
# `pneumo evaluate --split val`. Settings below keep it to a few minutes on a 2-core CPU.
set -euo pipefail

DEMO_DIR=${DEMO_DIR:-demo}
N_IMAGES=${DEMO_N:-300}          # synthetic X-rays (about 22% with a pneumothorax)
RAW_SIZE=${DEMO_RAW_SIZE:-256}   # pixels of the synthetic DICOMs
IMAGE_SIZE=${DEMO_IMAGE_SIZE:-128}
EPOCHS=${DEMO_EPOCHS:-20}
ENCODER=${DEMO_ENCODER:-resnet18}

if [ -e "$DEMO_DIR" ] && [ ! -e "$DEMO_DIR/.pneumo-demo" ]; then
  echo "quickstart: $DEMO_DIR exists and was not made by this script; set DEMO_DIR elsewhere" >&2
  exit 1
fi
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"
touch "$DEMO_DIR/.pneumo-demo"
cd "$DEMO_DIR"
step() { printf '\n== %s\n' "$*" >&2; }

step "1/8 synthetic dataset in the Kaggle layout: raw/dicom-images-train/..., raw/train-rle.csv"
pneumo demo-data raw --n "$N_IMAGES" --size "$RAW_SIZE" --seed 0

step "2/8 decode the RLE labels to mask PNGs"
pneumo rle-decode raw/train-rle.csv masks --width "$RAW_SIZE" --height "$RAW_SIZE"

step "3/8 preprocess: crop, CLAHE, resize, 80/10/10 patient-grouped splits"
pneumo preprocess raw/ cache/ --rle raw/train-rle.csv --image-size "$IMAGE_SIZE"

step "4/8 train the ResNet-U-Net (random start: no ImageNet download in the demo)"
pneumo train --gpus 0 --encoder "$ENCODER" --encoder-weights none --epochs "$EPOCHS" \
  --batch-size 16 --pos-fraction 0.5 --patience 6

step "5/8 evaluate on val and tune the post-processing gate"
pneumo evaluate --split val --tune

step "6/8 evaluate once on the held-out test split"
pneumo evaluate --split test --json > test-metrics.json

step "7/8 predict the test X-rays from their DICOMs, with mirror test-time augmentation"
# The test split's DICOMs, from the manifest (column 6 is split, column 19 the source path).
awk -F, 'NR > 1 && $6 == "test" { print "raw/" $19 }' cache/manifest.csv > test-files.txt
xargs pneumo predict --out predictions --tta hflip < test-files.txt

step "8/8 overlays for the doctor: X-ray | prediction | ground truth"
xargs pneumo overlay --masks predictions/masks --rle raw/train-rle.csv --out overlays \
  --max-size 512 < test-files.txt

python3 - <<'PY'
import json
m = json.load(open("test-metrics.json"))
print()
print("pneumo quickstart finished (synthetic data; these numbers say nothing about real X-rays)")
def shown(value):  # null when the split has no image of that kind (a tiny demo)
    return "n/a" if value is None else f"{value:.3f}"
print(f"  test mean Dice (SIIM, empty vs empty = 1): {shown(m['mean_dice'])}")
print(f"  test Dice on positive images only:         {shown(m['positive_mean_dice'])}")
print(f"  test images: {m['n_images']} ({m['n_positive']} with pneumothorax)")
PY
cat <<EOF

Look at:
  $DEMO_DIR/runs/latest/eval-test/report.html   evaluation report (opens from disk)
  $DEMO_DIR/runs/latest/eval-test/metrics.json  every number
  $DEMO_DIR/runs/latest/curves.png              training curves
  $DEMO_DIR/predictions/predictions.csv         per-image predictions (Kaggle RLE)
  $DEMO_DIR/overlays/                           pictures for the doctor
EOF
