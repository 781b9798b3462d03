"""The training command: a LightningCLI with the data description linked into the model.

``python scripts/train.py fit --config configs/camvid/fcn8s.yaml`` (also ``validate`` / ``test`` with
``--ckpt_path``). Checkpoints (README "Long runs"):

- ``best.ckpt``: the best epoch on val mIoU (the ``--checkpoint.*`` options);
- ``last.ckpt``: the newest step, written at every training-epoch end (after validation, whatever it
  scored; every N-th with ``--last_every_n_epochs N``), every ``--checkpoint_every`` minutes inside an
  epoch, and when SIGTERM or Ctrl-C stops the run.
  Lightning writes both atomically (a temporary file, then a rename). ``--ckpt_path last.ckpt`` resumes at
  the saved global step with the same learning-rate schedule.
"""

from __future__ import annotations

import inspect
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

# Model arguments that the data module sets (linked at instantiation), with the flag that sets them.
LINKED = {
    "num_classes": "--data.dataset (and --data.classes_file for folder data)",
    "class_names": "--data.dataset (and --data.classes_file for folder data)",
    "palette": "--data.dataset (and --data.classes_file for folder data)",
    "ignore_index": "--data.ignore_index",
    "mean": "the data module (ImageNet statistics, what the backbones expect)",
    "std": "the data module (ImageNet statistics, what the backbones expect)",
    "class_weights": "--data.class_weighting median_frequency",
}


