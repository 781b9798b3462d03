"""Reading training checkpoints as untrusted input: ``weights_only`` loading, validation, model rebuild.
Their ``hyper_parameters`` (from :class:`fcn.lit.SegmentationModule`) describe the model and the data."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcn.data.io import atomic_path
from fcn.exposure import check_exposure_target
from fcn.models import ModelError, build_model, list_models
from fcn.palette import IMAGENET_MEAN, IMAGENET_STD, default_palette


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not describe a model; the message says the fix."""


ONNX_META_PREFIX = "fcn."
TORCHSCRIPT_META_FILE = "fcn_meta.json"
META_VERSION = 1


@dataclass(frozen=True)
class ModelMeta:
    """What a checkpoint or an exported model file says about its model and data (the exports embed it:
    ONNX ``metadata_props``, TorchScript extra file :data:`TORCHSCRIPT_META_FILE`)."""

    model_name: str
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]
    ignore_index: int
    mean: list[float]
    std: list[float]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    exposure_target: float | None = None  # fcn.exposure: inference scales each image's mean grey to it

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
        """Validate decoded export metadata; :class:`CheckpointError` naming ``source`` when unusable."""
        missing = sorted({"model_name", "num_classes", "class_names", "palette", "mean", "std"} - set(data))
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


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (library errors can run to many lines of advice)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0].strip()}" if lines else type(err).__name__


def require_file(path: Path, *, what: str, fix: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a file (saying whether it is missing or a folder)."""
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"{what} {path} {state}; {fix}")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    """Return the model's state dict (``model.`` prefix removed) and the validated description."""
    path = Path(path).expanduser()
    fix = "pass the .ckpt written by `python scripts/train.py` (see the 'best checkpoint:' line it prints)"
    require_file(path, what="checkpoint", fix=fix)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle/unpickler errors vary by torch version
        # only the type: torch's message suggests turning weights_only off, unsafe for an untrusted file
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}); "
            "it must be a Lightning .ckpt written by scripts/train.py"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no 'state_dict'); use a .ckpt from training"
        )
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict) or "model" not in hp or "num_classes" not in hp:
        raise CheckpointError(
            f"{path} has no hyper_parameters 'model' and 'num_classes'; it was not written by fcn's training"
        )
    name = hp["model"]
    if not isinstance(name, str) or name not in list_models():
        raise CheckpointError(f"{path} names model {name!r}, which is not one of {list_models()}")
    fields = check_description(hp, source=path, fix="it was not written by fcn's training, or is damaged")
    kwargs = fields.pop("model_kwargs")
    kwargs.pop("weights", None)  # the checkpoint carries the trained weights; never re-load ImageNet
    info = ModelMeta(model_name=name, model_kwargs=kwargs, **fields)
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise CheckpointError(f"{path} holds no 'model.*' weights")
    return state, info


def check_description(data: Mapping[str, Any], *, source: str | Path, fix: str) -> dict[str, Any]:
    """Validate and normalise the data description of a checkpoint or an export's metadata (defaults for
    missing optional fields): ``num_classes``, ``class_names``, ``palette``, ``ignore_index``, ``mean``,
    ``std``, ``model_kwargs``, ``exposure_target``. Raises one :class:`CheckpointError` naming the field
    and ``source``, ending with ``fix``."""

    def bad(name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{source}: {name} {problem}; {fix}")

    num_classes = data.get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise bad("num_classes", f"must be an integer >= 1, got {num_classes!r}")
    names = data.get("class_names") or [f"class_{i}" for i in range(num_classes)]
    if not isinstance(names, (list, tuple)) or len(names) != num_classes:
        raise bad("class_names", f"must list {num_classes} names (num_classes), got {_short(names)}")
    palette = data.get("palette") or default_palette(num_classes)
    if not isinstance(palette, (list, tuple)) or len(palette) != num_classes:
        raise bad("palette", f"must hold {num_classes} colours (num_classes), got {_short(palette)}")
    for colour in palette:
        if not (isinstance(colour, (list, tuple)) and len(colour) == 3 and all(_is_int(v) for v in colour)):
            raise bad("palette", f"colours must be 3 integers (R, G, B), got {_short(colour)}")
        if not all(0 <= v <= 255 for v in colour):
            raise bad("palette", f"values must be in 0..255, got {list(colour)}")
    ignore_index = data.get("ignore_index", 255)
    if not _is_int(ignore_index):
        raise bad("ignore_index", f"must be an integer, got {ignore_index!r}")
    stats = {}
    for name, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        values = data.get(name, default)
        if not isinstance(values, (list, tuple)) or len(values) != 3:
            raise bad(name, f"must be 3 numbers (R, G, B), got {_short(values)}")
        if not all((_is_int(v) or isinstance(v, float)) and math.isfinite(v) for v in values):
            raise bad(name, f"must be finite numbers, got {list(values)}")
        if name == "std" and not all(v > 0 for v in values):
            raise bad(name, f"must be positive (images are divided by it), got {list(values)}")
        stats[name] = [float(v) for v in values]
    kwargs = data.get("model_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise bad("model_kwargs", f"must be a mapping, got {_short(kwargs)}")
    try:
        exposure = check_exposure_target(data.get("exposure_target"))
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}; {fix}") from err
    return {
        "num_classes": num_classes,
        "class_names": [str(n) for n in names],
        "palette": [[int(v) for v in c] for c in palette],
        "ignore_index": int(ignore_index),
        "model_kwargs": dict(kwargs),
        "exposure_target": exposure,
        **stats,
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def load_model(
    path: str | Path, *, device: str | torch.device = "cpu", num_classes: int | None = None
) -> tuple[nn.Module, ModelMeta]:
    """Rebuild the model described by a checkpoint and load its weights (eval mode); with ``num_classes``,
    refuse a checkpoint trained on another number of classes."""
    state, info = read_checkpoint(path)
    if num_classes is not None and info.num_classes != num_classes:
        raise CheckpointError(
            f"{path} has {info.num_classes} classes but the data has {num_classes}; "
            "use a checkpoint trained on the same classes"
        )
    try:
        model = build_model(info.model_name, num_classes=info.num_classes, **info.model_kwargs)
    except ModelError as err:
        raise CheckpointError(f"{path}: cannot rebuild {info.model_name} ({err})") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # e.g. num_classes differs from the score layers' outputs
        detail = textwrap.shorten(str(err), 300, placeholder=" ...")  # PyTorch lists mismatches one a line
        raise CheckpointError(
            f"{path}: weights do not fit {info.model_name} with num_classes {info.num_classes} ({detail})"
        ) from err
    return model.to(device).eval(), info


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    model_name: str,
    model_kwargs: dict[str, Any] | None = None,
    class_names: list[str] | None = None,
    palette: list[list[int]] | None = None,
    ignore_index: int = 255,
    mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
    std: tuple[float, ...] | list[float] = IMAGENET_STD,
    exposure_target: float | None = None,
) -> Path:
    """Write a minimal self-describing checkpoint (what :func:`read_checkpoint` needs) for a model not
    trained by ``scripts/train.py`` (tests, conversions)."""
    description = {"num_classes": int(model.num_classes), "class_names": class_names, "palette": palette}
    description.update(ignore_index=ignore_index, mean=mean, std=std, model_kwargs=model_kwargs)
    description.update(exposure_target=exposure_target)
    hp = {
        "model": model_name,
        **check_description(description, source=path, fix="pass a valid data description"),
    }
    state = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, "hyper_parameters": hp}, tmp)
    return Path(path)
