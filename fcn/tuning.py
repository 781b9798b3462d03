"""Process-wide settings of the console commands, in one place (figures: docs/RESULTS.md section 7).

Only :mod:`fcn.cli` applies them, and only for the process's own command line (``scripts/*.py``, the
``fcn-*`` commands); library functions and in-process calls such as ``predict_main([...])`` leave the
process alone. Each setting has an opt-out, and a user's own setting of the same knob always wins:

============================  =================================================  ==========================
setting                       measured gain (2-core CPU, 360x480, batch 4)        opt-out
============================  =================================================  ==========================
malloc keeps freed memory     student forward 84 -> 111 images/s, predict         ``FCN_DEFAULT_MALLOC=1``,
(:func:`keep_freed_memory`)   63 -> 82 (1.29x); fcn8s forward 2.68 -> 2.95        ``MALLOC_*_``, jemalloc...
short OpenMP spin-wait        writer/decoder threads get the cores right after   ``GOMP_SPINCOUNT`` or
(``GOMP_SPINCOUNT=30000``)    a forward pass instead of ~8 ms later               ``OMP_WAIT_POLICY`` set
oneDNN for every convolution  student with 1 thread 40.7 -> 63.4 images/s         ``FCN_DEFAULT_CONV=1``
OpenCV single-threaded        its pool would preempt the model's threads (and    ``FCN_DEFAULT_OPENCV=1``
                              deadlocks forked loader workers)
============================  =================================================  ==========================

:func:`cpu_has_native_bf16` only reads a fact (whether bf16 runs natively here); training warns on it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# libgomp's busy-wait after each parallel region, in spins (default 300000, ~8 ms on the 2-core CPU of
# docs/RESULTS.md section 7): PyTorch's idle OpenMP threads spin that long after every forward pass and
# take the cores that decode and write images next. 30000 (~1 ms) still bridges the gaps between the
# operators of one forward pass (measured equally fast). Set before torch loads; users' settings win.
PREDICT_SPINCOUNT = "30000"

# glibc malloc settings (mallopt parameter -> value). By default glibc gives freed blocks above a moving
# threshold back to the OS, so every batch maps its activations anew and page-faults them in (a fifth of
# predict's CPU time was kernel time): these keep them in the process for the next batch instead. Blocks of
# 32 MiB and more are mapped whatever the threshold unless mmap is off: oneDNN's 42 MiB buffer for the
# student's final upsampling (batch 4 at 360x480) was page-faulted in again on every forward pass (+25 %).
KEEP_FREED_MEMORY = {
    -3: 32 << 20,  # M_MMAP_THRESHOLD: blocks below 32 MiB (glibc's maximum) come from the heap, not mmap
    -4: 0,  # M_MMAP_MAX: larger blocks too (no mmap'd blocks at all)
    -1: 1 << 30,  # M_TRIM_THRESHOLD: give the heap's free top back to the OS only past 1 GiB
    -2: 64 << 20,  # M_TOP_PAD: grow the heap 64 MiB at a time
}
_MALLOC_ENV = ("FCN_DEFAULT_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_MALLOC_ENV += ("MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")

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
    """Apply ``KEEP_FREED_MEMORY`` with glibc's ``mallopt``; returns whether it did.

    Nothing changes off glibc, with ``FCN_DEFAULT_MALLOC`` set, when the user tunes malloc (``MALLOC_*_``
    or ``GLIBC_TUNABLES``), or when another allocator is preloaded (``LD_PRELOAD``: jemalloc, tcmalloc,
    mimalloc). The price: memory freed after the peak stays with the process (up to 1 GiB of it).
    """
    if any(name in os.environ for name in _MALLOC_ENV):
        return False
    if any(k in os.environ.get("LD_PRELOAD", "") for k in ("jemalloc", "tcmalloc", "mimalloc")):
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
    """Give the heap's free memory back to the OS now (glibc ``malloc_trim``), e.g. before a peak-memory
    measurement; a no-op off glibc."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)  # type: ignore[operator]


def onednn_convolutions() -> bool:
    """Whether the loaders should make every CPU convolution run oneDNN
    (:func:`fcn.models.fuse.use_onednn_convolutions`): set by :func:`apply` unless ``FCN_DEFAULT_CONV``."""
    return "onednn" in _applied


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 arithmetic (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo).

    Without it PyTorch emulates bf16: on an AMD EPYC (Zen 3, AVX2) one training step of the CPU teacher
    took 50 s in bf16-mixed against 3.6 s in fp32 (docs/RESULTS.md section 8). Read only, changes nothing.
    """
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
        # OpenCV without its own thread pool: predict's threads decode and encode in parallel already, and
        # the pool's threads would preempt the model's (nor is it fork-safe for DataLoader workers)
        import cv2

        cv2.setNumThreads(1)
        _applied.add("opencv")
