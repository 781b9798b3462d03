"""Inference-time model transforms: BatchNorm folded into the convolution before it (a quarter of the
student's CPU forward pass, docs/RESULTS.md section 7), and convolutions that always use oneDNN on the CPU.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fcn.models.errors import ModelError


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold every ``Conv2d`` directly followed by its ``BatchNorm2d`` in an ``nn.Sequential`` (as in
    torchvision's VGG16-BN and MobileNetV3) into the convolution, the BatchNorm becoming ``nn.Identity``;
    in place, in eval mode (running statistics: exact up to rounding). Returns the number of pairs fused."""
    if model.training:
        raise ModelError("fuse_conv_bn needs a model in eval mode (call model.eval() first)")
    fused = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for first, second in itertools.pairwise(list(seq._modules)):
            conv, bn = seq._modules[first], seq._modules[second]
            if (
                type(conv) is nn.Conv2d
                and type(bn) is nn.BatchNorm2d
                and bn.track_running_stats
                and bn.num_features == conv.out_channels
            ):
                seq._modules[first] = fuse_conv_bn_eval(conv, bn)
                seq._modules[second] = nn.Identity()
                fused += 1
    return fused


class OneDNNConv2d(nn.Conv2d):
    """A ``Conv2d`` that always runs oneDNN's convolution for float32 CPU input (same results).

    Single-threaded, PyTorch sends 1x1 convolutions with a batch under 16 to its slow reference im2col
    kernel (the student: 43.7 images/s against 65.7 with oneDNN, docs/RESULTS.md section 7). CUDA, other
    dtypes, autocast and string paddings take the usual path.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (
            input.device.type == "cpu"
            and input.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and not torch.is_autocast_enabled("cpu")
        ):
            return torch.ops.aten.mkldnn_convolution(
                input, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super().forward(input)


def use_onednn_convolutions(model: nn.Module) -> int:
    """Make every plain ``nn.Conv2d`` of ``model`` a :class:`OneDNNConv2d`, in place (weights untouched);
    returns how many (0 where PyTorch was built without oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = OneDNNConv2d
            changed += 1
    return changed
