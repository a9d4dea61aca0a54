"""Image steps of the cache, and their inverse for predictions (numpy + OpenCV, no TensorFlow).

Forward (``pneumo preprocess``): crop the uniform dark border, CLAHE contrast correction, resize
to ``image_size`` x ``image_size`` (with ``downscale_first``: shrink by a power of two, crop,
resize, then CLAHE). The crop box is kept so that :func:`restore_to_original` maps
a prediction made on the cached image back to the original pixels. ``pneumo predict`` calls these
same functions, so training and prediction inputs are prepared identically.

Normalisation to the network's input range is *not* done here: the cache stores 8-bit PNGs and
the training/prediction data pipeline scales them once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pneumo_cli.core.config import PreprocessConfig
from pneumo_cli.core.image_files import reduced_shape, reduction_for

# (top, bottom, left, right): rows [top, bottom), columns [left, right), in original pixels.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Prepared:
    """An image ready for the network.

    Attributes:
        image: uint8 (S, S), S = ``settings.image_size``.
        crop: (top, bottom, left, right) in original pixels; rows [top, bottom), cols [left, right).
        original_shape: (H, W) of the image before the crop.
    """

    image: np.ndarray
    crop: Box
    original_shape: tuple[int, int]


def detect_crop(image: np.ndarray, threshold: int = 10, min_keep: float = 0.5) -> Box:
    """Find the box inside the uniform dark border of a uint8 (H, W) image (air dark).

    A border row (column) is one whose 99th-percentile value is at most ``threshold``: nearly all
    of it is black, which tolerates JPEG ringing and a few stray bright pixels. Only rows and
    columns touching the edges count; dark lung fields inside the image are never cut. A box that
    would keep less than ``min_keep`` of the height or width is distrusted and the whole image is
    kept (an almost black image is the corrupt filter's business, not the crop's).
    """
    import cv2

    height, width = image.shape
    # The 99th percentile along a line is below `threshold` iff fewer than 1% of its pixels
    # exceed it: counting is much cheaper than a percentile (and OpenCV counts faster than numpy
    # sums a boolean array; benchmarks/bench_predict.py times the whole path).
    _, bright = cv2.threshold(np.ascontiguousarray(image), threshold, 1, cv2.THRESH_BINARY)
    dark_rows = cv2.reduce(bright, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel() <= width // 100
    dark_cols = cv2.reduce(bright, 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel() <= height // 100
    top, bottom = _inner_span(dark_rows)
    left, right = _inner_span(dark_cols)
    if bottom - top < min_keep * height or right - left < min_keep * width:
        return 0, height, 0, width
    return top, bottom, left, right


def _inner_span(dark: np.ndarray) -> tuple[int, int]:
    """First and one-past-last index that is not dark; (0, n) when every line is dark."""
    keep = np.flatnonzero(~dark)
    if keep.size == 0:
        return 0, dark.size
    return int(keep[0]), int(keep[-1]) + 1


def apply_clahe(image: np.ndarray, clip: float = 2.0, grid: int = 8) -> np.ndarray:
    """OpenCV CLAHE on a uint8 (H, W) image with ``grid`` x ``grid`` tiles; returns uint8 (H, W)."""
    import cv2

    return cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid)).apply(image)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 (H, W) image to (size, size): area averaging when shrinking (no aliasing),
    bilinear when enlarging."""
    import cv2

    height, width = image.shape
    if (height, width) == (size, size):
        return image.copy()
    shrinking = height >= size and width >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def decoded_min_side(settings: PreprocessConfig) -> int | None:
    """The shorter side an X-ray may be decoded down to before :func:`prepare_image` (twice
    ``image_size`` with ``downscale_first``), or None: decode it whole."""
    return 2 * settings.image_size if settings.downscale_first else None


def prepare_image(
    image: np.ndarray,
    settings: PreprocessConfig,
    *,
    reduction: int = 1,
    original_shape: tuple[int, int] | None = None,
) -> Prepared:
    """Crop, CLAHE and resize a uint8 (H, W) X-ray (air dark) as ``settings`` say.

    ``image`` is the whole X-ray, or with ``reduction`` > 1 the X-ray decoded at that fraction
    of its ``original_shape`` (``read_xray(..., min_side=decoded_min_side(settings))``). With
    ``settings.downscale_first`` an image still larger than that rule allows is first shrunk by
    area averaging, so every source of the same X-ray is prepared at the same scale; the crop is
    found on the small image and CLAHE applied after the resize.

    Returns a :class:`Prepared` with the uint8 (S, S) image and the crop box in original pixels.

    Raises:
        ValueError: not uint8 (H, W), or a ``reduction`` the settings do not allow.
    """
    import cv2

    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"prepare_image needs uint8 (H, W), got {image.dtype} {image.shape}")
    height, width = original_shape or image.shape
    wanted = reduction_for((height, width), decoded_min_side(settings))
    if (
        reduction > wanted
        or wanted % reduction
        or image.shape != reduced_shape((height, width), reduction)
    ):
        raise ValueError(
            f"prepare_image: an image of {image.shape} decoded at 1/{reduction} of "
            f"{(height, width)} does not fit these settings (1/{wanted})"
        )
    if wanted > reduction:
        # As libjpeg's reduced decode does: means of whole factor x factor blocks, the last row
        # and column of blocks filled out by repeating the image's edge.
        factor = wanted // reduction
        small_height, small_width = reduced_shape((height, width), wanted)
        bottom_pad = small_height * factor - image.shape[0]
        right_pad = small_width * factor - image.shape[1]
        if bottom_pad or right_pad:
            image = cv2.copyMakeBorder(image, 0, bottom_pad, 0, right_pad, cv2.BORDER_REPLICATE)
        image = cv2.resize(image, (small_width, small_height), interpolation=cv2.INTER_AREA)
    small = (0, image.shape[0], 0, image.shape[1])
    if settings.crop_border:
        small = detect_crop(image, settings.crop_threshold, settings.crop_min_keep)
    top, bottom, left, right = small
    region = image[top:bottom, left:right]
    if settings.clahe and not settings.downscale_first:
        region = apply_clahe(region, settings.clahe_clip, settings.clahe_grid)
    prepared = resize_image(region, settings.image_size)
    if settings.clahe and settings.downscale_first:
        prepared = apply_clahe(prepared, settings.clahe_clip, settings.clahe_grid)
    crop = (
        top * wanted,
        min(bottom * wanted, height),
        left * wanted,
        min(right * wanted, width),
    )
    return Prepared(prepared, crop, (height, width))


