"""Reading images and label maps robustly: grayscale, RGBA and 16-bit images become RGB uint8."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from fcn.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Convert a decoded OpenCV image (gray / BGR / BGRA, 8- or 16-bit) to RGB uint8 ``(H, W, 3)``."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as RGB uint8 ``(H, W, 3)``; unreadable files raise :class:`DataError`."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise DataError(
            f"cannot read image {path} (missing, corrupt, truncated or not an image); replace or remove it"
        )
    return to_rgb_uint8(img)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a single-channel label map (uint8 or uint16) as stored, without any interpolation."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.size == 0:
        raise DataError(
            f"cannot read label file {path} (missing, corrupt or not an image); replace or remove it"
        )
    if mask.ndim == 3:
        first = mask[:, :, 0]
        if not all(np.array_equal(first, mask[:, :, c]) for c in range(1, min(3, mask.shape[2]))):
            raise DataError(
                f"label file {path} is a colour image; labels must be single-channel PNGs of class ids "
                "(convert colour-coded labels to ids first)"
            )
        mask = first
    return mask
