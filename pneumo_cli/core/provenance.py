"""What made an artifact: the package versions recorded in caches, runs and exports.

One collector, so every artifact names a missing package the same way.
"""

from __future__ import annotations

import sys

# Packages that decide what a trained network computes.
MODEL_PACKAGES = (
    "tensorflow",
    "tf-keras",
    "segmentation-models",
    "numpy",
    "opencv-python-headless",
)
# Packages that decide the cached pixels.
IMAGE_PACKAGES = ("numpy", "opencv-python-headless", "pydicom", "pylibjpeg", "pandas")
# Packages that convert and run ONNX exports.
ONNX_PACKAGES = ("tf2onnx", "onnx", "onnxruntime")
MISSING = "not installed"


def package_versions(names: tuple[str, ...] = MODEL_PACKAGES) -> dict[str, str]:
    """``{"python": ..., name: version}`` for ``names``; :data:`MISSING` for an absent one."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = MISSING
    return versions
