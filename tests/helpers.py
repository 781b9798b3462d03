"""Helpers shared by the test modules (pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

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


def huge_header_image(kind: str, width: int = 60000, height: int = 60000) -> bytes:
    """A tiny file whose header claims ``width x height`` pixels (``kind`` "png" or "jpg"); decoding it
    would allocate the whole image, so readers must refuse it from the header."""
    import struct
    import zlib

    import cv2
    import numpy as np

    if kind == "png":

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        idat = zlib.compress(b"\0" * 16)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    data = bytearray(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    sof = data.find(b"\xff\xc0")  # baseline frame header: length (2), precision (1), height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def signal_when_ready(
    cmd: list[str], ready: Callable[[], bool], signum: int, *, wait: float, env: dict[str, str] | None = None
) -> tuple[bool, int, str]:
    """Start ``cmd``, send it ``signum`` once ``ready()`` holds (or after ``wait`` seconds), wait for it to
    end; returns (whether it was still running when signalled, exit code, stderr). Never leaves it running.

    The child starts with SIGINT's default action: a shell without job control starts background jobs
    (e.g. ``pytest &``) with SIGINT ignored, the child would inherit that and Ctrl-C tests would fail."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.002)
        still_running = proc.poll() is None
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=wait)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return still_running, proc.returncode, stderr
