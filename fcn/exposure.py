"""Exposure normalisation at inference: each image of a normalised batch is scaled so that its mean grey
level is the training frames' (``exposure_target``, 0-255), then clipped to the 0-255 range as a camera's
gain would be. Footage of another drive filmed darker (CamVid's 0001TP at dusk: mean grey ~59 against
~107 for the training frames) then reaches the model at the exposure it was trained at; the training
recipes jitter brightness (x0.4-1.4) instead and are unchanged (docs/RESULTS.md section 8, "Exposure
normalisation at inference").

The target travels with the model: ``exposure_target`` in the training module's hyper-parameters, hence in
its checkpoints (:class:`fcn.checkpoint.ModelMeta`) and exports; ``evaluate.py`` / ``predict.py`` apply it
(``--exposure-target`` sets, changes or, with ``off``, drops it).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

# ITU-R BT.601 luma weights for R, G, B: OpenCV's ``COLOR_RGB2GRAY``
GREY_WEIGHTS = (0.299, 0.587, 0.114)


def check_exposure_target(value: object) -> float | None:
    """``value`` as a float in (0, 255], or None; anything else raises ValueError naming it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"exposure_target must be a number in (0, 255] or null, got {value!r}")
    if not 0 < value <= 255:
        raise ValueError(
            f"exposure_target must be a mean grey level in (0, 255] (e.g. the training frames' mean), "
            f"got {value!r}"
        )
    return float(value)


def image_mean_grey(rgb: np.ndarray) -> float:
    """Mean grey level (0-255) of one RGB uint8 ``(H, W, 3)`` image (OpenCV's grey conversion)."""
    return float(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).mean())


def mean_grey(image: torch.Tensor) -> torch.Tensor:
    """Mean grey level (0-255) of RGB ``(N, 3, H, W)`` in 0-1 -> ``(N, 1, 1, 1)``."""
    weights = torch.tensor(GREY_WEIGHTS, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    return (image * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True) * 255.0


@dataclass(frozen=True)
class ExposureNorm:
    """``norm(x)``: a normalised batch ``(N, 3, H, W)`` (``(x_rgb - mean) / std``, RGB in 0-1) with each
    image's mean grey level scaled to ``target`` and clipped, normalised again. Call it on whole images
    (before any sliding window), so that every window of an image gets the same gain."""

    target: float
    mean: Sequence[float]
    std: Sequence[float]

    def __post_init__(self) -> None:
        check_exposure_target(self.target)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        rgb = x * std + mean  # 0-1
        gain = self.target / mean_grey(rgb).clamp_min(1.0)  # a black frame: at most x target
        return ((rgb * gain).clamp_(0.0, 1.0) - mean) / std


def exposure_argument(text: str) -> float | str:
    """argparse type of ``--exposure-target``: a mean grey level in (0, 255], or ``off``."""
    if text.strip().lower() == "off":
        return "off"
    try:
        return check_exposure_target(float(text))  # type: ignore[return-value]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a mean grey level in (0, 255] (e.g. 107) or 'off'"
        ) from err


EXPOSURE_HELP = (
    "scale each image to this mean grey level (0-255) before the model; default: the checkpoint's "
    "exposure_target (none for most); 'off' drops it"
)
