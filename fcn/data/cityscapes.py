"""Cityscapes, official layout: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
``gtFine/{split}/{city}/*_gtFine_labelIds.png`` (or ``*_gtFine_labelTrainIds.png``); 19 train classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fcn.data.base import SegmentationDataset, Transform, label_table, pair_by_stem, require_dir
from fcn.data.errors import DataError

# labelId: (name, trainId, colour) of every official label (cityscapesScripts labels.py); trainId 255 is
# ignored. "license plate" (officially trainId -1) never appears in labelIds PNGs (its pixels are car).
LABELS: dict[int, tuple[str, int, tuple[int, int, int] | None]] = {
    0: ("unlabeled", 255, None),
    1: ("ego vehicle", 255, None),
    2: ("rectification border", 255, None),
    3: ("out of roi", 255, None),
    4: ("static", 255, None),
    5: ("dynamic", 255, None),
    6: ("ground", 255, None),
    7: ("road", 0, (128, 64, 128)),
    8: ("sidewalk", 1, (244, 35, 232)),
    9: ("parking", 255, None),
    10: ("rail track", 255, None),
    11: ("building", 2, (70, 70, 70)),
    12: ("wall", 3, (102, 102, 156)),
    13: ("fence", 4, (190, 153, 153)),
    14: ("guard rail", 255, None),
    15: ("bridge", 255, None),
    16: ("tunnel", 255, None),
    17: ("pole", 5, (153, 153, 153)),
    18: ("polegroup", 255, None),
    19: ("traffic light", 6, (250, 170, 30)),
    20: ("traffic sign", 7, (220, 220, 0)),
    21: ("vegetation", 8, (107, 142, 35)),
    22: ("terrain", 9, (152, 251, 152)),
    23: ("sky", 10, (70, 130, 180)),
    24: ("person", 11, (220, 20, 60)),
    25: ("rider", 12, (255, 0, 0)),
    26: ("car", 13, (0, 0, 142)),
    27: ("truck", 14, (0, 0, 70)),
    28: ("bus", 15, (0, 60, 100)),
    29: ("caravan", 255, None),
    30: ("trailer", 255, None),
    31: ("train", 16, (0, 80, 100)),
    32: ("motorcycle", 17, (0, 0, 230)),
    33: ("bicycle", 18, (119, 11, 32)),
    -1: ("license plate", 255, None),
}
_TRAIN = sorted((t, lid, name, colour) for lid, (name, t, colour) in LABELS.items() if t != 255)
CLASSES = tuple(name for _, _, name, _ in _TRAIN)
PALETTE = tuple(colour for *_, colour in _TRAIN)
# trainId -> labelId, for writing predictions in the official evaluation server's format
TRAIN_ID_TO_LABEL_ID = np.array([lid for _, lid, _, _ in _TRAIN], dtype=np.uint8)
LABEL_TYPES = ("labelIds", "labelTrainIds", "auto")
IMAGE_SUFFIX = "_leftImg8bit.png"
LAYOUT = """  ROOT/leftImg8bit/{train,val,test}/<city>/<name>_leftImg8bit.png
  ROOT/gtFine/{train,val,test}/<city>/<name>_gtFine_labelIds.png   (or _gtFine_labelTrainIds.png)"""


def cityscapes_table(label_type: str = "labelIds", ignore_index: int = 255) -> np.ndarray:
    """Raw label -> train id for ``labelIds`` (the official table) or ``labelTrainIds`` files (0-18 kept,
    255 -> ``ignore_index``)."""
    if label_type == "labelIds":
        return label_table({lid: (ignore_index if t == 255 else t) for lid, (_, t, _) in LABELS.items()})
    if label_type == "labelTrainIds":
        return label_table({**{i: i for i in range(len(CLASSES))}, 255: ignore_index})
    raise DataError(f"label_type must be one of {LABEL_TYPES}, got {label_type!r}")


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Predicted train ids (0-18) -> official labelIds; anything else becomes 0 (unlabeled)."""
    out = np.zeros(train_ids.shape, dtype=np.uint8)
    valid = (train_ids >= 0) & (train_ids < len(TRAIN_ID_TO_LABEL_ID))
    out[valid] = TRAIN_ID_TO_LABEL_ID[train_ids[valid]]
    return out


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
        transform: Transform | None = None,
        label_type: str = "labelIds",
        ignore_index: int = 255,
        unknown_labels: str = "error",
    ) -> None:
        root = require_dir(Path(root), what="Cityscapes root", layout=LAYOUT)
        img_dir, gt_dir = (
            require_dir(root / sub / split, what=f"Cityscapes {sub} folder ({split})", layout=LAYOUT)
            for sub in ("leftImg8bit", "gtFine")
        )
        self.label_type = resolve_label_type(root, split, label_type)
        suffix = f"_gtFine_{self.label_type}.png"
        pairs = pair_by_stem(  # by <city>/<frame>: frames of different cities never pair up
            sorted(img_dir.glob(f"*/*{IMAGE_SUFFIX}")),
            sorted(gt_dir.glob(f"*/*{suffix}")),
            image_stem=lambda p: f"{p.parent.name}/{p.name.removesuffix(IMAGE_SUFFIX)}",
            mask_stem=lambda p: f"{p.parent.name}/{p.name.removesuffix(suffix)}",
            where=f"Cityscapes {root} split {split!r} ({self.label_type})",
        )
        super().__init__(
            pairs,
            classes=CLASSES,
            palette=PALETTE,
            lut=cityscapes_table(self.label_type, ignore_index),
            ignore_index=ignore_index,
            unknown_labels=unknown_labels,
            transform=transform,
            name=f"Cityscapes {split} ({root})",
            hint=f". Expected layout:\n{LAYOUT}",
        )
