"""Models as predictors: the inference API of predict, evaluate and notebooks.

:func:`load_predictor` (``fcn.load``) turns a training ``.ckpt``, an exported ``.onnx`` (onnxruntime) or an
exported TorchScript file into a :class:`Predictor` carrying the model's
:class:`~fcn.checkpoint.ModelMeta` (exports embed it, so each format is self-describing)::

    model = fcn.load("best.ckpt")
    labels = model.segment(image)  # (H, W) class ids of an RGB uint8 (H, W, 3) image
    colours = model.colorize(labels)

:func:`predict_logits` (resize, sliding window, flip / multi-scale TTA) takes any ``model(x) -> logits``
callable; :func:`labels_and_confidence`, :func:`label_arrays` and :func:`class_ids` turn logits into ids.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fcn import checkpoint
from fcn.checkpoint import TORCHSCRIPT_META_FILE, CheckpointError, ModelMeta, first_line
from fcn.data.io import colorize, read_image
from fcn.exposure import ExposureNorm
from fcn.models.fuse import fuse_conv_bn, use_onednn_convolutions

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


class InferenceError(ValueError):
    """A user-facing inference problem (bad option, unavailable device); the message says the fix."""


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
    """``predictor(x)``: normalised float batch ``(N, 3, H, W)`` (any device) -> float32 logits
    ``(N, C, H, W)`` on :attr:`device`."""

    meta: ModelMeta
    device: torch.device
    channels_last: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def exposure(self) -> ExposureNorm | None:
        """The exposure normalisation the model was trained for (``meta.exposure_target``), or None."""
        target = self.meta.exposure_target
        return None if target is None else ExposureNorm(target, self.meta.mean, self.meta.std)

    def cpu_threads(self) -> int:
        """CPU threads the model's forward pass runs on."""
        return torch.get_num_threads()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """RGB ``(N, H, W, 3)`` (any device) -> the model input: float32 ``(N, 3, H, W)`` on the device.

        uint8 is normalised with the model's mean/std; float32 is taken as normalised already (by
        :meth:`normalize_table`) and only moved (a view when channels-last on the same device).
        """
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if images.dtype == torch.float32:
            return x.contiguous(memory_format=fmt)
        x = x.to(torch.float32, memory_format=fmt)  # NHWC data is already channels-last: no copy then
        mean, std = (torch.tensor(v, device=self.device) * 255.0 for v in (self.meta.mean, self.meta.std))
        return x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))

    def normalize_table(self) -> np.ndarray:
        """``(1, 256, 3)`` float32 ``cv2.LUT`` table: channel value -> what :meth:`normalize` makes of it
        (the same float32 operations: bit-identical)."""
        values = torch.arange(256, dtype=torch.float32).view(256, 1)
        mean, std = (torch.tensor(v).view(1, 3) * 255.0 for v in (self.meta.mean, self.meta.std))
        return ((values - mean) / std).numpy().reshape(1, 256, 3)

    def logits(self, x: torch.Tensor, **strategy: object) -> torch.Tensor:
        """:func:`predict_logits` of this model for a normalised batch ``x``, with its :attr:`exposure`:
        the one way every inference path (predict, evaluate, video, benchmark) runs the model."""
        return predict_logits(self, x, exposure=self.exposure, **strategy)  # type: ignore[arg-type]

    def segment(
        self, images: np.ndarray | Sequence[np.ndarray] | str | Path, **strategy: object
    ) -> np.ndarray:
        """Class ids of an RGB uint8 ``(H, W, 3)`` image (or file) -> ``(H, W)``, or of a batch
        ``(N, H, W, 3)`` -> ``(N, H, W)``; uint8 up to 256 classes, else int32. ``strategy``: the options of
        :func:`predict_logits`."""
        if isinstance(images, (str, Path)):
            images = read_image(images)
        batch = np.asarray(images)
        if batch.dtype != np.uint8 or batch.shape[-1:] != (3,) or batch.ndim not in (3, 4):
            raise InferenceError(f"segment takes RGB uint8 (H, W, 3) or (N, H, W, 3), got {batch.shape}")
        x = self.normalize(torch.from_numpy(np.ascontiguousarray(batch.reshape(-1, *batch.shape[-3:]))))
        ids = self.logits(x, **strategy).argmax(1)
        labels = ids.to(torch.uint8 if self.num_classes <= 256 else torch.int32).cpu().numpy()
        return labels[0] if batch.ndim == 3 else labels

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """Class ids ``(..., H, W)`` -> RGB ``(..., H, W, 3)`` in the model's palette (others black)."""
        return colorize(labels, self.meta.palette)


