"""CamVid in the SegNet layout: ``{split}/*.png`` images and ``{split}annot/*.png`` labels 0–10, 11 = void."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fcn.data.base import SegmentationDataset, label_table, pair_by_stem, require_dir
from fcn.data.io import MASK_EXTENSIONS, list_images, read_mask

CLASSES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
# The SegNet tutorial's CamVid colours, in class order.
PALETTE = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
VOID = 11
LAYOUT = """  ROOT/train/*.png   ROOT/trainannot/*.png   (labels: 0-10 classes, 11 void)
  ROOT/val/*.png     ROOT/valannot/*.png
  ROOT/test/*.png    ROOT/testannot/*.png"""


def camvid_table(ignore_index: int = 255) -> np.ndarray:
    """Raw CamVid label → train id: 0–10 unchanged, 11 (void) → ``ignore_index``."""
    return label_table({**{i: i for i in range(len(CLASSES))}, VOID: ignore_index})


def camvid_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """``(image, label)`` paths of one split, matched by file name."""
    root = Path(root)
    require_dir(root, what="CamVid root", layout=LAYOUT)
    img_dir = require_dir(root / split, what=f"CamVid split folder '{split}'", layout=LAYOUT)
    ann_dir = require_dir(root / f"{split}annot", what=f"CamVid label folder '{split}annot'", layout=LAYOUT)
    return pair_by_stem(
        list_images(img_dir),
        list_images(ann_dir, extensions=MASK_EXTENSIONS),
        mask_stem=lambda p: p.stem,
        where=f"CamVid {root} split {split!r}",
    )


class CamVid(SegmentationDataset):
    """CamVid (SegNet layout), 11 classes, void ignored."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        transform: Callable[..., dict[str, Any]] | None = None,
        ignore_index: int = 255,
        unknown_labels: str = "error",
    ) -> None:
        super().__init__(
            camvid_pairs(root, split),
            classes=CLASSES,
            palette=PALETTE,
            lut=camvid_table(ignore_index),
            ignore_index=ignore_index,
            unknown_labels=unknown_labels,
            transform=transform,
            name=f"CamVid {split} ({root})",
            hint=f". Expected layout:\n{LAYOUT}",
        )


def median_frequency_weights(root: str | Path, split: str = "train") -> list[float]:
    """Median-frequency class weights (Eigen & Fergus): ``median(freq) / freq[c]`` over the split's labels.

    ``freq[c]`` is the pixel count of class ``c`` over the total pixels of the images where ``c`` appears.
    Classes that never appear get weight 0.
    """
    n = len(CLASSES)
    counts = np.zeros(n, dtype=np.float64)
    image_pixels = np.zeros(n, dtype=np.float64)
    for _, mask_path in camvid_pairs(root, split):
        raw = read_mask(mask_path)
        hist = np.bincount(raw.ravel(), minlength=256)[:n].astype(np.float64)
        counts += hist
        image_pixels[hist > 0] += raw.size
    present = counts > 0
    freq = np.zeros(n)
    freq[present] = counts[present] / image_pixels[present]
    median = float(np.median(freq[present])) if present.any() else 0.0
    return [float(median / f) if f > 0 else 0.0 for f in freq]
