"""LightningModules adding loss, optimiser, schedule and metrics to a registered model. Every constructor
argument is a plain type saved in the hyper-parameters, so a checkpoint alone rebuilds the model."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from fcn import distill
from fcn.checkpoint import CheckpointError, load_model
from fcn.exposure import ExposureNorm, check_exposure_target
from fcn.losses import segmentation_loss
from fcn.metrics import ConfusionMatrix, segmentation_scores
from fcn.models import build_model
from fcn.models.fcn import transfer_weights
from fcn.palette import IMAGENET_MEAN, IMAGENET_STD

OPTIMIZERS = ("sgd", "adamw")
# Logged name -> key of fcn.metrics.segmentation_scores.
SCORE_LOGS = dict(mIoU="mean_iou", pixel_acc="pixel_accuracy", mean_acc="mean_accuracy", fw_iou="fw_iou")


class SettingError(ValueError):
    """A training setting is out of range; the message names the option and the fix."""


def _one_of(name: str, value: str, choices: tuple[str, ...], hint: str = "") -> None:
    if value not in choices:
        raise SettingError(f"--model.init_args.{name} must be one of {choices}{hint}, got {value!r}")


def _check_settings(values: dict[str, Any]) -> None:
    """Optimiser and loss settings, checked before anything is built (one line per bad value)."""
    checks = (
        ("lr", lambda v: v > 0, "a positive number, e.g. 0.001"),
        ("momentum", lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9"),
        ("weight_decay", lambda v: v >= 0, "0 or more, e.g. 0.0005"),
        ("bias_lr_mult", lambda v: v >= 0, "0 or more, e.g. 2"),
        ("poly_power", lambda v: v >= 0, "0 or more, e.g. 0.9"),
        ("warmup_steps", lambda v: v >= 0, "0 or more"),
        ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("ohem_fraction", lambda v: 0 < v <= 1, "in (0, 1], e.g. 0.25 (1 keeps every pixel)"),
    )
    for name, ok, hint in checks:
        value = values[name]
        if not isinstance(value, (int, float)) or value != value or not ok(value):  # value != value: NaN
            raise SettingError(f"--model.init_args.{name} {value!r} is not valid; it must be {hint}")


class SegmentationModule(L.LightningModule):
    """Train a registered segmentation model with cross-entropy, SGD/AdamW and a poly schedule.

    Args:
        model, model_kwargs: registry name (``fcn8s``, ``student`` ...) and builder keyword arguments.
        num_classes, class_names, palette, ignore_index, mean, std, class_weights: the data description,
            linked from the data module (:mod:`fcn.train`) and stored in the checkpoint.
        optimizer, lr, momentum, weight_decay: ``"sgd"`` or ``"adamw"``; biases and norms get no decay
            and ``bias_lr_mult`` x lr.
        poly_power, warmup_steps: ``lr * (1 - step / total) ** poly_power`` after a linear warm-up.
        label_smoothing, ohem_fraction: see :func:`fcn.losses.segmentation_loss`.
        init_from: checkpoint of a coarser model to start from (FCN-16s from FCN-32s, 8s from 16s).
        channels_last, compile: channels-last memory format; ``nn.Module.compile`` (same checkpoint keys).
        exposure_target: mean grey level (0-255) that inference scales each whole image to
            (:mod:`fcn.exposure`; the training frames' mean), stored in the checkpoint; the val and test
            passes apply it too, so the logged val mIoU is what ``evaluate.py`` reports. Training crops
            are not scaled. None: off.
    """

    def __init__(
        self,
        model: str = "fcn8s",
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int = 11,
        class_names: list[str] | None = None,
        palette: list[list[int]] | None = None,
        ignore_index: int = 255,
        mean: list[float] | tuple[float, ...] = IMAGENET_MEAN,
        std: list[float] | tuple[float, ...] = IMAGENET_STD,
        optimizer: str = "sgd",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        bias_lr_mult: float = 2.0,
        poly_power: float = 0.9,
        warmup_steps: int = 0,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        ohem_fraction: float = 1.0,
        init_from: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
        exposure_target: float | None = None,
    ) -> None:
        super().__init__()
        _one_of("optimizer", optimizer, OPTIMIZERS)
        try:
            check_exposure_target(exposure_target)
        except ValueError as err:
            raise SettingError(f"--model.init_args.{err}") from err
        if class_weights is not None and len(class_weights) != num_classes:
            raise SettingError(f"class_weights has {len(class_weights)} values for {num_classes} classes")
        _check_settings(locals())
        self.save_hyperparameters()
        self.model = build_model(model, num_classes=num_classes, **(model_kwargs or {}))
        if init_from:
            self._init_from(init_from)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.val_confmat = ConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index)
        self.test_confmat = ConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.compile()
        self.exposure = ExposureNorm(exposure_target, mean, std) if exposure_target is not None else None

    # -- model -------------------------------------------------------------------------------------
    def _init_from(self, path: str) -> None:
        source, info = load_model(path, num_classes=self.hparams.num_classes)
        copied = transfer_weights(source, self.model)
        rank_zero_info(f"init_from {path}: copied {len(copied)} tensors from {info.model_name}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(self.model, x)

    def run(self, net: nn.Module, x: torch.Tensor, **kwargs: Any) -> Any:
        """``net(x, **kwargs)`` with ``x`` in channels-last memory format when ``channels_last`` is set."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return net(x, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        theirs = checkpoint.get("hyper_parameters", {}).get("num_classes")
        if theirs is not None and theirs != self.hparams.num_classes:
            raise CheckpointError(
                f"the checkpoint has {theirs} classes but the data/model has {self.hparams.num_classes}; "
                "resume with a checkpoint trained on the same data set"
            )

    # -- steps ---------------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        settings = {k: self.hparams[k] for k in ("ignore_index", "label_smoothing", "ohem_fraction")}
        return segmentation_loss(logits, target, class_weights=self.class_weights, **settings)

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop with a clear message instead of training on a NaN/inf loss."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}); "
                "lower the learning rate (--model.init_args.lr) or train in fp32 (--trainer.precision 32)"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if len(batch) != 2:
            raise SettingError(STORED_LABELS_NEED)
        images, masks = batch
        loss = self.loss(self(images), masks)
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        images, masks = batch
        logits = self(self.exposure(images) if self.exposure is not None else images)
        getattr(self, f"{stage}_confmat").update(logits, masks)
        self.log(f"{stage}/loss", self.loss(logits, masks), sync_dist=True, batch_size=images.shape[0])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_scores(self, stage: str) -> None:
        confmat = getattr(self, f"{stage}_confmat")
        scores = segmentation_scores(confmat.compute(), self.hparams.class_names)  # synced across ranks
        confmat.reset()
        names = self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]
        logs = {f"{stage}/{short}": scores[key] for short, key in SCORE_LOGS.items()}
        logs |= {f"{stage}_iou/{name}": iou for name, iou in zip(names, scores["per_class_iou"])}
        # Already global and equal on every rank: a max over ranks keeps them bit-exact, and every rank has
        # them for callbacks (checkpointing, stopping). None: no labelled pixel at all (n/a).
        for key, value in logs.items():
            if value is not None:
                self.log(key, value, prog_bar=key == f"{stage}/mIoU", sync_dist=True, reduce_fx="max")

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    # -- optimisation ---------------------------------------------------------------------------------
    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        """Weights with decay; biases and norm parameters without decay and at ``bias_lr_mult`` x lr."""
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue  # e.g. frozen upsampling
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [
            {"params": decay, "lr": hp.lr, "weight_decay": hp.weight_decay},
            {"params": no_decay, "lr": hp.lr * hp.bias_lr_mult, "weight_decay": 0.0},
        ]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.model]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = [g for m in self.trainable_modules() for g in self.param_groups(m) if g["params"]]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total - 1)

        def poly(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, 1 - (step - warmup) / max(1, total - warmup)) ** hp.poly_power

        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


