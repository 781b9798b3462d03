"""The training command: a LightningCLI with the data description linked into the model.

``python scripts/train.py fit --config configs/camvid/fcn8s.yaml`` (also ``validate`` / ``test`` with
``--ckpt_path``); checkpoints are kept on val mIoU (``best.ckpt``) and ``last.ckpt``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from fcn.checkpoint import CheckpointError
from fcn.data.datamodule import SegDataModule
from fcn.lit import SegmentationModule

LINKED = ("num_classes", "class_names", "palette", "ignore_index", "mean", "std", "class_weights")


def check_writable(directory: str | Path) -> None:
    """Create ``directory`` if needed and prove a file can be written there, or raise PermissionError."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(
            f"output directory {path} is not writable ({err.strerror}); "
            "choose another with --trainer.default_root_dir / the logger's save_dir"
        ) from err


class FCNCLI(LightningCLI):
    """LightningCLI with the data description linked into the model and checkpointing on val mIoU."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[override]
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/mIoU",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,  # best.ckpt / last.ckpt are overwritten
            }
        )
        for key in LINKED:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    def _check_outputs(self) -> None:
        check_writable(self.trainer.default_root_dir)
        for logger in self.trainer.loggers:
            check_writable(logger.save_dir)

    def _check_ckpt_path(self) -> None:
        ckpt = self.config[self.subcommand].get("ckpt_path")
        if ckpt and ckpt not in ("last", "best", "hpc", "registry") and not Path(ckpt).is_file():
            raise CheckpointError(f"--ckpt_path {ckpt} does not exist; pass a .ckpt written by training")

    def before_fit(self) -> None:
        self._check_outputs()
        self._check_ckpt_path()

    def before_validate(self) -> None:
        self._check_ckpt_path()

    def before_test(self) -> None:
        self._check_ckpt_path()


def run_cli(args: Sequence[str]) -> FCNCLI:
    """Run the training CLI on ``args`` (without the program name) and return it."""
    return FCNCLI(
        SegmentationModule,
        SegDataModule,
        subclass_mode_model=True,
        args=list(args),
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
    )


def summarise_fit(cli: FCNCLI) -> None:
    ckpt = cli.trainer.checkpoint_callback
    if ckpt is None or ckpt.best_model_score is None:
        return
    print(f"val mIoU: {float(ckpt.best_model_score):.3f}")
    print(f"best checkpoint: {ckpt.best_model_path}")
