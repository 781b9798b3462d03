"""One evaluation pass: a predictor over a labelled data set, scored with the training metrics.

:func:`evaluate_model` is the pass (:mod:`fcn.evaluate` is its command line); under ``torchrun`` each rank
scores its share and :func:`gather_pass` joins the shares into the result of one pass over all of them.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fcn.data.errors import DataError
from fcn.distributed import all_gather, all_reduce_sum
from fcn.metrics import ConfusionMatrix, image_scores
from fcn.predictor import Predictor, predict_logits


@dataclass(frozen=True)
class PredictOptions:
    """How logits are produced (see :func:`fcn.predictor.predict_logits`): window, scales, flip."""

    sliding_window: bool = False
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def strategy(self) -> dict[str, Any]:
        """:func:`~fcn.predictor.predict_logits`'s keyword arguments."""
        return {"crop": self.crop, "stride": self.stride, "scales": self.scales, "flip": self.flip}

    def describe(self) -> str:
        """One line for the report, e.g. ``sliding window 512x1024 / stride 341x683, flip``."""
        parts = ["whole image"]
        if self.sliding_window and self.crop and self.stride:
            parts = [
                f"sliding window {self.crop[0]}x{self.crop[1]} / stride {self.stride[0]}x{self.stride[1]}"
            ]
        if tuple(self.scales) != (1.0,):
            parts.append("scales " + ", ".join(f"{s:g}" for s in self.scales))
        if self.flip:
            parts.append("flip")
        return ", ".join(parts)


@dataclass
class PassResult:
    """What one evaluation pass over the split produced."""

    confmat: Tensor
    per_image: list[dict[str, Any]] = field(default_factory=list)
    worst: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    metric_seconds: float = 0.0
    per_image_seconds: float = 0.0
    indices: list[int] = field(default_factory=list)  # the data-set index of each per-image row

    def timing(self) -> dict[str, float]:
        """Seconds, images/s and the accumulator's share of the pass (the metric overhead)."""
        total = max(self.seconds, 1e-12)
        return {
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images / total, 3),
            "metric_seconds": round(self.metric_seconds, 6),
            "metric_overhead": round(self.metric_seconds / total, 6),
            "per_image_seconds": round(self.per_image_seconds, 6),
            "per_image_overhead": round(self.per_image_seconds / total, 6),
        }


# -- data ---------------------------------------------------------------------------------------------
class _Indexed(Dataset):
    """``(index, image, mask)`` for the first ``limit`` samples of a data set, or those of them listed in
    ``indices``."""

    def __init__(self, dataset: Any, limit: int | None, indices: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        length = len(dataset) if limit is None else min(limit, len(dataset))
        self.indices = list(range(length)) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < length]
        if bad:
            raise ValueError(f"indices {bad[:5]} are outside the {length} images evaluated")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, Tensor, Tensor] | DataError:
        index = self.indices[position]
        try:
            image, mask = self.dataset[index]
        except DataError as err:  # returned, raised in the main process: a loader worker would bury the
            return err  # message in its traceback
        return index, torch.as_tensor(image), torch.as_tensor(mask)


def _same_shape_groups(batch: list[Any]) -> Iterator[list[tuple[int, Tensor, Tensor]]]:
    """Runs of consecutive same-size images of a batch; the first :class:`DataError` a sample returned,
    raised."""
    for item in batch:
        if isinstance(item, DataError):
            raise item
    for _, group in itertools.groupby(batch, key=lambda item: item[1].shape):
        yield list(group)


def _image_name(path: Any, root: Path) -> str:
    """The image's path relative to the data root, or its file name when outside it."""
    with contextlib.suppress(ValueError):
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    return Path(path).name


