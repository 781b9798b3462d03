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
    except Exception as err:
        user = _user_error(err)
        if user is None:
            raise
        print(f"error: {user}", file=sys.stderr)
        return 2


def train_main(argv: Sequence[str] | None = None) -> int:
    """``python scripts/train.py [fit|validate|test] --config FILE ...``; no arguments: the demo."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        args = ["fit", "--config", str(DEMO_CONFIG)]

    def run() -> None:
        from fcn.train import run_cli, summarise_fit

        cli = run_cli(args)
        if cli.subcommand == "fit" and cli.trainer.is_global_zero:
            summarise_fit(cli)

    return _guard(run)


def short_openmp_spin() -> bool:
    """Shorten libgomp's spin-wait (see ``PREDICT_SPINCOUNT``) when torch is not loaded yet and neither
    ``GOMP_SPINCOUNT`` nor ``OMP_WAIT_POLICY`` is set; returns whether it did."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = PREDICT_SPINCOUNT
    return True


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


evaluate_main = _delegate("fcn.evaluate")
predict_main = _delegate("fcn.predict", prepare=short_openmp_spin)
export_main = _delegate("fcn.export")
benchmark_main = _delegate("fcn.benchmark")
