"""The shared dataset: file pairs → ``(image, mask)`` through an explicit label table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fcn.data.errors import DataError
from fcn.data.io import read_image, read_mask

UNKNOWN = -1  # marks raw label values that are not in a data set's table
UNKNOWN_LABELS = ("error", "ignore")


def label_table(mapping: dict[int, int], *, size: int = 256) -> np.ndarray:
    """A lookup table ``raw value -> train id`` with :data:`UNKNOWN` for every value not in ``mapping``."""
    lut = np.full(size, UNKNOWN, dtype=np.int64)
    for raw, train_id in mapping.items():
        lut[raw] = train_id
    return lut


def pair_by_stem(
    images: Sequence[Path], masks: Sequence[Path], *, mask_stem: Callable[[Path], str], where: str
) -> list[tuple[Path, Path]]:
    """Match images and labels by stem; unmatched files on either side raise one :class:`DataError`."""
    by_stem = {mask_stem(m): m for m in masks}
    pairs, lonely = [], []
    for img in images:
        key = img.stem
        if key in by_stem:
            pairs.append((img, by_stem.pop(key)))
        else:
            lonely.append(img)
    problems = []
    if lonely:
        problems.append(f"{len(lonely)} image(s) without a label, e.g. {[str(p) for p in lonely[:5]]}")
    if by_stem:
        extra = sorted(by_stem.values())
        problems.append(f"{len(extra)} label(s) without an image, e.g. {[str(p) for p in extra[:5]]}")
    if problems:
        raise DataError(f"{where}: " + "; ".join(problems) + ". Add the missing files or remove the strays.")
    return pairs


class SegmentationDataset(Dataset):
    """Map file pairs to ``(image, mask)``.

    Without a transform: ``image`` uint8 ``(H, W, 3)`` RGB, ``mask`` int64 ``(H, W)`` train ids with
    ``ignore_index`` for void. With an albumentations transform (see :mod:`fcn.data.transforms`):
    a float tensor ``(3, H, W)`` and an int64 tensor ``(H, W)``.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, Path]],
        *,
        classes: Sequence[str],
        palette: Sequence[Sequence[int]],
        lut: np.ndarray,
        ignore_index: int = 255,
        unknown_labels: str = "error",
        transform: Callable[..., dict[str, Any]] | None = None,
        name: str = "dataset",
    ) -> None:
        if unknown_labels not in UNKNOWN_LABELS:
            raise DataError(f"unknown_labels must be one of {UNKNOWN_LABELS}, got {unknown_labels!r}")
        if not samples:
            raise DataError(f"{name} is empty: no image/label pairs found")
        self.samples = list(samples)
        self.classes = tuple(classes)
        self.palette = tuple(tuple(int(v) for v in c) for c in palette)
        self.ignore_index = ignore_index
        self.unknown_labels = unknown_labels
        self.transform = transform
        self.name = name
        self._lut = np.array(lut, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def map_labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Raw label values → train ids through the table; unknown values raise or become ignore."""
        raw = raw.astype(np.int64, copy=False)
        inside = raw < len(self._lut)
        mapped = self._lut[np.where(inside, raw, 0)]
        unknown = (mapped == UNKNOWN) | ~inside
        if unknown.any():
            if self.unknown_labels == "error":
                values = np.unique(raw[unknown])[:10].tolist()
                known = np.flatnonzero(self._lut != UNKNOWN).tolist()
                raise DataError(
                    f"label file {path} has values {values} that are not in the {self.name} class table "
                    f"(known values: {known}); fix the labels, or set unknown_labels='ignore' "
                    "(--data.unknown_labels ignore) to map them to the ignore index"
                )
            mapped = np.where(unknown, self.ignore_index, mapped)
        return mapped

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw pair: RGB uint8 image and int64 train-id mask, checked for equal size."""
        img_path, mask_path = self.samples[index]
        image = read_image(img_path)
        raw = read_mask(mask_path)
        if raw.shape[:2] != image.shape[:2]:
            raise DataError(
                f"image {img_path} is {image.shape[0]}x{image.shape[1]} but its label {mask_path} is "
                f"{raw.shape[0]}x{raw.shape[1]}; a pair must have the same size (re-export or remove it)"
            )
        return image, self.map_labels(raw, mask_path)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, mask = self.load(index)
        if self.transform is None:
            return image, mask
        out = self.transform(image=image, mask=mask)
        m = out["mask"]
        return out["image"], (
            m.long() if isinstance(m, torch.Tensor) else torch.as_tensor(m, dtype=torch.long)
        )


def require_dir(path: Path, *, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist. Expected layout:\n{layout}")
    return path
