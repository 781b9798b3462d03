"""The training command, a LightningCLI with the data description linked into the model. It writes
``best.ckpt`` (best val mIoU, the ``--checkpoint.*`` options) and ``last.ckpt`` (the newest step, see
:class:`LastCheckpoint`), both atomically; ``--ckpt_path last.ckpt`` resumes (README "Long runs")."""

from __future__ import annotations

import inspect
import multiprocessing
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from fcn.checkpoint import CheckpointError, read_checkpoint
from fcn.data.datamodule import SegDataModule
from fcn.data.errors import DataError
from fcn.data.io import check_writable
from fcn.lit import SegmentationModule, SettingError
from fcn.tuning import cpu_has_native_bf16

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"  # what `python scripts/train.py` runs without arguments

# Model arguments that the data module sets (linked at instantiation), with the flag that sets them.
LINKED = {
    "num_classes": "--data.dataset (and --data.classes_file for folder data)",
    "class_names": "--data.dataset (and --data.classes_file for folder data)",
    "palette": "--data.dataset (and --data.classes_file for folder data)",
    "ignore_index": "--data.ignore_index",
    "mean": "the data module (ImageNet statistics, what the backbones expect)",
    "std": "the data module (ImageNet statistics, what the backbones expect)",
    "class_weights": "--data.class_weighting median_frequency",
    "exposure_target": "--data.exposure_target (auto: the training frames' mean grey level)",
}


class TrainingStopped(Exception):
    """SIGTERM or Ctrl-C stopped training; the message says where ``last.ckpt`` is and how to resume."""

    def __init__(self, message: str, exit_code: int, *, report: bool = True) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.report = report  # False on every rank but the first: one line per run


class LastCheckpoint(ModelCheckpoint):
    """Writes ``<dirpath>/last.ckpt`` with the newest step, whatever val scored (Lightning's ``save_last``
    only follows top-k writes): every ``minutes`` minutes if > 0, else at every ``every_n_epochs``-th
    training-epoch end and on SIGTERM / Ctrl-C (``stop_saver``). Two triggers cannot share one."""

    def __init__(self, dirpath: str | Path | None, *, every_n_epochs: int = 1, minutes: float = 0) -> None:
        train_time_interval = timedelta(minutes=minutes) if minutes > 0 else None
        super().__init__(
            dirpath=dirpath,
            filename=self.CHECKPOINT_NAME_LAST,
            monitor=None,
            save_top_k=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
            every_n_epochs=None if train_time_interval is not None else every_n_epochs,
            train_time_interval=train_time_interval,
        )
        self.stop_saver = train_time_interval is None
        self.stopped_by: str | None = None  # "SIGTERM" / "SIGINT" once a signal stopped the run
        self.saved_on_stop: Path | None = None
        self._previous_sigint: Any = None  # SIGINT's handler before on_train_start, put back at the end

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning's SIGTERM handler broadcasts from inside the handler, which deadlocks DDP whether one
        # rank or all get the signal. Here SIGTERM and Ctrl-C only note it; the ranks agree on it at the
        # next batch end and Lightning stops all at the same step. A second Ctrl-C stops at once.
        # Lightning restores SIGTERM's previous handler; ``_restore_sigint`` restores SIGINT's.
        super().on_train_start(trainer, pl_module)
        if not self.stop_saver or threading.current_thread() is not threading.main_thread():
            return

        def note(signum: int, frame: object) -> None:
            if self.stopped_by is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C
            self.stopped_by = signal.Signals(signum).name
            if trainer.world_size == 1:
                trainer._signal_connector.received_sigterm = True

        signal.signal(signal.SIGTERM, note)
        self._previous_sigint = signal.signal(signal.SIGINT, note)

    def _agree_on_stop(self, trainer: Trainer) -> None:
        if not self.stop_saver or trainer.world_size == 1:
            return
        if trainer.strategy.reduce_boolean_decision(self.stopped_by is not None, all=False):
            trainer._signal_connector.received_sigterm = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._agree_on_stop(trainer)
        super().on_train_batch_end(trainer, pl_module, *args)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._agree_on_stop(trainer)

    def _restore_sigint(self) -> None:
        previous, self._previous_sigint = self._previous_sigint, None
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_sigint()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        # A signal ends in SIGTERMException (a SystemExit), a second Ctrl-C in KeyboardInterrupt; not others.
        if not self.stop_saver or not isinstance(exception, (KeyboardInterrupt, SystemExit)):
            return
        if self.stopped_by is None:
            self.stopped_by = "SIGINT" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        if trainer.state.fn != "fit" or trainer.sanity_checking or trainer.global_step == 0:
            return
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path, weights_only=False)  # atomic; every rank takes part, rank 0 writes
        self.saved_on_stop = path


