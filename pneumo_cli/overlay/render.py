"""Drawing masks on X-rays: translucent fills with contours in colour-blind-safe colours,
side-by-side panels with a title strip, and picture encoding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pneumo_cli.core.choices import PictureFormat, values
from pneumo_cli.core.errors import InputError, OutputError

# Okabe-Ito colours, in OpenCV's BGR order.
PRED_COLOR_BGR = (0, 94, 213)  # vermillion, RGB (213, 94, 0)
TRUTH_COLOR_BGR = (115, 158, 0)  # bluish green, RGB (0, 158, 115)
LABEL_COLOR_BGR = (240, 240, 240)
BACKGROUND_BGR = (24, 24, 24)
# Share of the mask colour in a filled pixel, in percent; integer maths keeps it exact.
FILL_ALPHA_PCT = 35

FORMATS = values(PictureFormat)
JPEG_QUALITY = 95


def contour_thickness_px(height: int, width: int) -> int:
    """Width of the drawn contour for an image of ``height`` x ``width`` pixels: 3 px at 1024,
    growing with the image so it stays visible after downscaling, never below 2 px."""
    return max(2, round(max(height, width) / 400))


def mask_contour(mask: np.ndarray, thickness_px: int) -> np.ndarray:
    """The inner edge of ``mask``: mask pixels within ``thickness_px`` (chessboard distance) of a
    background pixel or of the image border. Returns uint8 {0,1} of the same (H, W) shape."""
    import cv2

    side = 2 * thickness_px + 1
    core = cv2.erode(
        (mask != 0).astype(np.uint8),
        np.ones((side, side), np.uint8),
        borderType=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return ((mask != 0) & (core == 0)).astype(np.uint8)


def _check_pair(image: np.ndarray, mask: np.ndarray, what: str) -> None:
    if image.dtype != np.uint8 or image.ndim != 2:
        raise InputError(f"image must be uint8 (H, W), got {image.dtype} {image.shape}")
    if mask.shape != image.shape:
        raise InputError(f"{what} mask has shape {mask.shape}, the image {image.shape}")


def render_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int] = PRED_COLOR_BGR,
    thickness_px: int | None = None,
) -> np.ndarray:
    """Draw ``mask`` on a grey X-ray: translucent fill plus an opaque inner contour.

    Args:
        image: uint8 (H, W) grey X-ray.
        mask: (H, W); any non-zero pixel is foreground.
        color: BGR colour of fill and contour.
        thickness_px: contour width; default :func:`contour_thickness_px`.

    Returns:
        uint8 (H, W, 3) BGR. Outside the mask every pixel is the grey value unchanged; a fill
        pixel is ``(grey * (100 - FILL_ALPHA_PCT) + color * FILL_ALPHA_PCT + 50) // 100``
        per channel; a contour pixel is ``color``.

    Raises:
        InputError: the image is not uint8 (H, W) or the mask's shape differs.
    """
    _check_pair(image, mask, "the")
    picture = np.repeat(image[:, :, None], 3, axis=2)
    inside = mask != 0
    if not inside.any():
        return picture
    colour = np.asarray(color, dtype=np.uint32)
    grey = image[inside].astype(np.uint32)[:, None]
    blended = (grey * (100 - FILL_ALPHA_PCT) + colour * FILL_ALPHA_PCT + 50) // 100
    picture[inside] = blended.astype(np.uint8)
    if thickness_px is None:
        thickness_px = contour_thickness_px(*image.shape)
    picture[mask_contour(mask, thickness_px) != 0] = np.asarray(color, dtype=np.uint8)
    return picture


@dataclass(frozen=True)
class PanelLayout:
    """Where things go in a figure of ``n_panels`` panels of ``panel_height`` x ``panel_width``:
    a title bar across the top, then a label strip above each panel, panels ``gap_px`` apart."""

    panel_height: int
    panel_width: int
    n_panels: int
    title_px: int
    label_px: int
    gap_px: int

    @property
    def height(self) -> int:
        return self.title_px + self.label_px + self.panel_height

    @property
    def width(self) -> int:
        return self.n_panels * self.panel_width + (self.n_panels - 1) * self.gap_px

    def panel_origin(self, index: int) -> tuple[int, int]:
        """(row, column) of panel ``index``'s top-left pixel."""
        return self.title_px + self.label_px, index * (self.panel_width + self.gap_px)


def panel_layout(panel_height: int, panel_width: int, n_panels: int) -> PanelLayout:
    """The layout :func:`render_panels` uses; bars scale with the panel so text stays legible."""
    longest = max(panel_height, panel_width)
    return PanelLayout(
        panel_height=panel_height,
        panel_width=panel_width,
        n_panels=n_panels,
        title_px=max(32, round(longest * 0.07)),
        label_px=max(26, round(longest * 0.055)),
        gap_px=max(4, round(longest / 100)),
    )


