"""Process-wide settings of the console commands, applied by :mod:`fcn.cli` for the process's own command
line only, never by library or in-process calls such as ``predict_main([...])``. Each has an opt-out, and
a user's own setting of the same knob wins (gains on a 2-core CPU, 360x480, batch 4; docs/RESULTS.md 7):

- malloc keeps freed memory (:func:`keep_freed_memory`): student forward 84 -> 111 images/s, predict
  63 -> 82, fcn8s forward 2.68 -> 2.95; opt-out ``FCN_DEFAULT_MALLOC=1``, ``MALLOC_*_``, jemalloc...
- short OpenMP spin-wait (``GOMP_SPINCOUNT=30000``, predict): image threads get the cores right after a
  forward pass instead of ~8 ms later; opt-out ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` set.
- oneDNN for every convolution (predict, evaluate): student with 1 thread 40.7 -> 63.4 images/s;
  opt-out ``FCN_DEFAULT_CONV=1``.
- OpenCV single-threaded (predict): its pool would preempt the model's threads (and deadlocks forked
  loader workers); opt-out ``FCN_DEFAULT_OPENCV=1``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# libgomp's spins after a parallel region (default 300000, ~8 ms); ~1 ms still bridges a forward's operators
PREDICT_SPINCOUNT = "30000"

# glibc mallopt parameter -> value: keep freed activations for the next batch instead of page-faulting
# them in again (a fifth of predict's CPU time was kernel time)
KEEP_FREED_MEMORY = {
    -3: 32 << 20,  # M_MMAP_THRESHOLD: blocks below 32 MiB (glibc's maximum) come from the heap, not mmap
    -4: 0,  # M_MMAP_MAX: larger blocks too (no mmap'd blocks at all)
    -1: 1 << 30,  # M_TRIM_THRESHOLD: give the heap's free top back to the OS only past 1 GiB
    -2: 64 << 20,  # M_TOP_PAD: grow the heap 64 MiB at a time
}
_MALLOC_ENV = ("FCN_DEFAULT_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_MALLOC_ENV += ("MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")  # the user tunes malloc

_applied: set[str] = set()  # the settings this process got (read back by --benchmark and the loaders)


def short_openmp_spin() -> bool:
    """Shorten libgomp's spin-wait (``PREDICT_SPINCOUNT``) when torch is not loaded yet and neither
    ``GOMP_SPINCOUNT`` nor ``OMP_WAIT_POLICY`` is set; returns whether it did."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = PREDICT_SPINCOUNT
    return True


def _libc(symbol: str) -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return getattr(ctypes.CDLL("libc.so.6"), symbol)
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
        return None


def keep_freed_memory() -> bool:
    """Apply ``KEEP_FREED_MEMORY`` with glibc's ``mallopt`` unless ``_MALLOC_ENV`` is set or another
    allocator is preloaded; returns whether it did. Up to 1 GiB freed after the peak stays in the process."""
    preloaded = any(k in os.environ.get("LD_PRELOAD", "") for k in ("jemalloc", "tcmalloc", "mimalloc"))
    if preloaded or any(name in os.environ for name in _MALLOC_ENV):
        return False
    mallopt = _libc("mallopt")
    if mallopt is None or not all(mallopt(p, v) == 1 for p, v in KEEP_FREED_MEMORY.items()):  # type: ignore[operator]
        return False
    _applied.add("malloc")
    return True


def keeps_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` changed this process's malloc settings."""
    return "malloc" in _applied


def release_freed_memory() -> None:
    """Give the heap's free memory back to the OS now (glibc ``malloc_trim``; a no-op off glibc)."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)  # type: ignore[operator]


def onednn_convolutions() -> bool:
    """Whether loaders should run every CPU convolution with oneDNN (:func:`apply`; ``FCN_DEFAULT_CONV``)."""
    return "onednn" in _applied


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 arithmetic (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo); without it
    PyTorch emulates bf16, ~14x slower (docs/RESULTS.md section 8). Read only."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: unknown, taken as emulated
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def apply(command: str) -> None:
    """The settings of ``command`` (train, evaluate, predict, export, benchmark), before torch loads."""
    if command in ("export", "curves"):
        return
    if command == "predict":
        short_openmp_spin()
    keep_freed_memory()
    if command in ("predict", "evaluate") and not os.environ.get("FCN_DEFAULT_CONV"):
        _applied.add("onednn")
    if command == "predict" and not os.environ.get("FCN_DEFAULT_OPENCV"):
        import cv2

        cv2.setNumThreads(1)
        _applied.add("opencv")
