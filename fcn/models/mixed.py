"""CPU bf16 mixed-precision training: the depthwise convolutions whose bf16 backward is slow train in fp32.

With ``torch.autocast("cpu", dtype=torch.bfloat16)`` oneDNN 3.12 (torch 2.14.1) has no fast bf16 kernel
for two kinds of depthwise backward pass: 5x5 weights gradients fall back to the generic
``jit_bf16:avx512_core_bf16`` kernel, and stride-2 data gradients to ``brgconv_strided``. In the student's
MobileNetV3 (8 such layers) they took about 765 of the 1860 ms oneDNN spent in a batch-8 240x320 training
step (in fp32 the backward of all 15 depthwise layers took about 210 ms), which made bf16 training slower
than fp32 on an AMX CPU although every other convolution is faster. With them in fp32 the student's bf16
training step is about 1.2x faster than fp32 there. :func:`train_slow_depthwise_in_fp32` makes those layers
run in fp32 while autocast is on and gradients are recorded; inference and fp32 training are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class Fp32TrainingConv2d(nn.Conv2d):
    """A ``Conv2d`` that runs in fp32 (autocast off, input cast up) in CPU autocast training; its output is
    then fp32, which the next BatchNorm takes as is and the next autocast convolution casts back down."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(input.float())
        return super().forward(input)


def _slow_in_bf16(conv: nn.Conv2d) -> bool:
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    return depthwise and (max(conv.kernel_size) >= 5 or max(conv.stride) > 1)


def train_slow_depthwise_in_fp32(model: nn.Module) -> int:
    """Make the depthwise ``nn.Conv2d``s with a 5x5 (or larger) kernel or a stride of 2 a
    :class:`Fp32TrainingConv2d`, in place (weights and state dict untouched); returns how many.

    A training-time transform: :func:`fcn.models.fuse.fuse_conv_bn` folds only plain ``nn.Conv2d``s, so
    inference should build its model afresh (as checkpoints are loaded) rather than reuse this one.
    """
    changed = 0
    for module in model.modules():
        if type(module) is nn.Conv2d and _slow_in_bf16(module):
            module.__class__ = Fp32TrainingConv2d
            changed += 1
    return changed