DISTILL_MODES = ("offline", "semi", "self", "stored")
SELF_TEACHERS = ("ema", "snapshot")
TEACHER_PRECISIONS = ("32", "bf16")
STORED_LABELS_NEED = (
    "the training batches carry a teacher's stored soft labels (data.teacher_labels): train them with "
    "model fcn.lit.DistillationModule and distill_mode: stored, or drop data.teacher_labels"
)
FEATURE_KEYS = ("c3", "c4", "c5", "out")


class DistillationModule(SegmentationModule):
    """Train a student with knowledge from a teacher (README "The distilled student"; docs/RESULTS.md 5).

    Modes: ``offline``, a frozen teacher from ``teacher_checkpoint``; ``semi``, as offline plus unlabeled
    images (``data.unlabeled_root``) supervised by the teacher's soft predictions and its pseudo-labels
    (confidence >= ``pseudo_threshold``), weighted by ``unlabeled_weight``; ``self``, from epoch
    ``self_start_epoch`` on an EMA (``ema_decay``) or a frozen snapshot of the student is the teacher;
    ``stored``, offline from a teacher's predictions written once (``predict.py --outputs probs``, e.g. with
    test-time augmentation) and read with each training crop (``data.teacher_labels``): no teacher runs
    while training, and the losses see the stored probabilities' logs as the teacher's logits (``feature_key``
    ``out`` only: stored labels have no features).

    Loss: ``ce_weight`` x CE + ``kd_weight`` x pixel KD (``temperature``) + ``pairwise_weight`` x affinity
    + ``channel_weight`` x channel-wise distillation on ``feature_key`` (``c3``/``c4``/``c5`` through a 1x1
    adapter to the teacher's width; ``out``, the logits, without). ``teacher_precision="bf16"`` runs the
    teacher under bf16 autocast whatever the trainer's precision (docs/RESULTS.md section 8); its outputs
    reach the losses in fp32. The teacher is never a submodule: not optimised, DDP-wrapped or saved."""

    def __init__(
        self,
        teacher_checkpoint: str | None = None,
        distill_mode: str = "offline",
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        pairwise_weight: float = 0.0,
        channel_weight: float = 0.0,
        feature_key: str = "c5",
        pairwise_pool: int = 16,
        channel_temperature: float = 4.0,
        pseudo_threshold: float = 0.9,
        unlabeled_weight: float = 1.0,
        self_start_epoch: int = 1,
        self_teacher: str = "ema",
        ema_decay: float = 0.99,
        teacher_precision: str = "32",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _one_of("teacher_precision", teacher_precision, TEACHER_PRECISIONS)
        _one_of("distill_mode", distill_mode, DISTILL_MODES)
        _one_of("self_teacher", self_teacher, SELF_TEACHERS)
        _one_of("feature_key", feature_key, FEATURE_KEYS, " (features at 1/8, 1/16, 1/32, or the logits)")
        teacher = None
        if distill_mode in ("offline", "semi"):
            if not teacher_checkpoint:
                raise CheckpointError(
                    f"distill_mode={distill_mode!r} needs teacher_checkpoint=<.ckpt of a trained model>"
                )
            teacher = distill.load_teacher(teacher_checkpoint, num_classes=self.hparams.num_classes)
        elif teacher_checkpoint:
            raise SettingError(
                f"distill_mode={distill_mode!r} takes no teacher_checkpoint (self: the student is its own "
                "teacher; stored: the teacher's soft labels come with the data); drop teacher_checkpoint"
            )
        features = pairwise_weight > 0 or (channel_weight > 0 and feature_key != "out")
        if distill_mode == "stored" and features:
            raise SettingError(
                "distill_mode='stored' has the teacher's probabilities, not its features: set "
                "pairwise_weight: 0 and feature_key: out (channel-wise distillation of the logits)"
            )
        ema = distill.make_ema(self.model) if distill_mode == "self" else None
        self.frozen = SimpleNamespace(teacher=teacher, ema=ema)  # not submodules: not optimised, saved, DDP'd
        self.adapter = None
        if channel_weight > 0 and feature_key != "out":  # logits share the class channels: no adapter
            t_net = teacher if teacher is not None else self.model  # self mode: the student's own width
            self.adapter = distill.FeatureAdapter(
                self.model.backbone.out_channels[feature_key], t_net.backbone.out_channels[feature_key]
            )

    # -- teacher ---------------------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (offline / semi), or the snapshot of self-distillation once taken."""
        return self.frozen.teacher

    @property
    def ema(self) -> nn.Module | None:
        """Self-distillation's EMA of the student (None in the other modes)."""
        return self.frozen.ema

    def active_teacher(self) -> nn.Module | None:
        """The teacher for the current epoch (None before ``self_start_epoch`` in self mode and in stored)."""
        hp = self.hparams
        if hp.distill_mode == "stored":
            return None
        if hp.distill_mode != "self":
            return self.teacher
        if self.current_epoch < hp.self_start_epoch:
            return None
        if hp.self_teacher == "snapshot":
            if self.teacher is None:
                self.frozen.teacher = distill.make_ema(self.model)
            return self.teacher
        return self.ema

    @torch.no_grad()
    def run_teacher(self, teacher: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's outputs and features for ``x`` in ``teacher_precision``, whatever the trainer's."""
        bf16 = self.hparams.teacher_precision == "bf16"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self.run(teacher, x, return_features=True)
        return {k: v.float() for k, v in out.items()}

    def on_fit_start(self) -> None:
        for net in (self.teacher, self.ema):
            if net is not None:
                net.to(self.device)

    on_validation_start = on_fit_start

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            distill.ema_update(self.ema, self.model, decay=self.hparams.ema_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A resumed self-distillation keeps its teacher (outside ``state_dict``, the student's alone).
        if self.ema is not None:
            checkpoint["ema_state_dict"] = self.ema.state_dict()
        if self.hparams.distill_mode == "self" and self.teacher is not None:
            checkpoint["snapshot_state_dict"] = self.teacher.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.ema is not None and "ema_state_dict" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema_state_dict"])
        if self.hparams.distill_mode == "self" and "snapshot_state_dict" in checkpoint:
            snapshot = distill.make_ema(self.model)  # the student's architecture, frozen
            snapshot.load_state_dict(checkpoint["snapshot_state_dict"])
            self.frozen.teacher = snapshot

    def trainable_modules(self) -> list[nn.Module]:
        return [self.model] + ([self.adapter] if self.adapter is not None else [])

    # -- losses ----------------------------------------------------------------------------------------
    def distill_losses(
        self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], valid: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        hp = self.hparams
        kd = distill.pixel_kd_loss(student["out"], teacher["out"], temperature=hp.temperature, valid=valid)
        losses, key = {"kd": kd}, hp.feature_key
        if hp.pairwise_weight > 0:
            s, t = student[key], teacher[key]
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            losses["pairwise"] = distill.pairwise_loss(s, t, pool_size=hp.pairwise_pool)
        if hp.channel_weight > 0:
            s, t = student[key], teacher[key]
            if self.adapter is not None:
                s = self.adapter(s, tuple(t.shape[-2:]))
            losses["channel"] = distill.channel_wise_loss(s, t, temperature=hp.channel_temperature)
        return losses

    def _weighted(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        hp = self.hparams
        weights = {"kd": hp.kd_weight, "pairwise": hp.pairwise_weight, "channel": hp.channel_weight}
        return sum(weights[k] * v for k, v in losses.items())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        unlabeled = None
        if isinstance(batch, dict):  # semi-supervised: {"labeled": (x, y), "unlabeled": (x, _) or None}
            batch, unlabeled = batch["labeled"], batch.get("unlabeled")
        stored = hp.distill_mode == "stored"
        if len(batch) != (3 if stored else 2):
            need = "distill_mode: stored needs data.teacher_labels (the folder of predict.py --outputs probs)"
            raise SettingError(need if stored else STORED_LABELS_NEED)
        images, masks = batch[:2]
        student = self.run(self.model, images, return_features=True)
        ce = self.loss(student["out"], masks)
        total = hp.ce_weight * ce
        logs = {"ce": ce}
        teacher = self.active_teacher()
        if stored:  # uint8 round(255 p) -> log-probabilities (+0.5: a zero is "below 1/510", not impossible)
            t_out = {"out": batch[2].float().add_(0.5).log_()}
            losses = self.distill_losses(student, t_out, masks != hp.ignore_index)
            total = total + self._weighted(losses)
            logs.update(losses)
        elif teacher is not None:
            t_out = self.run_teacher(teacher, images)
            losses = self.distill_losses(student, t_out, masks != hp.ignore_index)
            total = total + self._weighted(losses)
            logs.update(losses)
            if unlabeled is not None and hp.distill_mode == "semi":
                s_u = self.run(self.model, unlabeled[0], return_features=True)
                t_u = self.run_teacher(teacher, unlabeled[0])
                labels = distill.pseudo_labels(
                    t_u["out"], threshold=hp.pseudo_threshold, ignore_index=hp.ignore_index
                )
                u_losses = self.distill_losses(s_u, t_u, None)
                u_ce = self.loss(s_u["out"], labels)
                total = total + hp.unlabeled_weight * (self._weighted(u_losses) + hp.ce_weight * u_ce)
                logs.update(unlabeled_ce=u_ce, unlabeled_kd=u_losses["kd"])
                logs["pseudo_label_share"] = (labels != hp.ignore_index).float().mean()
        self.check_finite(total)
        logs["teacher_active"] = float(teacher is not None or stored)
        self.log("train/loss", total, prog_bar=True, batch_size=images.shape[0])
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=images.shape[0])
        return total
