"""The LightningDataModule: data set choice, splits, loaders, and the data description the model links to."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from fcn.data import camvid, cityscapes
from fcn.data.base import UNKNOWN_LABELS
from fcn.data.demo import make_demo_dataset
from fcn.data.errors import DataError
from fcn.data.folder import FolderDataset, UnlabeledImageFolder, read_class_file
from fcn.data.io import read_image
from fcn.data.soft_labels import SoftLabelled
from fcn.data.transforms import eval_transform, train_transform
from fcn.exposure import check_exposure_target, image_mean_grey
from fcn.palette import IMAGENET_MEAN, IMAGENET_STD

DATASETS = ("demo", "camvid", "cityscapes", "folder")
CLASS_WEIGHTINGS = (None, "median_frequency", "sqrt_median_frequency")


class PermutationStream(Sampler[int]):
    """``num_samples`` indices per epoch from an endless stream of random permutations of ``range(size)``
    (every index once before any repeats; the next epoch goes on where this one stopped), so the labelled
    set sets the epoch's length. Not a ``RandomSampler``: Lightning shards it across DDP ranks instead of
    replacing it."""

    def __init__(self, size: int, *, num_samples: int, generator: torch.Generator) -> None:
        if size < 1 or num_samples < 1:
            raise DataError(f"PermutationStream needs size and num_samples >= 1, got {size}, {num_samples}")
        self.size = size
        self.num_samples = num_samples
        self.generator = generator
        self._pending: list[int] = []

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        for _ in range(self.num_samples):
            if not self._pending:
                self._pending = torch.randperm(self.size, generator=self.generator).tolist()[::-1]
            yield self._pending.pop()


def build_dataset(
    name: str, root: str | Path, split: str, *, transform: Any = None, **kwargs: Any
) -> Dataset:
    """A labelled data set: ``camvid`` / ``demo`` (CamVid layout), ``cityscapes`` (kwargs: ``label_type``)
    or ``folder`` (kwargs: ``classes_file``); all take ``ignore_index`` and ``unknown_labels``."""
    if name in ("camvid", "demo"):
        return camvid.CamVid(root, split, transform=transform, **kwargs)
    if name == "cityscapes":
        return cityscapes.Cityscapes(root, split, transform=transform, **kwargs)
    if name == "folder":
        return FolderDataset(root, split, transform=transform, **kwargs)
    raise DataError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def read_frame_list(path: str | Path) -> list[str]:
    """Image file names from a list file, one a line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    fix = "write one image file name (e.g. 0001TP_006690.png) a line"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(
            f"frame list {path} cannot be read ({getattr(err, 'strerror', None) or err}); {fix}"
        ) from err
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise DataError(f"frame list {path} lists no frames; {fix}")
    twice = sorted(name for name, n in Counter(names).items() if n > 1)
    if twice:
        raise DataError(f"frame list {path} lists {twice[:5]} more than once; list each frame once")
    return names


def select_frames(ds: Dataset, names: Sequence[str], source: str | Path) -> tuple[Dataset, list[Path]]:
    """``(a copy of ds with only the listed frames, the image paths of the others)``; a listed name missing
    from ``ds`` or matching two images is a :class:`DataError`."""
    by_name: dict[str, int] = Counter(image.name for image, _ in ds.samples)
    missing = [name for name in names if name not in by_name]
    if missing:
        raise DataError(
            f"frame list {source} names {len(missing)} frame(s) that are not in {ds.name}, e.g. "
            f"{missing[:5]}; point --data.data_root at the data the list was made for, or regenerate the "
            "list (fcn.data.camvid.write_subset_list)"
        )
    ambiguous = [name for name in names if by_name[name] > 1]
    if ambiguous:
        raise DataError(f"frame list {source}: {ambiguous[:5]} match several images of {ds.name}")
    listed = set(names)
    subset = copy.copy(ds)
    subset.samples = [pair for pair in ds.samples if pair[0].name in listed]
    subset.name = f"{ds.name}, the {len(subset.samples)} frames of {source}"
    return subset, [image for image, _ in ds.samples if image.name not in listed]


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: each worker gets its own numpy / random / albumentations seed from the loader's
    generator (same seed, same batches) and single-threaded OpenCV. Workers ignore SIGINT and their first
    SIGTERM: those are for the main process, which saves and then ends them with a second SIGTERM (a worker
    dying first would end the run in a DataLoader traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    info = get_worker_info()
    seed = (info.seed if info is not None else torch.initial_seed()) % 2**32
    np.random.seed(seed)
    random.seed(seed)
    # 0 = no thread pool. Not 1: resizing OpenCV's pthreads pool in a forked child whose parent already
    # used the pool deadlocks (tests/test_datamodule.py::test_workers_survive_a_parent_that_used_opencv).
    cv2.setNumThreads(0)
    ds = getattr(info, "dataset", None)
    if hasattr(getattr(ds, "transform", None), "set_random_seed"):
        ds.transform.set_random_seed(seed)


def collate(batch: list[Any]) -> Any:
    """``default_collate`` with a clear error when images of one batch differ in size."""
    try:
        return default_collate(batch)
    except RuntimeError as err:
        if "equal size" not in str(err) and "same size" not in str(err):
            raise
        sizes = sorted({tuple(item[0].shape[-2:]) for item in batch})
        raise DataError(
            f"images of one batch have different sizes {sizes[:4]}; use a batch size of 1 for evaluation "
            "(--data.val_batch_size 1) or resize them (--data.eval_size H W)"
        ) from err


def _pair(value: Sequence[Any], name: str, kind: type, *, ordered: bool = False) -> tuple[Any, Any]:
    try:
        a, b = (kind(v) for v in value)
    except (TypeError, ValueError) as err:
        raise DataError(f"{name} must be two numbers, got {value!r}") from err
    if a <= 0 or b <= 0:
        raise DataError(f"{name} must be positive, got {value!r}")
    if ordered and a > b:
        raise DataError(f"{name} must be (low, high) with low <= high, got {value!r}")
    return a, b


class SegDataModule(L.LightningDataModule):
    """Loaders for one data set; ``num_classes``, ``ignore_index``, ``class_names``, ``palette``, ``mean``,
    ``std`` (and ``class_weights``) are there right after construction, for linking into the model.

    Args:
        dataset: ``demo`` (generated in ``data_root`` when missing), ``camvid``, ``cityscapes`` or ``folder``.
        data_root: the data set's root folder (layouts: ``data/README.md``).
        test_split: the split ``trainer.test`` uses (CamVid's test split is withheld: test on val).
        batch_size: training batch per process; val_batch_size is evaluation's.
        crop_size: training crops (H, W).
        scale_range: (low, high) random scale factors of the training images, applied before cropping.
        brightness_range: (low, high) factors of the brightness jitter (``fcn.data.transforms``).
        eval_size: resize evaluation images to (H, W); default: as they are.
        ignore_index: the void label (folder data: the YAML's unless given).
        unknown_labels: ``error`` or ``ignore`` (as void) for label values outside the class table.
        label_type: Cityscapes ``labelIds``, ``labelTrainIds`` or ``auto``.
        classes_file: folder data's class YAML (default ``<data_root>/classes.yaml``).
        class_weighting: ``median_frequency`` (CamVid/demo, from the training labels) or
            ``sqrt_median_frequency`` (their square roots: a softer push towards rare classes).
        unlabeled_root: an unlabeled image folder for semi-supervised distillation: the train loader then
            yields ``{"labeled": ..., "unlabeled": ...}``, as many unlabeled batches as labelled ones.
        unlabeled_ratio: unlabeled batches hold ``round(batch_size * unlabeled_ratio)`` random crops.
        train_list: a file of image names, one a line: train (and weigh classes) on these frames of the train
            split only (e.g. ``configs/camvid_cpu/train_quarter.txt``).
        unlabeled_from_train: the unlabeled pool is the train split's frames *not* in ``train_list`` (labels
            unused); needs ``train_list``, excludes ``unlabeled_root``.
        exposure_target: ``auto`` (the mean grey level of the training frames, ``train_list``'s when given),
            a grey level in (0, 255], or None (off): linked into the model, whose inference scales each
            image to it (:mod:`fcn.exposure`); training crops are not scaled.
        teacher_labels: a folder of a teacher's soft labels of the training frames (``predict.py --outputs
            probs``: ``.npy`` per image stem, :mod:`fcn.data.soft_labels`); training items become ``(image,
            mask, soft)`` for ``DistillationModule``'s ``stored`` mode.
        seed: loader shuffling and augmentation seed.
        demo_test: extra demo frames in ``test/`` (e.g. an unlabeled pool) besides demo_train / demo_val.
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
        brightness_range: tuple[float, float] = (0.4, 1.4),
        eval_size: tuple[int, int] | None = None,
        ignore_index: int = 255,
        unknown_labels: str = "error",
        label_type: str = "labelIds",
        classes_file: str | None = None,
        class_weighting: str | None = None,
        unlabeled_root: str | None = None,
        unlabeled_ratio: float = 1.0,
        train_list: str | None = None,
        unlabeled_from_train: bool = False,
        exposure_target: float | str | None = None,
        teacher_labels: str | None = None,
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
        if class_weighting not in CLASS_WEIGHTINGS:
            raise DataError(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {class_weighting!r}")
        if label_type not in cityscapes.LABEL_TYPES:
            raise DataError(f"label_type must be one of {cityscapes.LABEL_TYPES}, got {label_type!r}")
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if int(value) < 1:
                raise DataError(f"{name} must be at least 1, got {value}")
        if int(num_workers) < 0:
            raise DataError(f"num_workers must be 0 or more, got {num_workers}")
        if not float(unlabeled_ratio) > 0:
            raise DataError(f"unlabeled_ratio must be positive, got {unlabeled_ratio}")
        if unlabeled_from_train and not train_list:
            raise DataError("unlabeled_from_train needs train_list (the other training frames are the pool)")
        if unlabeled_from_train and unlabeled_root:
            raise DataError("give either unlabeled_root or unlabeled_from_train, not both")
        if teacher_labels and (unlabeled_root or unlabeled_from_train):
            raise DataError(
                "teacher_labels (stored soft labels of the training frames) does not combine with an unlabeled "
                "pool (unlabeled_root / unlabeled_from_train); drop one"
            )
        if exposure_target != "auto":
            try:
                exposure_target = check_exposure_target(exposure_target)
            except ValueError as err:
                raise DataError(f"{err}, or auto (the training frames' mean)") from err
        self.dataset = dataset
        self.data_root = Path(data_root)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and self.num_workers > 0
        self.crop_size = _pair(crop_size, "crop_size", int)
        self.scale_range = _pair(scale_range, "scale_range", float, ordered=True)
        self.brightness_range = _pair(brightness_range, "brightness_range", float, ordered=True)
        self.eval_size = _pair(eval_size, "eval_size", int) if eval_size else None
        self.class_weighting = class_weighting
        self.unlabeled_root = unlabeled_root
        self.unlabeled_ratio = float(unlabeled_ratio)
        self.train_list = train_list
        self.unlabeled_from_train = bool(unlabeled_from_train)
        self.teacher_labels = teacher_labels
        self._train_frames = read_frame_list(train_list) if train_list else None
        self.seed = int(seed)
        self.demo = {"n_train": demo_train, "n_val": demo_val, "n_test": demo_test, "seed": self.seed}
        self.demo["size"] = list(_pair(demo_size, "demo_size", int))
        # the description linked into the model
        if dataset == "folder":
            meta = read_class_file(classes_file or self.data_root / "classes.yaml")
            classes, palette = meta["classes"], meta["palette"]
            # the YAML's ignore index unless one is given explicitly (255 is the default)
            ignore_index = meta["ignore_index"] if ignore_index == 255 else ignore_index
        else:
            source = cityscapes if dataset == "cityscapes" else camvid
            classes, palette = source.CLASSES, source.PALETTE
        if 0 <= ignore_index < len(classes):
            raise DataError(f"ignore_index {ignore_index} collides with class id {ignore_index}")
        self.ignore_index = ignore_index
        extra = {"cityscapes": {"label_type": label_type}, "folder": {"classes_file": classes_file}}
        self._kwargs = {"ignore_index": ignore_index, "unknown_labels": unknown_labels}  # for build_dataset
        self._kwargs |= extra.get(dataset, {})
        self.num_classes = len(classes)
        self.class_names = list(classes)
        self.palette = [list(map(int, c)) for c in palette]
        self.mean, self.std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        self._data: dict[str, Dataset] = {}
        self._class_weights: list[float] | None = None
        self._exposure = exposure_target

    @property
    def exposure_target(self) -> float | None:
        """The grey level inference scales images to: as given, or with ``auto`` the mean grey level of the
        training frames (each frame counts once; computed on first use, to 0.1)."""
        if self._exposure == "auto":
            self.prepare_data()
            paths = [image for image, _ in self.make_dataset("train").samples]  # train_list's frames
            if not paths:
                raise DataError(f"exposure_target=auto: no training frames in {self.data_root}")
            self._exposure = round(float(np.mean([image_mean_grey(read_image(p)) for p in paths])), 1)
        return self._exposure

    @property
    def class_weights(self) -> list[float] | None:
        """Median-frequency weights (or their square roots) of the training labels, if ``class_weighting``."""
        if self.class_weighting is None:
            return None
        if self.dataset not in ("camvid", "demo"):
            raise DataError(f"class_weighting={self.class_weighting!r} is implemented for CamVid-layout data")
        if self._class_weights is None:
            self.prepare_data()
            frames = set(self._train_frames) if self._train_frames else None
            weights = camvid.median_frequency_weights(self.data_root, self.splits["train"], frames=frames)
            if self.class_weighting == "sqrt_median_frequency":
                weights = [w**0.5 for w in weights]
            self._class_weights = weights
        return self._class_weights

    # -- data sets -----------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate the demo data when ``dataset="demo"`` and its folder holds none yet."""
        if self.dataset != "demo":
            return
        manifest = self.data_root / "demo.json"
        if not manifest.is_file():
            make_demo_dataset(self.data_root, layout="camvid", **self.demo)
            return
        try:
            found = json.loads(manifest.read_text())
        except (OSError, ValueError):
            found = {}
        differ = {k: found.get(k) for k, v in self.demo.items() if found.get(k) != v}
        if differ:
            warnings.warn(
                f"demo data in {self.data_root} was generated with {differ}, not {self.demo}; using it as it "
                f"is (delete {self.data_root} to regenerate)",
                stacklevel=2,
            )

    def _rank(self) -> int:
        return int(self.trainer.global_rank) if self.trainer is not None else 0

    def _train_transform(self) -> Any:
        tf = train_transform(
            crop_size=self.crop_size,
            scale_range=self.scale_range,
            brightness_range=self.brightness_range,
            ignore_index=self.ignore_index,
            mean=self.mean,
            std=self.std,
        )
        tf.set_random_seed(self.seed + 7919 * self._rank())  # in-process loading (num_workers=0)
        return tf

    def make_dataset(self, split: str) -> Dataset:
        """The data set of ``split`` (``train`` / ``val`` / ``test``) with its transform."""
        if split == "train":
            tf = self._train_transform()
        else:
            tf = eval_transform(mean=self.mean, std=self.std, size=self.eval_size)
        ds = build_dataset(self.dataset, self.data_root, self.splits[split], transform=tf, **self._kwargs)
        if split == "train" and self._train_frames:
            ds, _ = select_frames(ds, self._train_frames, self.train_list)
        return ds

    @property
    def semi_supervised(self) -> bool:
        """Whether the train loader also yields unlabeled batches."""
        return bool(self.unlabeled_root or self.unlabeled_from_train)

    def _unlabeled_pool(self) -> Dataset:
        """``unlabeled_root``'s images, or the training frames not in ``train_list`` loaded the same way."""
        root, paths = self.unlabeled_root, None
        if not root:
            everything = build_dataset(self.dataset, self.data_root, self.splits["train"], **self._kwargs)
            _, paths = select_frames(everything, self._train_frames, self.train_list)
            if not paths:
                raise DataError(
                    f"train_list {self.train_list} holds every training frame: nothing is left for the "
                    "unlabeled pool (unlabeled_from_train)"
                )
            root = os.path.commonpath([p.parent for p in paths])
        tf = self._train_transform()
        return UnlabeledImageFolder(root, transform=tf, ignore_index=self.ignore_index, paths=paths)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # no-op unless the demo data is missing (e.g. outside a Trainer)
        wanted = {"fit": ("train", "val"), None: ("train", "val"), "validate": ("val",), "test": ("test",)}
        for split in wanted.get(stage, ()):
            if split not in self._data:
                ds = self.make_dataset(split)
                if split == "train" and self.teacher_labels:
                    ds = SoftLabelled(ds, self.teacher_labels)
                self._data[split] = ds
        if stage in ("fit", None) and self.semi_supervised and "unlabeled" not in self._data:
            self._data["unlabeled"] = self._unlabeled_pool()

    def _get(self, key: str, stage: str) -> Dataset:
        if key not in self._data:
            self.setup(stage)
        return self._data[key]

    def _loader(
        self, ds: Dataset, *, batch_size: int, shuffle: bool, salt: int = 0, num_samples: int | None = None
    ) -> DataLoader:
        # one generator per loader and rank: reproducible, and DDP ranks draw different augmentations
        loader_seed = self.seed + 104729 * salt
        generator = torch.Generator().manual_seed(loader_seed + 7919 * self._rank())
        sampler = None
        if num_samples is not None:
            # the same stream on every rank: Lightning's DistributedSamplerWrapper gives each a disjoint share
            stream_generator = torch.Generator().manual_seed(loader_seed)
            sampler = PermutationStream(len(ds), num_samples=num_samples, generator=stream_generator)
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            drop_last=shuffle and len(ds) >= batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            worker_init_fn=seed_worker,
            generator=generator,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader | dict[str, DataLoader]:
        """Shuffled random crops; semi-supervised (``unlabeled_root`` / ``unlabeled_from_train``) a dict
        ``{"labeled", "unlabeled"}`` of loaders."""
        labeled = self._loader(self._get("train", "fit"), batch_size=self.batch_size, shuffle=True)
        if not self.semi_supervised:
            return labeled
        n = max(1, round(self.batch_size * self.unlabeled_ratio))
        unlabeled = self._loader(
            self._get("unlabeled", "fit"), batch_size=n, shuffle=True, salt=1, num_samples=len(labeled) * n
        )
        return {"labeled": labeled, "unlabeled": unlabeled}

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._get("val", "validate"), batch_size=self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._get("test", "test"), batch_size=self.val_batch_size, shuffle=False)
