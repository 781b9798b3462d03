"""FCN-32s / FCN-16s / FCN-8s (Long, Shelhamer & Darrell): one class parametrised by output stride, with
the model contract of docs/DESIGN.md (logits at the input size; ``return_features`` adds c3/c4/c5). Modes:

* ``"aligned"`` (default): conv1_1 padding 1, fc6 padding 3, upsamplers padded ``factor // 2`` so every map
  is exactly ``factor`` times larger, fused maps cropped at offset 0. With ceil-mode pooling the bilinear
  upsampler puts each 1/s cell at its receptive-field centre: geometrically exact, about half the FLOPs.
* ``"paper"``: conv1_1 padding 100, unpadded fc6 and upsamplers, and the reference's Caffe crop offsets.
"""

from __future__ import annotations

import torch
from torch import nn

from fcn.models.errors import ModelError
from fcn.models.score import score_conv

MODES = ("aligned", "paper")
STRIDES = (32, 16, 8)
# Caffe crop offsets of the reference FCN (VGG16 with conv1_1 pad 100)
PAPER_SKIP_OFFSETS = {"c4": 5, "c3": 9}
PAPER_FINAL_OFFSETS = {32: 19, 16: 27, 8: 31}
# scaling of pool4 / pool3 before their score layers in the "at-once" FCN-8s
AT_ONCE_SCALES = {"c4": 0.01, "c3": 0.0001}


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """A ``(channels, channels, k, k)`` transposed-convolution weight upsampling each channel bilinearly (the
    paper's ``upsample_filt``); with stride ``k / 2`` it is ``align_corners=False`` interpolation away from
    the borders."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    filt_1d = 1 - (torch.arange(kernel_size, dtype=torch.float64) - center).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
    weight[range(channels), range(channels)] = filt_1d[:, None] * filt_1d[None, :]
    return weight.float()


def make_upsampler(
    channels: int, factor: int, *, padding: int = 0, learnable: bool = True
) -> nn.ConvTranspose2d:
    """A bias-free ``ConvTranspose2d`` (kernel ``2 * factor``, stride ``factor``) initialised to bilinear;
    ``learnable=False`` freezes it, as in the paper's fixed upsampling."""
    layer = nn.ConvTranspose2d(
        channels, channels, kernel_size=2 * factor, stride=factor, padding=padding, bias=False
    )
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, 2 * factor))
    layer.weight.requires_grad_(learnable)
    return layer


def _crop(x: torch.Tensor, offset: int, height: int, width: int) -> torch.Tensor:
    if x.shape[-2] < offset + height or x.shape[-1] < offset + width:
        raise RuntimeError(
            f"cannot crop {height}x{width} at offset {offset} from a map of {tuple(x.shape[-2:])}"
        )
    return x[..., offset : offset + height, offset : offset + width]


class FCN(nn.Module):
    """Fully convolutional network with skip fusion up to ``stride`` (32, 16 or 8).

    Args:
        backbone: module returning ``{"c3", "c4", "c5"}`` features with an ``out_channels`` dict.
        num_classes: number of output classes ``C``.
        stride: 32 (no skip), 16 (+ pool4) or 8 (+ pool4 + pool3).
        mode: ``"aligned"`` or ``"paper"`` (the backbone must be built in the same mode).
        learnable_upsampling: if False the bilinear upsampling layers are frozen.
        skip_scaling: scale pool4/pool3 by 0.01/0.0001 before scoring (the "at-once" FCN-8s).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int,
        stride: int = 8,
        mode: str = "aligned",
        learnable_upsampling: bool = True,
        skip_scaling: bool = False,
    ) -> None:
        super().__init__()
        if stride not in STRIDES:
            raise ModelError(f"stride must be one of {STRIDES}, got {stride!r}")
        if mode not in MODES:
            raise ModelError(f"mode must be one of {MODES}, got {mode!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.stride = stride
        self.mode = mode
        self.skip_scaling = skip_scaling
        ch = backbone.out_channels

        def up(factor: int) -> nn.ConvTranspose2d:
            pad = 0 if mode == "paper" else factor // 2
            return make_upsampler(num_classes, factor, padding=pad, learnable=learnable_upsampling)

        def score(key: str) -> nn.Conv2d:  # zero-initialised as in the reference: a new skip adds nothing
            layer = nn.Conv2d(ch[key], num_classes, kernel_size=1)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
            return layer

        # layer names as in the reference; one 2x upsampling and one score layer per skip
        self.score_fr = score("c5")
        self.skips = [k for k, s in (("c4", 16), ("c3", 8)) if stride <= s]
        if "c4" in self.skips:
            self.upscore2, self.score_pool4 = up(2), score("c4")
        if "c3" in self.skips:
            self.upscore_pool4, self.score_pool3 = up(2), score("c3")
        self.upscore = up(stride)  # final: 1/stride -> 1/1

    def _fuse(self, coarse: torch.Tensor, skip: torch.Tensor, key: str) -> torch.Tensor:
        """The 2x-upsampled coarser score map plus a skip score map, cropped to a common size."""
        if self.mode == "paper":
            skip = _crop(skip, PAPER_SKIP_OFFSETS[key], coarse.shape[-2], coarse.shape[-1])
        else:
            coarse = _crop(coarse, 0, skip.shape[-2], skip.shape[-1])
        return coarse + skip

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        feats = self.backbone(x)
        score = score_conv(self.score_fr, feats["c5"])  # (N, C, H/32, W/32)
        if "c4" in self.skips:
            pool4 = feats["c4"] * AT_ONCE_SCALES["c4"] if self.skip_scaling else feats["c4"]
            score = self._fuse(self.upscore2(score), score_conv(self.score_pool4, pool4), "c4")  # 1/16
        if "c3" in self.skips:
            pool3 = feats["c3"] * AT_ONCE_SCALES["c3"] if self.skip_scaling else feats["c3"]
            score = self._fuse(self.upscore_pool4(score), score_conv(self.score_pool3, pool3), "c3")  # 1/8
        offset = PAPER_FINAL_OFFSETS[self.stride] if self.mode == "paper" else 0
        out = _crop(self.upscore(score), offset, height, width)  # (N, C, H, W)
        return {"out": out, **feats} if return_features else out


def transfer_weights(source: nn.Module, target: nn.Module) -> list[str]:
    """Copy every parameter/buffer of ``source`` whose name and shape exist in ``target``; returns the names.

    For staged training (FCN-16s from FCN-32s, FCN-8s from FCN-16s): the new skip score layers stay zero, so
    the finer net starts from the coarser net's predictions.
    """
    src, dst = source.state_dict(), target.state_dict()
    shared = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape}
    if not any(k.startswith("backbone.") for k in shared):
        raise ModelError(
            "the source model shares no backbone weights with the target; "
            "staged training needs the same backbone (name, width_mult, fc_dim) in both"
        )
    target.load_state_dict(shared, strict=False)
    return sorted(shared)
