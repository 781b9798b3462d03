"""Distillation losses, pseudo-labels, EMA and teacher freezing (pure tensor checks)."""

from __future__ import annotations

import math

import pytest
import torch

from fcn.checkpoint import CheckpointError, save_checkpoint
from fcn.distill import (
    FeatureAdapter,
    channel_wise_loss,
    ema_update,
    load_teacher,
    make_ema,
    pairwise_loss,
    pixel_kd_loss,
    pseudo_labels,
)
from fcn.models import build_model


def test_kd_is_zero_for_identical_logits() -> None:
    logits = torch.randn(2, 5, 7, 9)
    assert pixel_kd_loss(logits, logits.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_matches_hand_computation_with_temperature_and_ignore() -> None:
    # Two pixels, two classes. Pixel 0: student (0, 0), teacher (2, 0); pixel 1 is void.
    s = torch.tensor([[[[0.0, 5.0]], [[0.0, -5.0]]]])  # (1, 2, 1, 2)
    t = torch.tensor([[[[2.0, -5.0]], [[0.0, 5.0]]]])
    valid = torch.tensor([[[True, False]]])
    temp = 2.0
    # teacher softmax at T=2 for (2, 0): p = (e^1, 1) / (e^1 + 1); student at T=2: (0.5, 0.5)
    p1 = math.e / (math.e + 1)
    p2 = 1 - p1
    kl = p1 * math.log(p1 / 0.5) + p2 * math.log(p2 / 0.5)
    expected = kl * temp**2  # only the valid pixel counts, scaled by T^2
    got = pixel_kd_loss(s, t, temperature=temp, valid=valid)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # without the mask the void pixel (a large disagreement) changes the value
    assert pixel_kd_loss(s, t, temperature=temp).item() > expected
    # an all-void batch gives 0 with a gradient path
    s.requires_grad_(True)
    zero = pixel_kd_loss(s, t, temperature=temp, valid=torch.zeros_like(valid))
    zero.backward()
    assert zero.item() == 0.0 and torch.isfinite(s.grad).all()


def test_kd_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differ"):
        pixel_kd_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 4, 4, 4))


def test_feature_losses() -> None:
    torch.manual_seed(0)
    f = torch.randn(2, 8, 6, 6)
    assert pairwise_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert pairwise_loss(f, torch.randn(2, 16, 6, 6)).item() > 1e-3  # widths may differ
    assert channel_wise_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert channel_wise_loss(f, torch.randn(2, 8, 6, 6)).item() > 1e-3
    with pytest.raises(ValueError, match="adapt the student"):
        channel_wise_loss(f, torch.randn(2, 4, 6, 6))
    adapter = FeatureAdapter(8, 32)
    assert adapter(f, (12, 12)).shape == (2, 32, 12, 12)


def test_pseudo_labels_below_threshold_are_ignored() -> None:
    logits = torch.tensor([[[[4.0, 0.1]], [[0.0, 0.0]]]])  # pixel 0 confident class 0; pixel 1 ~50/50
    labels = pseudo_labels(logits, threshold=0.9, ignore_index=255)
    assert labels.tolist() == [[[0, 255]]]
    assert pseudo_labels(logits, threshold=0.5, ignore_index=255).tolist() == [[[0, 0]]]


def test_ema_update_is_exact() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    ema = make_ema(model)
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema_update(ema, model, decay=0.9)
    for b, e, m in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * m)
        assert not e.requires_grad
    assert torch.equal(ema[1].running_mean, model[1].running_mean)


def test_teacher_is_frozen_and_class_checked(tmp_path) -> None:
    net = build_model("student", num_classes=4)
    path = save_checkpoint(tmp_path / "t.ckpt", model=net, model_name="student")
    teacher = load_teacher(str(path), num_classes=4)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(CheckpointError, match="has 4 classes but the student/data has 11"):
        load_teacher(str(path), num_classes=11)
