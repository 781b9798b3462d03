"""One evaluation pass (:func:`evaluate_model`; :mod:`fcn.evaluate` is its command line): a predictor over a
labelled data set, scored with the training metrics. :func:`gather_pass` joins the ranks' shares."""

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
from fcn.distributed import all_gather
from fcn.metrics import ConfusionMatrix, image_scores
from fcn.predictor import Predictor


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
            (h, w), (sh, sw) = self.crop, self.stride
            parts = [f"sliding window {h}x{w} / stride {sh}x{sw}"]
        if tuple(self.scales) != (1.0,):
            parts.append("scales " + ", ".join(f"{s:g}" for s in self.scales))
        return ", ".join([*parts, "flip"] if self.flip else parts)


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


class _Indexed(Dataset):
    """``(index, image, mask)`` of the first ``limit`` samples of a data set, or of those in ``indices``."""

    def __init__(self, dataset: Any, limit: int | None, indices: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        length = len(dataset) if limit is None else min(limit, len(dataset))
        self.indices = list(range(length)) if indices is None else [int(i) for i in indices]
        if bad := [i for i in self.indices if not 0 <= i < length]:
            raise ValueError(f"indices {bad[:5]} are outside the {length} images evaluated")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, Tensor, Tensor] | DataError:
        index = self.indices[position]
        try:
            image, mask = self.dataset[index]
        except DataError as err:  # returned, raised in the main process: a worker would bury the message
            return err
        return index, torch.as_tensor(image), torch.as_tensor(mask)


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


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that ``time.perf_counter`` measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank(item: dict[str, Any]) -> tuple[float, int]:
    """The order of the worst images: the lowest mean IoU first, ties to the lower data-set index."""
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
    """Run ``predictor`` over ``dataset`` (normalised with the predictor's mean/std) and score it: one
    :class:`ConfusionMatrix`, and with ``per_image`` each image's :func:`image_scores` and the ``worst``
    lowest-mIoU images. ``on_prediction(index, pred)`` gets each image's class ids ``(H, W)`` on the CPU.
    ``indices``: score only these of the first ``limit`` images (a rank's share, see :func:`gather_pass`).
    """
    device, meta = predictor.device, predictor.meta
    num_classes = meta.num_classes
    data = _Indexed(dataset, limit, indices)
    # collate_fn=list: images may differ in size, grouped by shape in the loop
    pin = device.type == "cuda"
    loader = DataLoader(data, batch_size, num_workers=num_workers, collate_fn=list, pin_memory=pin)
    # this process's matrix: joined over the ranks explicitly, by gather_pass
    confmat = ConfusionMatrix(num_classes, ignore_index=ignore_index, sync_on_compute=False).to(device)
    rows: list[dict[str, Any]] = []
    row_indices: list[int] = []
    kept: list[dict[str, Any]] = []  # the `worst` lowest-mIoU images so far, in _rank order
    spent = {"metric": 0.0, "per_image": 0.0}

    @contextlib.contextmanager
    def timed(key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        sync(device)
        spent[key] += time.perf_counter() - t0

    def score_image(index: int, image: Tensor, pred: Tensor, target: Tensor) -> None:
        name = _image_name(dataset.samples[index][0], data_root)
        scores = image_scores(pred, target, num_classes=num_classes, ignore_index=ignore_index)
        rows.append({"file": name, **scores})
        row_indices.append(index)
        miou = scores["mean_iou"]
        if worst and miou is not None and (len(kept) < worst or (miou, index) < _rank(kept[-1])):
            item = {
                "index": index,
                "name": name,
                "image": _to_rgb_uint8(image, mean=meta.mean, std=meta.std),
                "target": target.numpy(),
                "pred": pred.numpy().astype(np.uint8 if num_classes <= 256 else np.int32),
                "mean_iou": miou,
            }
            bisect.insort(kept, item, key=_rank)
            del kept[worst:]

    bar = tqdm(total=len(data), unit="img", desc=desc, disable=None if progress else True, delay=2.0)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            if errors := [item for item in batch if isinstance(item, DataError)]:
                raise errors[0]  # see _Indexed
            for _, same_shape in itertools.groupby(batch, key=lambda item: item[1].shape):
                group = list(same_shape)
                x = torch.stack([g[1] for g in group]).to(device, non_blocking=True)
                target = torch.stack([g[2] for g in group]).to(device, non_blocking=True)
                pred = predictor.logits(x, **options.strategy()).argmax(dim=1)
                sync(device)
                with timed("metric"):
                    confmat.update(pred, target)
                if per_image or on_prediction is not None:
                    with timed("per_image"):
                        for (index, image, _), p, t in zip(group, pred.cpu(), target.cpu()):
                            if per_image:
                                score_image(index, image, p, t)
                            if on_prediction is not None:
                                on_prediction(index, p)
                bar.update(len(group))
        with timed("metric"):
            cm = confmat.compute()
    seconds = time.perf_counter() - start
    bar.close()
    return PassResult(
        confmat=cm.cpu(),
        per_image=rows,
        worst=kept,
        images=len(data),
        seconds=seconds,
        metric_seconds=spent["metric"],
        per_image_seconds=spent["per_image"],
        indices=row_indices,
    )


def gather_pass(result: PassResult, *, worst: int) -> PassResult:
    """The ranks' shares joined into one pass: confusion matrices summed, per-image rows in data-set
    order, the ``worst`` lowest-mIoU images of all (as one process chooses them), images counted over the
    ranks, the slowest rank's seconds. Without a process group, ``result`` itself."""
    shares: list[PassResult] = all_gather(result)
    if len(shares) == 1:
        return result
    ordered = sorted((pair for s in shares for pair in zip(s.indices, s.per_image)), key=lambda p: p[0])
    return PassResult(
        confmat=torch.stack([s.confmat for s in shares]).sum(dim=0),
        per_image=[row for _, row in ordered],
        worst=sorted((w for s in shares for w in s.worst), key=_rank)[:worst],  # among the ranks' own worst
        images=sum(s.images for s in shares),
        seconds=max(s.seconds for s in shares),
        metric_seconds=max(s.metric_seconds for s in shares),
        per_image_seconds=max(s.per_image_seconds for s in shares),
        indices=[i for i, _ in ordered],
    )
