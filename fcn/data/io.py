"""Reading images and label maps with OpenCV.

Images of any common kind (grayscale, gray + alpha, RGBA, 16-bit, float TIFF) become RGB uint8
``(H, W, 3)``; label maps are returned exactly as stored (uint8 or uint16 ids, palette PNGs as their
indices). Unreadable, truncated and non-image files raise one :class:`DataError` naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np

from fcn.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


def is_image_file(path: Path) -> bool:
    """True for a file name with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(
    folder: Path, *, recursive: bool = False, extensions: tuple[str, ...] = IMAGE_EXTENSIONS
) -> list[Path]:
    """Sorted image files in ``folder`` (hidden files skipped)."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p for p in found if p.suffix.lower() in extensions and not p.name.startswith(".") and p.is_file()
    )


def _read_bytes(path: Path, what: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)  # one read; also works for non-ASCII paths
    except OSError as err:
        raise DataError(
            f"cannot read {what} {path} ({err.strerror or err}); check that it exists and is readable"
        ) from err


def _is_truncated(data: np.ndarray) -> bool:
    """JPEG files cut short still decode (grey bottom rows) in OpenCV, so look for the end marker."""
    if data[:2].tobytes() != _JPEG_SOI:
        return False
    tail = data[-4096:].tobytes()  # the EOI marker, possibly followed by a little padding
    return _JPEG_EOI not in tail


def _decode(path: Path, what: str) -> np.ndarray:
    data = _read_bytes(path, what)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None or img.size == 0 or _is_truncated(data):
        raise DataError(
            f"cannot read {what} {path} (corrupt, truncated or not an image); replace or remove it"
        )
    return img


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Convert a decoded OpenCV image (gray / gray+alpha / BGR / BGRA; 8-, 16-bit or float) to RGB uint8."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(img)) <= 1.0 else 1.0  # float images are usually 0..1
        img = np.clip(np.nan_to_num(img) * scale, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    channels = img.shape[2]
    if channels in (1, 2):  # gray, gray + alpha
        return cv2.cvtColor(np.ascontiguousarray(img[:, :, 0]), cv2.COLOR_GRAY2RGB)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as RGB uint8 ``(H, W, 3)``; unreadable files raise :class:`DataError`."""
    return to_rgb_uint8(_decode(Path(path), "image"))


def _palette_indices(data: np.ndarray, path: Path) -> np.ndarray | None:
    """The index plane of a palette ('P' mode) PNG, which OpenCV would expand to colours."""
    head = data[:26].tobytes()
    if len(head) < 26 or not head.startswith(_PNG_SIGNATURE) or head[25] != 3:  # IHDR colour type 3
        return None
    try:
        from PIL import Image  # ships with torchvision / matplotlib

        with Image.open(io.BytesIO(data.tobytes())) as im:
            return np.asarray(im.convert("P") if im.mode != "P" else im)
    except Exception as err:  # PIL raises many types for broken files
        raise DataError(f"cannot read label file {path} ({err}); replace or remove it") from err


def read_mask(path: str | Path) -> np.ndarray:
    """Read a single-channel label map (uint8 or uint16 ids) as stored, without any interpolation.

    Palette PNGs give their indices; a colour image whose three channels are equal is accepted as gray;
    a genuinely colour-coded label raises :class:`DataError`.
    """
    path = Path(path)
    data = _read_bytes(path, "label file")
    indices = _palette_indices(data, path)
    if indices is not None:
        return indices
    mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if mask is None or mask.size == 0:
        raise DataError(
            f"cannot read label file {path} (corrupt, truncated or not an image); replace or remove it"
        )
    if mask.ndim == 3:
        first = mask[:, :, 0]
        if not all(np.array_equal(first, mask[:, :, c]) for c in range(1, min(3, mask.shape[2]))):
            raise DataError(
                f"label file {path} is a colour image; labels must be single-channel PNGs of class ids "
                "(convert colour-coded labels to ids first)"
            )
        mask = np.ascontiguousarray(first)
    if mask.dtype not in (np.uint8, np.uint16):
        raise DataError(
            f"label file {path} has pixel type {mask.dtype}; labels must be 8- or 16-bit integers"
        )
    return mask
