"""The PyTorch peer's bare network, for bench_peer.py: run with a Python that has torch and
segmentation_models_pytorch (a scratch environment; neither is a pneumo dependency).

Run: PEER_PYTHON benchmarks/peer_smp.py [--size 256] [--batch 16] [--encoder resnet34]

A segmentation_models_pytorch U-Net (random weights: speed does not depend on them), one grey
input channel, eval mode, ``torch.no_grad``, bf16 ``torch.autocast`` and channels-last memory
(the peer's fastest CPU configuration), one thread per core. Prints one JSON line: images/s at
``--batch`` (median of ``--repeats`` batches after two warm-ups) and the median ms of one image
(of 30).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()

    import segmentation_models_pytorch as smp
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = smp.Unet(args.encoder, encoder_weights=None, in_channels=1, classes=1).eval()
    model = model.to(memory_format=torch.channels_last)

    def run(images: torch.Tensor) -> float:
        began = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)
        return time.perf_counter() - began

    batch = torch.rand(args.batch, 1, args.size, args.size).to(memory_format=torch.channels_last)
    one = batch[:1].contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        run(batch)
        run(one)
    rate = args.batch / statistics.median(run(batch) for _ in range(args.repeats))
    latency = statistics.median(run(one) for _ in range(30)) * 1e3
    print(json.dumps({
        "torch": torch.__version__, "smp": smp.__version__, "threads": torch.get_num_threads(),
        "images_per_second": round(rate, 2), "batch1_ms": round(latency, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
