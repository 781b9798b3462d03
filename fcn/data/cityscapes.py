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

# labelId: (name, trainId) for every official label with a labelId 0..33 (license plate, -1, never
# appears in labelIds PNGs).
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
TRAIN_ID_TO_LABEL_ID = np.array([lid for lid, (_, t) in sorted(LABELS.items()) if t != 255], dtype=np.uint8)
LABEL_TYPES = ("labelIds", "labelTrainIds")
LAYOUT = """  ROOT/leftImg8bit/{train,val,test}/<city>/<name>_leftImg8bit.png
  ROOT/gtFine/{train,val,test}/<city>/<name>_gtFine_labelIds.png   (or _gtFine_labelTrainIds.png)"""


def cityscapes_table(label_type: str = "labelIds", ignore_index: int = 255) -> np.ndarray:
    """Raw label → train id for ``labelIds`` (the official table) or ``labelTrainIds`` files."""
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


def cityscapes_pairs(root: str | Path, split: str, label_type: str = "labelIds") -> list[tuple[Path, Path]]:
    root = Path(root)
    require_dir(root, what="Cityscapes root", layout=LAYOUT)
    img_dir = require_dir(
        root / "leftImg8bit" / split, what=f"Cityscapes image folder ({split})", layout=LAYOUT
    )
    gt_dir = require_dir(root / "gtFine" / split, what=f"Cityscapes label folder ({split})", layout=LAYOUT)
    suffix = f"_gtFine_{label_type}.png"
    images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
    masks = sorted(gt_dir.glob(f"*/*{suffix}"))

    # compare by "<city>/<frame>" so that files of different cities never pair up
    renamed = [p.with_name(f"{p.parent.name}__{p.name[: -len('_leftImg8bit.png')]}.png") for p in images]
    lookup = dict(zip(renamed, images))
    pairs = pair_by_stem(
        renamed,
        masks,
        mask_stem=lambda p: f"{p.parent.name}__{p.name[: -len(suffix)]}",
        where=f"Cityscapes {root} split {split!r} ({label_type})",
    )
    return [(lookup[img], mask) for img, mask in pairs]


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations, 19 train classes, everything else ignored."""

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
        super().__init__(
            cityscapes_pairs(root, split, label_type),
            classes=CLASSES,
            palette=PALETTE,
            lut=cityscapes_table(label_type, ignore_index),
            ignore_index=ignore_index,
            unknown_labels=unknown_labels,
            transform=transform,
            name=f"Cityscapes {split}",
        )
