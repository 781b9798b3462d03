"""Image files, in and out: the one reader of the data sets, predict, evaluate and report, and the
one writer of their PNGs.

Reading: images of any common kind (grayscale, gray + alpha, RGBA, 16-bit, float TIFF) become RGB uint8
``(H, W, 3)`` as a viewer shows them (EXIF orientation applied); label maps are returned exactly as
stored (uint8 or uint16 ids, palette PNGs as their indices, no orientation). Unreadable, truncated and
non-image files raise one :class:`DataError` naming the file. :func:`probe_size` reads a size from the
header only.

Writing: :func:`colorize` / :func:`overlay` turn class ids into pictures, :func:`encode_png` encodes
(label maps through Pillow, which writes palette PNGs; other arrays through OpenCV) and
:func:`write_bytes_atomic` writes a file whole or not at all; :func:`check_writable` proves a folder
can be written before a long run.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from fcn.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".jp2")

# The largest image the readers decode, in pixels (64 Mpx, e.g. 8192 x 8192): a header claiming more (a
# corrupt or hostile file) is refused before decoding, which would allocate its pixels (OpenCV raises
# cv2.error past its own 1 Gpx limit). Below Pillow's decompression-bomb limit, whose error means "larger".
MAX_IMAGE_PIXELS = 1 << 26
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
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


def _read_bytes(path: Path, what: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)  # one read; also works for non-ASCII paths
    except OSError as err:
        raise DataError(
            f"cannot read {what} {path} ({err.strerror or err}); check that it exists and is readable"
        ) from err


def jpeg_truncated(data: np.ndarray) -> bool:
    """Whether JPEG bytes were cut short: OpenCV may still decode them (grey bottom rows), so the last scan
    (SOS) must be followed by the end marker (EOI). False for other formats.

    ``FF DA`` cannot occur inside entropy-coded data (``FF`` is stuffed there), so the last one found is the
    last scan's header, after any EXIF thumbnail; data appended after EOI (phone cameras) is allowed.
    """
    if data[:2].tobytes() != _JPEG_SOI:
        return False
    raw = data.tobytes()
    sos = raw.rfind(b"\xff\xda")
    return sos < 0 or raw.find(_JPEG_EOI, sos) < 0


def exif_orientation(data: np.ndarray) -> int:
    """The EXIF orientation (1-8) of encoded image bytes; 1 (as stored) without EXIF or with an orientation
    Pillow cannot parse (OpenCV's own readers ignore such tags too). Only the header is parsed."""
    head = data[:8].tobytes()
    if head.startswith(_JPEG_SOI) and b"Exif\x00\x00" not in data[:65536].tobytes():
        return 1  # the common cases without Pillow: a JPEG without an EXIF segment, a PNG without
    if head == _PNG_SIGNATURE and b"eXIf" not in data.tobytes():  # an eXIf chunk (Pillow would decode
        return 1  # the whole PNG to look for one after the pixels)
    if head.startswith(b"BM"):  # BMP: no EXIF
        return 1
    from PIL import Image

    try:  # the bytes are in memory: an OSError here is Pillow's (UnidentifiedImageError, bad data)
        with Image.open(io.BytesIO(data.tobytes())) as im:
            value = im.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, struct.error):
        return 1  # a format Pillow does not know, or a broken EXIF block: the image as stored
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# EXIF orientation (2-8) -> the turn from the image as stored to the view it describes (1: as stored)
_ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda img: cv2.flip(img, 1),  # mirrored left-right
    3: lambda img: cv2.rotate(img, cv2.ROTATE_180),
    4: lambda img: cv2.flip(img, 0),  # mirrored top-bottom
    5: cv2.transpose,  # mirrored along the main diagonal
    6: lambda img: cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE),
    7: lambda img: cv2.flip(cv2.transpose(img), -1),  # mirrored along the anti-diagonal
    8: lambda img: cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


def oversized(data: np.ndarray) -> str | None:
    """Why encoded image bytes are too large to decode (a size over :data:`MAX_IMAGE_PIXELS` in their header;
    nothing is decoded), or None (also for a format Pillow does not know, or broken: the decoder will tell)."""
    limit = f"over the limit of {MAX_IMAGE_PIXELS} (fcn.data.io.MAX_IMAGE_PIXELS)"
    head = data[:24].tobytes()
    if len(head) == 24 and head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])  # the common case, without Pillow
    else:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data.tobytes())) as im:  # parses the header only
                w, h = im.size
        except Image.DecompressionBombError:  # past Pillow's own limit, whose size it does not report
            return f"its header claims more pixels than Pillow allows, {limit}"
        except Exception:
            return None
    return f"its header claims {w}x{h} pixels, {limit}" if w * h > MAX_IMAGE_PIXELS else None


