"""FCN-32s / FCN-16s / FCN-8s (Long, Shelhamer & Darrell): one class parametrised by output stride.

Forward contract: ``model(x)`` maps ``(N, 3, H, W)`` to logits ``(N, C, H, W)`` at exactly the input size;
``model(x, return_features=True)`` returns ``{"out", "c3", "c4", "c5"}`` (logits and the stride 8/16/32
features) for distillation.

Two alignments:

* ``"aligned"`` (default): conv1_1 padding 1, fc6 padding 3, upsampling layers with padding
  ``factor // 2`` so every map is exactly ``factor`` times larger; fused maps are cropped at offset 0.
  With ceil-mode pooling the bilinear upsampler puts each 1/s cell's value at its receptive-field
  centre (``s * i + s / 2 - 0.5``), so this is geometrically exact and costs about half the FLOPs.
* ``"paper"``: conv1_1 padding 100, fc6 without padding, unpadded upsampling and the Caffe crop
  offsets (5 for pool4, 9 for pool3, and 19/27/31 for the final 32s/16s/8s output), as in the
  reference implementation. The 100-pixel border roughly doubles the FLOPs at 360x480.
"""

from __future__ import annotations

import torch
from torch import nn

from fcn.models.errors import ModelError
from fcn.models.init import make_upsampler, zero_init
from fcn.models.score import score_conv

MODES = ("aligned", "paper")
STRIDES = (32, 16, 8)
# Caffe crop offsets of the reference FCN (VGG16 with conv1_1 pad 100).
PAPER_SKIP_OFFSETS = {"c4": 5, "c3": 9}
PAPER_FINAL_OFFSETS = {32: 19, 16: 27, 8: 31}
# Scaling of pool4 / pool3 before their score layers in the "at-once" FCN-8s.
AT_ONCE_SCALES = {"c4": 0.01, "c3": 0.0001}


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
        mode: ``"aligned"`` or ``"paper"`` (the backbone must be built with the matching paddings).
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
        paper = mode == "paper"

        def up(factor: int) -> nn.ConvTranspose2d:
            pad = 0 if paper else factor // 2
            return make_upsampler(num_classes, factor, padding=pad, learnable=learnable_upsampling)

        # Zero-initialised class scoring, as in the reference (Caffe's default constant filler).
        self.score_fr = zero_init(nn.Conv2d(ch["c5"], num_classes, kernel_size=1))
        self.skips = [k for k, s in (("c4", 16), ("c3", 8)) if stride <= s]
        # One 2x upsampling + one zero-initialised score layer per skip, named as in the reference.
        if "c4" in self.skips:
            self.upscore2 = up(2)
            self.score_pool4 = zero_init(nn.Conv2d(ch["c4"], num_classes, kernel_size=1))
        if "c3" in self.skips:
            self.upscore_pool4 = up(2)
            self.score_pool3 = zero_init(nn.Conv2d(ch["c3"], num_classes, kernel_size=1))
        self.upscore = up(stride)  # final: 1/stride -> 1/1

    def _fuse(self, coarse: torch.Tensor, skip: torch.Tensor, key: str) -> torch.Tensor:
        """Add a skip score map to the 2x-upsampled coarser score map, cropped to a common size."""
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
        if return_features:
            return {"out": out, **feats}
        return out


def transfer_weights(source: nn.Module, target: nn.Module) -> list[str]:
    """Copy every parameter/buffer of ``source`` whose name and shape exist in ``target``.

    Used for staged training (FCN-16s from FCN-32s, FCN-8s from FCN-16s): the backbone, ``score_fr``
    and, from 16s to 8s, ``score_pool4`` / ``upscore2`` are shared; the new skip score layers stay
    zero so the finer net starts from the coarser net's predictions. Returns the copied names.
    """
    src = source.state_dict()
    dst = target.state_dict()
    shared = {k: v for k, v in src.items() if k in dst and dst[k].shape == v.shape}
    if not any(k.startswith("backbone.") for k in shared):
        raise ModelError(
            "the source model shares no backbone weights with the target; "
            "staged training needs the same backbone (name, width_mult, fc_dim) in both"
        )
    target.load_state_dict(shared, strict=False)
    return sorted(shared)
