"""Cityscapes, official layout: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
``gtFine/{split}/{city}/*_gtFine_labelIds.png`` (or ``*_gtFine_labelTrainIds.png``).

The labelId → trainId table below is the official one (cityscapesScripts ``labels.py``): 19 train classes,
everything else 255.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fcn.data.base import SegmentationDataset, label_table, pair_by_stem, require_dir
from fcn.data.errors import DataError

# labelId: (name, trainId) for every official label. Officially "license plate" (labelId -1) has trainId
# -1; it never appears in labelIds PNGs (its pixels are labelled car) and is ignored here like the rest.
LABELS: dict[int, tuple[str, int]] = {
    0: ("unlabeled", 255),
    1: ("ego vehicle", 255),
    2: ("rectification border", 255),
    3: ("out of roi", 255),
    4: ("static", 255),
    5: ("dynamic", 255),
    6: ("ground", 255),
    7: ("road", 0),
    8: ("sidewalk", 1),
    9: ("parking", 255),
    10: ("rail track", 255),
    11: ("building", 2),
    12: ("wall", 3),
    13: ("fence", 4),
    14: ("guard rail", 255),
    15: ("bridge", 255),
    16: ("tunnel", 255),
    17: ("pole", 5),
    18: ("polegroup", 255),
    19: ("traffic light", 6),
    20: ("traffic sign", 7),
    21: ("vegetation", 8),
    22: ("terrain", 9),
    23: ("sky", 10),
    24: ("person", 11),
    25: ("rider", 12),
    26: ("car", 13),
    27: ("truck", 14),
    28: ("bus", 15),
    29: ("caravan", 255),
    30: ("trailer", 255),
    31: ("train", 16),
    32: ("motorcycle", 17),
    33: ("bicycle", 18),
    -1: ("license plate", 255),
}
CLASSES = tuple(name for _, (name, t) in sorted(LABELS.items(), key=lambda kv: kv[1][1]) if t != 255)
PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)
# trainId → labelId, for writing predictions in the official evaluation server's format.
TRAIN_ID_TO_LABEL_ID = np.array(
    [min(lid for lid, (_, t) in LABELS.items() if t == train_id) for train_id in range(len(CLASSES))],
    dtype=np.uint8,
)
LABEL_TYPES = ("labelIds", "labelTrainIds", "auto")
IMAGE_SUFFIX = "_leftImg8bit.png"
LAYOUT = """  ROOT/leftImg8bit/{train,val,test}/<city>/<name>_leftImg8bit.png
  ROOT/gtFine/{train,val,test}/<city>/<name>_gtFine_labelIds.png   (or _gtFine_labelTrainIds.png)"""


def cityscapes_table(label_type: str = "labelIds", ignore_index: int = 255) -> np.ndarray:
    """Raw label → train id (int64 table of 256) for ``labelIds`` (the official table) or
    ``labelTrainIds`` files (0–18 kept, 255 → ``ignore_index``)."""
    if label_type == "labelIds":
        return label_table({lid: (ignore_index if t == 255 else t) for lid, (_, t) in LABELS.items()})
    if label_type == "labelTrainIds":
        return label_table({**{i: i for i in range(len(CLASSES))}, 255: ignore_index})
    raise DataError(f"label_type must be one of {LABEL_TYPES}, got {label_type!r}")


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map predicted train ids (0–18) to official labelIds; anything else becomes 0 (unlabeled)."""
    out = np.zeros(train_ids.shape, dtype=np.uint8)
    valid = (train_ids >= 0) & (train_ids < len(TRAIN_ID_TO_LABEL_ID))
    out[valid] = TRAIN_ID_TO_LABEL_ID[train_ids[valid]]
    return out


def _frame(path: Path, suffix: str) -> str:
    """``<city>/<frame>`` of a Cityscapes file, so that frames of different cities never pair up."""
    return f"{path.parent.name}/{path.name[: -len(suffix)]}"


def resolve_label_type(root: str | Path, split: str, label_type: str = "labelIds") -> str:
    """``auto`` becomes ``labelTrainIds`` when every frame of the split has one, else ``labelIds``."""
    if label_type not in LABEL_TYPES:
        raise DataError(f"label_type must be one of {LABEL_TYPES}, got {label_type!r}")
    if label_type != "auto":
        return label_type
    gt = Path(root) / "gtFine" / split
    n_ids = sum(1 for _ in gt.glob("*/*_gtFine_labelIds.png"))
    n_train = sum(1 for _ in gt.glob("*/*_gtFine_labelTrainIds.png"))
    return "labelTrainIds" if n_train and n_train >= n_ids else "labelIds"


def cityscapes_pairs(root: str | Path, split: str, label_type: str = "labelIds") -> list[tuple[Path, Path]]:
    """``(leftImg8bit, gtFine label)`` paths of one split, matched by ``<city>/<frame>``."""
    root = Path(root)
    require_dir(root, what="Cityscapes root", layout=LAYOUT)
    img_dir = require_dir(
        root / "leftImg8bit" / split, what=f"Cityscapes image folder ({split})", layout=LAYOUT
    )
    gt_dir = require_dir(root / "gtFine" / split, what=f"Cityscapes label folder ({split})", layout=LAYOUT)
    label_type = resolve_label_type(root, split, label_type)
    suffix = f"_gtFine_{label_type}.png"
    return pair_by_stem(
        sorted(img_dir.glob(f"*/*{IMAGE_SUFFIX}")),
        sorted(gt_dir.glob(f"*/*{suffix}")),
        image_stem=lambda p: _frame(p, IMAGE_SUFFIX),
        mask_stem=lambda p: _frame(p, suffix),
        where=f"Cityscapes {root} split {split!r} ({label_type})",
    )


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations, 19 train classes, everything else ignored.

    ``label_type``: ``labelIds`` (default, mapped with the official table), ``labelTrainIds`` (files made by
    cityscapesScripts' ``createTrainIdLabelImgs``) or ``auto`` (trainIds when every frame has them).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        transform: Callable[..., dict[str, Any]] | None = None,
        label_type: str = "labelIds",
        ignore_index: int = 255,
        unknown_labels: str = "error",
    ) -> None:
        self.label_type = resolve_label_type(root, split, label_type) if Path(root).is_dir() else label_type
        super().__init__(
            cityscapes_pairs(root, split, self.label_type),
            classes=CLASSES,
            palette=PALETTE,
            lut=cityscapes_table(self.label_type, ignore_index),
            ignore_index=ignore_index,
            unknown_labels=unknown_labels,
            transform=transform,
            name=f"Cityscapes {split} ({root})",
            hint=f". Expected layout:\n{LAYOUT}",
        )
