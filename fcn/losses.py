"""The supervised segmentation loss: pixel-wise cross entropy with an ignore index, class weights, OHEM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def segmentation_loss(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = 255,
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
    ohem_fraction: float = 1.0,
) -> Tensor:
    """Cross entropy of ``(N, C, H, W)`` logits (computed in float32) against ``(N, H, W)`` class ids,
    averaged over the pixels that are not ``ignore_index``, weighted as ``F.cross_entropy`` does with
    ``class_weights`` (``(C,)``). An all-ignored batch gives 0 with zero gradients, not NaN.

    ``ohem_fraction < 1``: online hard example mining (bootstrapped CE, Wu et al. 2016), only the
    ``ceil(ohem_fraction * valid pixels)`` pixels with the highest loss count."""
    if logits.ndim < 2 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match target of shape {tuple(target.shape)}; "
            "expected (N, C, H, W) logits and an (N, H, W) target"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not 0.0 < ohem_fraction <= 1.0:
        raise ValueError(f"ohem_fraction must be in (0, 1] (1 keeps every pixel), got {ohem_fraction}")
    num_classes, logits, target = logits.shape[1], logits.float(), target.long()
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights).to(device=logits.device, dtype=logits.dtype)
        if weight.shape != (num_classes,):
            raise ValueError(
                f"class_weights has shape {tuple(weight.shape)} but the logits have {num_classes} classes; "
                "give one weight per class"
            )
    per_pixel = F.cross_entropy(
        logits,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    valid = target != ignore_index
    if weight is None:
        pixel_weight = valid.to(per_pixel.dtype)
    else:
        pixel_weight = torch.where(valid, weight[target.clamp(0, num_classes - 1)], 0.0)
    if ohem_fraction < 1.0:
        # The hardest pixels only (ignored ones have loss 0 and weight 0); k needs one host sync.
        kept = math.ceil(ohem_fraction * int(valid.sum()))
        per_pixel, hardest = per_pixel.flatten().topk(max(kept, 1))
        pixel_weight = pixel_weight.flatten()[hardest]
    # Clamping the denominator turns 0/0 (every pixel ignored) into 0 without a host sync.
    return per_pixel.sum() / pixel_weight.sum().clamp(min=torch.finfo(per_pixel.dtype).tiny)
