"""VGG16 feature extractor for the FCNs: pool3 (1/8), pool4 (1/16) and convolutionalised fc6/fc7 (1/32).

torchvision's ``vgg16`` / ``vgg16_bn`` ``features`` (same module indices: its state dicts load unchanged)
with Caffe's ceil-mode pooling (``ceil(H / s)`` cells at stride ``s``); fc6 is a 7x7 and fc7 a 1x1
convolution of ``fc_dim`` channels, each followed by ReLU and dropout as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import VGG16_BN_Weights, VGG16_Weights, WeightsEnum
from torchvision.models.vgg import cfgs, make_layers

from fcn.models.errors import ModelError


class VGG16Backbone(nn.Module):
    """VGG16 trunk returning ``{"c3": pool3 (1/8), "c4": pool4 (1/16), "c5": fc7 (1/32)}``.

    Args:
        batch_norm: use the ``vgg16_bn`` layout (for training from scratch).
        mode: ``"aligned"`` (conv1_1 padding 1, fc6 padding 3) or ``"paper"`` (100 and 0, as the reference).
        fc_dim: channels of fc6/fc7 (4096 in the paper; smaller only for demo-sized models).
        width_mult: scales every conv width (1.0 for pretrained weights; < 1 for demo-sized models).
        dropout: dropout probability after fc6 and fc7.
    """

    def __init__(
        self,
        *,
        batch_norm: bool = False,
        mode: str = "aligned",
        fc_dim: int = 4096,
        width_mult: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        cfg = [v if v == "M" else max(8, round(int(v) * width_mult)) for v in cfgs["D"]]
        self.features = make_layers(cfg, batch_norm=batch_norm)
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        for i in pools:
            self.features[i].ceil_mode = True
        paper = mode == "paper"
        self.features[0].padding = (100, 100) if paper else (1, 1)
        self._taps = {pools[2]: "c3", pools[3]: "c4"}  # pool3, pool4
        widths = [v for v in cfg if v != "M"]
        c3, c4, c5 = widths[6], widths[9], widths[12]  # conv3_3, conv4_3, conv5_3
        self.fc6 = nn.Conv2d(int(c5), fc_dim, kernel_size=7, padding=0 if paper else 3)
        self.fc7 = nn.Conv2d(fc_dim, fc_dim, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.drop7 = nn.Dropout(dropout)
        self.out_channels = {"c3": int(c3), "c4": int(c4), "c5": fc_dim}
        self.width_mult = width_mult
        self.batch_norm = batch_norm

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._taps:
                feats[self._taps[i]] = x  # c3: 1/8, c4: 1/16
        x = self.drop6(self.relu(self.fc6(x)))  # pool5 (1/32) -> (N, fc_dim, H/32, W/32)
        feats["c5"] = self.drop7(self.relu(self.fc7(x)))
        return feats

    def load_imagenet(self, weights: str | Path) -> None:
        """Load ``"imagenet"`` (torchvision enum) or a local torchvision VGG16(-BN) state dict: ``features.*``
        as is, the classifier's fc6/fc7 reshaped into convolutions."""
        if self.width_mult != 1.0 or self.fc6.out_channels != 4096:
            raise ModelError(
                "pretrained VGG16 weights need the full-size backbone; "
                f"got width_mult={self.width_mult}, fc_dim={self.fc6.out_channels}: "
                "use width_mult=1.0 and fc_dim=4096, or weights=None"
            )
        kind = "vgg16_bn" if self.batch_norm else "vgg16"
        enum = VGG16_BN_Weights.IMAGENET1K_V1 if self.batch_norm else VGG16_Weights.IMAGENET1K_V1
        state = load_torchvision_weights(weights, enum, kind="VGG16")
        if not isinstance(state, Mapping) or "classifier.0.weight" not in state:
            raise ModelError(
                f"{Path(str(weights)).expanduser()} is not a torchvision VGG16 state dict "
                f"(no 'classifier.0.weight'); save one with torch.save(torchvision.models.{kind}("
                "weights=...).state_dict(), path)"
            )
        feats = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        try:
            self.features.load_state_dict(feats, strict=True)
            with torch.no_grad():
                self.fc6.weight.copy_(state["classifier.0.weight"].view(self.fc6.weight.shape))
                self.fc6.bias.copy_(state["classifier.0.bias"])
                self.fc7.weight.copy_(state["classifier.3.weight"].view(self.fc7.weight.shape))
                self.fc7.bias.copy_(state["classifier.3.bias"])
        except (KeyError, RuntimeError) as err:
            raise ModelError(
                f"the weights are not a torchvision {kind} state dict ({err}); "
                f"save one with torch.save(torchvision.models.{kind}(weights=...).state_dict(), path)"
            ) from err


def load_torchvision_weights(weights: str | Path, enum: WeightsEnum, *, kind: str) -> Mapping[str, Any]:
    """A torchvision state dict from ``"imagenet"`` (torchvision's ``enum``: ``$TORCH_HOME`` cache, else a
    download) or a local file path (``torch.load(weights_only=True)``); ``kind`` names it in messages."""
    if isinstance(weights, str) and weights.lower() == "imagenet":
        try:
            return enum.get_state_dict(progress=True)
        except Exception as err:  # network errors come in many types; re-raised with the fix
            raise ModelError(
                f"could not load {enum} ({err}); on a machine without internet, download "
                f"{enum.url} elsewhere and pass its local path as weights=PATH"
            ) from err
    path = Path(str(weights)).expanduser()
    if not path.is_file():
        raise ModelError(
            f"weights file {path} does not exist; pass weights=None (random init), "
            f"weights='imagenet', or the path of a torchvision {kind} state dict"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors differ by torch version; re-raised with the file name
        raise ModelError(
            f"could not read weights file {path} ({err}); it must be a torch.save()d state dict"
        ) from err
    return state["state_dict"] if isinstance(state, Mapping) and "state_dict" in state else state
