"""Image files in and out: the one reader of the data sets, predict, evaluate and report, and the one writer
of their PNGs. Images become RGB uint8 ``(H, W, 3)`` as a viewer shows them (EXIF orientation applied);
label maps come back as stored. Unreadable, truncated and non-image files raise one :class:`DataError`
naming the file. Writes are atomic (temporary file + ``os.replace``).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from fcn.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".jp2")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
# The largest image decoded (64 Mpx): a header claiming more (corrupt or hostile) is refused before decoding
# allocates it. Below Pillow's decompression-bomb limit, whose error therefore means "larger".
MAX_IMAGE_PIXELS = 1 << 26
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


def list_images(
    folder: Path, *, recursive: bool = False, extensions: tuple[str, ...] = IMAGE_EXTENSIONS
) -> list[Path]:
    """Sorted image files in ``folder`` (hidden files skipped)."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p for p in found if p.suffix.lower() in extensions and not p.name.startswith(".") and p.is_file()
    )


def jpeg_truncated(data: np.ndarray) -> bool:
    """Whether JPEG bytes were cut short (OpenCV decodes them with grey bottom rows): no end marker after
    the last scan header ``FF DA`` (which cannot occur in entropy-coded data). False for other formats."""
    if data[:2].tobytes() != _JPEG_SOI:
        return False
    raw = data.tobytes()
    sos = raw.rfind(b"\xff\xda")
    return sos < 0 or raw.find(_JPEG_EOI, sos) < 0


def exif_orientation(data: np.ndarray) -> int:
    """The EXIF orientation (1-8) of encoded image bytes, from the header; 1 without a (valid) one."""
    head = data[:8].tobytes()
    if head.startswith(_JPEG_SOI) and b"Exif\x00\x00" not in data[:65536].tobytes():
        return 1  # skip Pillow in the common cases: a JPEG without EXIF segment, a PNG without eXIf chunk
    if head == _PNG_SIGNATURE and b"eXIf" not in data.tobytes():
        return 1
    if head.startswith(b"BM"):  # BMP: no EXIF
        return 1
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            value = im.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, struct.error):
        return 1  # unknown format or broken EXIF block: the image as stored
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# EXIF orientation -> cv2.flip code (1 left-right, 0 top-bottom, -1 both) turning the stored image into the
# view it describes, after a transpose for 5-8 (6: 90 degrees clockwise, 8: counter-clockwise)
_FLIPS = {2: 1, 3: -1, 4: 0, 6: 1, 7: -1, 8: 0}


def oversized(data: np.ndarray) -> str | None:
    """Why encoded image bytes are too large to decode (header size over :data:`MAX_IMAGE_PIXELS`), else
    None (also for formats Pillow cannot parse: the decoder will tell)."""
    limit = f"over the limit of {MAX_IMAGE_PIXELS} (fcn.data.io.MAX_IMAGE_PIXELS)"
    head = data[:24].tobytes()
    if len(head) == 24 and head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])  # the common case, without Pillow
    else:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data.tobytes())) as im:  # parses the header only
                w, h = im.size
        except Image.DecompressionBombError:
            return f"its header claims more pixels than Pillow allows, {limit}"
        except Exception:
            return None
    return f"its header claims {w}x{h} pixels, {limit}" if w * h > MAX_IMAGE_PIXELS else None


def _decode(path: Path, what: str, *, mask: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The decoded image as stored and the file's bytes; with ``mask`` a palette PNG gives its indices
    (OpenCV would expand them to colours) and truncated JPEGs are not looked for."""
    fix = "replace or remove it"
    try:
        data = np.fromfile(path, dtype=np.uint8)  # one read; also works for non-ASCII paths
    except OSError as err:
        raise DataError(
            f"cannot read {what} {path} ({err.strerror or err}); check that it exists and is readable"
        ) from err
    if too_large := oversized(data):
        raise DataError(f"cannot read {what} {path}: {too_large}; {fix}")
    head = data[:26].tobytes()
    if mask and len(head) == 26 and head.startswith(_PNG_SIGNATURE) and head[25] == 3:  # IHDR colour type 3
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data.tobytes())) as im:
                return np.asarray(im.convert("P") if im.mode != "P" else im), data
        except Exception as err:  # PIL raises many types for broken files
            raise DataError(f"cannot read label file {path} ({err}); {fix}") from err
    try:
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error as err:  # e.g. a header past OpenCV's size limits; its message ends with the reason
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        reason = f"OpenCV: {lines[-1]}" if lines else "OpenCV error"
        raise DataError(f"cannot read {what} {path} ({reason}); {fix}") from err
    if img is None or img.size == 0 or (not mask and jpeg_truncated(data)):
        raise DataError(f"cannot read {what} {path} (corrupt, truncated or not an image); {fix}")
    return img, data


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """A decoded OpenCV image (gray / gray+alpha / BGR / BGRA; 8-, 16-bit or float) as RGB uint8."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype.kind == "f":
        scale = 255.0 if float(np.nanmax(img)) <= 1.0 else 1.0  # float images are usually 0..1
        img = np.clip(np.nan_to_num(img) * scale, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] < 3:  # gray, gray + alpha
        img = np.ascontiguousarray(img[:, :, 0])
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)


