"""Heap corruption in oneDNN's AMX bf16 backward-weights convolution (bias gradient overrun).

Plain PyTorch, no other dependency. On a CPU with AMX (``amx_bf16`` in /proc/cpuinfo) and 2+ threads,
torch 2.14.1 (oneDNN v3.12.0) aborts within a few iterations with a glibc heap error such as
``free(): invalid next size (fast)`` or ``corrupted size vs. prev_size``. Expected: it prints ``OK``.

    python amx_bf16_conv_bwd_bias.py            # aborts (rc 134)
    python amx_bf16_conv_bwd_bias.py --no-bias  # OK: the same convolution without a bias gradient
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python amx_bf16_conv_bwd_bias.py  # OK (no AMX kernels)
    OMP_NUM_THREADS=1 python amx_bf16_conv_bwd_bias.py                    # OK

The failing primitive (``ONEDNN_VERBOSE=1``) is ``brgconv_bwd_w:avx10_1_512_amx`` with
``bia:bf16:a:blocked:a::f0``, e.g. ``mb2_ic4096oc11_ih2oh2kh1...``. It needs out channels not a multiple of
16 (11, 12, 5, 1 abort; 16, 32 do not) and more than 2048 in channels (2049 .. 8192 abort; 2048 and
less do not).
"""

import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--in-channels", type=int, default=4096)
    p.add_argument("--out-channels", type=int, default=11)
    p.add_argument("--no-bias", action="store_true")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    ic, oc = args.in_channels, args.out_channels
    weight = torch.randn(oc, ic, 1, 1, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    mask = [False, True, not args.no_bias]  # grad_input, grad_weight, grad_bias
    for i in range(args.iters):
        x = torch.randn(2, ic, 2, 2, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        grad_out = torch.randn(2, oc, 2, 2, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        # The backward of nn.Conv2d(ic, oc, 1) in bf16 (also reached by autocast("cpu", torch.bfloat16)).
        torch.ops.aten.convolution_backward(
            grad_out, x, weight, [oc], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask
        )
        print(i, flush=True)
    print("OK")


if __name__ == "__main__":
    main()
