"""The FCN score layers' convolution, with the bias added apart where oneDNN's AMX kernel overruns it.

On AMX CPUs, oneDNN 3.12 (torch 2.14.1) writes past the **bias gradient** in its bf16 backward-weights
convolution when the output channels are not a multiple of 16 and the input has over 2048 (FCN's
``score_fr``), corrupting the heap (docs/upstream/README.md has the reproducer). In bf16 CPU training
:func:`score_conv` runs such a layer bias-free plus a broadcast add, so autograd sums the bias gradient;
elsewhere it calls the plain ``nn.Conv2d`` as is (inference, fp32, CUDA and export unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def score_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; the bias added after a bias-free convolution when a bf16 CPU backward would compute its
    gradient (same values up to one bf16 rounding)."""
    bias = conv.bias
    if bias is None or not (torch.is_grad_enabled() and bias.requires_grad) or conv.padding_mode != "zeros":
        return conv(x)
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if x.device.type != "cpu" or not (torch.bfloat16 in (x.dtype, conv.weight.dtype) or autocast_bf16):
        return conv(x)
    out = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out + bias.to(out.dtype).view(1, -1, 1, 1)
