"""CamVid in the SegNet layout: ``{split}/*.png`` images and ``{split}annot/*.png`` labels 0–10, 11 = void."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from fcn.data.base import SegmentationDataset, Transform, label_table, pair_by_stem, require_dir
from fcn.data.errors import DataError
from fcn.data.io import MASK_EXTENSIONS, list_images, read_mask, write_bytes_atomic

# class -> the SegNet tutorial's CamVid colour, in train-id order
_COLOURS = {
    "Sky": (128, 128, 128),
    "Building": (128, 0, 0),
    "Pole": (192, 192, 128),
    "Road": (128, 64, 128),
    "Pavement": (60, 40, 222),
    "Tree": (128, 128, 0),
    "SignSymbol": (192, 128, 128),
    "Fence": (64, 64, 128),
    "Car": (64, 0, 128),
    "Pedestrian": (64, 64, 0),
    "Bicyclist": (0, 128, 192),
}
CLASSES, PALETTE = tuple(_COLOURS), tuple(_COLOURS.values())
VOID = 11
LAYOUT = """  ROOT/train/*.png   ROOT/trainannot/*.png   (labels: 0-10 classes, 11 void)
  ROOT/val/*.png     ROOT/valannot/*.png
  ROOT/test/*.png    ROOT/testannot/*.png"""


def camvid_table(ignore_index: int = 255) -> np.ndarray:
    """Raw CamVid label -> train id: 0-10 unchanged, 11 (void) -> ``ignore_index``."""
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
        where=f"CamVid {root} split {split!r}",
    )


class CamVid(SegmentationDataset):
    """CamVid (SegNet layout), 11 classes, void ignored."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        transform: Transform | None = None,
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


def median_frequency_weights(
    root: str | Path, split: str = "train", *, frames: Collection[str] | None = None
) -> list[float]:
    """Median-frequency class weights (Eigen & Fergus) ``median(freq) / freq[c]`` over the split's labels
    (only the image names in ``frames`` when given). ``freq[c]``: pixels of class ``c`` over the pixels of
    the images where it appears; absent classes get 0."""
    n = len(CLASSES)
    counts, image_pixels = np.zeros((2, n), dtype=np.float64)
    for image_path, mask_path in camvid_pairs(root, split):
        if frames is not None and image_path.name not in frames:
            continue
        raw = read_mask(mask_path)
        hist = np.bincount(raw.ravel(), minlength=256)[:n].astype(np.float64)
        counts += hist
        image_pixels[hist > 0] += raw.size
    present = counts > 0
    freq = np.divide(counts, image_pixels, out=np.zeros(n), where=present)
    median = float(np.median(freq[present])) if present.any() else 0.0
    return [float(median / f) if f > 0 else 0.0 for f in freq]


# -- labelled subsets (the label-scarce protocol of configs/camvid_cpu/) -----------------------------------
def sequence_of(name: str) -> str:
    """The video sequence of a frame: its stem before the first ``_`` (``0016E5_07959.png`` -> ``0016E5``)."""
    return Path(name).stem.split("_", 1)[0]


def spread_subset(names: Sequence[str], fraction: float = 0.25) -> list[str]:
    """``round(fraction * len(names))`` frames spread evenly over the sequences and over time, sorted.

    Each sequence gets ``fraction`` of its frames (remainders by largest remainder, ties by name); of
    its ``n`` frames sorted by name, ``k`` are the centres of ``k`` equal spans (every 4th for a quarter).
    """
    if not 0 < fraction <= 1:
        raise DataError(f"fraction must be in (0, 1], got {fraction}")
    groups: dict[str, list[str]] = {}
    for name in sorted(set(names)):
        groups.setdefault(sequence_of(name), []).append(name)
    if not groups:
        raise DataError("no frames to choose a subset from")
    total = round(fraction * sum(len(g) for g in groups.values()))
    quota = {seq: math.floor(fraction * len(g)) for seq, g in groups.items()}
    by_remainder = sorted(groups, key=lambda s: (-(fraction * len(groups[s]) - quota[s]), s))
    for seq in by_remainder[: max(0, total - sum(quota.values()))]:
        quota[seq] += 1
    chosen = []
    for seq, frames in groups.items():
        n, k = len(frames), quota[seq]
        chosen += [frames[math.floor((i + 0.5) * n / k)] for i in range(k)]
    return sorted(chosen)


def write_subset_list(
    root: str | Path, output: str | Path, *, split: str = "train", fraction: float = 0.25
) -> list[str]:
    """Write :func:`spread_subset` of a split's image names to ``output``, one a line (a ``--data.train_list``
    file); returns the names. The shipped quarter list is::

        python -c "from fcn.data.camvid import write_subset_list as w; \\
            w('data/camvid', 'configs/camvid_cpu/train_quarter.txt')"
    """
    names = spread_subset([image.name for image, _ in camvid_pairs(root, split)], fraction)
    write_bytes_atomic(output, "".join(f"{name}\n" for name in names).encode())
    return names
