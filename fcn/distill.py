"""Distillation: student-teacher losses (pure tensor functions), teacher loading, EMA, pseudo-labels."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcn.checkpoint import load_model


def pixel_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, valid: Tensor | None = None
) -> Tensor:
    """Pixel-wise KD of ``(N, C, H, W)`` logits: ``KL(softmax(t / T) || softmax(s / T)) * T**2`` averaged
    over the ``valid`` pixels (optional ``(N, H, W)`` bool mask; an empty one gives 0, still in the graph)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; both must be (N, C, H, W) at the input size"
        )
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # (N, H, W)
    if valid is None:
        return kl.mean() * t * t
    valid = valid.to(kl.dtype)
    return (kl * valid).sum() / valid.sum().clamp_min(1.0) * t * t


class FeatureAdapter(nn.Module):
    """Trainable bias-free 1x1 convolution from the student's feature width to the teacher's, then a
    bilinear resize to the teacher's ``size``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, student_feat: Tensor, size: tuple[int, int]) -> Tensor:
        x = self.proj(student_feat)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


def _affinity(feat: Tensor) -> Tensor:
    f = F.normalize(feat.flatten(2).float(), dim=1)  # (N, C, HW)
    return f.transpose(1, 2) @ f  # cosine similarity of all positions, (N, HW, HW)


def pairwise_loss(student_feat: Tensor, teacher_feat: Tensor, *, pool_size: int | None = None) -> Tensor:
    """Pair-wise distillation: mean squared difference of the spatial cosine-similarity matrices of two
    ``(N, *, H, W)`` maps (channels may differ), average-pooled to ``pool_size`` squared first if given."""
    if pool_size is not None:
        student_feat = F.adaptive_avg_pool2d(student_feat, pool_size)
        teacher_feat = F.adaptive_avg_pool2d(teacher_feat, pool_size)
    return (_affinity(student_feat) - _affinity(teacher_feat)).pow(2).mean()


def channel_wise_loss(student_feat: Tensor, teacher_feat: Tensor, *, temperature: float = 4.0) -> Tensor:
    """Channel-wise distillation: ``KL * T**2`` between each channel's spatial softmax (temperature ``T``)
    of teacher and student, averaged over channels and images; equal ``(N, C, H, W)`` shapes."""
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"channel-wise distillation needs equal shapes, got {tuple(student_feat.shape)} and "
            f"{tuple(teacher_feat.shape)}; adapt the student features first"
        )
    t = temperature
    s = F.log_softmax(student_feat.flatten(2).float() / t, dim=-1)
    p = F.log_softmax(teacher_feat.flatten(2).float() / t, dim=-1)
    return (p.exp() * (p - s)).sum(-1).mean() * t * t


def pseudo_labels(teacher_logits: Tensor, *, threshold: float, ignore_index: int = 255) -> Tensor:
    """Teacher argmax where its softmax confidence is at least ``threshold``; ``ignore_index`` elsewhere."""
    prob, label = teacher_logits.float().softmax(dim=1).max(dim=1)
    return torch.where(prob >= threshold, label, torch.full_like(label, ignore_index))


def freeze(model: nn.Module) -> nn.Module:
    """Put a teacher in eval mode and stop every gradient to it."""
    return model.eval().requires_grad_(False)


def load_teacher(path: str, *, num_classes: int) -> nn.Module:
    """Load a frozen teacher from a training checkpoint; its classes must be the student's."""
    return freeze(load_model(path, num_classes=num_classes)[0])


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` to be updated with :func:`ema_update`."""
    return freeze(copy.deepcopy(model))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, *, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers (BN statistics) are copied."""
    for e, m in zip(ema.parameters(), model.parameters()):
        e.lerp_(m.detach(), 1.0 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)
