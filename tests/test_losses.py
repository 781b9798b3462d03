"""Tests for fcn.losses.segmentation_loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fcn.losses import segmentation_loss

IGNORE = 255


def test_matches_a_hand_computation():
    # two classes, three pixels (the third is ignored):
    #   pixel a: logits [0, ln 3] -> p = [1/4, 3/4], target 1 -> -ln(3/4)
    #   pixel b: logits [ln 4, 0] -> p = [4/5, 1/5], target 1 -> -ln(1/5)
    #   pixel c: ignored, its logits must not matter
    logits = torch.tensor([[0.0, math.log(4.0), 100.0], [math.log(3.0), 0.0, -100.0]]).reshape(1, 2, 1, 3)
    target = torch.tensor([[[1, 1, IGNORE]]])
    expected = (-math.log(3 / 4) - math.log(1 / 5)) / 2
    assert segmentation_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # weights [1, 3]: both pixels are class 1, so the weighted mean is unchanged ...
    weights = torch.tensor([1.0, 3.0])
    assert segmentation_loss(logits, target, class_weights=weights).item() == pytest.approx(
        expected, rel=1e-6
    )
    # ... but relabelling pixel b as class 0 (-ln(4/5), weight 1) gives (3 * -ln(3/4) + 1 * -ln(4/5)) / 4
    target_b0 = torch.tensor([[[1, 0, IGNORE]]])
    weighted = (3 * -math.log(3 / 4) + 1 * -math.log(4 / 5)) / 4
    got = segmentation_loss(logits, target_b0, class_weights=weights).item()
    assert got == pytest.approx(weighted, rel=1e-6)
    assert segmentation_loss(logits, target_b0).item() != pytest.approx(weighted, rel=1e-3)


def _random_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (2, 5, 6, 7), a target whose first two rows are ignored, and 5 class weights in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 6, 7, generator=g)
    target = torch.randint(0, 5, (2, 6, 7), generator=g)
    target[:, :2] = IGNORE
    return logits, target, torch.rand(5, generator=g) + 0.5


def test_matches_torch_mean_with_weights_and_smoothing():
    logits, target, weights = _random_batch(0)
    for w, eps in [(None, 0.0), (weights, 0.0), (None, 0.1), (weights, 0.2)]:
        ours = segmentation_loss(logits, target, class_weights=w, label_smoothing=eps)
        ref = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE, label_smoothing=eps)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5), (w, eps)


def test_ignored_pixels_do_not_count():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (1, 4, 4), generator=g)
    target[0, 0] = IGNORE
    changed = logits.clone()
    changed[:, :, 0] = 50 * torch.randn(1, 3, 4, generator=g)
    assert segmentation_loss(logits, target).item() == pytest.approx(
        segmentation_loss(changed, target).item()
    )


def test_all_ignored_batch_is_zero_with_a_finite_grad():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    target = torch.full((2, 3, 3), IGNORE)
    for w in (None, torch.ones(4)):
        loss = segmentation_loss(logits, target, class_weights=w, label_smoothing=0.1)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad).all() and grad.abs().sum() == 0


def test_custom_ignore_index_and_low_precision_logits():
    logits = torch.randn(1, 3, 4, 4).to(torch.bfloat16)
    target = torch.randint(0, 3, (1, 4, 4))
    target[0, 0] = -100
    loss = segmentation_loss(logits, target, ignore_index=-100, class_weights=torch.ones(3))
    ref = F.cross_entropy(logits.float(), target, ignore_index=-100)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="do not match"):
        segmentation_loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="one weight per class"):
        segmentation_loss(
            torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), class_weights=torch.ones(2)
        )
    with pytest.raises(ValueError, match="label_smoothing"):
        segmentation_loss(
            torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), label_smoothing=1.5
        )


def test_ohem_keeps_the_hardest_pixels():
    # the hand example above: pixel b (-ln 1/5) is harder than pixel a (-ln 3/4); half of the two
    # labelled pixels is one pixel, so only b counts, and the ignored pixel c is never picked
    logits = torch.tensor([[0.0, math.log(4.0), 100.0], [math.log(3.0), 0.0, -100.0]]).reshape(1, 2, 1, 3)
    logits.requires_grad_(True)
    target = torch.tensor([[[1, 1, IGNORE]]])
    loss = segmentation_loss(logits, target, ohem_fraction=0.5)
    assert loss.item() == pytest.approx(-math.log(1 / 5), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[0, :, 0, 1].abs().sum() > 0  # b is trained ...
    assert grad[0, :, 0, 0].abs().sum() == 0 and grad[0, :, 0, 2].abs().sum() == 0  # ... a and c are not
    # fraction 1 is the plain loss
    assert segmentation_loss(logits, target, ohem_fraction=1.0).item() == pytest.approx(
        segmentation_loss(logits, target).item()
    )


def test_ohem_matches_a_sorted_reference_with_weights():
    logits, target, weights = _random_batch(2)
    valid = target != IGNORE
    for w in (None, weights):
        pixel_w = torch.ones(5)[target.clamp(0, 4)] if w is None else w[target.clamp(0, 4)]
        per_pixel = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE, reduction="none")
        for fraction in (0.1, 0.3, 0.75):
            k = math.ceil(fraction * int(valid.sum()))
            order = per_pixel[valid].argsort(descending=True)[:k]
            ref = per_pixel[valid][order].sum() / pixel_w[valid][order].sum()
            ours = segmentation_loss(logits, target, class_weights=w, ohem_fraction=fraction)
            assert ours.item() == pytest.approx(ref.item(), rel=1e-5), (w, fraction)
            assert ours.item() > segmentation_loss(logits, target, class_weights=w).item()


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_bad_ohem_fraction_raises(fraction):
    with pytest.raises(ValueError, match="ohem_fraction"):
        segmentation_loss(
            torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), ohem_fraction=fraction
        )
