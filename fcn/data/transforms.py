"""albumentations presets for image + mask. Masks always use nearest interpolation, are padded with the
ignore index and end as int64 tensors; images are normalised with the ImageNet statistics."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from fcn.palette import IMAGENET_MEAN, IMAGENET_STD

# stated, not left to albumentations' defaults: masks (ids) are never interpolated
_RESIZE = {"interpolation": cv2.INTER_LINEAR, "mask_interpolation": cv2.INTER_NEAREST}


def train_transform(
    *,
    crop_size: Sequence[int] = (360, 480),
    scale_range: Sequence[float] = (0.5, 2.0),
    ignore_index: int = 255,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    hflip: bool = True,
    color_jitter: bool = True,
    brightness_range: Sequence[float] = (0.4, 1.4),
) -> A.Compose:
    """Random scale -> pad (image with the mean colour, mask with ``ignore_index``) -> random crop ->
    horizontal flip -> photometric jitter (brightness factor from ``brightness_range``, down to 0.4 for
    dusk footage: docs/RESULTS.md section 8) -> normalise -> tensors."""
    h, w = int(crop_size[0]), int(crop_size[1])
    lo, hi = float(scale_range[0]), float(scale_range[1])
    ops: list[A.BasicTransform] = []
    if (lo, hi) != (1.0, 1.0):
        ops.append(A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), p=1.0, **_RESIZE))
    ops += [
        A.PadIfNeeded(
            min_height=h,
            min_width=w,
            border_mode=cv2.BORDER_CONSTANT,
            fill=tuple(round(255 * m) for m in mean),  # the mean colour: 0 after normalisation
            fill_mask=ignore_index,
        ),
        A.RandomCrop(height=h, width=w),
    ]
    if hflip:
        ops.append(A.HorizontalFlip(p=0.5))
    if color_jitter:
        brightness = (float(brightness_range[0]), float(brightness_range[1]))
        ops.append(A.ColorJitter(brightness=brightness, contrast=0.3, saturation=0.3, hue=0.03, p=0.8))
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()]
    return A.Compose(ops)


def eval_transform(
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    size: Sequence[int] | None = None,
) -> A.Compose:
    """Normalise (and resize to ``size`` if given) -> tensors."""
    resize = [A.Resize(int(size[0]), int(size[1]), **_RESIZE)] if size is not None else []
    return A.Compose([*resize, A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()])
