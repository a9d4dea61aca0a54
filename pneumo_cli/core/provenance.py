"""TODO: split-out module docstring."""

from __future__ import annotations

import sys


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide what a trained model computes."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for name in (
        "tensorflow",
        "tf-keras",
        "segmentation-models",
        "numpy",
        "opencv-python-headless",
    ):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions
