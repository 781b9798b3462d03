"""Tests for fcn.metrics: the confusion-matrix accumulator and the four FCN metrics."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fcn import metrics as M
from fcn.metrics import (
    ConfusionMatrix,
    confusion_matrix,
    image_scores,
    score_tensors,
    segmentation_scores,
)

IGNORE = 255


# -- an independent brute-force reference ------------------------------------------------------------
def brute_confmat(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int | None) -> np.ndarray:
    """Pixel-by-pixel loop: skip the ignore value and any target outside [0, C)."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
        if ignore is not None and t == ignore:
            continue
        if not 0 <= t < num_classes:
            continue
        cm[t, p] += 1
    return cm


def brute_scores(cm: np.ndarray) -> dict:
    """Class-by-class loops with the documented n/a convention (None = n/a)."""
    n = cm.shape[0]
    total = int(cm.sum())
    ious, accs = [], []
    for k in range(n):
        tp = int(cm[k, k])
        in_gt = int(sum(cm[k, j] for j in range(n)))
        in_pred = int(sum(cm[i, k] for i in range(n)))
        union = in_gt + in_pred - tp
        ious.append(tp / union if union else None)
        accs.append(tp / in_gt if in_gt else None)
    valid_iou = [v for v in ious if v is not None]
    valid_acc = [v for v in accs if v is not None]
    fw = None
    if total:
        fw = sum(int(cm[k].sum()) * ious[k] for k in range(n) if cm[k].sum() > 0) / total
    return {
        "pixel_accuracy": sum(int(cm[k, k]) for k in range(n)) / total if total else None,
        "mean_accuracy": sum(valid_acc) / len(valid_acc) if valid_acc else None,
        "mean_iou": sum(valid_iou) / len(valid_iou) if valid_iou else None,
        "fw_iou": fw,
        "per_class_iou": ious,
        "per_class_accuracy": accs,
    }


def assert_close_or_none(actual, expected, tol=1e-12):
    if expected is None:
        assert actual is None
    else:
        assert actual is not None and actual == pytest.approx(expected, abs=tol)