def _decode(path: Path, what: str, *, mask: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The decoded image as stored, and the file's bytes; with ``mask`` a palette PNG gives its indices
    (which OpenCV would expand to colours) and a truncated JPEG is not looked for."""
    data = _read_bytes(path, what)
    too_large = oversized(data)
    if too_large:
        raise DataError(f"cannot read {what} {path}: {too_large}; replace or remove it")
    indices = _palette_indices(data, path) if mask else None
    if indices is not None:
        return indices, data
    try:
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error as err:  # OpenCV refuses some headers it cannot decode (e.g. over its size limits)
        raise DataError(f"cannot read {what} {path} ({first_cv2_line(err)}); replace or remove it") from err
    if img is None or img.size == 0 or (not mask and jpeg_truncated(data)):
        raise DataError(
            f"cannot read {what} {path} (corrupt, truncated or not an image); replace or remove it"
        )
    return img, data


def first_cv2_line(err: Exception) -> str:
    """The reason in an OpenCV error (its message spans lines: file, function, then the reason)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"OpenCV: {lines[-1]}" if lines else "OpenCV error"


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
    """Read an image as RGB uint8 ``(H, W, 3)``, EXIF orientation applied (a phone photo stored sideways
    comes out upright, as its label map was drawn); unreadable files raise :class:`DataError`."""
    img, data = _decode(Path(path), "image")
    turn = _ORIENTATIONS.get(exif_orientation(data))
    img = to_rgb_uint8(img)
    return img if turn is None else turn(img)


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
    """Class ids ``(H, W)`` -> RGB ``(H, W, 3)`` uint8; ids without a colour (ignore index, negative ids)
    are black."""
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

    With ``palette`` a uint8 ``(H, W)`` map of class ids becomes an indexed-colour PNG through Pillow
    (which OpenCV cannot write; 256 entries, ids past the palette black; any viewer shows the colours,
    decoders expand it to RGB); wider ids are coloured first. Everything else goes through OpenCV; uint8
    maps with run-length deflate and no row filter (long runs of one id: 3x faster than the default).
    """
    if palette is not None and array.ndim == 2 and array.dtype == np.uint8:
        from PIL import Image

        image = Image.frombuffer("P", array.shape[::-1], np.ascontiguousarray(array), "raw", "P", 0, 1)
        lut = np.zeros((256, 3), dtype=np.uint8)
        colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
        lut[: len(colours)] = colours
        image.putpalette(lut.tobytes())
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=compression, compress_type=3)  # 3: zlib.Z_RLE
        return buf.getvalue()
    if palette is not None:
        array = colorize(array, palette)
    params = [cv2.IMWRITE_PNG_COMPRESSION, compression]
    if array.ndim == 2:  # label maps: run-length deflate is faster and smaller than the default here
        params += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
        if array.dtype == np.uint8 and hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.11
            params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array, params)
    if not ok:
        raise OSError(f"cannot encode an array of {array.shape} {array.dtype} as PNG")
    return buf.tobytes()


TMP_PREFIX = ".fcn-tmp-"


def temp_name(path: Path) -> Path:
    """A hidden temporary name next to ``path`` (``.fcn-tmp-<stem>-<random>.tmp``, 48 random bits)."""
    return path.parent / f"{TMP_PREFIX}{path.stem}-{secrets.token_hex(6)}.tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A hidden temporary file next to ``path`` (``.fcn-tmp-*``, never ``*.png``; named before it exists,
    so a signal at any point after finds it to remove; the usual permissions, 0666 less the umask, unlike
    ``tempfile.mkstemp``) to write; on success it replaces ``path`` (``os.replace``), else it is removed.
    Readers and interrupted runs never see a truncated file."""
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
    """Write ``data`` to ``path`` through :func:`atomic_path`. ``fsync`` also flushes the bytes to disk
    first (a power loss then cannot leave an empty file under the final name); costly per file, so off
    for predictions."""
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
    """``path`` and its ancestors that do not exist yet, deepest first (what ``mkdir(parents=True)``
    would create): a failed command removes them again with :func:`remove_empty_dirs`."""
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
