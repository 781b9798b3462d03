"""Weight initialisers shared by the FCN heads."""

from __future__ import annotations

import torch
from torch import nn


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """Return a ``(channels, channels, k, k)`` transposed-convolution weight that upsamples bilinearly.

    Each channel is upsampled independently (the kernel is zero between different channels), as in
    the FCN paper's ``upsample_filt``. With ``stride = factor`` and ``kernel_size = 2 * factor`` the
    layer reproduces bilinear interpolation with half-pixel alignment (``align_corners=False``)
    away from the borders.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    filt_1d = 1 - (og - center).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
    weight[range(channels), range(channels)] = filt_1d[:, None] * filt_1d[None, :]
    return weight.float()


def make_upsampler(
    channels: int, factor: int, *, padding: int = 0, learnable: bool = True
) -> nn.ConvTranspose2d:
    """A ``ConvTranspose2d`` (kernel ``2 * factor``, stride ``factor``, no bias) initialised to bilinear.

    ``learnable=False`` freezes it (``requires_grad=False``), as in the paper's fixed upsampling.
    """
    layer = nn.ConvTranspose2d(
        channels, channels, kernel_size=2 * factor, stride=factor, padding=padding, bias=False
    )
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, 2 * factor))
    layer.weight.requires_grad_(learnable)
    return layer


def zero_init(layer: nn.Conv2d) -> nn.Conv2d:
    """Zero a score layer's weight and bias so a new skip branch starts by contributing nothing."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer
