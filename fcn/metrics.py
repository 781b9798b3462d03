"""Confusion-matrix accumulation and the four FCN-paper segmentation metrics.

One accumulator, :class:`ConfusionMatrix`, is used by training validation and by the evaluate CLI.
Rows of the matrix are ground truth, columns are predictions: ``confmat[i, j]`` counts the pixels
of class ``i`` predicted as class ``j``. Everything else is computed from that matrix with
:func:`segmentation_scores` (JSON-ready) or :func:`score_tensors` (tensors with NaN).

The metrics are those of Long, Shelhamer & Darrell (FCN, 2015), with ``n_ij`` the matrix,
``t_i = sum_j n_ij`` the ground-truth pixels of class ``i`` and ``p_j = sum_i n_ij`` the predicted ones:

- pixel accuracy ``sum_i n_ii / sum_i t_i``
- mean accuracy ``mean_i n_ii / t_i``
- mean IoU ``mean_i n_ii / (t_i + p_i - n_ii)``
- frequency-weighted IoU ``sum_i t_i * IoU_i / sum_i t_i``

n/a convention (a class "is absent" when it has no pixel in the accumulated data):

- absent from ground truth AND prediction: IoU and accuracy are n/a; the class is left out of every mean.
- absent from ground truth but predicted: IoU is 0 (all its predictions are false positives) and
  accuracy is n/a (left out of mean accuracy).
- n/a is NaN in tensors and ``None`` in the JSON-ready dict. A mean over no class at all
  (an empty matrix) is n/a too.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "ConfusionMatrix",
    "confusion_matrix",
    "image_scores",
    "score_tensors",
    "segmentation_scores",
]

SUMMARY_KEYS = ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")
"""The four FCN-paper metrics, in the order the paper reports them."""


def _as_tensor(x: Tensor | np.ndarray) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def _class_ids(preds: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Predicted class ids with the target's shape (argmax over dim 1 for logits)."""
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
    if preds.is_floating_point():
        if target.ndim == 0 or preds.shape != (target.shape[0], num_classes, *target.shape[1:]):
            raise ValueError(
                f"logits of shape {tuple(preds.shape)} do not match target of shape {tuple(target.shape)}; "
                f"expected (N, {num_classes}, *spatial) logits for an (N, *spatial) target"
            )
        return preds.argmax(dim=1)
    if preds.dtype == torch.bool or preds.is_complex():
        raise ValueError(f"preds must be class ids (integer) or logits (float), got dtype {preds.dtype}")
    if preds.shape != target.shape:
        raise ValueError(
            f"predicted ids of shape {tuple(preds.shape)} do not match target of shape "
            f"{tuple(target.shape)}; pass ids with the target's shape or (N, C, *spatial) logits"
        )
    return preds


def _counts(
    preds: Tensor, target: Tensor, num_classes: int, ignore_index: int | None
) -> tuple[Tensor, Tensor]:
    """Confusion counts ``(C, C)`` and the number of out-of-range predicted ids, without host sync.

    Pixels to skip are sent to an extra "trash" bin instead of being masked out, so that the shapes
    never depend on the data (boolean indexing would force a device-to-host copy).
    """
    c = num_classes
    pred = _class_ids(preds, target, c).reshape(-1).long()
    tgt = target.reshape(-1).long()
    valid_target = (tgt >= 0) & (tgt < c)
    if ignore_index is not None:
        valid_target &= tgt != ignore_index
    valid_pred = (pred >= 0) & (pred < c)
    trash, bad_pred = c * c, c * c + 1
    index = torch.where(valid_target & valid_pred, tgt * c + pred, trash)
    index = torch.where(valid_target & ~valid_pred, torch.full_like(index, bad_pred), index)
    nbins = c * c + 2
    if index.device.type == "cpu":
        # numpy's single-threaded bincount: torch's multi-threaded one slows down 10-40x when the
        # cores are busy (e.g. with data-loader workers), numpy's stays at ~1 ms for a 360x480 batch.
        hist = torch.from_numpy(np.bincount(index.numpy(), minlength=nbins))
    else:
        hist = _scatter_histogram(index, nbins)
    return hist[: c * c].reshape(c, c), hist[bad_pred]


def _scatter_histogram(index: Tensor, nbins: int) -> Tensor:
    """``torch.bincount(index, minlength=nbins)`` for indices known to be in ``[0, nbins)``.

    Used on accelerators: torch.bincount on CUDA reads min/max back to the host (a sync per call), a 1-D
    ``scatter_add_`` does not, and it stays deterministic under ``torch.use_deterministic_algorithms``.
    """
    hist = torch.zeros(nbins, dtype=torch.long, device=index.device)
    return hist.scatter_add_(0, index, torch.ones_like(index))


def confusion_matrix(
    preds: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    *,
    num_classes: int,
    ignore_index: int | None = 255,
) -> Tensor:
    """One-shot confusion matrix ``(C, C)`` int64 (rows ground truth, columns prediction).

    ``preds`` are class ids with the target's shape or logits ``(N, C, *spatial)``. Target pixels equal to
    ``ignore_index`` or outside ``[0, num_classes)`` are skipped. Predicted ids outside
    ``[0, num_classes)`` raise ``ValueError``.
    """
    num_classes = _check_num_classes(num_classes)
    counts, bad = _counts(_as_tensor(preds), _as_tensor(target), num_classes, ignore_index)
    if int(bad) > 0:
        raise ValueError(_bad_pred_message(int(bad), num_classes))
    return counts


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _bad_pred_message(count: int, num_classes: int) -> str:
    return (
        f"{count} predicted class ids were outside [0, {num_classes}); pass logits with {num_classes} "
        "channels (or their argmax) from a model built for this data set's classes"
    )


class ConfusionMatrix(Metric):
    """Accumulates the ``(C, C)`` confusion matrix over batches (and over DDP ranks by summation).

    ``update(preds, target)``: ``preds`` are class ids ``(N, H, W)`` or logits ``(N, C, H, W)``
    (argmax over dim 1); ``target`` is ``(N, H, W)`` integer class ids. Skipped pixels: target equal to
    ``ignore_index`` and ANY target outside ``[0, num_classes)`` (also with ``ignore_index=None``),
    so a stray void value such as -1 never lands in a wrong cell. ``update`` never copies to the host:
    predicted ids outside ``[0, num_classes)`` (impossible with logits) are counted and reported by
    ``compute()`` as a ``ValueError``.

    ``compute()`` returns the int64 matrix (rows ground truth, columns prediction); turn it into
    numbers with :func:`segmentation_scores`.
    """

    is_differentiable = False
    higher_is_better: bool | None = None  # a matrix, not a score
    full_state_update = False

    confmat: Tensor
    invalid_preds: Tensor

    def __init__(self, num_classes: int, ignore_index: int | None = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        num_classes = _check_num_classes(num_classes)
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral)
        ):
            raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
        self.num_classes = num_classes
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.add_state(
            "confmat",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )
        self.add_state("invalid_preds", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add one batch (see the class docstring for shapes and skipped pixels)."""
        counts, bad = _counts(preds, target, self.num_classes, self.ignore_index)
        self.confmat += counts.to(self.confmat.device)
        self.invalid_preds += bad.to(self.invalid_preds.device)

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another shard's state (a ``ConfusionMatrix`` or its ``metric_state``) to this one.

        Unlike the base class (torchmetrics 1.9), this also drops a cached ``compute()`` result, so
        computing, merging and computing again gives the merged matrix.
        """
        super().merge_state(incoming_state)
        self._computed = None

    def compute(self) -> Tensor:
        """The accumulated matrix, int64 ``(C, C)``; raises ``ValueError`` if any predicted id was invalid."""
        bad = int(self.invalid_preds)
        if bad > 0:
            raise ValueError(_bad_pred_message(bad, self.num_classes))
        return self.confmat.clone()


def score_tensors(confmat: Tensor | np.ndarray) -> dict[str, Tensor]:
    """The metrics as float64 CPU tensors, NaN for n/a (see the module docstring for the convention).

    Keys: ``pixel_accuracy``, ``mean_accuracy``, ``mean_iou``, ``fw_iou`` (0-d), ``per_class_iou``,
    ``per_class_accuracy``, ``pixel_share`` (share of ground-truth pixels per class), ``gt_pixels``,
    ``pred_pixels`` (``(C,)``).
    """
    cm = _as_tensor(confmat).detach().to("cpu")
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"a confusion matrix must be square (C, C) with C >= 1, got shape {tuple(cm.shape)}")
    cm = cm.to(torch.float64)
    if bool((cm < 0).any()) or not bool(torch.isfinite(cm).all()):
        raise ValueError("a confusion matrix must hold finite, non-negative counts")
    tp, gt, pred = cm.diagonal(), cm.sum(dim=1), cm.sum(dim=0)
    total = gt.sum()
    iou = tp / (gt + pred - tp)  # 0 / 0 = NaN: n/a (a class absent from both)
    acc = tp / gt  # NaN for a class absent from the ground truth
    present = gt > 0  # a class in the ground truth always has a defined IoU
    return {  # an empty matrix (total 0): 0 / 0, all NaN
        "pixel_accuracy": tp.sum() / total,
        "mean_accuracy": acc.nanmean(),
        "mean_iou": iou.nanmean(),
        "fw_iou": (gt[present] * iou[present]).sum() / total,
        "per_class_iou": iou,
        "per_class_accuracy": acc,
        "pixel_share": gt / total,
        "gt_pixels": gt,
        "pred_pixels": pred,
    }


