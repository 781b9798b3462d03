"""Confusion-matrix accumulation and the four FCN-paper segmentation metrics.

:class:`ConfusionMatrix` accumulates ``n_ij``: pixels of ground-truth class ``i`` predicted as ``j``. With
``t_i = sum_j n_ij`` and ``p_j = sum_i n_ij`` (Long et al., FCN, 2015):

- pixel accuracy ``sum_i n_ii / sum_i t_i``; mean accuracy ``mean_i n_ii / t_i``
- mean IoU ``mean_i n_ii / (t_i + p_i - n_ii)``; frequency-weighted IoU ``sum_i t_i * IoU_i / sum_i t_i``

n/a: a class absent from the ground truth has accuracy n/a, and IoU n/a unless predicted (then 0). n/a
values are left out of the means (a mean over none is n/a); they are NaN in tensors (:func:`score_tensors`)
and ``None`` in :func:`segmentation_scores`' dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["ConfusionMatrix", "confusion_matrix", "image_scores", "score_tensors", "segmentation_scores"]

SUMMARY_KEYS = ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")  # in the paper's order


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
    """Confusion counts ``(C, C)`` and the number of out-of-range predicted ids, without host sync: skipped
    pixels go to a "trash" bin, as boolean masking would make the shapes data-dependent (a host copy)."""
    c = num_classes
    pred = _class_ids(preds, target, c).reshape(-1).long()
    tgt = target.reshape(-1).long()
    valid_target = (tgt >= 0) & (tgt < c)
    if ignore_index is not None:
        valid_target &= tgt != ignore_index
    valid_pred = (pred >= 0) & (pred < c)
    trash, bad_pred = c * c, c * c + 1
    index = torch.where(valid_target, torch.where(valid_pred, tgt * c + pred, bad_pred), trash)
    nbins = c * c + 2
    if index.device.type == "cpu":
        # numpy's single-threaded bincount: torch's multi-threaded one slows down 10-40x on busy cores
        hist = torch.from_numpy(np.bincount(index.numpy(), minlength=nbins))
    else:  # a scatter-add bincount: unlike CUDA's bincount, no host sync and deterministic
        hist = index.new_zeros(nbins).scatter_add_(0, index, torch.ones_like(index))
    return hist[: c * c].reshape(c, c), hist[bad_pred]


def _check_int(name: str, value: Any, low: int | None) -> int | None:
    """``value`` as an int of at least ``low`` (``low`` None: any int or None), else ``ValueError``."""
    if low is None and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or (low is not None and value < low):
        kind = "a positive integer" if low is not None else "an int or None"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def _bad_pred_message(count: int, num_classes: int) -> str:
    return (
        f"{count} predicted class ids were outside [0, {num_classes}); pass logits with {num_classes} "
        "channels (or their argmax) from a model built for this data set's classes"
    )


def confusion_matrix(
    preds: Tensor | np.ndarray,
    target: Tensor | np.ndarray,
    *,
    num_classes: int,
    ignore_index: int | None = 255,
) -> Tensor:
    """One-shot ``(C, C)`` int64 matrix; same inputs and skipped pixels as :class:`ConfusionMatrix`, but
    predicted ids outside ``[0, num_classes)`` raise ``ValueError`` at once."""
    num_classes = _check_int("num_classes", num_classes, 1)
    counts, bad = _counts(_as_tensor(preds), _as_tensor(target), num_classes, ignore_index)
    if int(bad) > 0:
        raise ValueError(_bad_pred_message(int(bad), num_classes))
    return counts


class ConfusionMatrix(Metric):
    """Accumulates the ``(C, C)`` confusion matrix over batches (and over DDP ranks by summation).

    ``update(preds, target)``: ``preds`` are class ids ``(N, H, W)`` or logits ``(N, C, H, W)``;
    ``target`` is ``(N, H, W)`` integer ids. Skipped: target pixels equal to ``ignore_index`` and ANY
    target outside ``[0, num_classes)``. ``update`` never syncs with the host: predicted ids outside
    ``[0, num_classes)`` are counted, and ``compute()`` raises ``ValueError`` for them.
    ``compute()``: the int64 matrix; :func:`segmentation_scores` turns it into numbers.
    """

    is_differentiable = False
    higher_is_better: bool | None = None  # a matrix, not a score
    full_state_update = False

    confmat: Tensor
    invalid_preds: Tensor

    def __init__(self, num_classes: int, ignore_index: int | None = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes = _check_int("num_classes", num_classes, 1)
        self.ignore_index = _check_int("ignore_index", ignore_index, None)
        zeros = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.add_state("confmat", default=zeros, dist_reduce_fx="sum")
        self.add_state("invalid_preds", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        counts, bad = _counts(preds, target, self.num_classes, self.ignore_index)
        self.confmat += counts.to(self.confmat.device)
        self.invalid_preds += bad.to(self.invalid_preds.device)

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """The base class's merge, also dropping a cached ``compute()`` result (torchmetrics 1.9 keeps it)."""
        super().merge_state(incoming_state)
        self._computed = None

    def compute(self) -> Tensor:
        bad = int(self.invalid_preds)
        if bad > 0:
            raise ValueError(_bad_pred_message(bad, self.num_classes))
        return self.confmat.clone()


def score_tensors(confmat: Tensor | np.ndarray) -> dict[str, Tensor]:
    """The metrics as float64 CPU tensors (NaN for n/a): the :data:`SUMMARY_KEYS` (0-d), ``(C,)``
    ``per_class_iou``, ``per_class_accuracy``, ``pixel_share`` (of ground-truth pixels), ``gt_pixels``,
    ``pred_pixels``."""
    cm = _as_tensor(confmat).detach().to("cpu")
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"a confusion matrix must be square (C, C) with C >= 1, got shape {tuple(cm.shape)}")
    cm = cm.to(torch.float64)
    if bool((cm < 0).any()) or not bool(torch.isfinite(cm).all()):
        raise ValueError("a confusion matrix must hold finite, non-negative counts")
    tp, gt, pred = cm.diagonal(), cm.sum(dim=1), cm.sum(dim=0)
    total = gt.sum()  # 0 for an empty matrix: every value NaN
    iou = tp / (gt + pred - tp)  # 0 / 0 = NaN: absent from both
    acc = tp / gt  # NaN: absent from the ground truth
    present = gt > 0
    return {
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
    """:func:`score_tensors` as a JSON-serialisable dict: fractions in ``[0, 1]``, ``None`` = n/a, lists
    per class, plus ``class_names``, ``num_classes`` and ``num_pixels`` (counted, ignored ones excluded).
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
    """``{"mean_iou", "pixel_accuracy"}`` of one image (``None`` when it has no labelled pixel); ``pred``:
    ids ``(H, W)`` or logits ``(C, H, W)``, optionally with a leading batch of 1."""
    p, t = _as_tensor(pred), _as_tensor(target)
    if p.is_floating_point() and p.ndim == t.ndim + 1 and p.shape[0] == num_classes:
        p, t = p.unsqueeze(0), t.unsqueeze(0)  # (C, H, W) logits of one image
    scores = score_tensors(confusion_matrix(p, t, num_classes=num_classes, ignore_index=ignore_index))
    return {"mean_iou": _to_py(scores["mean_iou"]), "pixel_accuracy": _to_py(scores["pixel_accuracy"])}
