"""Model registry: ``build_model(name, *, num_classes, **kwargs)`` over ``fcn32s``, ``fcn16s``, ``fcn8s``
(VGG16) and the light ``student`` (MobileNetV3-Large). Every model obeys one contract: ``model(x)`` maps
``(N, 3, H, W)`` to logits ``(N, C, H, W)`` at the input size; ``model(x, return_features=True)`` returns
``{"out", "c3", "c4", "c5"}``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from pathlib import Path

from torch import nn

from fcn.models.errors import ModelError
from fcn.models.fcn import FCN, MODES
from fcn.models.student import MobileNetV3Backbone
from fcn.models.vgg import VGG16Backbone

BACKBONES = ("vgg16", "vgg16_bn")


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_REGISTRY)


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered model; unknown names and arguments raise :class:`ModelError` with the fix."""
    try:
        builder = _REGISTRY[name]
    except KeyError as err:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from err
    params = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ModelError(f"model {name!r} takes no argument(s) {unknown}; it takes {sorted(params)}")
    if "num_classes" not in kwargs:
        raise ModelError(f"model {name!r} needs num_classes=<int>")
    n = kwargs["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ModelError(f"num_classes must be a positive int, got {n!r}")
    return builder(**kwargs)


def fcn_vgg16(
    stride: int,
    *,
    num_classes: int,
    weights: str | Path | None = None,
    backbone: str = "vgg16",
    mode: str = "aligned",
    learnable_upsampling: bool = True,
    skip_scaling: bool = False,
    fc_dim: int = 4096,
    width_mult: float = 1.0,
    dropout: float = 0.5,
) -> FCN:
    """FCN-``stride``s on VGG16; ``weights``: None (random), 'imagenet' or a torchvision VGG16 file."""
    if backbone not in BACKBONES:
        raise ModelError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if mode not in MODES:
        raise ModelError(f"mode must be one of {MODES}, got {mode!r}")
    trunk = VGG16Backbone(
        batch_norm=backbone == "vgg16_bn", mode=mode, fc_dim=fc_dim, width_mult=width_mult, dropout=dropout
    )
    if weights is not None:
        trunk.load_imagenet(weights)
    return FCN(
        trunk,
        num_classes=num_classes,
        stride=stride,
        mode=mode,
        learnable_upsampling=learnable_upsampling,
        skip_scaling=skip_scaling,
    )


def student(
    *,
    num_classes: int,
    weights: str | Path | None = None,
    width_mult: float = 1.0,
    learnable_upsampling: bool = True,
) -> FCN:
    """Light FCN-8s-style student on MobileNetV3-Large (``weights`` as for the FCNs)."""
    trunk = MobileNetV3Backbone(width_mult=width_mult)
    if weights is not None:
        trunk.load_imagenet(weights)
    return FCN(
        trunk, num_classes=num_classes, stride=8, mode="aligned", learnable_upsampling=learnable_upsampling
    )


# name -> builder (keyword-only arguments, ``num_classes`` required; build_model reads their signatures)
_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{f"fcn{stride}s": partial(fcn_vgg16, stride) for stride in (32, 16, 8)},
    "student": student,
}
__all__ = ["ModelError", "build_model", "list_models"]