def _to_py(x: Tensor) -> float | None:
    v = float(x)
    return None if np.isnan(v) else v


def segmentation_scores(
    confmat: Tensor | np.ndarray, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """The four FCN metrics plus per-class values as a JSON-serialisable dict (``None`` = n/a).

    Values are fractions in ``[0, 1]``; n/a as in the module docstring. ``fw_iou`` weights each class by
    its ground-truth pixels, so classes absent from ground truth weigh nothing.

    Keys: ``pixel_accuracy``, ``mean_accuracy``, ``mean_iou``, ``fw_iou``, ``per_class_iou``,
    ``per_class_accuracy``, ``pixel_share``, ``gt_pixels``, ``pred_pixels`` (lists, one per class),
    ``class_names``, ``num_classes``, ``num_pixels`` (pixels counted, ignored ones excluded).
    """
    t = score_tensors(confmat)
    num_classes = t["per_class_iou"].numel()
    names = [str(n) for n in (range(num_classes) if class_names is None else class_names)]
    if len(names) != num_classes:
        raise ValueError(
            f"{len(names)} class names given for a {num_classes}-class confusion matrix; "
            "pass one name per class, in class-id order"
        )
    out: dict[str, Any] = {k: _to_py(t[k]) for k in SUMMARY_KEYS}
    out |= {k: [_to_py(v) for v in t[k]] for k in ("per_class_iou", "per_class_accuracy", "pixel_share")}
    out |= {k: [int(v) for v in t[k]] for k in ("gt_pixels", "pred_pixels")}
    return {**out, "class_names": names, "num_classes": num_classes, "num_pixels": sum(out["gt_pixels"])}


def image_scores(
    pred: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    *,
    num_classes: int,
    ignore_index: int | None = 255,
) -> dict[str, float | None]:
    """``{"mean_iou", "pixel_accuracy"}`` of one image (``None`` when it has no labelled pixel).

    ``pred`` is ids ``(H, W)`` or logits ``(C, H, W)``; a leading batch dimension of 1 is accepted too.
    Same skipping and n/a convention as :class:`ConfusionMatrix` / :func:`segmentation_scores`.
    """
    p, t = _as_tensor(pred), _as_tensor(target)
    if p.is_floating_point() and p.ndim == t.ndim + 1 and p.shape[0] == num_classes:
        p = p.unsqueeze(0)  # (C, H, W) logits of one image
        t = t.unsqueeze(0)
    cm = confusion_matrix(p, t, num_classes=num_classes, ignore_index=ignore_index)
    scores = score_tensors(cm)
    return {"mean_iou": _to_py(scores["mean_iou"]), "pixel_accuracy": _to_py(scores["pixel_accuracy"])}
