"""Helpers shared by the test modules (pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import torch
from torch import nn

# A tiny FCN: an eighth of VGG16's width, 32-channel fc6/fc7 (fast on CPU, same code paths).
TINY = {"fc_dim": 32, "width_mult": 0.125}


def randomize_scores(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give the zero-initialised score layers random weights so the logits vary by class and pixel.

    Random biases are left at zero: they would swamp the tiny features. Returns the model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.any() and not name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()
