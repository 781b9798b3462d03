"""Reading training checkpoints as untrusted input: ``weights_only`` loading, validation, model rebuild.

A checkpoint written by :class:`fcn.lit.SegmentationModule` is self-describing: its ``hyper_parameters``
hold the model name and keyword arguments, ``num_classes``, class names, palette, ignore index and the
normalisation. :func:`load_model` rebuilds the model from the file alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcn.models import ModelError, build_model, list_models
from fcn.palette import default_palette


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not describe a model; the message says the fix."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about its model and data."""

    path: Path
    model_name: str
    model_kwargs: dict[str, Any]
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]
    ignore_index: int
    mean: list[float]
    std: list[float]
    hparams: dict[str, Any] = field(repr=False)


def _read(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass the .ckpt written by "
            "`python scripts/train.py` (see the 'best checkpoint:' line it prints)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle/unpickler errors vary by torch version
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); "
            "it must be a Lightning .ckpt written by scripts/train.py"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no 'state_dict'); use a .ckpt from training"
        )
    return ckpt


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Return the model's state dict (``model.`` prefix removed) and the validated description."""
    ckpt = _read(path)
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict):
        raise CheckpointError(f"{path} has no hyper_parameters; it was not written by fcn's training module")
    missing = [k for k in ("model", "num_classes") if k not in hp]
    if missing:
        raise CheckpointError(f"{path} hyper_parameters lack {missing}; it was not written by fcn's training")
    name = hp["model"]
    if not isinstance(name, str) or name not in list_models():
        raise CheckpointError(f"{path} names model {name!r}, which is not one of {list_models()}")
    num_classes = hp["num_classes"]
    if not isinstance(num_classes, int) or num_classes < 1:
        raise CheckpointError(f"{path} has an invalid num_classes {num_classes!r}")
    class_names = list(hp.get("class_names") or [f"class_{i}" for i in range(num_classes)])
    if len(class_names) != num_classes:
        raise CheckpointError(f"{path} has {len(class_names)} class names for {num_classes} classes")
    palette = [list(map(int, c)) for c in (hp.get("palette") or default_palette(num_classes))]
    kwargs = dict(hp.get("model_kwargs") or {})
    kwargs.pop("weights", None)  # the checkpoint carries the trained weights; never re-load ImageNet
    info = CheckpointInfo(
        path=Path(path),
        model_name=name,
        model_kwargs=kwargs,
        num_classes=num_classes,
        class_names=class_names,
        palette=palette,
        ignore_index=int(hp.get("ignore_index", 255)),
        mean=[float(v) for v in hp.get("mean", (0.485, 0.456, 0.406))],
        std=[float(v) for v in hp.get("std", (0.229, 0.224, 0.225))],
        hparams=hp,
    )
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise CheckpointError(f"{path} holds no 'model.*' weights")
    return state, info


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild the model described by a checkpoint and load its weights (eval mode)."""
    state, info = read_checkpoint(path)
    try:
        model = build_model(info.model_name, num_classes=info.num_classes, **info.model_kwargs)
    except ModelError as err:
        raise CheckpointError(f"{path}: cannot rebuild {info.model_name} ({err})") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit {info.model_name} ({err})") from err
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
    mean: tuple[float, ...] | list[float] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] | list[float] = (0.229, 0.224, 0.225),
) -> Path:
    """Write a minimal self-describing checkpoint (the fields :func:`read_checkpoint` needs).

    Training writes full Lightning checkpoints; this is for models made elsewhere (tests, conversions).
    """
    num_classes = int(model.num_classes)
    hp = {
        "model": model_name,
        "model_kwargs": dict(model_kwargs or {}),
        "num_classes": num_classes,
        "class_names": list(class_names or [f"class_{i}" for i in range(num_classes)]),
        "palette": [list(map(int, c)) for c in (palette or default_palette(num_classes))],
        "ignore_index": ignore_index,
        "mean": list(mean),
        "std": list(std),
    }
    state = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": state, "hyper_parameters": hp}, tmp)
    tmp.replace(path)
    return path