def random_batch(seed: int, n=3, c=6, h=11, w=13):
    """Logits and a target with ignored pixels and out-of-range (negative and >= C) labels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g)
    target = torch.randint(0, c, (n, h, w), generator=g)
    # make predictions partly right so the metrics are not all near chance
    agree = torch.rand(n, h, w, generator=g) < 0.5
    logits[:, :, :, :] += 4.0 * torch.nn.functional.one_hot(target, c).permute(0, 3, 1, 2) * agree[:, None]
    r = torch.rand(n, h, w, generator=g)
    target[r < 0.1] = IGNORE
    target[(r >= 0.1) & (r < 0.15)] = c + 3
    target[(r >= 0.15) & (r < 0.2)] = -1
    return logits, target


# -- the accumulator ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_data(seed):
    logits, target = random_batch(seed)
    c = logits.shape[1]
    metric = ConfusionMatrix(num_classes=c, ignore_index=IGNORE)
    metric.update(logits[:2], target[:2])
    metric.update(logits[2:], target[2:])
    cm = metric.compute()
    expected_cm = brute_confmat(logits.argmax(1).numpy(), target.numpy(), c, IGNORE)
    assert cm.dtype == torch.int64 and cm.shape == (c, c)
    np.testing.assert_array_equal(cm.numpy(), expected_cm)
    assert cm.sum() < target.numel()  # ignored and out-of-range pixels really were dropped

    got = segmentation_scores(cm)
    want = brute_scores(expected_cm)
    for key in M.SUMMARY_KEYS:
        assert_close_or_none(got[key], want[key])
    for key in ("per_class_iou", "per_class_accuracy"):
        for a, b in zip(got[key], want[key]):
            assert_close_or_none(a, b)


def test_hand_computed_example():
    # 4 classes; pixels (target -> pred):
    #   0->0, 0->0, 0->1, 1->1, 1->3, 255->2 (ignored), 7->0 (target out of range: ignored)
    # confmat rows (gt): row0 = [2, 1, 0, 0], row1 = [0, 1, 0, 1], rows 2 and 3 empty
    # gt totals t = [3, 2, 0, 0], predicted totals p = [2, 2, 0, 1], diagonal = [2, 1, 0, 0]
    # pixel accuracy = (2 + 1) / 5 = 0.6
    # accuracy: class0 2/3, class1 1/2, class2 and class3 n/a (not in gt) -> mean = (2/3 + 1/2) / 2 = 7/12
    # IoU: class0 2/(3+2-2) = 2/3, class1 1/(2+2-1) = 1/3, class2 n/a (never seen), class3 0/(0+1-0) = 0
    #   mean IoU = (2/3 + 1/3 + 0) / 3 = 1/3
    # fw IoU = (3 * 2/3 + 2 * 1/3) / 5 = 8/15 ; pixel share = [3/5, 2/5, 0, 0]
    target = torch.tensor([[0, 0, 0, 1, 1, 255, 7]])
    pred = torch.tensor([[0, 0, 1, 1, 3, 2, 0]])
    metric = ConfusionMatrix(num_classes=4)
    metric.update(pred, target)
    cm = metric.compute()
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    s = segmentation_scores(cm, ["a", "b", "c", "d"])
    assert s["pixel_accuracy"] == pytest.approx(0.6)
    assert s["mean_accuracy"] == pytest.approx(7 / 12)
    assert s["mean_iou"] == pytest.approx(1 / 3)
    assert s["fw_iou"] == pytest.approx(8 / 15)
    assert s["per_class_iou"] == pytest.approx([2 / 3, 1 / 3, None, 0.0])
    assert s["per_class_accuracy"][:2] == pytest.approx([2 / 3, 1 / 2])
    assert s["per_class_accuracy"][2:] == [None, None]
    assert s["pixel_share"] == pytest.approx([0.6, 0.4, 0.0, 0.0])
    assert s["gt_pixels"] == [3, 2, 0, 0] and s["pred_pixels"] == [2, 2, 0, 1]
    assert s["num_pixels"] == 5 and s["num_classes"] == 4 and s["class_names"] == ["a", "b", "c", "d"]


def test_logits_and_ids_give_the_same_matrix():
    logits, target = random_batch(3)
    c = logits.shape[1]
    by_logits, by_ids = ConfusionMatrix(c), ConfusionMatrix(c)
    by_logits.update(logits, target)
    by_ids.update(logits.argmax(1), target)
    assert torch.equal(by_logits.compute(), by_ids.compute())
    assert torch.equal(by_ids.compute(), confusion_matrix(logits, target, num_classes=c))


def test_ignore_index_none_still_drops_out_of_range_targets():
    target = torch.tensor([[0, 1, 255, -1, 2]])
    pred = torch.tensor([[0, 1, 1, 1, 0]])
    cm = confusion_matrix(pred, target, num_classes=3, ignore_index=None)
    assert cm.sum() == 3
    # an in-range ignore_index removes that class's pixels
    cm = confusion_matrix(pred, target, num_classes=3, ignore_index=0)
    assert cm[0].sum() == 0 and cm.sum() == 2


def test_shard_merge_equals_single_pass():
    logits, target = random_batch(4, n=4)
    c = logits.shape[1]
    single = ConfusionMatrix(c)
    single.update(logits, target)
    a, b = ConfusionMatrix(c), ConfusionMatrix(c)
    a.update(logits[:1], target[:1])
    b.update(logits[1:3], target[1:3])
    b.update(logits[3:], target[3:])
    summed = a.compute() + b.compute()
    a.merge_state(b)  # after a compute(): the cached value must not be returned again
    assert torch.equal(a.compute(), single.compute())
    assert torch.equal(summed, single.compute())


def test_reset_and_state_reduction():
    metric = ConfusionMatrix(3)
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    assert metric.compute().sum() == 2
    metric.reset()
    assert metric.confmat.sum() == 0
    assert metric._reductions["confmat"] is not None  # summed across ranks
    assert metric.full_state_update is False and metric.is_differentiable is False


def test_invalid_inputs_raise_clear_errors():
    metric = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="do not match"):
        metric.update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match"):
        metric.update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))  # 2 != 3 classes
    with pytest.raises(ValueError, match="do not match"):
        metric.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class ids"):
        metric.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="positive integer"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3, ignore_index=2.5)
    # out-of-range predicted ids are counted during update (no host sync) and reported by compute
    metric.update(torch.tensor([[5, 0]]), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="outside"):
        metric.compute()
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([[-1]]), torch.tensor([[0]]), num_classes=2)
    with pytest.raises(ValueError, match="class names"):
        segmentation_scores(torch.eye(3, dtype=torch.long), ["a", "b"])
    with pytest.raises(ValueError, match="square"):
        segmentation_scores(torch.zeros(2, 3, dtype=torch.long))


# -- the n/a convention -------------------------------------------------------------------------------
def test_na_convention():
    # class 0: present and right; class 1: predicted but absent from gt; class 2: absent everywhere
    cm = torch.tensor([[4, 1, 0], [0, 0, 0], [0, 0, 0]])
    t = score_tensors(cm)
    assert t["per_class_iou"][0] == pytest.approx(0.8)
    assert t["per_class_iou"][1] == 0.0  # predicted, never in gt: IoU 0 ...
    assert math.isnan(t["per_class_accuracy"][1])  # ... and accuracy n/a
    assert math.isnan(t["per_class_iou"][2]) and math.isnan(t["per_class_accuracy"][2])
    s = segmentation_scores(cm)
    assert s["per_class_iou"] == [pytest.approx(0.8), 0.0, None]
    assert s["per_class_accuracy"] == [pytest.approx(0.8), None, None]
    assert s["mean_iou"] == pytest.approx(0.4)  # (0.8 + 0) / 2: class 2 left out, class 1 counted
    assert s["mean_accuracy"] == pytest.approx(0.8)  # only class 0 has an accuracy
    assert s["fw_iou"] == pytest.approx(0.8)
    json.dumps(s, allow_nan=False)  # strict JSON: no NaN anywhere


def test_empty_matrix_is_all_na_and_json_safe():
    s = segmentation_scores(torch.zeros(3, 3, dtype=torch.long))
    assert all(s[k] is None for k in M.SUMMARY_KEYS)
    assert s["per_class_iou"] == [None] * 3 and s["num_pixels"] == 0
    json.dumps(s, allow_nan=False)


# -- per image ----------------------------------------------------------------------------------------
def test_per_image_scores_match_a_one_image_matrix():
    logits, target = random_batch(6, n=1)
    c = logits.shape[1]
    cm = brute_confmat(logits.argmax(1).numpy(), target.numpy(), c, IGNORE)
    want = brute_scores(cm)
    got = image_scores(logits[0].argmax(0), target[0], num_classes=c)
    assert got["mean_iou"] == pytest.approx(want["mean_iou"])
    # (C, H, W) logits, numpy input and a leading batch of one are all accepted
    assert image_scores(logits[0], target[0], num_classes=c)["mean_iou"] == pytest.approx(want["mean_iou"])
    got = image_scores(logits.argmax(1).numpy(), target.numpy(), num_classes=c)
    assert got["mean_iou"] == pytest.approx(want["mean_iou"])
    assert got["pixel_accuracy"] == pytest.approx(want["pixel_accuracy"])


def test_per_image_all_ignored_is_nan():
    target = torch.full((4, 4), IGNORE)
    assert image_scores(torch.zeros(4, 4, dtype=torch.long), target, num_classes=3) == {
        "mean_iou": None,
        "pixel_accuracy": None,
    }


# -- devices ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_update_has_no_host_sync_and_matches_cpu():
    logits, target = random_batch(7)
    c = logits.shape[1]
    cpu = ConfusionMatrix(c)
    cpu.update(logits, target)
    gpu = ConfusionMatrix(c).cuda()
    logits_gpu, target_gpu = logits.cuda(), target.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu.update(logits_gpu, target_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(gpu.compute().cpu(), cpu.compute())
    gpu.update(torch.full_like(target_gpu, c), target_gpu)  # out-of-range ids: counted on the device
    with pytest.raises(ValueError, match="outside"):
        gpu.compute()


# -- real DDP (2 processes, gloo) ---------------------------------------------------------------------
def _ddp_worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        logits, target = random_batch(11, n=5)
        metric = ConfusionMatrix(logits.shape[1])
        # uneven shards: rank 0 gets images 0-2 (two updates), rank 1 gets images 3-4 (one update)
        if rank == 0:
            metric.update(logits[:1], target[:1])
            metric.update(logits[1:3], target[1:3])
        else:
            metric.update(logits[3:], target[3:])
        synced = metric.compute()  # torchmetrics all-gathers and sums the state
        if rank == 0:
            torch.save(synced, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_gloo_sync_equals_single_pass(tmp_path):
    out_file = str(tmp_path / "confmat.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True)
    logits, target = random_batch(11, n=5)
    single = ConfusionMatrix(logits.shape[1])
    single.update(logits, target)
    synced = torch.load(out_file, weights_only=True)
    assert torch.equal(synced, single.compute())
