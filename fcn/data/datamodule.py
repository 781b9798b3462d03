"""The LightningDataModule: data set choice, splits, loaders and the data description the model links to."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from fcn.data import camvid, cityscapes
from fcn.data.base import UNKNOWN_LABELS
from fcn.data.demo import make_demo_dataset
from fcn.data.errors import DataError
from fcn.data.folder import FolderDataset, UnlabeledImageFolder, read_class_file
from fcn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

DATASETS = ("demo", "camvid", "cityscapes", "folder")


def build_dataset(
    name: str, root: str | Path, split: str, *, transform: Any = None, **kwargs: Any
) -> Dataset:
    """``camvid`` / ``demo`` (CamVid layout), ``cityscapes`` or ``folder`` → a labelled data set."""
    if name in ("camvid", "demo"):
        return camvid.CamVid(root, split, transform=transform, **kwargs)
    if name == "cityscapes":
        return cityscapes.Cityscapes(root, split, transform=transform, **kwargs)
    if name == "folder":
        return FolderDataset(root, split, transform=transform, **kwargs)
    raise DataError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def seed_worker(worker_id: int) -> None:
    """Give every loader worker its own deterministic numpy / random / albumentations seed."""
    info = get_worker_info()
    seed = (info.seed if info is not None else torch.initial_seed()) % 2**32
    np.random.seed(seed)
    random.seed(seed)
    ds = info.dataset if info is not None else None
    transform = getattr(ds, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


class SegDataModule(L.LightningDataModule):
    """Loaders for one data set; exposes ``num_classes``, ``ignore_index``, ``class_names``, ``palette``,
    ``mean``, ``std`` (and ``class_weights``) right after construction, for linking into the model.

    Args:
        dataset: ``demo`` (generated under ``data_root`` when missing), ``camvid``, ``cityscapes`` or
            ``folder``.
        data_root: the data set's root folder (see ``data/README.md`` for the layouts).
        train_split, val_split, test_split: split names (CamVid's test split is withheld: test on val).
        batch_size, val_batch_size: per process. num_workers, pin_memory, persistent_workers: loaders.
        crop_size, scale_range: training crops and random scaling; eval_size: optional eval resize.
        ignore_index: void label; unknown_labels: ``error`` or ``ignore`` for values outside the table.
        label_type: Cityscapes ``labelIds`` or ``labelTrainIds``; classes_file: folder data's YAML.
        class_weighting: None or ``median_frequency`` (CamVid/demo; computed from the training labels).
        unlabeled_root, unlabeled_ratio: an unlabeled image folder for semi-supervised distillation;
            the train loader then yields ``{"labeled": ..., "unlabeled": ...}``.
        seed: loader shuffling and augmentation seed. demo_*: size of the generated demo data
            (``demo_test`` extra frames in ``test/``, e.g. as an unlabeled pool).
    """

    def __init__(
        self,
        dataset: str = "demo",
        data_root: str = "data/demo",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        crop_size: tuple[int, int] = (360, 480),
        scale_range: tuple[float, float] = (0.5, 2.0),
        eval_size: tuple[int, int] | None = None,
        ignore_index: int = 255,
        unknown_labels: str = "error",
        label_type: str = "labelIds",
        classes_file: str | None = None,
        class_weighting: str | None = None,
        unlabeled_root: str | None = None,
        unlabeled_ratio: float = 1.0,
        seed: int = 0,
        demo_train: int = 160,
        demo_val: int = 40,
        demo_test: int = 0,
        demo_size: tuple[int, int] = (120, 160),
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise DataError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
        if unknown_labels not in UNKNOWN_LABELS:
            raise DataError(f"unknown_labels must be one of {UNKNOWN_LABELS}, got {unknown_labels!r}")
        if class_weighting not in (None, "median_frequency"):
            raise DataError(f"class_weighting must be null or 'median_frequency', got {class_weighting!r}")
        self.dataset = dataset
        self.data_root = Path(data_root)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.crop_size = tuple(crop_size)
        self.scale_range = tuple(scale_range)
        self.eval_size = tuple(eval_size) if eval_size else None
        self.unknown_labels = unknown_labels
        self.label_type = label_type
        self.classes_file = classes_file
        self.class_weighting = class_weighting
        self.unlabeled_root = unlabeled_root
        self.unlabeled_ratio = unlabeled_ratio
        self.seed = seed
        self.demo = {
            "n_train": demo_train,
            "n_val": demo_val,
            "n_test": demo_test,
            "size": tuple(demo_size),
            "seed": seed,
        }
        if dataset == "folder":
            meta = read_class_file(classes_file or self.data_root / "classes.yaml")
            self._classes, self._palette = meta["classes"], meta["palette"]
            self._ignore = meta["ignore_index"] if ignore_index == 255 else ignore_index
        elif dataset == "cityscapes":
            self._classes, self._palette, self._ignore = cityscapes.CLASSES, cityscapes.PALETTE, ignore_index
        else:
            self._classes, self._palette, self._ignore = camvid.CLASSES, camvid.PALETTE, ignore_index
        self._data: dict[str, Dataset] = {}

    # -- the description linked into the model ----------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self._classes)

    @property
    def ignore_index(self) -> int:
        return self._ignore

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    @property
    def palette(self) -> list[list[int]]:
        return [list(map(int, c)) for c in self._palette]

    @property
    def mean(self) -> list[float]:
        return list(IMAGENET_MEAN)

    @property
    def std(self) -> list[float]:
        return list(IMAGENET_STD)

    @property
    def class_weights(self) -> list[float] | None:
        if self.class_weighting is None:
            return None
        if self.dataset not in ("camvid", "demo"):
            raise DataError("class_weighting='median_frequency' is implemented for CamVid-layout data")
        self.prepare_data()
        return camvid.median_frequency_weights(self.data_root, self.splits["train"])

    # -- data sets -----------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.dataset == "demo" and not (self.data_root / "demo.json").is_file():
            make_demo_dataset(self.data_root, layout="camvid", **self.demo)

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"ignore_index": self._ignore, "unknown_labels": self.unknown_labels}
        if self.dataset == "cityscapes":
            kw["label_type"] = self.label_type
        if self.dataset == "folder":
            kw["classes_file"] = self.classes_file
        return kw

    def make_dataset(self, stage: str) -> Dataset:
        if stage == "train":
            tf = train_transform(
                crop_size=self.crop_size,
                scale_range=self.scale_range,
                ignore_index=self._ignore,
                mean=self.mean,
                std=self.std,
            )
        else:
            tf = eval_transform(mean=self.mean, std=self.std, size=self.eval_size)
        return build_dataset(self.dataset, self.data_root, self.splits[stage], transform=tf, **self._kwargs())

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # no-op unless the demo data is missing (e.g. outside a Trainer)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), None: ("train", "val")}
        for split in wanted.get(stage, ()):
            if split not in self._data:
                self._data[split] = self.make_dataset(split)
        if stage in ("fit", None) and self.unlabeled_root and "unlabeled" not in self._data:
            tf = train_transform(
                crop_size=self.crop_size, scale_range=self.scale_range, ignore_index=self._ignore
            )
            self._data["unlabeled"] = UnlabeledImageFolder(
                self.unlabeled_root, transform=tf, ignore_index=self._ignore
            )

    def _loader(self, ds: Dataset, *, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(ds) >= batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader | dict[str, DataLoader]:
        labeled = self._loader(self._data["train"], batch_size=self.batch_size, shuffle=True)
        if "unlabeled" not in self._data:
            return labeled
        n = max(1, round(self.batch_size * self.unlabeled_ratio))
        return {
            "labeled": labeled,
            "unlabeled": self._loader(self._data["unlabeled"], batch_size=n, shuffle=True),
        }

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._data["val"], batch_size=self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._data["test"], batch_size=self.val_batch_size, shuffle=False)