def last_checkpoints(
    dirpath: str | Path | None, *, every_minutes: float, every_n_epochs: int = 1
) -> list[LastCheckpoint]:
    """The :class:`LastCheckpoint` writers: epoch ends and stops, and a timer when ``every_minutes`` > 0."""
    writers = [LastCheckpoint(dirpath, every_n_epochs=every_n_epochs)]
    if every_minutes > 0:
        writers.append(LastCheckpoint(dirpath, minutes=every_minutes))
    return writers


class FCNCLI(LightningCLI):
    """LightningCLI with the data description linked into the model, ``best.ckpt`` and ``last.ckpt``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.command = list(kwargs.get("args") or sys.argv[1:])  # the arguments given, for the resume command
        self.last_writers: list[LastCheckpoint] = []
        try:
            super().__init__(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit) as stop:
            stopper = next((w for w in self.last_writers if w.stopped_by), None)
            if stopper is None:
                raise
            raise self._stopped(stopper) from stop

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[override]
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/mIoU",
                "checkpoint.mode": "max",
                "checkpoint.save_last": False,  # last.ckpt comes from LastCheckpoint (the newest step)
                "checkpoint.filename": "best",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,  # best.ckpt / last.ckpt are overwritten
            }
        )
        parser.add_argument(
            "--checkpoint_every",
            type=float,
            default=10.0,
            help="minutes of training between two writes of last.ckpt inside an epoch (0: epoch ends only); "
            "last.ckpt is also written at epoch ends (--last_every_n_epochs) and on SIGTERM / Ctrl-C",
        )
        parser.add_argument(
            "--last_every_n_epochs",
            type=int,
            default=1,
            help="write last.ckpt at the end of every N-th training epoch (default 1: every epoch); more "
            "for models whose checkpoint takes longer to write than an epoch to train (FCN-8s on a GPU)",
        )
        for key in LINKED:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    # -- before anything is built ----------------------------------------------------------------------
    def parse_arguments(self, parser, args) -> None:  # type: ignore[override]
        """Parse, then check what needs no instantiation (before Lightning reads ``--ckpt_path``). Here
        ``--print_config`` also shows the values the data module gives the model, as comments."""
        argv = list(sys.argv[1:] if args is None else args)
        show = any(a == "--print_config" or a.startswith("--print_config=") for a in argv)
        if show:
            args = [a for a in argv if not a.startswith("--print_config")]
        # args given while sys.argv is set: expected here (--print_config was cut out of the arguments)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if not sub:
            return
        self._check_linked(sub)
        self._check_ckpt_path(sub)
        if show:
            config = self.config[sub]
            print(self._parser(sub).dump(config), end="")
            print("# linked from the data module into model.init_args (set them with the --data.* flags):")
            try:
                data = SegDataModule(**dict(config["data"]))
                for key in LINKED:
                    print(f"#   {key}: {getattr(data, key)}")
            except DataError as err:  # e.g. the data is not there yet
                print(f"#   (the data module cannot tell yet: {err})")
            sys.exit(0)

    def _check_linked(self, sub: str) -> None:
        """A model argument that the data sets is refused unless it equals the module's default."""
        init = self.config[sub]["model"].get("init_args") or {}
        params = inspect.signature(SegmentationModule.__init__).parameters  # every linked key has a default
        for key, flag in LINKED.items():
            value = init.get(key, params[key].default)
            if isinstance(value, list):
                value = tuple(value)  # as the tuple defaults (mean, std)
            if value is not None and value != params[key].default:
                raise SettingError(
                    f"--model.init_args.{key} is set by the data module and would be ignored; "
                    f"it comes from {flag}"
                )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        best = trainer.checkpoint_callback
        if self.subcommand == "fit" and best is not None:
            config = self.config["fit"]
            every, n = float(config.get("checkpoint_every") or 0), int(config.get("last_every_n_epochs", 1))
            if every < 0:
                raise SettingError(f"--checkpoint_every must be 0 or more minutes, got {every}")
            if n < 1:
                raise SettingError(f"--last_every_n_epochs must be 1 or more, got {n}")
            self.last_writers = last_checkpoints(best.dirpath, every_minutes=every, every_n_epochs=n)
            trainer.callbacks.extend(self.last_writers)
        return trainer

    def _check_ckpt_path(self, sub: str) -> None:
        ckpt = self.config[sub].get("ckpt_path")
        if not ckpt or ckpt in ("best", "hpc", "registry"):
            return
        if ckpt == "last":
            dirpath = self.config[sub].get("checkpoint", {}).get("dirpath")
            if dirpath is None:
                return  # Lightning looks for it in its default folder and says so
            ckpt = str(Path(dirpath) / "last.ckpt")
        try:
            read_checkpoint(ckpt)  # weights_only load + validation: one line instead of Lightning's traceback
        except CheckpointError as err:
            raise CheckpointError(f"--ckpt_path: {err} (or start without --ckpt_path)") from err

    def before_fit(self) -> None:
        check_writable(self.trainer.default_root_dir)
        for logger in self.trainer.loggers:
            check_writable(logger.save_dir, "the logger's save_dir (--trainer.logger)")
        best = self.trainer.checkpoint_callback
        if best is not None and best.dirpath is not None:
            check_writable(best.dirpath, "--checkpoint.dirpath")
        for advice in emulated_bf16(self.trainer, self.model, native=cpu_has_native_bf16()):
            rank_zero_warn(advice)

    def after_fit(self) -> None:
        best = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and best is not None and best.best_model_score is not None:
            print(f"val mIoU: {float(best.best_model_score):.3f}")
            print(f"best checkpoint: {best.best_model_path}")

    # -- stops -------------------------------------------------------------------------------------------
    def _stopped(self, writer: LastCheckpoint) -> TrainingStopped:
        saved, message = writer.saved_on_stop, f"stopped by {writer.stopped_by}"
        if saved is None:
            message += " before the first step (nothing saved)"
        else:
            old, args = "--ckpt_path", self.command  # without the old --ckpt_path (and its value)
            cleaned = [a for i, a in enumerate(args) if not a.startswith(old) and args[i - 1 : i] != [old]]
            program = sys.argv[0] if sys.argv[0].endswith(".py") else Path(sys.argv[0]).name
            python = ["python"] if program.endswith(".py") else []
            command = shlex.join([*python, program, *cleaned, "--ckpt_path", str(saved)])
            message += f" at global step {self.trainer.global_step}; saved {saved}; resume with: {command}"
        code = 130 if writer.stopped_by == "SIGINT" else 143  # 128 + the signal's number
        return TrainingStopped(message, code, report=self.trainer.is_global_zero)