def read_image(path: str | Path) -> np.ndarray:
    """An image as RGB uint8 ``(H, W, 3)``, EXIF orientation applied; unreadable files raise
    :class:`DataError`."""
    img, data = _decode(Path(path), "image")
    img, orientation = to_rgb_uint8(img), exif_orientation(data)
    if orientation >= 5:
        img = cv2.transpose(img)
    return cv2.flip(img, _FLIPS[orientation]) if orientation in _FLIPS else img


def read_mask(path: str | Path) -> np.ndarray:
    """A single-channel label map (uint8 or uint16 ids) exactly as stored (no orientation). Palette PNGs
    give their indices, colour images with three equal channels count as gray; real colour labels and
    other pixel types raise :class:`DataError`."""
    path = Path(path)
    mask, _ = _decode(path, "label file", mask=True)
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


def probe_size(path: str | Path) -> tuple[int, int] | None:
    """``(H, W)`` after EXIF orientation, from the file header (PIL, lazy); None when unknown."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "TIFF", "PNG", "WEBP") else 1
    except Exception:  # unreadable or unknown to PIL: the reader will tell
        return None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Class ids ``(H, W)`` -> RGB ``(H, W, 3)`` uint8; ids without a colour (ignore, negative) are black."""
    labels = np.asarray(labels)
    lut = np.zeros((max(256, len(palette), int(labels.max(initial=0)) + 1) + 1, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return lut[np.where(labels < 0, len(lut) - 1, labels) if labels.dtype.kind == "i" else labels]


def overlay(image: np.ndarray, color: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """Blend RGB ``image`` with the colour map: ``(1 - alpha) * image + alpha * color`` (uint8)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return cv2.addWeighted(image, 1.0 - alpha, color, alpha, 0.0)


def encode_png(
    array: np.ndarray, *, palette: Sequence[Sequence[int]] | None = None, compression: int = 1
) -> bytes:
    """PNG bytes of ``array``: ``(H, W)`` or RGB ``(H, W, 3)``, uint8 or uint16.

    With ``palette`` a uint8 ``(H, W)`` map becomes an indexed-colour PNG through Pillow (OpenCV cannot
    write those; ids past the palette black); wider ids are coloured first. Everything else goes through
    OpenCV; label maps with run-length deflate and, for uint8, no row filter (3x faster than the default).
    """
    if palette is not None and array.ndim == 2 and array.dtype == np.uint8:
        from PIL import Image

        image = Image.frombuffer("P", array.shape[::-1], np.ascontiguousarray(array), "raw", "P", 0, 1)
        image.putpalette(colorize(np.arange(256, dtype=np.uint8), palette).tobytes())  # 256 entries
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=compression, compress_type=3)  # 3: zlib.Z_RLE
        return buf.getvalue()
    if palette is not None:
        array = colorize(array, palette)
    params = [cv2.IMWRITE_PNG_COMPRESSION, compression]
    if array.ndim == 2:
        params += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
        if array.dtype == np.uint8 and hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.11
            params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array, params)
    if not ok:
        raise OSError(f"cannot encode an array of {array.shape} {array.dtype} as PNG")
    return buf.tobytes()


def temp_name(path: Path) -> Path:
    """A hidden temporary name next to ``path`` (``.fcn-tmp-<stem>-<random>.tmp``, 48 random bits)."""
    return path.parent / f".fcn-tmp-{path.stem}-{secrets.token_hex(6)}.tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A :func:`temp_name` file next to ``path`` (created before the body runs, so a signal always finds it
    to remove; permissions 0666 less the umask, unlike ``mkstemp``) to write; on success it replaces
    ``path`` (``os.replace``), else it is removed. Nobody ever sees a truncated file."""
    tmp = temp_name(Path(path))
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_path`; ``fsync`` flushes it to disk first (a power
    loss cannot leave an empty file; costly per file, so off for predictions)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_png_atomic(
    path: str | Path, array: np.ndarray, *, palette: Sequence[Sequence[int]] | None = None
) -> Path:
    """Write ``array`` as a PNG (:func:`encode_png`) with :func:`write_bytes_atomic`."""
    return write_bytes_atomic(path, encode_png(array, palette=palette))


def check_writable(
    directory: str | Path,
    option: str = "--trainer.default_root_dir",
    *,
    error: type[OSError] = PermissionError,
) -> Path:
    """Create ``directory`` if needed and prove a file can be written there, or raise ``error`` naming
    ``option``, the flag that sets it. Returns the folder."""
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise error(
            f"output directory {path} ({option}) is not writable ({err.strerror or err}); "
            f"choose another with {option}"
        ) from err
    return path


def missing_dirs(path: str | Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (for :func:`remove_empty_dirs`)."""
    missing = []
    path = Path(os.path.abspath(Path(path).expanduser()))
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty_dirs(dirs: Sequence[Path]) -> None:
    """Remove the folders ``dirs`` that are empty (deepest first); others stay."""
    for d in sorted(set(dirs), key=lambda d: len(d.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
