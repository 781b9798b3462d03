"""Your own data: ``images/`` + ``masks/`` matched by file stem, classes from ``classes.yaml``; and an
unlabeled image folder (recursive) for inference and semi-supervised distillation.

``classes.yaml``::

    classes: [road, sidewalk, building, ...]   # train ids 0..C-1 in this order
    palette: [[128, 64, 128], ...]             # optional, one RGB per class
    ignore_index: 255                          # optional, the void value in the masks

A split is a sub-folder (``ROOT/<split>/images``, ``ROOT/<split>/masks``) or, if that does not exist,
the root itself (``ROOT/images``, ``ROOT/masks``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from fcn.data.base import SegmentationDataset, label_table, pair_by_stem, require_dir
from fcn.data.errors import DataError
from fcn.data.io import is_image_file, read_image

LAYOUT = """  ROOT/classes.yaml                      (classes: [...], optional palette / ignore_index)
  ROOT/<split>/images/*.png|jpg          ROOT/<split>/masks/<same stem>.png   (or ROOT/images, ROOT/masks)"""


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """Distinct colours (golden-ratio hues) for classes without a palette."""
    import colorsys

    return [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95))
        for i in range(n)
    ]


def read_class_file(path: str | Path) -> dict[str, Any]:
    """Parse and validate ``classes.yaml``; returns ``{"classes", "palette", "ignore_index"}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class file {path} does not exist; create it with `classes: [name, ...]`")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"class file {path} is not valid YAML ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
        raise DataError(f"class file {path} needs a non-empty list `classes: [name, ...]`")
    classes = [str(c) for c in data["classes"]]
    palette = data.get("palette") or default_palette(len(classes))
    if len(palette) != len(classes) or any(len(c) != 3 for c in palette):
        raise DataError(f"class file {path}: palette needs one [r, g, b] per class ({len(classes)})")
    ignore_index = int(data.get("ignore_index", 255))
    if 0 <= ignore_index < len(classes):
        raise DataError(f"class file {path}: ignore_index {ignore_index} collides with a class id")
    return {"classes": classes, "palette": [list(map(int, c)) for c in palette], "ignore_index": ignore_index}


def folder_pairs(root: str | Path, split: str | None) -> list[tuple[Path, Path]]:
    root = require_dir(Path(root), what="data root", layout=LAYOUT)
    base = root / split if split and (root / split).is_dir() else root
    if split and base == root and not (root / "images").is_dir():
        raise DataError(f"split folder {root / split} does not exist. Expected layout:\n{LAYOUT}")
    img_dir = require_dir(base / "images", what="image folder", layout=LAYOUT)
    mask_dir = require_dir(base / "masks", what="mask folder", layout=LAYOUT)
    images = sorted(p for p in img_dir.rglob("*") if is_image_file(p))
    masks = sorted(p for p in mask_dir.rglob("*") if p.suffix.lower() in (".png", ".tif", ".tiff", ".bmp"))
    return pair_by_stem(images, masks, mask_stem=lambda p: p.stem, where=f"folder data set {base}")


class FolderDataset(SegmentationDataset):
    """``images/`` + ``masks/`` pairs with class names from ``classes.yaml`` (see the module doc)."""

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        *,
        transform: Callable[..., dict[str, Any]] | None = None,
        classes_file: str | Path | None = None,
        ignore_index: int | None = None,
        unknown_labels: str = "error",
    ) -> None:
        meta = read_class_file(classes_file or Path(root) / "classes.yaml")
        ignore = meta["ignore_index"] if ignore_index is None else ignore_index
        n = len(meta["classes"])
        table = {i: i for i in range(n)}
        if 0 <= ignore < 65536:
            table[ignore] = ignore
        super().__init__(
            folder_pairs(root, split),
            classes=meta["classes"],
            palette=meta["palette"],
            lut=label_table(table, size=max(256, ignore + 1)),
            ignore_index=ignore,
            unknown_labels=unknown_labels,
            transform=transform,
            name=f"folder {root}",
        )


class UnlabeledImageFolder(Dataset):
    """Every image below ``root`` (recursive, common extensions); items are ``(image, mask)`` with a mask
    that is all ``ignore_index``, so batches collate like labelled ones. ``relative_paths`` keeps the
    position of each file below ``root``."""

    def __init__(
        self,
        root: str | Path,
        *,
        transform: Callable[..., dict[str, Any]] | None = None,
        ignore_index: int = 255,
    ) -> None:
        self.root = require_dir(Path(root), what="unlabeled image folder", layout="  ROOT/**/*.png|jpg|...")
        self.paths = sorted(p for p in self.root.rglob("*") if p.is_file() and is_image_file(p))
        if not self.paths:
            raise DataError(f"unlabeled image folder {self.root} holds no images (png, jpg, bmp, tif, webp)")
        self.relative_paths = [p.relative_to(self.root) for p in self.paths]
        self.transform = transform
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = read_image(self.paths[index])
        mask = np.full(image.shape[:2], self.ignore_index, dtype=np.int64)
        if self.transform is None:
            return image, mask
        out = self.transform(image=image, mask=mask)
        return out["image"], torch.as_tensor(out["mask"]).long()
