"""Callbacks for watching training (``trainer.callbacks``): a one-line progress report, val grids."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from fcn.data.io import colorize, write_png_atomic
from fcn.palette import IMAGENET_MEAN, IMAGENET_STD, default_palette


def format_duration(seconds: float, *, precise: bool = True) -> str:
    """``42s``, ``5m12s`` (``5m`` unless ``precise``), ``2h05m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if precise else f"{round(seconds / 60)}m"


def count_images(batch: Any) -> int:
    """Images in a training batch ``(images, masks)`` or a semi-supervised dict of such pairs (all count)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        return sum(count_images(v) for v in batch.values() if v is not None)
    if isinstance(batch, (list, tuple)) and batch:
        return count_images(batch[0])
    return 0


class ProgressLine(Callback):
    """Log one line per training epoch (and every ``every_n_steps`` steps when > 0) with ``rank_zero_info``::

        epoch 3/40  step 138  train 12.3 img/s  val mIoU 0.512 (best 0.530)  elapsed 5m12s  ETA 31m

    ``img/s``: the epoch's training images over its training-step time; ETA: the mean epoch time times the
    epochs left. ``monitor`` (mode max) and its best value are kept in the checkpoint. An epoch without
    training batches (resumed after its last batch) prints nothing and does not count towards the ETA."""

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
        self.best, self.last = state_dict.get("best"), state_dict.get("last")


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
    """One row per image, ``image | ground truth | prediction``: RGB uint8 ``(N*H, 3*W, 3)`` from normalised
    ``(N, 3, H, W)`` images (undone with ``mean``/``std``) and ``(N, H, W)`` train ids; void is black."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    rgb = ((images.float().cpu() * s + m).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    masks, predictions = masks.cpu().numpy(), predictions.cpu().numpy()
    truth = colorize(np.where(masks == ignore_index, -1, masks), palette)
    grid = np.concatenate([rgb, truth, colorize(predictions, palette)], axis=2)  # (N, H, 3W, 3)
    return grid.reshape(-1, grid.shape[2], 3)


class ValPredictionGrid(Callback):
    """Every ``every_n_epochs`` epochs (and at the last), write the :func:`prediction_grid` of the first
    ``num_images`` validation images (resized to the first's size) to ``dirpath/epoch_XXX.png`` (0-based
    epoch; default ``<default_root_dir>/val_grids``) and to TensorBoard (``val/predictions``). Rank 0 only."""

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
            loader = trainer.val_dataloaders
            ds = (loader[0] if isinstance(loader, (list, tuple)) else loader).dataset
            items = [ds[i] for i in range(min(self.num_images, len(ds)))]
            size = tuple(items[0][0].shape[-2:])  # resizing to the same size changes nothing
            images = torch.cat([F.interpolate(image[None], size=size, mode="bilinear") for image, _ in items])
            masks = torch.cat([F.interpolate(mask[None, None].float(), size=size)[:, 0] for _, mask in items])
            self._batch = images, masks.long()
        return self._batch

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        due = epoch % self.every_n_epochs == 0 or epoch == trainer.max_epochs
        if trainer.sanity_checking or not trainer.is_global_zero or not due:
            return
        images, masks = self._samples(trainer)
        hp = pl_module.hparams
        was_training = pl_module.training
        pl_module.eval()
        x = images.to(pl_module.device)
        exposure = getattr(pl_module, "exposure", None)  # as the val pass: fcn.lit.SegmentationModule
        with torch.no_grad():
            preds = pl_module(exposure(x) if exposure is not None else x).argmax(1)
        pl_module.train(was_training)
        num_classes = int(hp.get("num_classes", preds.max().item() + 1))
        palette, ignore = hp.get("palette") or default_palette(num_classes), int(hp.get("ignore_index", 255))
        stats = {k: hp[k] for k in ("mean", "std") if k in hp}  # else ImageNet's
        grid = prediction_grid(images, masks, preds, palette=palette, ignore_index=ignore, **stats)
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "val_grids")
        folder.mkdir(parents=True, exist_ok=True)
        write_png_atomic(folder / f"epoch_{trainer.current_epoch:03d}.png", grid)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    "val/predictions", grid, global_step=trainer.global_step, dataformats="HWC"
                )
