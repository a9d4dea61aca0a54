"""TensorFlow's native start-up lines are filtered from stderr; everything else passes."""

from __future__ import annotations

import subprocess
import sys

from pneumo_cli.engine.tf import _NATIVE_NOISE


def test_noise_pattern_keeps_real_messages():
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1795798558.489483   16428 port.cc:153] oneDNN custom operations are on.",
        "E0000 00:00:1795798565.478850   16428 cuda_platform.cc:52] failed call to cuInit: X",
    ]
    kept = [
        "W0000 00:00:1795798571.192742   16428 dataset.cc:997] Input of GeneratorDatasetOp",
        "Traceback (most recent call last):",
        "error: something real",
    ]
    assert all(_NATIVE_NOISE.match(line) for line in noise)
    assert not any(_NATIVE_NOISE.match(line) for line in kept)


def test_import_tf_prints_no_start_up_noise():
    code = (
        "import sys\n"
        "from pneumo_cli.engine.tf import import_tf\n"
        "tf = import_tf()\n"
        "print('tf-ok', file=sys.stderr)\n"
        "import os; os.write(2, b'native line after start-up\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "tf-ok" in lines and "native line after start-up" in lines  # fd 2 restored
    assert not [line for line in lines if _NATIVE_NOISE.match(line)]
