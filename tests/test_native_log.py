"""Native stderr lines of TensorFlow: known noise dropped, everything else passed on as it comes."""

from __future__ import annotations

import subprocess
import sys

NOISE = (
    "W0000 00:00:1796172813.546216    3527 dataset.cc:997] Input of GeneratorDatasetOp::Dataset "
    "will not be optimized because the dataset does not implement the AsGraphDefInternal() "
    "method needed to apply optimizations."
)


def run(body: str) -> subprocess.CompletedProcess:
    """Run ``body`` inside the filter in a fresh process; stderr as text, "\\r" kept as it is."""
    code = (
        "import os, sys\n"
        "from pneumo_cli.engine.native_log import native_noise_dropped\n"
        "with native_noise_dropped():\n" + "".join(f"    {line}\n" for line in body.splitlines())
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    done.stderr = done.stderr.decode()
    return done


def test_the_generator_dataset_warning_is_dropped_and_the_rest_kept_in_order() -> None:
    body = (
        "os.write(2, b'before\\n')\n"
        f"os.write(2, {NOISE.encode()!r} + b'\\n')\n"
        "os.write(2, b'W0000 00:00:1.0 1 other.cc:1] a real warning\\n')\n"
        "print('python stderr', file=sys.stderr, flush=True)\n"
        "os.write(2, b'\\rprogress 50%')\n"
        "os.write(2, b'\\rprogress 100%\\n')\n"
    )
    assert run(body).stderr == (
        "before\nW0000 00:00:1.0 1 other.cc:1] a real warning\npython stderr\n"
        "\rprogress 50%\rprogress 100%\n"
    )


def test_a_noise_line_written_in_pieces_is_still_dropped() -> None:
    half = len(NOISE) // 2
    body = (
        f"os.write(2, {NOISE[:3].encode()!r})\n"
        f"os.write(2, {NOISE[3:half].encode()!r})\n"
        f"os.write(2, {NOISE[half:].encode()!r} + b'\\n')\n"
        "os.write(2, b'after\\n')\n"
    )
    assert run(body).stderr.splitlines() == ["after"]


def test_stderr_is_restored_after_the_block() -> None:
    code = (
        "import os\n"
        "from pneumo_cli.engine.native_log import native_noise_dropped\n"
        "with native_noise_dropped():\n"
        "    pass\n"
        f"os.write(2, {NOISE.encode()!r} + b'\\n')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr.strip() == NOISE  # outside the block nothing is filtered