class TorchPredictor(Predictor):
    """A PyTorch model (checkpoint or TorchScript) with autocast precision and memory format (channels-last
    by default on CPU and CUDA: measured faster). Not for TorchScript: ``fuse`` folds Conv2d -> BatchNorm2d
    pairs in place (:func:`fuse_conv_bn`), ``onednn`` runs the CPU convolutions in oneDNN
    (:func:`~fcn.models.fuse.use_onednn_convolutions`, see fcn.tuning)."""

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
        self.meta, self.device, self.dtype = meta, device, PRECISIONS[precision]
        self.channels_last = device.type in ("cpu", "cuda") if channels_last is None else channels_last
        model = model.to(device).eval()
        plain = not isinstance(model, torch.jit.ScriptModule)  # TorchScript stays as it is
        self.fused = fuse_conv_bn(model) if fuse and plain else 0
        self.onednn = use_onednn_convolutions(model) if onednn and plain and device.type == "cpu" else 0
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fp32 = self.dtype == torch.float32
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=not fp32):
            return self.model(x).float()


class OnnxPredictor(Predictor):
    """An exported ONNX model run by onnxruntime (fp32; CUDA provider when asked for and available)."""

    def __init__(self, path: str | Path, *, device: torch.device) -> None:
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
        opts.intra_op_num_threads = self.threads = torch.get_num_threads()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise CheckpointError(f"{path} is not a loadable ONNX model ({first_line(err)})") from err
        self.meta = ModelMeta.from_onnx_props(self.session.get_modelmeta().custom_metadata_map, source=path)
        shape = self.session.get_outputs()[0].shape
        if len(shape) == 4 and isinstance(shape[1], int):
            _check_class_count(path, shape[1], self.meta)
        self.input_name = self.session.get_inputs()[0].name
        self.device = device

    def cpu_threads(self) -> int:
        return self.threads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().float().cpu().contiguous().numpy()
        (out,) = self.session.run(None, {self.input_name: arr})
        return torch.from_numpy(out).to(self.device)


def set_exposure_target(predictor: Predictor, value: float | str | None) -> None:
    """Apply ``--exposure-target`` (:func:`fcn.exposure.exposure_argument`): None keeps the model's,
    ``"off"`` drops it, a number replaces it."""
    if value is not None:
        target = None if value == "off" else float(value)
        predictor.meta = dataclasses.replace(predictor.meta, exposure_target=target)


def _check_class_count(path: str | Path, outputs: int, meta: ModelMeta) -> None:
    if outputs != meta.num_classes:
        raise CheckpointError(
            f"{path}: the model outputs {outputs} classes but its metadata says num_classes "
            f"{meta.num_classes}; export it again with `python scripts/export.py`"
        )