def _to_rgb_uint8(image: Tensor, *, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the eval normalisation: ``(3, H, W)`` float → ``(H, W, 3)`` uint8 RGB."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * s + m) * 255.0
    return rgb.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


# -- one pass -----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that ``time.perf_counter`` measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Worst:
    """The ``n`` images with the lowest mean IoU seen so far, worst first (ties: the lower index)."""

    n: int
    items: list[dict[str, Any]] = field(default_factory=list)

    def wants(self, miou: float | None, index: int) -> bool:
        if self.n == 0 or miou is None:
            return False
        return len(self.items) < self.n or (miou, index) < _rank(self.items[-1])

    def add(self, item: dict[str, Any]) -> None:
        bisect.insort(self.items, item, key=_rank)
        del self.items[self.n :]


def _rank(item: dict[str, Any]) -> tuple[float, int]:
    return item["mean_iou"], item["index"]


def evaluate_model(
    predictor: Predictor,
    dataset: Any,
    *,
    options: PredictOptions,
    data_root: Path,
    ignore_index: int | None,
    batch_size: int = 1,
    num_workers: int = 0,
    limit: int | None = None,
    worst: int = 5,
    per_image: bool = True,
    on_prediction: Callable[[int, Tensor], None] | None = None,
    progress: bool = True,
    desc: str = "evaluate",
    indices: Sequence[int] | None = None,
) -> PassResult:
    """Run ``predictor`` over ``dataset`` (normalised with the predictor's mean/std) and score it.

    The confusion matrix is ONE :class:`ConfusionMatrix` on the predictor's device. With ``per_image``
    every image is scored too (:func:`image_scores`) and the ``worst`` lowest-mIoU images are kept for
    the report. ``on_prediction(index, pred)`` receives each image's class ids ``(H, W)`` on the CPU.
    ``indices``: score only these images (of the first ``limit``), e.g. a rank's share; the result is this
    process's own (:func:`gather_pass` joins the ranks').
    """
    device = predictor.device
    meta = predictor.meta
    num_classes = meta.num_classes
    data = _Indexed(dataset, limit, indices)
    loader = DataLoader(
        data,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=list,  # images may differ in size: grouped by shape in the loop
        pin_memory=device.type == "cuda",
    )
    # this process's matrix: joined over the ranks explicitly, by gather_pass
    confmat = ConfusionMatrix(num_classes, ignore_index=ignore_index, sync_on_compute=False).to(device)
    rows: list[dict[str, Any]] = []
    row_indices: list[int] = []
    keep = _Worst(worst if per_image else 0)
    per_image_needed = per_image or on_prediction is not None
    metric_s = per_image_s = 0.0

    def score_image(index: int, image: Tensor, pred: Tensor, target: Tensor) -> None:
        name = _image_name(dataset.samples[index][0], data_root)
        scores = image_scores(pred, target, num_classes=num_classes, ignore_index=ignore_index)
        rows.append({"file": name, **scores})
        row_indices.append(index)
        if keep.wants(scores["mean_iou"], index):
            item = {
                "index": index,
                "name": name,
                "image": _to_rgb_uint8(image, mean=meta.mean, std=meta.std),
                "target": target.numpy(),
                "pred": pred.numpy().astype(np.uint8 if num_classes <= 256 else np.int32),
                "mean_iou": scores["mean_iou"],
            }
            keep.add(item)

    bar = tqdm(total=len(data), unit="img", desc=desc, disable=None if progress else True, delay=2.0)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            for group in _same_shape_groups(batch):
                x = torch.stack([g[1] for g in group]).to(device, non_blocking=True)
                target = torch.stack([g[2] for g in group]).to(device, non_blocking=True)
                pred = predict_logits(predictor, x, **options.strategy()).argmax(dim=1)
                sync(device)
                t0 = time.perf_counter()
                confmat.update(pred, target)
                sync(device)
                metric_s += time.perf_counter() - t0
                if per_image_needed:
                    t0 = time.perf_counter()
                    for (index, image, _), p, t in zip(group, pred.cpu(), target.cpu()):
                        if per_image:
                            score_image(index, image, p, t)
                        if on_prediction is not None:
                            on_prediction(index, p)
                    per_image_s += time.perf_counter() - t0
                bar.update(len(group))
        t0 = time.perf_counter()
        cm = confmat.compute()
        sync(device)
        metric_s += time.perf_counter() - t0
    seconds = time.perf_counter() - start
    bar.close()
    return PassResult(
        confmat=cm.cpu(),
        per_image=rows,
        worst=keep.items,
        images=len(data),
        seconds=seconds,
        metric_seconds=metric_s,
        per_image_seconds=per_image_s,
        indices=row_indices,
    )


def gather_pass(result: PassResult, *, worst: int) -> PassResult:
    """The pass over all ranks' shares as one: confusion matrices summed over the ranks (``all_reduce``),
    per-image rows in data-set order, the ``worst`` lowest-mIoU images of all (the same choice as one
    process makes), images counted over the ranks, the slowest rank's seconds. Without a process group,
    ``result`` itself.
    """
    shares = all_gather(
        {
            "rows": result.per_image,
            "indices": result.indices,
            "worst": result.worst,
            "images": result.images,
            "seconds": (result.seconds, result.metric_seconds, result.per_image_seconds),
        }
    )
    if len(shares) == 1:
        return result
    confmat = all_reduce_sum(result.confmat)
    pairs = (pair for s in shares for pair in zip(s["indices"], s["rows"]))
    ordered = sorted(pairs, key=lambda pair: pair[0])
    keep = _Worst(worst)
    for item in sorted((w for s in shares for w in s["worst"]), key=lambda w: w["index"]):
        if keep.wants(item["mean_iou"], item["index"]):
            keep.add(item)
    seconds, metric_s, per_image_s = (max(s["seconds"][k] for s in shares) for k in range(3))
    return PassResult(
        confmat=confmat,
        per_image=[row for _, row in ordered],
        worst=keep.items,
        images=sum(s["images"] for s in shares),
        seconds=seconds,
        metric_seconds=metric_s,
        per_image_seconds=per_image_s,
        indices=[i for i, _ in ordered],
    )