def emulated_bf16(trainer: Trainer, model: LightningModule, *, native: bool) -> list[str]:
    """One line per bf16 setting of this run that a CPU without native bf16 (``native`` False, see
    :func:`fcn.tuning.cpu_has_native_bf16`) emulates, ~14x slower than fp32, with the flag that fixes it."""
    if native or not isinstance(trainer.accelerator, CPUAccelerator):
        return []
    why = (
        "this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is emulated: "
        "~14x slower than fp32 (docs/RESULTS.md section 8)"
    )
    teacher = getattr(model.hparams, "teacher_precision", None)
    flags = {"--trainer.precision": trainer.precision, "--model.init_args.teacher_precision": teacher}
    return [f"{flag} {value}: {why}; add {flag} 32" for flag, value in flags.items() if "bf16" in str(value)]


def main(argv: Sequence[str]) -> int:
    """``python scripts/train.py [fit|validate|test] --config FILE ...`` (no arguments: the demo); fit prints
    the best val mIoU and checkpoint. Returns the exit code (130 / 143 after Ctrl-C / SIGTERM)."""
    try:
        FCNCLI(
            SegmentationModule,
            SegDataModule,
            subclass_mode_model=True,
            args=list(argv) or ["fit", "--config", str(DEMO_CONFIG)],
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": False},
        )
    except TrainingStopped as stop:
        if stop.report:
            print(stop, file=sys.stderr)
        # The loader workers the run left ignore the first SIGTERM (fcn.data.datamodule.seed_worker);
        # end them without PyTorch's SIGCHLD handler turning each exit into a traceback.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in multiprocessing.active_children():
            child.kill()
            child.join(timeout=10)
        return stop.exit_code
    return 0
