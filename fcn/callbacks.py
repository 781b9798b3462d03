"""Lightning callbacks for watching training: a one-line progress report and validation prediction grids.

Both are plain ``lightning.pytorch.callbacks.Callback`` s; the configs under ``configs/camvid_cpu/`` add them
through ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: fcn.callbacks.ProgressLine
        - class_path: fcn.callbacks.ValPredictionGrid
          init_args: {every_n_epochs: 5, num_images: 4}
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from fcn.data.io import colorize, write_bytes_atomic
from fcn.palette import IMAGENET_MEAN, IMAGENET_STD, default_palette


def format_duration(seconds: float, *, precise: bool = True) -> str:
    """``42s``, ``5m12s`` (``5m`` unless ``precise``), ``2h05m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return f"{minutes}m{rest:02d}s" if precise else f"{round(seconds / 60)}m"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m"


def count_images(batch: Any) -> int:
    """Images in a training batch: ``(images, masks)``, or the semi-supervised dict of such pairs (labelled
    and unlabeled images both count)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return sum(count_images(v) for v in batch.values() if v is not None)
    if isinstance(batch, (list, tuple)) and batch:
        return count_images(batch[0])
    return 0


class ProgressLine(Callback):
    """Print one line per training epoch (and every ``every_n_steps`` steps when > 0), on rank 0 only::

        epoch 3/40  step 138  train 12.3 img/s  val mIoU 0.512 (best 0.530)  elapsed 5m12s  ETA 31m

    ``img/s`` counts the images of the epoch's training batches (labelled + unlabeled) over the time spent
    in training steps, validation excluded; the ETA is the mean epoch time (validation included) times the
    epochs left to ``max_epochs``. The best value survives a resume (it is saved in the checkpoint); an
    epoch without training batches (a resume from a checkpoint written after the epoch's last batch) prints
    nothing and does not count towards the ETA.
    Lines go through Lightning's ``rank_zero_info`` (the ``lightning.fabric`` logger, to stderr).

    Args:
        every_n_steps: also print every this many optimiser steps (0: only at epoch ends).
        monitor: the validation metric shown (``val/mIoU``); mode ``max``.
    """

    def __init__(self, every_n_steps: int = 0, monitor: str = "val/mIoU") -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be 0 (off) or more, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.monitor = monitor
        self.best: float | None = None
        self.last: float | None = None
        self._start = self._epoch_start = self._last_batch = time.monotonic()
        self._images = 0
        self._epoch_seconds: list[float] = []

    def line(self, trainer: L.Trainer) -> str:
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        train_time = self._last_batch - self._epoch_start
        rate = f"{self._images / train_time:.1f}" if train_time > 0 and self._images else "-"
        name = self.monitor.split("/")[-1]
        val = f"val {name} -" if self.last is None else f"val {name} {self.last:.3f} (best {self.best:.3f})"
        parts = [
            f"epoch {trainer.current_epoch + 1}{epochs}",
            f"step {trainer.global_step}",
            f"train {rate} img/s",
            val,
            f"elapsed {format_duration(time.monotonic() - self._start)}",
        ]
        if epochs and self._epoch_seconds:
            left = trainer.max_epochs - trainer.current_epoch - 1
            mean = sum(self._epoch_seconds) / len(self._epoch_seconds)
            parts.append(f"ETA {format_duration(mean * max(0, left), precise=False)}")
        return "  ".join(parts)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()
        self._epoch_seconds = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._last_batch = time.monotonic()
        self._images = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += count_images(batch)
        self._last_batch = time.monotonic()
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            rank_zero_info(self.line(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        self.last = float(value)
        self.best = self.last if self.best is None else max(self.best, self.last)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._images:  # no training batch ran in this epoch (every batch holds images)
            return
        self._epoch_seconds.append(time.monotonic() - self._epoch_start)  # validation runs before this hook
        rank_zero_info(self.line(trainer))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "last": self.last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
        self.last = state_dict.get("last")


def prediction_grid(
    images: torch.Tensor,
    masks: torch.Tensor,
    predictions: torch.Tensor,
    *,
    palette: Sequence[Sequence[int]],
    ignore_index: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """One row per image: ``image | ground truth | prediction``, RGB uint8 ``(N*H, 3*W, 3)``.

    ``images`` are normalised ``(N, 3, H, W)`` (undone with ``mean``/``std``), ``masks`` and
    ``predictions`` train ids ``(N, H, W)``; void (``ignore_index``) is black.
    """
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    rgb = ((images.float().cpu() * s + m).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    masks, predictions = masks.cpu().numpy(), predictions.cpu().numpy()
    truth = colorize(np.where(masks == ignore_index, -1, masks), palette)
    grid = np.concatenate([rgb, truth, colorize(predictions, palette)], axis=2)  # (N, H, 3W, 3)
    return grid.reshape(-1, grid.shape[2], 3)


class ValPredictionGrid(Callback):
    """Every ``every_n_epochs`` epochs (and at the last), predict the first ``num_images`` validation images
    and write a grid (one row each: image | ground truth | prediction, the model's palette, void black) to
    ``dirpath/epoch_XXX.png`` (``XXX`` the 0-based epoch, as in ``metrics.csv``; default ``dirpath``:
    ``<trainer.default_root_dir>/val_grids``) and to TensorBoard (``val/predictions``) when a
    ``TensorBoardLogger`` is attached. Rank 0 only; images of other sizes are resized to the first's.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 4, dirpath: str | None = None) -> None:
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError(
                f"every_n_epochs and num_images must be at least 1, got {every_n_epochs}, {num_images}"
            )
        self.every_n_epochs = int(every_n_epochs)
        self.num_images = int(num_images)
        self.dirpath = dirpath
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def _samples(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batch is None:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            ds = loader.dataset
            items = [ds[i] for i in range(min(self.num_images, len(ds)))]
            size = tuple(items[0][0].shape[-2:])  # resizing to the same size changes nothing
            images = torch.cat([F.interpolate(image[None], size=size, mode="bilinear") for image, _ in items])
            masks = torch.cat([F.interpolate(mask[None, None].float(), size=size)[:, 0] for _, mask in items])
            self._batch = images, masks.long()
        return self._batch

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 == trainer.max_epochs
        return (epoch + 1) % self.every_n_epochs == 0 or last

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self._due(trainer):
            return
        images, masks = self._samples(trainer)
        hp = pl_module.hparams
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            preds = pl_module(images.to(pl_module.device)).argmax(1)
        pl_module.train(was_training)
        num_classes = int(hp.get("num_classes", preds.max().item() + 1))
        grid = prediction_grid(
            images,
            masks,
            preds,
            palette=hp.get("palette") or default_palette(num_classes),
            ignore_index=int(hp.get("ignore_index", 255)),
            mean=hp.get("mean", IMAGENET_MEAN),
            std=hp.get("std", IMAGENET_STD),
        )
        self.write(grid, trainer)

    def write(self, grid: np.ndarray, trainer: L.Trainer) -> Path:
        """Write ``grid`` as this epoch's PNG (atomically) and to TensorBoard; returns the PNG's path."""
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "val_grids")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch_{trainer.current_epoch:03d}.png"
        ok, data = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"could not encode the prediction grid for {path}")
        write_bytes_atomic(path, data.tobytes())
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    "val/predictions", grid, global_step=trainer.global_step, dataformats="HWC"
                )
        return path
