"""bf16 training on CPUs with AMX: oneDNN's bf16 backward-weights convolution overruns the bias gradient
of FCN's ``score_fr`` (4096 -> num_classes), corrupting the heap (docs/upstream/README.md).
``fcn.models.score.score_conv`` adds that bias apart; these tests check it trains there and computes the
same values everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from fcn.models.score import score_conv


def _cpu_has_amx_bf16() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# score_fr is 4096 -> 11 as in the full model; the rest of the net is demo-sized so a step takes well under
# a second. Before the work-around this aborted (glibc heap error) within the first two steps.
_TRAIN = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from fcn.models import build_model

    torch.manual_seed(0)
    torch.set_num_threads(2)  # the overrun happens in oneDNN's multi-threaded bias reduction
    model = build_model("fcn8s", num_classes=11, width_mult=0.25, fc_dim=4096)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 11, (2, 64, 64))
    for _ in range(6):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert model.score_fr.bias.grad is not None and torch.isfinite(loss)
    print("trained")
    """
)


@pytest.mark.skipif(not _cpu_has_amx_bf16(), reason="needs a CPU with AMX (amx_bf16 in /proc/cpuinfo)")
def test_bf16_training_survives_on_amx() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _TRAIN], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("trained")


def _grads(conv: nn.Conv2d, x: torch.Tensor, fn) -> tuple[torch.Tensor, ...]:
    conv.zero_grad()
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(conv, x)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach().float(), x.grad, conv.weight.grad.clone(), conv.bias.grad.clone()


def test_score_conv_matches_the_fused_bias_in_bf16_training() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 11, kernel_size=1)  # 64 input channels: oneDNN's fused bias path is safe here
    x = torch.randn(2, 64, 5, 7)
    fused = _grads(conv, x, lambda c, t: c(t))
    apart = _grads(conv, x, score_conv)
    names = ("output", "input grad", "weight grad", "bias grad")
    for name, a, b in zip(names, fused, apart):
        # One extra bf16 rounding of the convolution output (before the bias) is the only difference.
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2, msg=name)
    assert apart[3].abs().sum() > 0


def test_score_conv_is_the_layer_itself_outside_bf16_training() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 11, kernel_size=1)
    x = torch.randn(1, 16, 4, 4)
    calls = []
    conv.register_forward_hook(lambda *_: calls.append(1))
    score_conv(conv, x)  # fp32 training
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        score_conv(conv, x)  # bf16 inference
    assert len(calls) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        score_conv(conv, x)  # bf16 training: the bias is added apart, the module is not called
    assert len(calls) == 2
