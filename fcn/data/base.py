"""The shared dataset: file pairs -> ``(image, mask)`` through an explicit label table."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from fcn.data.errors import DataError
from fcn.data.io import read_image, read_mask

UNKNOWN = int(np.iinfo(np.int64).min)  # marks raw values not in a table (-1 may be a valid ignore index)
UNKNOWN_LABELS = ("error", "ignore")
Transform = Callable[..., dict[str, Any]]  # albumentations style: transform(image=..., mask=...) -> dict


def label_table(mapping: dict[int, int], *, size: int = 256) -> np.ndarray:
    """Int64 lookup table ``raw value -> train id``, :data:`UNKNOWN` where ``mapping`` has none (negative raw
    values never occur in label files and are skipped)."""
    lut = np.full(max(size, max((k + 1 for k in mapping), default=0)), UNKNOWN, dtype=np.int64)
    for raw, train_id in mapping.items():
        if raw >= 0:
            lut[raw] = train_id
    return lut


def pair_by_stem(
    images: Sequence[Path],
    masks: Sequence[Path],
    *,
    where: str,
    image_stem: Callable[[Path], str] = lambda p: p.stem,
    mask_stem: Callable[[Path], str] = lambda p: p.stem,
) -> list[tuple[Path, Path]]:
    """``(image, label)`` pairs in the images' order, matched by key (the file stem by default); unmatched
    or ambiguous files raise one :class:`DataError` listing a few of them."""
    by_key: dict[str, Path] = {}  # masks
    image_keys: dict[str, Path] = {}
    duplicates = []
    for files, stem, keys in ((masks, mask_stem, by_key), (images, image_stem, image_keys)):
        for path in files:
            if (key := stem(path)) in keys:
                duplicates.append(f"{keys[key]} / {path}")
            keys[key] = path
    problems = [f"{len(duplicates)} name(s) used twice, e.g. {duplicates[:3]}"] if duplicates else []
    lonely = [str(p) for key, p in image_keys.items() if key not in by_key]
    if lonely:
        problems.append(f"{len(lonely)} image(s) without a label, e.g. {lonely[:5]}")
    extra = sorted(p for key, p in by_key.items() if key not in image_keys)
    if extra:
        problems.append(f"{len(extra)} label(s) without an image, e.g. {[str(p) for p in extra[:5]]}")
    if problems:
        raise DataError(
            f"{where}: " + "; ".join(problems) + ". Add the missing files, or rename / remove the strays."
        )
    return [(img, by_key[key]) for key, img in image_keys.items()]


class SegmentationDataset(Dataset):
    """File pairs -> ``(image, mask)`` as docs/DESIGN.md's dataset contract says; raw label values outside
    the table ``lut`` (a :func:`label_table` or its mapping) raise :class:`DataError` or, with
    ``unknown_labels="ignore"``, become ``ignore_index``."""

    def __init__(
        self,
        samples: Sequence[tuple[Path, Path]],
        *,
        classes: Sequence[str],
        palette: Sequence[Sequence[int]],
        lut: np.ndarray | Mapping[int, int],
        ignore_index: int = 255,
        unknown_labels: str = "error",
        transform: Transform | None = None,
        name: str = "dataset",
        hint: str = "",
    ) -> None:
        if unknown_labels not in UNKNOWN_LABELS:
            raise DataError(f"unknown_labels must be one of {UNKNOWN_LABELS}, got {unknown_labels!r}")
        if not samples:
            raise DataError(f"{name} is empty: no image/label pairs found{hint}")
        self.samples = list(samples)
        self.classes = tuple(classes)
        self.palette = tuple(tuple(int(v) for v in c) for c in palette)
        self.ignore_index = ignore_index
        self.unknown_labels = unknown_labels
        self.transform = transform
        self.name = name
        self._lut = lut = label_table(lut) if isinstance(lut, Mapping) else np.asarray(lut, dtype=np.int64)
        known = lut != UNKNOWN
        # masks stay uint8 through augmentation when every train id fits (faster, 8x less memory)
        values = np.append(lut[known], ignore_index)
        self._dtype = np.uint8 if values.min() >= 0 and values.max() <= 255 else np.int32
        if self._dtype == np.uint8 and len(lut) >= 256:
            self._lut8 = np.where(known, lut, ignore_index)[:256].astype(np.uint8)
            self._unknown8 = (~known[:256]).astype(np.uint8)
        else:
            self._lut8 = None

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images, {self.num_classes} classes)"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _unknown_error(self, raw: np.ndarray, unknown: np.ndarray, path: Path) -> DataError:
        values = np.unique(raw[unknown])
        known = np.flatnonzero(self._lut != UNKNOWN).tolist()
        shown = values[:10].tolist() + (["..."] if len(values) > 10 else [])
        return DataError(
            f"label file {path} has values {shown} that are not in the {self.name} class table "
            f"(known values: {known}); fix the labels, or map them to the ignore index with "
            "unknown_labels='ignore' (train.py: --data.unknown_labels ignore; "
            "evaluate.py: --unknown-labels ignore)"
        )

    def map_labels(self, raw: np.ndarray, path: Path | str = "?") -> np.ndarray:
        """Raw label values -> train ids (uint8 when they fit, else int32) through the table."""
        if raw.dtype == np.uint8 and self._lut8 is not None:
            if self.unknown_labels == "error" and cv2.countNonZero(cv2.LUT(raw, self._unknown8)):
                raise self._unknown_error(raw, self._unknown8[raw].astype(bool), path)
            return cv2.LUT(raw, self._lut8)  # unknown values already map to ignore_index
        raw = raw.astype(np.int64, copy=False)
        inside = (raw >= 0) & (raw < len(self._lut))
        mapped = self._lut[np.where(inside, raw, 0)]
        unknown = (mapped == UNKNOWN) | ~inside
        if unknown.any():
            if self.unknown_labels == "error":
                raise self._unknown_error(raw, unknown, path)
            mapped[unknown] = self.ignore_index
        return mapped.astype(self._dtype)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 image and train-id mask (uint8 or int32) of a pair, checked for equal size."""
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
        return apply_transform(self.transform, *self.load(index))


def apply_transform(transform: Transform | None, image: np.ndarray, mask: np.ndarray) -> Any:
    """``(image, int64 mask)`` arrays without a transform, else the transformed image and int64 mask."""
    if transform is None:
        return image, mask.astype(np.int64)
    out = transform(image=image, mask=mask)
    return out["image"], torch.as_tensor(out["mask"]).long()


def require_dir(path: Path, *, what: str, layout: str) -> Path:
    """``path`` if it is a folder, else a :class:`DataError` showing the expected layout."""
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise DataError(f"{what} {path} {state}. Expected layout:\n{layout}")
    return path
