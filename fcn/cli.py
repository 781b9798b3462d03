"""Entry points behind ``scripts/*.py`` and the ``fcn-*`` console commands.

``train_main`` is a LightningCLI (``fit`` / ``validate`` / ``test`` / ``predict`` with YAML configs from
``configs/``); with no arguments it runs the demo. The other commands are argparse front-ends whose
work lives in :mod:`fcn.evaluate`, :mod:`fcn.inference`, :mod:`fcn.export` and :mod:`fcn.benchmark`.
Known user errors end in one ``error: ...`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
# libgomp's busy-wait after each parallel region, in spins (default 300000, ~8 ms on the 2-core CPU of
# docs/RESULTS.md section 7): PyTorch's idle OpenMP threads spin that long after every forward pass and
# take the cores that decode and write images next. 30000 (~1 ms) still bridges the gaps between the
# operators of one forward pass (measured equally fast). Set before torch loads; users' settings win.
PREDICT_SPINCOUNT = "30000"


def _user_error(err: BaseException) -> BaseException | None:
    """The first known user error in an exception's cause/context chain (jsonargparse and Lightning wrap
    the errors raised while they instantiate classes or run hooks)."""
    from fcn.checkpoint import CheckpointError  # here: importing this module must not load torch
    from fcn.data.errors import DataError
    from fcn.models import ModelError

    known = (ModelError, DataError, CheckpointError, FloatingPointError, FileNotFoundError, PermissionError)
    if "fcn.lit" in sys.modules:  # training settings (only loaded by the train command)
        known += (sys.modules["fcn.lit"].SettingError,)
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, known):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _guard(fn: Callable[[], int | None]) -> int:
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's code for SIGINT, not a traceback
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        user = _user_error(err)
        if user is None:
            raise
        print(f"error: {user}", file=sys.stderr)
        return 2


def train_main(argv: Sequence[str] | None = None) -> int:
    """``python scripts/train.py [fit|validate|test] --config FILE ...``; no arguments: the demo."""
    args = list(sys.argv[1:] if argv is None else argv)
    given = args if argv is not None else None  # None: LightningCLI reads sys.argv itself (no warning)
    if not args:
        given = ["fit", "--config", str(DEMO_CONFIG)]
    keep_freed_memory()

    def run() -> int:
        from fcn.train import TrainingStopped, run_cli, summarise_fit

        try:
            cli = run_cli(given)
        except TrainingStopped as stop:
            if stop.report:
                print(stop, file=sys.stderr)
            _end_loader_workers()
            return stop.exit_code
        if cli.subcommand == "fit" and cli.trainer.is_global_zero:
            summarise_fit(cli)
        return 0

    return _guard(run)


def _end_loader_workers() -> None:
    """After a stop: end the DataLoader workers that the stopped run left (they ignore the process group's
    first SIGTERM, see ``fcn.data.datamodule.seed_worker``), without PyTorch's SIGCHLD handler turning each
    exit into a traceback."""
    import multiprocessing
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=10)


def short_openmp_spin() -> bool:
    """Shorten libgomp's spin-wait (see ``PREDICT_SPINCOUNT``) when torch is not loaded yet and neither
    ``GOMP_SPINCOUNT`` nor ``OMP_WAIT_POLICY`` is set; returns whether it did."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = PREDICT_SPINCOUNT
    return True


# glibc malloc settings for the train, evaluate, predict and benchmark commands (mallopt parameter ->
# value). By default glibc gives freed blocks above a moving threshold back to the OS, so every batch maps
# its activations anew and page-faults them in (on the 2-core CPU of docs/RESULTS.md section 7 a fifth of
# predict's CPU time was kernel time): these keep them in the process for the next batch instead.
# Blocks of 32 MiB and more (glibc's ceiling for the mmap threshold) are mapped whatever the threshold
# unless mmap is off: oneDNN's 42 MiB buffer for the student's final upsampling (batch 4 at 360x480) was
# mapped and page-faulted in again on every forward pass, 10.8k faults and +25 % time per batch.
# FCN_DEFAULT_MALLOC=1 (or any MALLOC_*_ / GLIBC_TUNABLES setting of the user's) keeps glibc's defaults.
KEEP_FREED_MEMORY = {
    -3: 32 << 20,  # M_MMAP_THRESHOLD: blocks below 32 MiB (glibc's maximum) come from the heap, not mmap
    -4: 0,  # M_MMAP_MAX: larger blocks too (no mmap'd blocks at all)
    -1: 1 << 30,  # M_TRIM_THRESHOLD: give the heap's free top back to the OS only past 1 GiB
    -2: 64 << 20,  # M_TOP_PAD: grow the heap 64 MiB at a time
}
_MALLOC_ENV = ("FCN_DEFAULT_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_MALLOC_ENV += ("MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Apply ``KEEP_FREED_MEMORY`` with glibc's ``mallopt``; returns whether it did.

    Nothing changes off glibc, with ``FCN_DEFAULT_MALLOC`` set, when the user tunes malloc (``MALLOC_*_``
    or ``GLIBC_TUNABLES``), or when another allocator is preloaded (``LD_PRELOAD``: jemalloc, tcmalloc,
    mimalloc). The price: memory freed after the peak stays with the process (up to 1 GiB of it).
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _MALLOC_ENV):
        return False
    if any(k in os.environ.get("LD_PRELOAD", "") for k in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
        return False
    global _kept  # a process-wide setting, read back by predict --benchmark
    _kept = all(mallopt(param, value) == 1 for param, value in KEEP_FREED_MEMORY.items())
    return _kept


_kept = False


def release_freed_memory() -> None:
    """Give the heap's free memory back to the OS now (glibc ``malloc_trim``), e.g. before a peak-memory
    measurement; a no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def keeps_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` changed this process's malloc settings."""
    return _kept


def prepare_inference() -> None:
    """Process settings for the inference commands, before torch loads: shorter OpenMP spin-wait and
    glibc malloc keeping freed memory."""
    short_openmp_spin()
    keep_freed_memory()


def _delegate(
    module: str, *, prepare: Callable[[], object] | None = None
) -> Callable[[Sequence[str] | None], int]:
    def main(argv: Sequence[str] | None = None) -> int:
        import importlib

        if prepare is not None:
            prepare()

        mod = importlib.import_module(module)
        return _guard(lambda: mod.main(list(sys.argv[1:] if argv is None else argv)))

    main.__name__ = f"{module.rsplit('.', 1)[-1]}_main"
    return main


evaluate_main = _delegate("fcn.evaluate", prepare=keep_freed_memory)
predict_main = _delegate("fcn.predict", prepare=prepare_inference)
export_main = _delegate("fcn.export")
benchmark_main = _delegate("fcn.benchmark", prepare=keep_freed_memory)