class TrainingStopped(Exception):
    """SIGTERM or Ctrl-C stopped training; the message says where ``last.ckpt`` is and how to resume."""

    def __init__(self, message: str, exit_code: int, *, report: bool = True) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.report = report  # False on every rank but the first: one line per run


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` holding the newest step, whatever val scored (Lightning's ``save_last`` writes it only
    when a top-k checkpoint is written since 2.6, so with ``save_top_k=1`` it was a copy of the best).

    Two stock triggers cannot share one ``ModelCheckpoint``, so :func:`last_checkpoints` makes one at every
    training-epoch end (``stop_saver=True``: also the one that saves on SIGTERM / Ctrl-C) and one every
    ``train_time_interval``, both writing ``<dirpath>/last.ckpt``.
    """

    def __init__(
        self,
        dirpath: str | Path | None,
        *,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int = 1,
        stop_saver: bool = False,
    ) -> None:
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
        self.stop_saver = stop_saver
        self.stopped_by: str | None = None  # "SIGTERM" / "SIGINT" once a signal stopped the run
        self.saved_on_stop: Path | None = None
        self._previous_sigint: Any = None  # SIGINT's handler before on_train_start, put back at the end

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning's own SIGTERM handler runs a collective broadcast inside the handler and forwards the
        # signal to the other ranks: with DDP, a SIGTERM to the process group (every rank broadcasting from
        # its handler) or to one rank (which stops a batch before the others) deadlocks. Ctrl-C raises
        # KeyboardInterrupt wherever each rank is. Here both only note the signal; the ranks agree on it at
        # the next batch end (one all-reduce of a flag, DDP only), and Lightning then stops every rank at the
        # same step (its SIGTERM path). A second Ctrl-C stops at once. Lightning puts SIGTERM's previous
        # handler back when the run ends; SIGINT's is put back by ``_restore_sigint``.
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
        # A signal ends in Lightning's SIGTERMException (a SystemExit) after the current batch; a second
        # Ctrl-C in KeyboardInterrupt. Any other error is a bug or bad input, not a stop to resume from.
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
    """The ``last.ckpt`` writers: at the end of every ``every_n_epochs``-th training epoch and on stop,
    and every ``every_minutes`` minutes of training (none when ``every_minutes`` is 0)."""
    writers = [LastCheckpoint(dirpath, every_n_epochs=every_n_epochs, stop_saver=True)]
    if every_minutes > 0:
        writers.append(LastCheckpoint(dirpath, train_time_interval=timedelta(minutes=every_minutes)))
    return writers


def _same(a: Any, b: Any) -> bool:
    """Equal, a list equal to a tuple with the same items included."""
    sequences = (list, tuple)
    return list(a) == list(b) if isinstance(a, sequences) and isinstance(b, sequences) else a == b


class FCNCLI(LightningCLI):
    """LightningCLI with the data description linked into the model, checkpointing on val mIoU and a
    ``last.ckpt`` that always holds the newest step."""

    def __init__(self, *args: Any, command: Sequence[str] = (), **kwargs: Any) -> None:
        self.command = list(command)  # the arguments as given, for the resume command
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
        """Parse, then check what needs no instantiation (before Lightning reads ``--ckpt_path``'s
        hyper-parameters into the config). ``--print_config`` also shows the values the data module gives
        the model (it knows them once instantiated), as comments after the config."""
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
            if value is not None and not _same(value, params[key].default):
                raise SettingError(
                    f"--model.init_args.{key} is set by the data module and would be ignored; "
                    f"it comes from {flag}"
                )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        best = trainer.checkpoint_callback
        if self.subcommand == "fit" and best is not None:
            every = float(self.config[self.subcommand].get("checkpoint_every") or 0)
            if every < 0:
                raise SettingError(f"--checkpoint_every must be 0 or more minutes, got {every}")
            n = int(self.config[self.subcommand].get("last_every_n_epochs", 1))
            if n < 1:
                raise SettingError(f"--last_every_n_epochs must be 1 or more, got {n}")
            self.last_writers = last_checkpoints(best.dirpath, every_minutes=every, every_n_epochs=n)
            trainer.callbacks.extend(self.last_writers)
        return trainer

    # -- checks before fit/validate/test -----------------------------------------------------------------
    def _check_outputs(self) -> None:
        check_writable(self.trainer.default_root_dir)
        for logger in self.trainer.loggers:
            check_writable(logger.save_dir, "the logger's save_dir (--trainer.logger)")
        best = self.trainer.checkpoint_callback
        if best is not None and best.dirpath is not None:
            check_writable(best.dirpath, "--checkpoint.dirpath")

    def _check_ckpt_path(self, sub: str) -> None:
        ckpt = self.config[sub].get("ckpt_path")
        if not ckpt or ckpt in ("best", "hpc", "registry"):
            return
        if ckpt == "last":
            dirpath = self.config[sub].get("checkpoint", {}).get("dirpath")
            if dirpath is None:
                return  # Lightning looks for it in its default folder and says so
            ckpt = str(Path(dirpath) / "last.ckpt")
        path = Path(ckpt)
        if path.is_dir():
            raise CheckpointError(f"--ckpt_path {ckpt} is a folder; pass the .ckpt file (e.g. its last.ckpt)")
        if not path.is_file():
            raise CheckpointError(f"--ckpt_path {ckpt} does not exist; pass a .ckpt written by training")
        try:
            read_checkpoint(path)  # weights_only load + validation: one line instead of Lightning's traceback
        except CheckpointError as err:
            raise CheckpointError(f"--ckpt_path: {err} (or start without --ckpt_path)") from err

    def before_fit(self) -> None:
        self._check_outputs()
        for advice in emulated_bf16(self.trainer, self.model, native=cpu_has_native_bf16()):
            rank_zero_warn(advice)

    # -- stops -------------------------------------------------------------------------------------------
    def _stopped(self, writer: LastCheckpoint) -> TrainingStopped:
        code = 130 if writer.stopped_by == "SIGINT" else 143  # 128 + the signal's number
        if writer.saved_on_stop is None:
            message = f"stopped by {writer.stopped_by} before the first step (nothing saved)"
            return TrainingStopped(message, code, report=self.trainer.is_global_zero)
        step = self.trainer.global_step
        cleaned = list(self.command)  # without the old --ckpt_path
        while "--ckpt_path" in cleaned:
            i = cleaned.index("--ckpt_path")
            del cleaned[i : i + 2]
        cleaned = [a for a in cleaned if not a.startswith("--ckpt_path=")]
        program = sys.argv[0] if sys.argv[0].endswith(".py") else Path(sys.argv[0]).name
        python = ["python"] if program.endswith(".py") else []
        command = shlex.join([*python, program, *cleaned, "--ckpt_path", str(writer.saved_on_stop)])
        return TrainingStopped(
            f"stopped by {writer.stopped_by} at global step {step}; saved {writer.saved_on_stop}; "
            f"resume with: {command}",
            code,
            report=self.trainer.is_global_zero,
        )


def emulated_bf16(trainer: Trainer, model: LightningModule, *, native: bool) -> list[str]:
    """One line per bf16 setting of this run that a CPU without native bf16 (``native`` False, see
    :func:`fcn.tuning.cpu_has_native_bf16`) emulates, ~14x slower than fp32, with the flag that fixes it."""
    if native or not isinstance(trainer.accelerator, CPUAccelerator):
        return []
    why = (
        "this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 is emulated: "
        "~14x slower than fp32 (docs/RESULTS.md section 8)"
    )
    found = []
    if "bf16" in str(trainer.precision):
        found.append(f"--trainer.precision {trainer.precision}: {why}; add --trainer.precision 32")
    if getattr(model.hparams, "teacher_precision", None) == "bf16":
        found.append(
            f"--model.init_args.teacher_precision bf16: {why}; add --model.init_args.teacher_precision 32"
        )
    return found


def run_cli(args: Sequence[str] | None) -> FCNCLI:
    """Run the training CLI on ``args`` (without the program name; None: ``sys.argv``) and return it."""
    return FCNCLI(
        SegmentationModule,
        SegDataModule,
        subclass_mode_model=True,
        args=None if args is None else list(args),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
        command=sys.argv[1:] if args is None else args,
    )


def summarise_fit(cli: FCNCLI) -> None:
    ckpt = cli.trainer.checkpoint_callback
    if ckpt is None or ckpt.best_model_score is None:
        return
    print(f"val mIoU: {float(ckpt.best_model_score):.3f}")
    print(f"best checkpoint: {ckpt.best_model_path}")