def _is_torchscript(path: Path) -> bool:
    """True when ``path`` is a TorchScript archive (a zip with a ``code/`` folder)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.split("/", 2)[1:2] == ["code"] for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def load_predictor(
    path: str | Path,
    *,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    channels_last: bool | None = None,
    fuse: bool = True,
    onednn: bool = False,
) -> Predictor:
    """Load a training ``.ckpt``, an exported ``.onnx`` or TorchScript file (``fuse``, ``onednn``: see
    :class:`TorchPredictor`). Raises :class:`CheckpointError` for missing or unusable files and
    :class:`InferenceError` for options the file or machine cannot honour (fp16 ONNX, CUDA without a GPU).
    """
    path = Path(path).expanduser()  # checked once: here for ONNX, by the loaders otherwise
    if precision not in PRECISIONS:
        raise InferenceError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    dev = resolve_device(device)
    if path.suffix.lower() == ".onnx":
        fix = "pass a training .ckpt or a file from scripts/export.py"
        checkpoint.require_file(path, what="model file", fix=fix)
        if precision != "fp32":
            raise InferenceError("ONNX models run in fp32; use --precision fp32 or the training checkpoint")
        return OnnxPredictor(path, device=dev)
    if not _is_torchscript(path):
        model, meta = checkpoint.load_model(path, device="cpu")
    else:
        extra = {TORCHSCRIPT_META_FILE: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
                model = torch.jit.load(str(path), map_location=dev, _extra_files=extra)
        except Exception as err:  # TorchScript raises RuntimeError subclasses that vary by version
            raise CheckpointError(f"{path} is not a loadable TorchScript file ({first_line(err)})") from err
        try:
            data = json.loads(extra[TORCHSCRIPT_META_FILE] or "{}")
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: {TORCHSCRIPT_META_FILE} is not JSON ({err})") from err
        meta = ModelMeta.from_mapping(data, source=path)
        try:
            with torch.inference_mode():  # the traced graph's class count, on a small input
                outputs = int(model(torch.zeros(1, 3, 64, 64, device=dev)).shape[1])
        except Exception as err:  # a graph that does not run on images is not an fcn export
            raise CheckpointError(f"{path}: the TorchScript model does not run ({first_line(err)})") from err
        _check_class_count(path, outputs, meta)
    return TorchPredictor(  # fuse and onednn leave TorchScript as it is
        model, meta, device=dev, precision=precision, channels_last=channels_last, fuse=fuse, onednn=onednn
    )


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    last = max(length - crop, 0)
    starts = list(range(0, last + 1, stride))
    return starts if starts[-1] == last else [*starts, last]


def predict_sliding(
    model: LogitsFn, x: torch.Tensor, *, crop: tuple[int, int], stride: tuple[int, int], window_batch: int = 4
) -> torch.Tensor:
    """Logits of ``x`` (normalised ``(N, 3, H, W)``) averaged over ``crop`` windows every ``stride``; the last
    window of each axis meets the border, an image smaller than the crop is one window. ``window_batch``
    windows of all ``N`` images run per forward pass."""
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
    exposure: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits ``(N, C, H, W)`` of a normalised batch ``x`` ``(N, 3, H, W)``: the whole image, at a fixed
    ``resize=(h, w)``, or by sliding window (``crop``, ``stride``: default half the crop); with TTA every
    ``scales`` factor (bilinear) and, with ``flip``, its mirror. Several views return the log of their mean
    softmax (so arg-max and confidence follow the TTA average). ``exposure`` (a predictor's
    :attr:`Predictor.exposure`) first scales each whole image's brightness."""
    if resize is not None and crop is not None:
        raise InferenceError("choose either a fixed resize or a sliding window, not both")
    if not scales or any(s <= 0 for s in scales):
        raise InferenceError(f"scales must be positive, got {list(scales)}")
    if exposure is not None:
        x = exposure(x)
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
        out = _resize(one_view(view.flip(-1)).flip(-1) if flipped else one_view(view), size)
        if len(views) == 1:
            return out
        probs = out.softmax(1) if probs is None else probs.add_(out.softmax(1))
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


def label_arrays(
    labels: torch.Tensor, confidence: torch.Tensor | None, *, num_classes: int, bits: int = 8
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predict's arrays ``(N, H, W)``: ids uint8 up to 256 classes (else uint16), the confidence scaled to
    ``bits`` (8 or 16) bit integers."""
    ids = labels.to(torch.uint8 if num_classes <= 256 else torch.int32).cpu().numpy()
    ids = ids if ids.dtype == np.uint8 else ids.astype(np.uint16)
    if confidence is None:
        return ids, None
    scaled = (confidence * float((1 << bits) - 1)).round_().to(torch.int32).cpu().numpy()
    return ids, scaled.astype(np.uint8 if bits == 8 else np.uint16)


def probabilities_uint8(logits: torch.Tensor) -> np.ndarray:
    """One image's ``(C, H, W)`` logits -> its class probabilities as uint8 ``round(255 p)``, ``(C, H, W)``
    C-contiguous (predict's ``probs`` output; read back by :func:`fcn.data.soft_labels.read_soft_labels`)."""
    if logits.ndim != 3:
        raise ValueError(f"probabilities_uint8 needs (C, H, W) logits, got shape {tuple(logits.shape)}")
    probs = logits.float().softmax(0).mul_(255.0).round_().to(torch.uint8)
    return probs.cpu().contiguous().numpy()


def class_ids(logits: np.ndarray) -> np.ndarray:
    """Arg-max of one image's ``(C, H, W)`` logits: ids ``(H, W)``, uint8 up to 256 classes (else uint16),
    the first of equal maxima winning. Channels-last logits are reduced over their contiguous class axis in
    one pass over memory (docs/RESULTS.md section 7)."""
    if logits.ndim != 3:
        raise ValueError(f"class_ids needs (C, H, W) logits, got shape {logits.shape}")
    hwc = logits.transpose(1, 2, 0)
    ids = hwc.argmax(-1) if hwc.flags.c_contiguous else logits.argmax(0)
    return ids.astype(np.uint8 if logits.shape[0] <= 256 else np.uint16)
