"""Entry points behind ``scripts/*.py`` and the ``fcn-*`` console commands.

``train_main`` is a LightningCLI (``fit`` / ``validate`` / ``test`` with YAML configs from
``configs/``); with no arguments it runs the demo. The other commands are argparse front-ends whose
work lives in :mod:`fcn.evaluate`, :mod:`fcn.predict`, :mod:`fcn.export` and :mod:`fcn.benchmark`.
Known user errors end in one ``error: ...`` line and exit code 2, never a traceback. Run as the process's
command (``argv`` None) they first apply the process settings of :mod:`fcn.tuning`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


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
        print(f"error: {_one_line(user)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    """An error's message; for one raised in a DataLoader worker, which PyTorch re-raises in the main
    process with the worker's whole traceback in the message, the original message alone."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last.removeprefix(prefix).removeprefix(f"{type(err).__qualname__}: ")


def train_main(argv: Sequence[str] | None = None) -> int:
    """``python scripts/train.py [fit|validate|test] --config FILE ...``; no arguments: the demo."""
    args = list(sys.argv[1:] if argv is None else argv)
    given = args if argv is not None else None  # None: LightningCLI reads sys.argv itself (no warning)
    if not args:
        given = ["fit", "--config", str(DEMO_CONFIG)]
    if argv is None:  # the process's own command line: its settings (fcn.tuning)
        from fcn.tuning import apply

        apply("train")

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


def _delegate(module: str) -> Callable[[Sequence[str] | None], int]:
    command = module.rsplit(".", 1)[-1]

    def main(argv: Sequence[str] | None = None) -> int:
        import importlib

        if argv is None:  # the process's own command line (not an in-process call): its settings
            from fcn.tuning import apply

            apply(command)

        mod = importlib.import_module(module)
        return _guard(lambda: mod.main(list(sys.argv[1:] if argv is None else argv)))

    main.__name__ = f"{command}_main"
    return main


evaluate_main = _delegate("fcn.evaluate")
predict_main = _delegate("fcn.predict")
export_main = _delegate("fcn.export")
plot_curves_main = _delegate("fcn.curves")
benchmark_main = _delegate("fcn.benchmark")
