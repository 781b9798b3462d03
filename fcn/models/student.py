"""The light student's trunk: torchvision's MobileNetV3-Large under the FCN-8s head (c3: 40 channels at
1/8, c4: 112 at 1/16, c5: 960 at 1/32)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large

from fcn.models.errors import ModelError
from fcn.models.vgg import load_torchvision_weights

# the ``features`` blocks ending strides 1/8, 1/16 and 1/32
_TAPS = {6: "c3", 12: "c4", 16: "c5"}


class MobileNetV3Backbone(nn.Module):
    """MobileNetV3-Large ``features`` returning ``{"c3": 1/8, "c4": 1/16, "c5": 1/32}``."""

    def __init__(self, *, width_mult: float = 1.0, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.features = mobilenet_v3_large(weights=None, width_mult=width_mult).features
        # torchvision's BN momentum 0.01 suits long ImageNet schedules; in short ones the running
        # statistics lag far behind the weights and eval-mode output is poor
        for m in self.features.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
        self.out_channels = {key: self.features[i].out_channels for i, key in _TAPS.items()}
        self.width_mult = width_mult

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = {}
        for i, block in enumerate(self.features):
            x = block(x)
            if i in _TAPS:
                feats[_TAPS[i]] = x
        return feats

    def load_imagenet(self, weights: str | Path) -> None:
        """Load ``"imagenet"`` (torchvision enum) or a local torchvision MobileNetV3-Large state dict."""
        if self.width_mult != 1.0:
            raise ModelError(f"pretrained weights need width_mult=1.0, got {self.width_mult}")
        state = load_torchvision_weights(
            weights, MobileNet_V3_Large_Weights.IMAGENET1K_V1, kind="MobileNetV3"
        )
        feats = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        try:
            self.features.load_state_dict(feats, strict=True)
        except RuntimeError as err:
            raise ModelError(
                f"the weights are not a torchvision mobilenet_v3_large state dict ({err}); save one with "
                "torch.save(torchvision.models.mobilenet_v3_large(weights=...).state_dict(), path)"
            ) from err