def prepare_mask(mask: np.ndarray, crop: Box, settings: PreprocessConfig) -> np.ndarray:
    """Crop and resize a {0,1} (H, W) mask like its image; returns uint8 {0,1} (S, S).

    Every rule here is pixel-centred, so a shape keeps its centroid (to ~0.01 px on average;
    OpenCV's plain nearest neighbour samples pixel corners and moved masks ~0.5 px down and right
    of their image when the crop box was smaller than ``image_size``).

    Enlarging (both sides of the crop box below S): nearest neighbour at pixel centres
    (``INTER_NEAREST_EXACT``), which keeps every annotated pixel. Shrinking: a cached pixel is
    foreground when at least half of the original area it covers is (area rule), so areas scale
    faithfully; a side below S is first enlarged by repeating its pixels a whole number of
    times, which moves nothing. A connected region too thin to cover half of any cached pixel (a
    1-3 px sliver at 1024 px) would vanish that way; such a region instead keeps every cached
    pixel its pixels' centres fall in, so no annotation is ever erased.
    """
    import cv2

    top, bottom, left, right = crop
    region = (mask[top:bottom, left:right] > 0).astype(np.uint8)
    size = settings.image_size
    if not region.any():
        return np.zeros((size, size), dtype=np.uint8)
    if region.shape[0] <= size and region.shape[1] <= size:
        return cv2.resize(region, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
    repeat_rows = -(-size // region.shape[0])  # ceil: each side becomes at least `size`
    repeat_cols = -(-size // region.shape[1])
    if repeat_rows > 1:
        region = np.repeat(region, repeat_rows, axis=0)
    if repeat_cols > 1:
        region = np.repeat(region, repeat_cols, axis=1)
    height, width = region.shape
    coverage = cv2.resize(region.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    small = (coverage >= 0.5).astype(np.uint8)
    count, labels = cv2.connectedComponents(region, connectivity=8)
    rows, cols = np.nonzero(labels)
    # The cached pixel each original pixel's centre falls in.
    small_rows = (2 * rows + 1) * size // (2 * height)
    small_cols = (2 * cols + 1) * size // (2 * width)
    kept = np.bincount(labels[rows, cols], weights=small[small_rows, small_cols], minlength=count)
    lost = kept[labels[rows, cols]] == 0
    small[small_rows[lost], small_cols[lost]] = 1
    return small


def restore_to_original(
    array: np.ndarray, crop: Box, original_shape: tuple[int, int], is_mask: bool
) -> np.ndarray:
    """Map an (S, S) prediction back to the original (H, W) pixels: undo the resize into the crop
    box and fill outside it with 0.

    Args:
        array: (S, S) float probabilities (``is_mask=False``, bilinear, returned as float32) or a
            {0,1} mask (``is_mask=True``, pixel-centred nearest neighbour, returned as uint8
            {0,1}).
        crop: (top, bottom, left, right) from :class:`Prepared` or the manifest.
        original_shape: (H, W) of the original image.
    """
    region = restore_region(array, crop, original_shape, is_mask)
    top, bottom, left, right = crop
    restored = np.zeros(original_shape, dtype=region.dtype)
    restored[top:bottom, left:right] = region
    return restored


def restore_region(
    array: np.ndarray, crop: Box, original_shape: tuple[int, int], is_mask: bool
) -> np.ndarray:
    """The crop box's part of :func:`restore_to_original` (everything outside it is 0)."""
    import cv2

    top, bottom, left, right = crop
    height, width = original_shape
    if not (0 <= top < bottom <= height and 0 <= left < right <= width):
        raise ValueError(f"crop box {crop} does not fit an image of shape {original_shape}")
    if is_mask:
        source = (np.asarray(array) > 0).astype(np.uint8)
        # INTER_NEAREST samples each pixel's corner, not its centre: masks would move ~0.5 px.
        interpolation = cv2.INTER_NEAREST_EXACT
    else:
        source = np.asarray(array, dtype=np.float32)
        interpolation = cv2.INTER_LINEAR
    return cv2.resize(source, (right - left, bottom - top), interpolation=interpolation)
