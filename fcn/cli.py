"""Entry points behind ``scripts/*.py`` and the ``fcn-*`` console commands.

``train_main`` is a LightningCLI (``fit`` / ``validate`` / ``test`` / ``predict`` with YAML configs from
``configs/``); with no arguments it runs the demo. The other commands are argparse front-ends whose
work lives in :mod:`fcn.evaluate`, :mod:`fcn.inference`, :mod:`fcn.export` and :mod:`fcn.benchmark`.
Known user errors end in one ``error: ...`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fcn.checkpoint import CheckpointError
from fcn.data.errors import DataError
from fcn.models import ModelError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
USER_ERRORS = (ModelError, DataError, CheckpointError, FloatingPointError, FileNotFoundError, PermissionError)


def _user_error(err: BaseException) -> BaseException | None:
    """The first known user error in an exception's cause/context chain (jsonargparse and Lightning wrap
    the errors raised while they instantiate classes or run hooks)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
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


def _delegate(module: str) -> Callable[[Sequence[str] | None], int]:
    def main(argv: Sequence[str] | None = None) -> int:
        import importlib

        mod = importlib.import_module(module)
        return _guard(lambda: mod.main(list(sys.argv[1:] if argv is None else argv)))

    main.__name__ = f"{module.rsplit('.', 1)[-1]}_main"
    return main


evaluate_main = _delegate("fcn.evaluate")
predict_main = _delegate("fcn.predict")
export_main = _delegate("fcn.export")
benchmark_main = _delegate("fcn.benchmark")
