"""The FCN score layers' convolution, with the bias added apart where oneDNN's AMX kernel overruns it.

On CPUs with AMX (Sapphire Rapids and later), oneDNN 3.12 as shipped in torch 2.14.1 writes past the end of
the **bias gradient** in its bf16 backward-weights convolution (``brgconv_bwd_w:avx10_1_512_amx``) when the
number of output channels is not a multiple of 16, the input has more than 2048 channels and the reduction
runs on more than one thread: exactly FCN's ``score_fr`` (4096 -> num_classes, 1x1). The overrun corrupts
the heap and glibc aborts a step or two later (``corrupted size vs. prev_size``,
``free(): invalid next size``).
See docs/upstream/README.md and the plain-torch reproducer there.

:func:`score_conv` runs such a layer as a bias-free convolution plus a broadcast add in bf16 CPU training,
so oneDNN computes no bias gradient (autograd sums it instead); everywhere else it calls the layer as is,
so inference, fp32 and CUDA are unchanged and the layer stays a plain ``nn.Conv2d`` for the inference
transforms (:mod:`fcn.models.fuse`) and export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _bf16_on_cpu(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    if x.device.type != "cpu":
        return False
    if x.dtype == torch.bfloat16 or conv.weight.dtype == torch.bfloat16:
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def score_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, but with the bias added after a bias-free convolution when a bf16 CPU backward
    would compute the bias gradient (same values up to one bf16 rounding of the convolution output)."""
    bias = conv.bias
    if (
        bias is None
        or not (torch.is_grad_enabled() and bias.requires_grad)
        or conv.padding_mode != "zeros"
        or not _bf16_on_cpu(x, conv)
    ):
        return conv(x)
    out = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out + bias.to(out.dtype).view(1, -1, 1, 1)
