"""The light student: the FCN-8s head (skip fusion at strides 32/16/8, bilinear-initialised learned
upsampling, zero-initialised skip scores) on torchvision's MobileNetV3-Large.

It has the FCNs' output contract: logits ``(N, C, H, W)`` at the input size, and
``{"out", "c3", "c4", "c5"}`` with ``return_features=True`` (c3: 40 ch at 1/8, c4: 112 ch at 1/16,
c5: 960 ch at 1/32).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large

from fcn.models.errors import ModelError
from fcn.models.vgg import load_torchvision_weights

# torchvision ``features`` indices ending each stride: 1/8 after block 6, 1/16 after 12, 1/32 after 16.
_STAGE_ENDS = (7, 13, 17)


class MobileNetV3Backbone(nn.Module):
    """MobileNetV3-Large ``features`` returning ``{"c3": 1/8, "c4": 1/16, "c5": 1/32}``."""

    def __init__(self, *, width_mult: float = 1.0, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.features = mobilenet_v3_large(weights=None, width_mult=width_mult).features
        # torchvision uses BN momentum 0.01 for long ImageNet schedules; with short segmentation
        # schedules the running statistics then lag far behind the weights and eval-mode output is poor.
        for m in self.features.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
        chans = [self.features[end - 1].out_channels for end in _STAGE_ENDS]
        self.out_channels = {"c3": chans[0], "c4": chans[1], "c5": chans[2]}
        self.width_mult = width_mult

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = {}
        start = 0
        for key, end in zip(("c3", "c4", "c5"), _STAGE_ENDS):
            for i in range(start, end):
                x = self.features[i](x)
            feats[key] = x
            start = end
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
