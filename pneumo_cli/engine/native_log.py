"""TensorFlow's native log lines on stderr (file descriptor 2), filtered while a block runs.

TensorFlow's C++ code writes absl log lines straight to file descriptor 2, around Python's
``sys.stderr``. A few of them are known noise that a user can do nothing about, for example the
``dataset.cc`` warning that tf.data cannot optimise a generator dataset inside Keras' ``fit``.
:func:`native_noise_dropped` routes fd 2 through a pipe for the duration of a block; a thread
forwards everything at once (progress bars and Python's own stderr included) except whole lines
that match the noise pattern. Warnings and errors that do not match still reach the user.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

# A native log line starts like "W0000 00:00:1796172813.546216    3527 dataset.cc:997] ".
_NATIVE_START = re.compile(rb"^[IWEF]\d{4} ")
TRAINING_NOISE = re.compile(
    rb"^W\d{4} [\d:. ]+\d+ dataset\.cc:\d+\] Input of GeneratorDatasetOp::Dataset will not be "
    rb"optimized"
)


@contextlib.contextmanager
def native_noise_dropped(noise: re.Pattern[bytes] = TRAINING_NOISE) -> Iterator[None]:
    """Drop whole stderr lines matching ``noise`` while the block runs; pass the rest on."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    forwarder = threading.Thread(target=_forward, args=(read_end, saved, noise), daemon=True)
    forwarder.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the forwarder sees end of file
        forwarder.join(timeout=10)
        os.close(saved)


def _forward(read_end: int, target: int, noise: re.Pattern[bytes]) -> None:
    """Copy ``read_end`` to ``target`` as data arrives; a line that may be a native log line is
    held until it is complete, then dropped if it is noise."""
    pending = b""
    try:
        while chunk := os.read(read_end, 65536):
            pending += chunk
            pending = _flush_complete(pending, target, noise)
        if pending and not noise.match(pending):
            os.write(target, pending)
    finally:
        os.close(read_end)


def _flush_complete(data: bytes, target: int, noise: re.Pattern[bytes]) -> bytes:
    """Write what can be decided now; return the undecided rest (a partial native line)."""
    out = []
    while data:
        newline = data.find(b"\n")
        if newline < 0:
            # A partial line: forward it now (a progress bar redraws without a newline) unless
            # it may be the beginning of a native log line.
            maybe_native = _NATIVE_START.match(data[:6]) or (
                len(data) < 6 and re.match(rb"^[IWEF]\d{0,4}$", data)
            )
            if maybe_native:
                break
            out.append(data)
            data = b""
            break
        line, data = data[: newline + 1], data[newline + 1 :]
        if not noise.match(line):
            out.append(line)
    if out:
        os.write(target, b"".join(out))
    return data
