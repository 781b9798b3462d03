"""A teacher's stored soft labels: the ``.npy`` files of ``scripts/predict.py --outputs probs`` (one uint8
``(C, H, W)`` array ``round(255 p)`` per image, found by the image's file stem anywhere under the folder),
read beside each training pair and cropped, scaled and flipped with it (distillation's ``stored`` mode)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fcn.data.base import SegmentationDataset
from fcn.data.errors import DataError

MAKE_THEM = (
    "write them with python scripts/predict.py --checkpoint TEACHER.ckpt --input <the training images> "
    "--output DIR --outputs probs [--scales 0.75 1.0 1.25 --flip] and pass DIR/probs"
)


def read_soft_labels(path: str | Path, *, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    """The uint8 ``(num_classes, H, W)`` array stored at ``path``, checked against the image's ``size``."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"soft labels {path} cannot be read ({err}); {MAKE_THEM}") from err
    expected = (num_classes, *size)
    if array.dtype != np.uint8 or array.shape != expected:
        raise DataError(
            f"soft labels {path} are {array.dtype} {array.shape}, expected uint8 {expected} (the classes "
            f"of the data set at the image's size); {MAKE_THEM}"
        )
    return array


def index_soft_labels(folder: str | Path) -> dict[str, Path]:
    """``{image stem: .npy path}`` of every ``.npy`` under ``folder``; a stem found twice is an error."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"teacher_labels {root} is not a folder; {MAKE_THEM}")
    files = sorted(root.rglob("*.npy"))
    twice = sorted(stem for stem, n in Counter(p.stem for p in files).items() if n > 1)
    if twice:
        raise DataError(f"teacher_labels {root} holds {twice[:3]} more than once; keep one file per image")
    return {p.stem: p for p in files}


class SoftLabelled(Dataset):
    """``dataset``'s training pairs plus their stored soft labels: items ``(image, mask, soft)``, ``soft``
    the uint8 ``(C, h, w)`` probabilities transformed with the pair by ``dataset.transform`` (as masks:
    nearest, padding 255 where the mask is padded with the ignore index)."""

    def __init__(self, dataset: SegmentationDataset, folder: str | Path) -> None:
        if dataset.transform is None:
            raise ValueError("SoftLabelled needs a data set with a (training) transform")
        found = index_soft_labels(folder)
        missing = [image.name for image, _ in dataset.samples if image.stem not in found]
        if missing:
            raise DataError(
                f"teacher_labels {folder} has no soft labels for {len(missing)} of the {len(dataset)} "
                f"training frames, e.g. {missing[:3]}; {MAKE_THEM}"
            )
        self.dataset = dataset
        self.files = [found[image.stem] for image, _ in dataset.samples]
        self.folder = Path(folder)

    @property
    def transform(self) -> Any:  # seeded per loader worker (fcn.data.datamodule.seed_worker)
        return self.dataset.transform

    @property
    def samples(self) -> list[tuple[Path, Path]]:
        return self.dataset.samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"{self.dataset!r} with soft labels from {self.folder}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, mask = self.dataset.load(index)
        soft = read_soft_labels(
            self.files[index], num_classes=self.dataset.num_classes, size=(image.shape[0], image.shape[1])
        )
        out = self.transform(image=image, mask=mask, masks=list(soft))
        soft_out = torch.stack([torch.as_tensor(m) for m in out["masks"]])  # (C, h, w) uint8
        return out["image"], torch.as_tensor(out["mask"]).long(), soft_out
