"""Entry points behind ``scripts/*.py`` and the ``fcn-*`` console commands: the ``main(argv)`` of
:mod:`fcn.train`, :mod:`fcn.evaluate`, :mod:`fcn.predict` ... Known user errors end in one ``error: ...``
line and exit code 2; run as the process's command (``argv`` None) they first apply :mod:`fcn.tuning`."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from fcn import tuning  # no torch: its settings come before torch loads


def _user_error(err: BaseException) -> BaseException | None:
    """The first known user error in ``err``'s cause/context chain (jsonargparse and Lightning wrap them)."""
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
    """An error's message, without the worker's traceback that PyTorch adds to a DataLoader worker's."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last.removeprefix(prefix).removeprefix(f"{type(err).__qualname__}: ")


def _delegate(module: str) -> Callable[[Sequence[str] | None], int]:
    command = module.rsplit(".", 1)[-1]

    def main(argv: Sequence[str] | None = None) -> int:
        if argv is None:  # the process's own command line (not an in-process call): its settings
            tuning.apply(command)
        mod = importlib.import_module(module)
        return _guard(lambda: mod.main(list(sys.argv[1:] if argv is None else argv)))

    main.__name__ = f"{command}_main"
    return main


train_main = _delegate("fcn.train")
evaluate_main = _delegate("fcn.evaluate")
predict_main = _delegate("fcn.predict")
export_main = _delegate("fcn.export")
plot_curves_main = _delegate("fcn.curves")
benchmark_main = _delegate("fcn.benchmark")
