"""Your own data: ``images/`` + ``masks/`` matched by path, classes from ``classes.yaml`` (``classes:
[road, ...]`` in train-id order, optional ``palette: [[r, g, b], ...]`` and ``ignore_index: 255``); a split
is ``ROOT/<split>/`` or, without one, ``ROOT`` itself. And an unlabeled image folder (recursive) for
inference and semi-supervised distillation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch.utils.data import Dataset

from fcn.data.base import SegmentationDataset, Transform, apply_transform, pair_by_stem, require_dir
from fcn.data.errors import DataError
from fcn.data.io import IMAGE_EXTENSIONS, MASK_EXTENSIONS, list_images, read_image
from fcn.palette import default_palette

LAYOUT = """  ROOT/classes.yaml                      (classes: [...], optional palette / ignore_index)
  ROOT/<split>/images/*.png|jpg          ROOT/<split>/masks/<same stem>.png   (or ROOT/images, ROOT/masks)"""

UNLABELED_LAYOUT = "  ROOT/**/*.png|jpg|jpeg|bmp|tif|tiff|webp   (any depth, any letter case)"


def read_class_file(path: str | Path) -> dict[str, Any]:
    """Parse and validate ``classes.yaml``; returns ``{"classes", "palette", "ignore_index"}``."""
    path = Path(path)
    fix = "write it as `classes: [name, ...]` (optional `palette: [[r, g, b], ...]`, `ignore_index: 255`)"
    if not path.is_file():
        raise DataError(f"class file {path} does not exist; {fix}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DataError(f"class file {path} is not valid YAML ({err}); {fix}") from err
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
        raise DataError(f"class file {path} needs a non-empty list of class names; {fix}")
    classes = [str(c) for c in data["classes"]]
    if len(set(classes)) != len(classes):
        raise DataError(f"class file {path} lists a class name twice: {classes}")
    try:
        palette = [[int(v) for v in c] for c in data.get("palette") or default_palette(len(classes))]
    except (TypeError, ValueError):
        palette = []  # not integer triples
    if len(palette) != len(classes) or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in palette):
        raise DataError(
            f"class file {path}: palette needs one [r, g, b] (ints 0-255) per class, {len(classes)} in all"
        )
    try:
        ignore_index = int(data.get("ignore_index", 255))
    except (TypeError, ValueError) as err:
        raise DataError(f"class file {path}: ignore_index must be an integer") from err
    if 0 <= ignore_index < len(classes):
        raise DataError(f"class file {path}: ignore_index {ignore_index} collides with a class id")
    return {"classes": classes, "palette": palette, "ignore_index": ignore_index}


class FolderDataset(SegmentationDataset):
    """``images/`` + ``masks/`` pairs: mask value ``i`` is ``classes[i]`` of ``classes.yaml``;
    ``ignore_index`` (the YAML's unless given) marks void."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        *,
        transform: Transform | None = None,
        classes_file: str | Path | None = None,
        ignore_index: int | None = None,
        unknown_labels: str = "error",
    ) -> None:
        meta = read_class_file(classes_file or Path(root) / "classes.yaml")
        ignore = meta["ignore_index"] if ignore_index is None else int(ignore_index)
        n = len(meta["classes"])
        if 0 <= ignore < n:
            raise DataError(f"ignore_index {ignore} collides with class id {ignore} of {n} classes")
        root = require_dir(Path(root), what="data root", layout=LAYOUT)
        base = root / split if split and (root / split).is_dir() else root
        if split and base == root and not (root / "images").is_dir():
            raise DataError(f"split folder {root / split} does not exist. Expected layout:\n{LAYOUT}")
        img_dir = require_dir(base / "images", what="image folder", layout=LAYOUT)
        mask_dir = require_dir(base / "masks", what="mask folder", layout=LAYOUT)
        pairs = pair_by_stem(  # by the path below images/ and masks/ without extension: a/b.jpg with a/b.png
            list_images(img_dir, recursive=True),
            list_images(mask_dir, recursive=True, extensions=MASK_EXTENSIONS),
            image_stem=lambda p: p.relative_to(img_dir).with_suffix("").as_posix(),
            mask_stem=lambda p: p.relative_to(mask_dir).with_suffix("").as_posix(),
            where=f"folder data set {base}",
        )
        super().__init__(
            pairs,
            classes=meta["classes"],
            palette=meta["palette"],
            lut={i: i for i in (*range(n), ignore) if i < 65536},  # ids as they are (masks: 16-bit)
            ignore_index=ignore,
            unknown_labels=unknown_labels,
            transform=transform,
            name=f"folder data set {root} ({split or 'all'})",
            hint=f". Expected layout:\n{LAYOUT}",
        )


class UnlabeledImageFolder(Dataset):
    """Every image below ``root`` (recursive, any letter case, hidden files skipped; or only ``paths``) as
    ``(image, mask)`` with an all-``ignore_index`` mask, so batches collate like labelled ones. ``paths``
    holds the files, ``relative_paths`` their place below ``root``."""

    def __init__(
        self,
        root: str | Path,
        *,
        transform: Transform | None = None,
        ignore_index: int = 255,
        paths: Sequence[Path] | None = None,
    ) -> None:
        self.root = require_dir(Path(root), what="unlabeled image folder", layout=UNLABELED_LAYOUT)
        self.paths = list_images(self.root, recursive=True) if paths is None else sorted(paths)
        if not self.paths:
            raise DataError(
                f"unlabeled image folder {self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "point it at a folder of images"
            )
        self.relative_paths = [p.relative_to(self.root) for p in self.paths]
        self.transform = transform
        self.ignore_index = ignore_index
        self._dtype = np.uint8 if 0 <= ignore_index <= 255 else np.int32

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"UnlabeledImageFolder({str(self.root)!r}, {len(self)} images)"

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = read_image(self.paths[index])
        mask = np.full(image.shape[:2], self.ignore_index, dtype=self._dtype)
        return apply_transform(self.transform, image, mask)
