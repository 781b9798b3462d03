"""Inference building blocks shared by the predict, evaluate and export commands.

* :func:`load_predictor` turns a training checkpoint (``.ckpt``), an exported ONNX model (``.onnx``, run
  through onnxruntime) or an exported TorchScript file into a :class:`Predictor`: a callable mapping a
  normalised float batch ``(N, 3, H, W)`` to float32 logits ``(N, C, H, W)``, with the model's
  :class:`ModelMeta` (class names, palette, mean/std, ignore index). Exports embed that metadata, so each
  format is self-describing.
* :func:`predict_whole`, :func:`predict_sliding` and :func:`predict_logits` (resize, sliding window,
  flip / multi-scale TTA) work on a normalised batch with any ``model(x) -> logits`` callable: an
  ``nn.Module`` or a :class:`Predictor`.
* :func:`read_image_rgb`, :func:`colorize`, :func:`overlay` and :func:`write_png_atomic` are the image I/O of
  the predict command.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fcn.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    check_description,
    first_line,
    load_model,
    require_file,
)
from fcn.data.io import first_cv2_line, jpeg_truncated, oversized
from fcn.models.fuse import fuse_conv_bn, use_onednn_convolutions

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
ONNX_META_PREFIX = "fcn."
TORCHSCRIPT_META_FILE = "fcn_meta.json"
META_VERSION = 1
# channels_last measured faster on CPU (oneDNN, 360x480, batch 4: student ~1.5x, FCN-8s ~1.15x).
CHANNELS_LAST_DEFAULT = {"cpu": True, "cuda": True}

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


class InferenceError(ValueError):
    """A user-facing inference problem (bad option, unavailable device); the message says the fix."""


# --------------------------------------------------------------------------------------------------------
# Model metadata and predictors
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMeta:
    """What a model file says about its model and data (the same fields as a checkpoint's)."""

    model_name: str
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]
    ignore_index: int
    mean: list[float]
    std: list[float]
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checkpoint_info(cls, info: CheckpointInfo) -> ModelMeta:
        """The metadata of a training checkpoint."""
        return cls(
            model_name=info.model_name,
            num_classes=info.num_classes,
            class_names=list(info.class_names),
            palette=[list(c) for c in info.palette],
            ignore_index=info.ignore_index,
            mean=list(info.mean),
            std=list(info.std),
            model_kwargs=dict(info.model_kwargs),
        )

    def to_json(self) -> str:
        """One JSON object (used for TorchScript extra files)."""
        return json.dumps({"version": META_VERSION, **asdict(self)})

    def to_onnx_props(self) -> dict[str, str]:
        """String key/value pairs for ONNX ``metadata_props`` (lists and dicts as JSON)."""
        props = {f"{ONNX_META_PREFIX}{k}": json.dumps(v) for k, v in asdict(self).items()}
        props[f"{ONNX_META_PREFIX}version"] = str(META_VERSION)
        return props

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str | Path) -> ModelMeta:
        """Validate decoded metadata; raise :class:`CheckpointError` naming ``source`` when it is unusable."""
        missing = [
            k for k in ("model_name", "num_classes", "class_names", "palette", "mean", "std") if k not in data
        ]
        if missing:
            raise CheckpointError(
                f"{source} lacks the fcn metadata {missing}; export it with `python scripts/export.py`"
            )
        name = data["model_name"]
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{source}: model_name must be a name, got {name!r}; export it again")
        fields = check_description(data, source=source, fix="export it again with `python scripts/export.py`")
        return cls(model_name=name, **fields)

    @classmethod
    def from_onnx_props(cls, props: Mapping[str, str], *, source: str | Path) -> ModelMeta:
        """Decode :meth:`to_onnx_props` output (as onnxruntime's ``custom_metadata_map`` returns it)."""
        data: dict[str, Any] = {}
        for key, value in props.items():
            if key.startswith(ONNX_META_PREFIX) and key != f"{ONNX_META_PREFIX}version":
                try:
                    data[key[len(ONNX_META_PREFIX) :]] = json.loads(value)
                except json.JSONDecodeError as err:
                    raise CheckpointError(f"{source}: metadata {key} is not JSON ({err})") from err
        return cls.from_mapping(data, source=source)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; asking for an unavailable CUDA is an error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InferenceError(f"--device {name} was asked for but CUDA is not available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise InferenceError(f"unknown device {name!r}; use one of {DEVICES}") from err


class Predictor:
    """``predictor(x)``: normalised float batch ``(N, 3, H, W)`` -> float32 logits ``(N, C, H, W)``.

    Inputs may live on any device; logits come back on :attr:`device`. :meth:`normalize` turns a uint8
    ``(N, H, W, 3)`` RGB batch into the model input with the model's mean/std.
    """

    meta: ModelMeta
    device: torch.device
    kind: str = "?"
    channels_last: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    def cpu_threads(self) -> int:
        """CPU threads the model's forward pass runs on."""
        return torch.get_num_threads()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB ``(N, H, W, 3)`` (any device) -> normalised float32 ``(N, 3, H, W)`` on the device."""
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.to(torch.float32, memory_format=fmt)  # NHWC data is already channels-last: no copy then
        mean = torch.tensor(self.meta.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.meta.std, device=self.device).view(1, 3, 1, 1) * 255.0
        return x.sub_(mean).div_(std)

    def normalize_table(self) -> np.ndarray:
        """``(1, 256, 3)`` float32 look-up table for ``cv2.LUT``: value ``v`` of channel ``c`` -> the input
        :meth:`normalize` makes of it (the same float32 operations, so bit-identical results)."""
        values = torch.arange(256, dtype=torch.float32).view(256, 1)
        mean = torch.tensor(self.meta.mean).view(1, 3) * 255.0
        std = torch.tensor(self.meta.std).view(1, 3) * 255.0
        return ((values - mean) / std).numpy().reshape(1, 256, 3)

    def normalized_input(self, images: torch.Tensor) -> torch.Tensor:
        """Already normalised float32 ``(N, H, W, 3)`` (e.g. by :meth:`normalize_table`) -> the model input
        ``(N, 3, H, W)`` on the device (a view when the model runs channels-last on the same device)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous(memory_format=fmt)


class TorchPredictor(Predictor):
    """A PyTorch model (from a checkpoint or TorchScript) with autocast precision and memory format.

    With ``fuse`` (default) the model's Conv2d -> BatchNorm2d pairs are folded (:func:`fuse_conv_bn`;
    the model is modified in place). With ``onednn`` its CPU convolutions always run oneDNN
    (:func:`~fcn.models.fuse.use_onednn_convolutions`; the console commands ask for it, see fcn.tuning).
    """

    kind = "torch"

    def __init__(
        self,
        model: nn.Module,
        meta: ModelMeta,
        *,
        device: torch.device,
        precision: str = "fp32",
        channels_last: bool | None = None,
        fuse: bool = True,
        onednn: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise InferenceError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.meta = meta
        self.device = device
        self.precision = precision
        self.channels_last = (
            CHANNELS_LAST_DEFAULT.get(device.type, False) if channels_last is None else channels_last
        )
        model = model.to(device).eval()
        # BatchNorm folded into the convolutions (not possible inside TorchScript): same logits, faster
        scripted = isinstance(model, torch.jit.ScriptModule)
        self.fused = fuse_conv_bn(model) if fuse and not scripted else 0
        # oneDNN for every convolution on the CPU (PyTorch's single-threaded 1x1 fallback is 1.5x slower)
        cpu = device.type == "cpu" and not scripted
        self.onednn = use_onednn_convolutions(model) if onednn and cpu else 0
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = PRECISIONS[self.precision]
        autocast = (
            torch.autocast(self.device.type, dtype=dtype)
            if dtype != torch.float32
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            out = self.model(x)
        return out.float()


class OnnxPredictor(Predictor):
    """An exported ONNX model run by onnxruntime (fp32; CUDA provider when asked for and available)."""

    kind = "onnx"

    def __init__(self, path: str | Path, *, device: torch.device, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise CheckpointError(
                f"{path} is an ONNX model but onnxruntime is not installed; `pip install onnxruntime` "
                "or pass the training checkpoint"
            ) from err
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise InferenceError(
                    "onnxruntime has no CUDA provider here; use --device cpu or install onnxruntime-gpu"
                )
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        self.threads = threads or torch.get_num_threads()
        opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise CheckpointError(f"{path} is not a loadable ONNX model ({first_line(err)})") from err
        self.meta = ModelMeta.from_onnx_props(self.session.get_modelmeta().custom_metadata_map, source=path)
        shape = self.session.get_outputs()[0].shape
        outputs = shape[1] if len(shape) == 4 else None
        if isinstance(outputs, int) and outputs != self.meta.num_classes:
            raise CheckpointError(_class_count_mismatch(path, outputs, self.meta.num_classes))
        self.input_name = self.session.get_inputs()[0].name
        self.device = device
        self.precision = "fp32"

    def cpu_threads(self) -> int:
        return self.threads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().float().cpu().contiguous().numpy()
        (out,) = self.session.run(None, {self.input_name: arr})
        return torch.from_numpy(out).to(self.device)


def _class_count_mismatch(path: str | Path, outputs: int, num_classes: int) -> str:
    return (
        f"{path}: the model outputs {outputs} classes but its metadata says num_classes {num_classes}; "
        "export it again with `python scripts/export.py`"
    )


def is_torchscript(path: str | Path) -> bool:
    """True when ``path`` is a TorchScript archive (a zip with a ``code/`` folder)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.split("/", 2)[1:2] == ["code"] for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointInfo]:
    """The model and description of a training checkpoint (:func:`fcn.checkpoint.load_model`)."""
    return load_model(path, device=device)


def load_predictor(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    channels_last: bool | None = None,
    fuse: bool = True,
    onednn: bool = False,
) -> Predictor:
    """Load a ``.ckpt`` training checkpoint, an exported ``.onnx`` or an exported TorchScript file.

    ``fuse`` folds BatchNorm into the convolutions of a checkpoint's model, ``onednn`` makes its CPU
    convolutions run oneDNN (see :class:`TorchPredictor`).

    Raises :class:`CheckpointError` for missing or unusable files and :class:`InferenceError` for options
    the file or machine cannot honour (fp16 with ONNX, CUDA without a GPU).
    """
    path = Path(path).expanduser()
    require_file(path, what="model file", fix="pass a training .ckpt or a file from scripts/export.py")
    if precision not in PRECISIONS:
        raise InferenceError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    dev = resolve_device(device)
    if path.suffix.lower() == ".onnx":
        if precision != "fp32":
            raise InferenceError("ONNX models run in fp32; use --precision fp32 or the training checkpoint")
        return OnnxPredictor(path, device=dev)
    if is_torchscript(path):
        extra = {TORCHSCRIPT_META_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
                module = torch.jit.load(str(path), map_location=dev, _extra_files=extra)
        except Exception as err:  # TorchScript raises RuntimeError subclasses that vary by version
            raise CheckpointError(f"{path} is not a loadable TorchScript file ({first_line(err)})") from err
        try:
            data = json.loads(extra[TORCHSCRIPT_META_FILE] or "{}")
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: {TORCHSCRIPT_META_FILE} is not JSON ({err})") from err
        meta = ModelMeta.from_mapping(data, source=path)
        try:
            with torch.inference_mode():  # the traced graph's class count, on a small input
                outputs = int(module(torch.zeros(1, 3, 64, 64, device=dev)).shape[1])
        except Exception as err:  # a graph that does not run on images is not an fcn export
            raise CheckpointError(f"{path}: the TorchScript model does not run ({first_line(err)})") from err
        if outputs != meta.num_classes:
            raise CheckpointError(_class_count_mismatch(path, outputs, meta.num_classes))
        return TorchPredictor(
            module, meta, device=dev, precision=precision, channels_last=channels_last, onednn=onednn
        )
    model, info = load_model(path, device="cpu")
    return TorchPredictor(
        model,
        ModelMeta.from_checkpoint_info(info),
        device=dev,
        precision=precision,
        channels_last=channels_last,
        fuse=fuse,
        onednn=onednn,
    )


# --------------------------------------------------------------------------------------------------------
# Prediction on a normalised batch
# --------------------------------------------------------------------------------------------------------


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def predict_whole(model: LogitsFn, x: torch.Tensor, *, resize: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits of the whole images ``x`` (normalised ``(N, 3, H, W)``) at ``H x W``.

    With ``resize=(h, w)`` the model sees the batch resized (bilinear) to ``h x w`` and the logits are
    resized back (bilinear) to ``H x W``.
    """
    size = (int(x.shape[-2]), int(x.shape[-1]))
    if resize is None:
        return model(x).float()
    return _resize(model(_resize(x, resize)).float(), size)


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] != length - crop:
        starts.append(length - crop)
    return starts


def predict_sliding(
    model: LogitsFn,
    x: torch.Tensor,
    *,
    crop: tuple[int, int],
    stride: tuple[int, int],
    window_batch: int = 4,
) -> torch.Tensor:
    """Logits of ``x`` (normalised ``(N, 3, H, W)``) from overlapping ``crop`` windows every ``stride``.

    Windows cover the image exactly (the last one in each direction is aligned to the border; an image
    smaller than the crop is one window of its own size, as the FCNs take any size); the logits of
    overlapping windows are averaged. ``window_batch`` windows of all ``N`` images run per forward pass.
    """
    (ch, cw), (sh, sw) = crop, stride
    if min(ch, cw, sh, sw) < 1:
        raise InferenceError(f"crop and stride must be positive, got crop={crop} stride={stride}")
    n, _, h, w = x.shape
    ch, cw = min(ch, h), min(cw, w)
    boxes = [(y, xx) for y in _window_starts(h, ch, sh) for xx in _window_starts(w, cw, sw)]
    logits: torch.Tensor | None = None
    count = torch.zeros(1, 1, h, w, device=x.device)
    for i in range(0, len(boxes), window_batch):
        chunk = boxes[i : i + window_batch]
        crops = torch.cat([x[:, :, y : y + ch, xx : xx + cw] for y, xx in chunk])
        out = model(crops).float()
        if logits is None:
            logits = torch.zeros(n, out.shape[1], h, w, device=out.device)
            count = count.to(out.device)
        for j, (y, xx) in enumerate(chunk):
            logits[:, :, y : y + ch, xx : xx + cw] += out[j * n : (j + 1) * n]
            count[:, :, y : y + ch, xx : xx + cw] += 1
    assert logits is not None  # at least one window
    return logits / count


def predict_logits(
    model: LogitsFn,
    x: torch.Tensor,
    *,
    resize: tuple[int, int] | None = None,
    crop: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window_batch: int = 4,
) -> torch.Tensor:
    """Logits ``(N, C, H, W)`` of a normalised batch ``x`` ``(N, 3, H, W)`` with the chosen strategy.

    * whole image (default), or at a fixed size with ``resize=(h, w)``;
    * sliding window with ``crop=(h, w)`` and ``stride=(h, w)`` (default stride: half the crop);
    * test-time augmentation: every ``scales`` factor (the image, or the ``resize`` size, is rescaled
      bilinearly) and, with ``flip``, its horizontal mirror.

    One view returns the model's logits. Several views return the log of their mean softmax
    probabilities: valid logits whose softmax is the averaged probabilities (so argmax and confidence
    follow the TTA average).
    """
    if resize is not None and crop is not None:
        raise InferenceError("choose either a fixed resize or a sliding window, not both")
    if not scales or any(s <= 0 for s in scales):
        raise InferenceError(f"scales must be positive, got {list(scales)}")
    size = (int(x.shape[-2]), int(x.shape[-1]))
    base = resize or size
    if crop is not None and stride is None:
        stride = (max(1, crop[0] // 2), max(1, crop[1] // 2))

    def one_view(view: torch.Tensor) -> torch.Tensor:
        if crop is not None:
            return predict_sliding(model, view, crop=crop, stride=stride, window_batch=window_batch)
        return model(view).float()

    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    probs: torch.Tensor | None = None
    for scale, flipped in views:
        target = (max(1, round(base[0] * scale)), max(1, round(base[1] * scale)))
        view = _resize(x, target)
        if flipped:
            view = view.flip(-1)
        out = one_view(view)
        if flipped:
            out = out.flip(-1)
        out = _resize(out, size)
        if len(views) == 1:
            return out
        p = out.softmax(1)
        probs = p if probs is None else probs.add_(p)
    assert probs is not None
    return probs.div_(len(views)).clamp_min_(1e-12).log_()


def labels_and_confidence(
    logits: torch.Tensor, *, confidence: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Arg-max class ids ``(N, H, W)`` and, optionally, the max softmax probability ``(N, H, W)``."""
    labels = logits.argmax(1)
    if not confidence:
        return labels, None
    top = logits.amax(1, keepdim=True)
    conf = (logits - top).exp_().sum(1).reciprocal_()
    return labels, conf


def class_ids(logits: np.ndarray) -> np.ndarray:
    """Arg-max over the class axis of one image's ``(C, H, W)`` logits: ids ``(H, W)``, uint8 for up to 256
    classes (uint16 beyond), the first of equal maxima winning.

    ``logits`` may be a view of channels-last memory (``(H, W, C)`` contiguous, as the CPU model returns
    it): NumPy then reduces the contiguous class axis in one pass over memory. Measured in predict's writer
    threads, where the logits are no longer in cache, that pass beat an OpenCV plane-by-plane arg-max that
    is 1.7x faster on cached logits (docs/RESULTS.md section 7).
    """
    if logits.ndim != 3:
        raise ValueError(f"class_ids needs (C, H, W) logits, got shape {logits.shape}")
    hwc = logits.transpose(1, 2, 0)
    ids = hwc.argmax(-1) if hwc.flags.c_contiguous else logits.argmax(0)
    return ids.astype(np.uint8 if logits.shape[0] <= 256 else np.uint16)


# --------------------------------------------------------------------------------------------------------
# Images in and out
# --------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".jp2"}
)


class ImageReadError(ValueError):
    """An input file is missing, not an image or corrupt."""


# OpenCV >= 4.10 decodes straight to RGB (libjpeg-turbo writes RGB itself: no BGR -> RGB pass after)
_IMREAD_RGB: int | None = getattr(cv2, "IMREAD_COLOR_RGB", None)


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Read any image as uint8 RGB ``(H, W, 3)``.

    Grayscale is replicated to 3 channels, alpha is dropped, 16-bit is scaled to 8 bits and the EXIF
    orientation is applied (OpenCV's ``IMREAD_COLOR[_RGB]`` does all four). Reading the bytes first keeps
    non-ASCII paths working. Raises :class:`ImageReadError` naming the file otherwise.
    """
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as err:
        raise ImageReadError(f"{path}: cannot read ({err.strerror or err})") from err
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file")
    too_large = oversized(data)
    if too_large:
        raise ImageReadError(f"{path}: {too_large}")
    try:
        image = cv2.imdecode(data, _IMREAD_RGB or cv2.IMREAD_COLOR)
    except cv2.error as err:  # OpenCV refuses some headers it cannot decode (e.g. over its size limits)
        raise ImageReadError(f"{path}: cannot decode ({first_cv2_line(err)})") from err
    if image is None:
        raise ImageReadError(f"{path}: not an image or corrupt")
    if jpeg_truncated(data):
        raise ImageReadError(f"{path}: truncated JPEG (no end marker after the last scan)")
    return image if _IMREAD_RGB else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


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
    """Class ids ``(H, W)`` -> RGB ``(H, W, 3)`` uint8; ids without a colour (ignore index) are black."""
    lut = np.zeros((max(256, len(palette), int(labels.max(initial=0)) + 1), 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return lut[labels]


def overlay(image: np.ndarray, color: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """Blend RGB ``image`` with the colour map: ``(1 - alpha) * image + alpha * color`` (uint8)."""
    if not 0.0 <= alpha <= 1.0:
        raise InferenceError(f"alpha must be in [0, 1], got {alpha}")
    return cv2.addWeighted(image, 1.0 - alpha, color, alpha, 0.0)


def confidence_to_uint(conf: np.ndarray, *, bits: int = 8) -> np.ndarray:
    """Probabilities in ``[0, 1]`` -> uint8 (``bits=8``) or uint16 (``bits=16``) full-scale values."""
    if bits not in (8, 16):
        raise InferenceError(f"confidence bits must be 8 or 16, got {bits}")
    top = 255 if bits == 8 else 65535
    return np.rint(np.clip(conf, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)


TMP_PREFIX = ".fcn-tmp-"


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


def open_temp_file(path: str | Path) -> tuple[int, Path]:
    """Create a hidden temporary file next to ``path`` (``.fcn-tmp-<stem>-<random>.tmp``).

    Unlike ``tempfile.mkstemp`` (mode 0600) it gets the usual permissions (0666 less the umask), so the
    file that replaces ``path`` is readable like any other output. Returns the open descriptor and path.
    """
    path = Path(path)
    for _ in range(100):
        tmp = temp_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def deflate_label_rows(label: np.ndarray, *, compression: int = 1) -> bytes:
    """The zlib stream of a PNG's image data for a uint8 ``(H, W)`` map (filter "None" on every row).

    Run-length deflate (``Z_RLE``) suits label maps: long runs of one id. The same stream serves the
    grayscale and the indexed-colour PNG of one map (:func:`label_png`), so two outputs cost one deflate.
    """
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"deflate_label_rows needs a uint8 (H, W) array, got {label.dtype} {label.shape}")
    h, w = label.shape
    rows = np.empty((h, w + 1), dtype=np.uint8)
    rows[:, 0] = 0  # filter type None
    rows[:, 1:] = label
    z = zlib.compressobj(compression, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return z.compress(rows) + z.flush()


def label_png(
    idat: bytes, shape: tuple[int, int], *, palette: Sequence[Sequence[int]] | None = None
) -> bytes:
    """PNG bytes from :func:`deflate_label_rows`'s stream: 8-bit grayscale, or indexed colour with
    ``palette`` (256 entries written; ids past the palette are black)."""
    h, w = shape
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if palette is None else 3, 0, 0, 0)
    chunks = [_png_chunk(b"IHDR", header)]
    if palette is not None:
        lut = np.zeros((256, 3), dtype=np.uint8)
        colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
        lut[: len(colours)] = colours
        chunks.append(_png_chunk(b"PLTE", lut.tobytes()))
    chunks += [_png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def encode_png(
    array: np.ndarray,
    *,
    rgb: bool = True,
    palette: Sequence[Sequence[int]] | None = None,
    compression: int = 1,
) -> bytes:
    """PNG bytes of ``array``: ``(H, W)`` or ``(H, W, 3)`` (RGB when ``rgb``), uint8 or uint16.

    With ``palette``, a uint8 ``(H, W)`` map of class ids becomes an indexed-colour PNG (any viewer shows the
    colours; decoders expand it to RGB): one channel to deflate instead of three. uint8 ``(H, W)`` maps go
    through :func:`deflate_label_rows` (measured faster than OpenCV's and Pillow's encoders, see
    docs/RESULTS.md); other arrays through OpenCV.
    """
    if array.ndim == 2 and array.dtype == np.uint8:
        idat = deflate_label_rows(np.ascontiguousarray(array), compression=compression)
        return label_png(idat, array.shape, palette=palette)
    if palette is not None:
        array = colorize(array, palette)
    params = [cv2.IMWRITE_PNG_COMPRESSION, compression]
    if array.ndim == 2:  # label maps: run-length deflate is faster and smaller than the default here
        params += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    if array.ndim == 3 and rgb:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array, params)
    if not ok:
        raise OSError(f"cannot encode an array of {array.shape} {array.dtype} as PNG")
    return buf.tobytes()


def write_bytes_atomic(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically: readers and interrupted runs see no file (or the old one) or
    the whole new one, never a truncated file.

    On Linux the bytes go to an unnamed file in the target folder (``O_TMPFILE``) that is given its name
    once complete (``linkat``): one directory entry per file instead of creating and renaming a temporary
    one, which measured 0.4-0.5 ms less CPU per file on ext4 in predict's writer threads (docs/RESULTS.md
    section 7), and a killed process leaves nothing behind. An existing ``path`` is replaced through a
    temporary name (``os.replace``). Elsewhere, or where the file system has no ``O_TMPFILE``, a hidden
    temporary file (``.fcn-tmp-*``, never ``*.png``) in the same folder replaces ``path``. ``fsync`` also
    flushes the bytes to disk first (a power loss then cannot leave an empty file under the final name);
    costly per file, so off for predictions.
    """
    global _link_works
    path = Path(path)
    fd = _open_unnamed(path.parent) if _link_works else None
    linked = False
    if fd is not None:
        try:
            _write_all(fd, data, fsync=fsync)
            try:
                _link_fd(fd, path)
                return path
            except FileExistsError:  # replacing a file: link under a temporary name, then rename over it
                tmp = temp_name(path)
                _link_fd(fd, tmp)
                linked = True
            except OSError:  # /proc unusable here (a sandbox): named temporary files from now on
                _link_works = False
        finally:
            os.close(fd)
    if not linked:
        fd, tmp = open_temp_file(path)
        try:
            _write_all(fd, data, fsync=fsync)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _write_all(fd: int, data: bytes, *, fsync: bool) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    if fsync:
        os.fsync(fd)


def temp_name(path: Path) -> Path:
    """A hidden temporary name next to ``path`` (``.fcn-tmp-<stem>-<random>.tmp``, 48 random bits)."""
    return path.parent / f"{TMP_PREFIX}{path.stem}-{secrets.token_hex(6)}.tmp"


# O_TMPFILE files are named through /proc/self/fd: without either, named temporary files (checked once)
_O_TMPFILE: int | None = getattr(os, "O_TMPFILE", None) if os.path.isdir("/proc/self/fd") else None
_link_works = True  # False once linking through /proc/self/fd failed in this process
_proc_fd: tuple[int, int] | None = None  # (pid, descriptor of /proc/self/fd), reopened after a fork


def _open_unnamed(folder: Path) -> int | None:
    """An unnamed writable file in ``folder`` (``O_TMPFILE``), or None where that is not available."""
    if _O_TMPFILE is None:
        return None
    try:
        return os.open(folder, os.O_WRONLY | _O_TMPFILE | os.O_CLOEXEC, 0o666)
    except OSError as err:
        # no O_TMPFILE on this file system (or kernel): the named temporary file instead
        if err.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


def _link_fd(fd: int, path: Path) -> None:
    """Give the open unnamed file ``fd`` the name ``path`` (``linkat`` through ``/proc/self/fd``, which
    needs no privilege, unlike ``AT_EMPTY_PATH``); FileExistsError if ``path`` exists."""
    global _proc_fd
    if _proc_fd is None or _proc_fd[0] != os.getpid():
        _proc_fd = (os.getpid(), os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    os.link(str(fd), path, src_dir_fd=_proc_fd[1], follow_symlinks=True)


def write_png_atomic(
    path: str | Path,
    array: np.ndarray,
    *,
    rgb: bool = True,
    palette: Sequence[Sequence[int]] | None = None,
    compression: int = 1,
) -> Path:
    """Write ``array`` as a PNG (see :func:`encode_png`) with :func:`write_bytes_atomic`."""
    return write_bytes_atomic(path, encode_png(array, rgb=rgb, palette=palette, compression=compression))


def forward_throughput(
    predictor: LogitsFn,
    *,
    batch_size: int,
    size: tuple[int, int],
    batches: int,
    device: torch.device | str = "cpu",
    warmup: int = 1,
) -> float:
    """Images per second of the bare ``predictor`` forward on random normalised batches."""
    import time

    x = torch.randn(batch_size, 3, *size, device=device)
    for _ in range(warmup):
        predictor(x)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        predictor(x)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return batches * batch_size / max(time.perf_counter() - start, 1e-9)


__all__ = [
    "IMAGE_EXTENSIONS",
    "PRECISIONS",
    "ImageReadError",
    "InferenceError",
    "ModelMeta",
    "OnnxPredictor",
    "Predictor",
    "TorchPredictor",
    "colorize",
    "confidence_to_uint",
    "deflate_label_rows",
    "encode_png",
    "forward_throughput",
    "label_png",
    "labels_and_confidence",
    "load_checkpoint",
    "load_predictor",
    "overlay",
    "predict_logits",
    "predict_sliding",
    "predict_whole",
    "probe_size",
    "read_image_rgb",
    "resolve_device",
    "write_bytes_atomic",
    "write_png_atomic",
]