def _text_strip(
    height: int, width: int, text: str, color: tuple[int, int, int], fill: float = 0.5
) -> np.ndarray:
    """A ``height`` x ``width`` BGR strip with ``text`` centred, about ``fill`` of its height tall
    and shrunk to fit the width. Drawn in its own array so text can never spill onto a panel."""
    import cv2

    strip = np.full((height, width, 3), BACKGROUND_BGR, dtype=np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    (_, unit_h), _ = cv2.getTextSize(text, font, 1.0, 1)
    scale = fill * height / max(unit_h, 1)
    thickness = max(1, round(scale * 1.6))
    (text_w, text_h), _ = cv2.getTextSize(text, font, scale, thickness)
    if text_w > 0.96 * width:
        scale *= 0.96 * width / text_w
        thickness = max(1, round(scale * 1.6))
        (text_w, text_h), _ = cv2.getTextSize(text, font, scale, thickness)
    origin = ((width - text_w) // 2, (height + text_h) // 2)
    cv2.putText(strip, text, origin, font, scale, color, thickness, cv2.LINE_AA)
    return strip


def downscale(picture: np.ndarray, max_size: int | None) -> np.ndarray:
    """Shrink ``picture`` (area interpolation) so its longest side is at most ``max_size``;
    smaller pictures and ``max_size=None`` are returned unchanged (never enlarged)."""
    import cv2

    height, width = picture.shape[:2]
    if max_size is None or max(height, width) <= max_size:
        return picture
    scale = max_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(picture, size, interpolation=cv2.INTER_AREA)


def render_panels(
    image: np.ndarray,
    pred_mask: np.ndarray,
    truth_mask: np.ndarray | None,
    title: str,
    max_size: int | None = None,
) -> np.ndarray:
    """The figure for one image: input | prediction [| ground truth], labelled, under ``title``.

    Overlays are drawn at the image's own resolution, then each panel is downscaled so its
    longest side is at most ``max_size`` (if given); bars and text are drawn at the final size.

    Args:
        image: uint8 (H, W) grey X-ray.
        pred_mask, truth_mask: (H, W) masks, non-zero = foreground; ``truth_mask`` may be None.
        title: text of the title bar (e.g. from :func:`format_title`).
        max_size: longest side of a panel in pixels, or None for full resolution.

    Returns:
        uint8 BGR figure laid out as :func:`panel_layout` describes.
    """
    _check_pair(image, pred_mask, "prediction")
    panels = [np.repeat(image[:, :, None], 3, axis=2), render_overlay(image, pred_mask)]
    labels = [("X-ray", LABEL_COLOR_BGR), ("Prediction", PRED_COLOR_BGR)]
    if truth_mask is not None:
        _check_pair(image, truth_mask, "ground-truth")
        panels.append(render_overlay(image, truth_mask, TRUTH_COLOR_BGR))
        labels.append(("Ground truth", TRUTH_COLOR_BGR))
    panels = [downscale(panel, max_size) for panel in panels]
    height, width = panels[0].shape[:2]
    layout = panel_layout(height, width, len(panels))
    figure = np.full((layout.height, layout.width, 3), BACKGROUND_BGR, dtype=np.uint8)
    figure[: layout.title_px] = _text_strip(
        layout.title_px, layout.width, title, LABEL_COLOR_BGR, fill=0.45
    )
    for index, (panel, (label, colour)) in enumerate(zip(panels, labels, strict=True)):
        top, left = layout.panel_origin(index)
        figure[top - layout.label_px : top, left : left + width] = _text_strip(
            layout.label_px, width, label, colour
        )
        figure[top : top + height, left : left + width] = panel
    return figure


def format_title(image_id: str, dice: float | None) -> str:
    """Title bar text: the Dice (3 decimals, if known) first, then the ImageId."""
    if dice is None:
        return image_id
    return f"Dice {dice:.3f}   {image_id}"


def encode_picture(picture: np.ndarray, fmt: str) -> bytes:
    """Encode a BGR picture as PNG or JPEG (quality 95, full-resolution colour) bytes."""
    import cv2

    if fmt == "png":
        ok, buffer = cv2.imencode(".png", picture)
    else:
        params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        # Thin coloured contours blur badly with the default 4:2:0 colour subsampling.
        if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR"):
            params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
        ok, buffer = cv2.imencode(".jpg", picture, params)
    if not ok:
        raise OutputError(f"OpenCV could not encode the picture as {fmt}")
    return buffer.tobytes()
