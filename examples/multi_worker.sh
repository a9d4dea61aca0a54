#!/usr/bin/env bash
# pneumo on two machines: one `pneumo train --multi-worker` process per machine.
#
# TensorFlow's MultiWorkerMirroredStrategy keeps one copy of the U-Net per machine (per GPU) and
# averages the gradients of every step over all of them, so the machines train ONE model. Each
# machine learns its own role from TF_CONFIG: the same cluster list everywhere, its own task
# index. Worker 0 is the chief: it alone writes the run folder; the other worker writes into a
# temporary folder that is removed at the end.
#
# Needs a filesystem both machines see at the same path (NFS, a cloud bucket mount, ...) for the
# cache and the runs folder, and the chosen port open between the machines.
#
#   On machine A:  bash examples/multi_worker.sh 0
#   On machine B:  bash examples/multi_worker.sh 1
#   One computer, both workers as two local processes on 127.0.0.1 (a rehearsal):
#                  bash examples/multi_worker.sh --local
#
# Settings (environment variables):
#   HOSTS   the two machines, "hostA:port,hostB:port"   (default 10.0.0.1:2222,10.0.0.2:2222)
#   SHARED  the shared folder holding cache/ and runs/  (default /mnt/shared/pneumo)
#   GPUS    GPUs to use on EACH machine                 (default: all visible; 0 = CPU)
#   PNEUMO  the pneumo command                          (default: pneumo)
#   any further arguments go to `pneumo train`, e.g.  ... 0 --epochs 30 --scale-lr
#
# Batch and learning rate: --batch-size is per replica. The global batch is
#   batch-size x replicas per machine x machines
# (2 machines with 4 GPUs each and --batch-size 16: 128 images per step). --scale-lr multiplies
# --lr by the number of replicas in sync (8 here), the linear scaling rule; without it the
# learning rate is used as given.
#
# If a worker dies, the other stops within ~10 s with one line naming the run to resume; restart
# both with the same command plus `--resume RUN` (the chief's run folder on the shared disk).
set -euo pipefail

HOSTS=${HOSTS:-10.0.0.1:2222,10.0.0.2:2222}
SHARED=${SHARED:-/mnt/shared/pneumo}
PNEUMO=${PNEUMO:-pneumo}
GPU_ARGS=()
[ -n "${GPUS:-}" ] && GPU_ARGS=(--gpus "$GPUS")

tf_config() {  # the TF_CONFIG of worker $1: the whole cluster plus "I am worker $1"
  local workers
  workers=$(printf '"%s",' ${HOSTS//,/ })
  printf '{"cluster": {"worker": [%s]}, "task": {"type": "worker", "index": %d}}' \
    "${workers%,}" "$1"
}

train_worker() {  # run worker $1 with the remaining arguments passed to pneumo train
  local index=$1
  shift
  TF_CONFIG=$(tf_config "$index") "$PNEUMO" train --multi-worker \
    --cache "$SHARED/cache" --runs-dir "$SHARED/runs" "${GPU_ARGS[@]}" "$@"
}

if [ "${1:-}" = "--local" ]; then
  shift
  # Rehearsal on one computer: free ports on 127.0.0.1, a demo cache, CPU only, a short run.
  free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
  HOSTS="127.0.0.1:$(free_port),127.0.0.1:$(free_port)"
  SHARED=${LOCAL_DIR:-multi_worker_demo}
  GPU_ARGS=(--gpus 0)
  if [ ! -d "$SHARED/cache" ]; then
    "$PNEUMO" demo-data "$SHARED/raw" --n 40 --size 128 --seed 0
    "$PNEUMO" preprocess "$SHARED/raw" "$SHARED/cache" --image-size 64 \
      --rle "$SHARED/raw/train-rle.csv"
  fi
  [ $# -gt 0 ] || set -- --encoder resnet18 --encoder-weights none --epochs 2 \
    --steps-per-epoch 3 --batch-size 2
  export CUDA_VISIBLE_DEVICES=""
  train_worker 1 "$@" --quiet > "$SHARED/worker1.json" &  # the helper, in the background
  helper=$!
  trap 'kill "$helper" 2>/dev/null || true' EXIT
  train_worker 0 "$@"                                     # the chief, in the foreground
  wait "$helper"
  trap - EXIT
  echo "run written by the chief: $SHARED/runs/latest" >&2
  exit 0
fi

case "${1:-}" in
  0 | 1) index=$1; shift; train_worker "$index" "$@" ;;
  *) echo "usage: $0 0|1 [pneumo train options]   or   $0 --local [options]" >&2; exit 2 ;;
esac
