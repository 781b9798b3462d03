"""Registered builders: ``fcn32s``, ``fcn16s``, ``fcn8s`` (VGG16) and the light ``student``."""

from __future__ import annotations

from pathlib import Path

from fcn.models import register_model
from fcn.models.errors import ModelError
from fcn.models.fcn import FCN, MODES
from fcn.models.student import MobileNetV3Backbone
from fcn.models.vgg import VGG16Backbone, load_vgg16_state_dict

BACKBONES = ("vgg16", "vgg16_bn")


def _fcn_vgg16(
    stride: int,
    *,
    num_classes: int,
    weights: str | Path | None,
    backbone: str,
    mode: str,
    learnable_upsampling: bool,
    skip_scaling: bool,
    fc_dim: int,
    width_mult: float,
    dropout: float,
) -> FCN:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive int, got {num_classes!r}")
    if backbone not in BACKBONES:
        raise ModelError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if mode not in MODES:
        raise ModelError(f"mode must be one of {MODES}, got {mode!r}")
    paper = mode == "paper"
    trunk = VGG16Backbone(
        batch_norm=backbone == "vgg16_bn",
        first_padding=100 if paper else 1,
        fc6_padding=0 if paper else 3,
        fc_dim=fc_dim,
        width_mult=width_mult,
        dropout=dropout,
    )
    if weights is not None:
        trunk.load_classifier_weights(load_vgg16_state_dict(weights, batch_norm=backbone == "vgg16_bn"))
    return FCN(
        trunk,
        num_classes=num_classes,
        stride=stride,
        mode=mode,
        learnable_upsampling=learnable_upsampling,
        skip_scaling=skip_scaling,
    )


def _make_fcn_builder(stride: int):
    def builder(
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
        return _fcn_vgg16(
            stride,
            num_classes=num_classes,
            weights=weights,
            backbone=backbone,
            mode=mode,
            learnable_upsampling=learnable_upsampling,
            skip_scaling=skip_scaling,
            fc_dim=fc_dim,
            width_mult=width_mult,
            dropout=dropout,
        )

    builder.__name__ = f"fcn{stride}s"
    builder.__doc__ = (
        f"FCN-{stride}s on VGG16. ``weights``: None (random), 'imagenet' (torchvision enum) or the "
        "path of a torchvision VGG16 state dict; fc6/fc7 get the classifier's weights reshaped."
    )
    return builder


fcn32s = register_model("fcn32s")(_make_fcn_builder(32))
fcn16s = register_model("fcn16s")(_make_fcn_builder(16))
fcn8s = register_model("fcn8s")(_make_fcn_builder(8))


@register_model("student")
def student(
    *,
    num_classes: int,
    weights: str | Path | None = None,
    width_mult: float = 1.0,
    learnable_upsampling: bool = True,
) -> FCN:
    """Light FCN-8s-style student on MobileNetV3-Large (``weights`` as for the FCNs)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive int, got {num_classes!r}")
    trunk = MobileNetV3Backbone(width_mult=width_mult)
    if weights is not None:
        trunk.load_imagenet(weights)
    return FCN(
        trunk, num_classes=num_classes, stride=8, mode="aligned", learnable_upsampling=learnable_upsampling
    )
