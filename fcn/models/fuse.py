"""Inference-time folding of BatchNorm into the convolution before it.

In eval mode ``bn(conv(x))`` is an affine map per output channel, so it folds exactly (up to float
rounding) into the convolution's weight and bias. torchvision's VGG16-BN and MobileNetV3 blocks are
``nn.Sequential``s with a ``Conv2d`` directly followed by its ``BatchNorm2d``; those pairs are fused and
the BatchNorm becomes ``nn.Identity``. On the CPU the student spends about a quarter of its forward pass
in BatchNorm (see docs/RESULTS.md section 7).
"""

from __future__ import annotations

import itertools

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fcn.models.errors import ModelError


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold every ``Conv2d`` -> ``BatchNorm2d`` pair of consecutive ``nn.Sequential`` children, in place.

    The model must be in eval mode (BatchNorm then uses its running statistics). Returns the number of
    pairs fused (0 for a model without BatchNorm).
    """
    if model.training:
        raise ModelError("fuse_conv_bn needs a model in eval mode (call model.eval() first)")
    fused = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for first, second in itertools.pairwise(names):
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
