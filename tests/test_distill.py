"""Distillation losses, pseudo-labels, EMA and teacher freezing (pure tensor checks)."""

from __future__ import annotations

import math

import pytest
import torch

from fcn.checkpoint import CheckpointError, save_checkpoint
from fcn.distill import (
    FeatureAdapter,
    channel_wise_loss,
    ema_update,
    load_teacher,
    make_ema,
    pairwise_loss,
    pixel_kd_loss,
    pseudo_labels,
)
from fcn.models import build_model


def test_kd_is_zero_for_identical_logits() -> None:
    logits = torch.randn(2, 5, 7, 9)
    assert pixel_kd_loss(logits, logits.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_matches_hand_computation_with_temperature_and_ignore() -> None:
    # Two pixels, two classes. Pixel 0: student (0, 0), teacher (2, 0); pixel 1 is void.
    s = torch.tensor([[[[0.0, 5.0]], [[0.0, -5.0]]]])  # (1, 2, 1, 2)
    t = torch.tensor([[[[2.0, -5.0]], [[0.0, 5.0]]]])
    valid = torch.tensor([[[True, False]]])
    temp = 2.0
    # teacher softmax at T=2 for (2, 0): p = (e^1, 1) / (e^1 + 1); student at T=2: (0.5, 0.5)
    p1 = math.e / (math.e + 1)
    p2 = 1 - p1
    kl = p1 * math.log(p1 / 0.5) + p2 * math.log(p2 / 0.5)
    expected = kl * temp**2  # only the valid pixel counts, scaled by T^2
    got = pixel_kd_loss(s, t, temperature=temp, valid=valid)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # without the mask the void pixel (a large disagreement) changes the value
    assert pixel_kd_loss(s, t, temperature=temp).item() > expected
    # an all-void batch gives 0 with a gradient path
    s.requires_grad_(True)
    zero = pixel_kd_loss(s, t, temperature=temp, valid=torch.zeros_like(valid))
    zero.backward()
    assert zero.item() == 0.0 and torch.isfinite(s.grad).all()


def test_kd_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differ"):
        pixel_kd_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 4, 4, 4))


def test_feature_losses() -> None:
    torch.manual_seed(0)
    f = torch.randn(2, 8, 6, 6)
    assert pairwise_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert pairwise_loss(f, torch.randn(2, 16, 6, 6)).item() > 1e-3  # widths may differ
    assert channel_wise_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert channel_wise_loss(f, torch.randn(2, 8, 6, 6)).item() > 1e-3
    with pytest.raises(ValueError, match="adapt the student"):
        channel_wise_loss(f, torch.randn(2, 4, 6, 6))
    adapter = FeatureAdapter(8, 32)
    assert adapter(f, (12, 12)).shape == (2, 32, 12, 12)


def test_pseudo_labels_below_threshold_are_ignored() -> None:
    logits = torch.tensor([[[[4.0, 0.1]], [[0.0, 0.0]]]])  # pixel 0 confident class 0; pixel 1 ~50/50
    labels = pseudo_labels(logits, threshold=0.9, ignore_index=255)
    assert labels.tolist() == [[[0, 255]]]
    assert pseudo_labels(logits, threshold=0.5, ignore_index=255).tolist() == [[[0, 0]]]


def test_ema_update_is_exact() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    ema = make_ema(model)
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema_update(ema, model, decay=0.9)
    for b, e, m in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * m)
        assert not e.requires_grad
    assert torch.equal(ema[1].running_mean, model[1].running_mean)


def test_teacher_is_frozen_and_class_checked(tmp_path) -> None:
    net = build_model("student", num_classes=4)
    path = save_checkpoint(tmp_path / "t.ckpt", model=net, model_name="student")
    teacher = load_teacher(str(path), num_classes=4)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(CheckpointError, match="has 4 classes but the data has 11"):
        load_teacher(str(path), num_classes=11)


# -- end to end on demo data ---------------------------------------------------------------------------------
TINY = {"width_mult": 0.125, "fc_dim": 32}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fcn.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, n_train=4, n_val=2, n_test=4, size=(48, 64), seed=0)
    teacher = build_model("fcn8s", num_classes=11, **TINY)
    torch.nn.init.normal_(teacher.score_fr.weight, std=0.5)
    ckpt = save_checkpoint(root / "teacher.ckpt", model=teacher, model_name="fcn8s", model_kwargs=TINY)
    return root, ckpt


def _module(**kw):
    from fcn.lit import DistillationModule

    return DistillationModule(model="student", num_classes=11, optimizer="adamw", lr=1e-3, **kw)


def _fit(module, root, tmp_path, *, epochs=1, unlabeled=False, callbacks=(), ckpt_path=None):
    import lightning as L

    from fcn.data.datamodule import SegDataModule

    dm = SegDataModule(
        dataset="camvid", data_root=str(root), batch_size=2, num_workers=0, crop_size=(48, 64),
        unlabeled_root=str(root / "test") if unlabeled else None,
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_offline_teacher_is_frozen_bit_identical_and_not_saved(demo, tmp_path) -> None:
    root, ckpt = demo
    module = _module(teacher_checkpoint=str(ckpt), pairwise_weight=1.0, channel_weight=1.0)
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = module.model.score_fr.weight.clone()
    trainer = _fit(module, root, tmp_path)
    after = module.teacher.state_dict()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    assert not module.teacher.training
    assert not torch.equal(student_before, module.model.score_fr.weight)  # the student did learn
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in module.teacher.parameters()}
    # the student's checkpoint holds no teacher weights and loads like any other
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher") for k in state)
    from fcn.checkpoint import load_model

    model, info = load_model(path)
    assert info.model_name == "student" and model(torch.randn(1, 3, 40, 56)).shape == (1, 11, 40, 56)


def test_semi_supervised_uses_unlabeled_batches(demo, tmp_path) -> None:
    root, ckpt = demo
    seen = []

    class Spy(__import__("lightning").Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(sorted(batch) if isinstance(batch, dict) else None)

    module = _module(teacher_checkpoint=str(ckpt), distill_mode="semi", pseudo_threshold=0.5)
    _fit(module, root, tmp_path, unlabeled=True, callbacks=[Spy()])
    assert seen and all(s == ["labeled", "unlabeled"] for s in seen)


def test_self_distillation_switches_at_the_configured_epoch(demo, tmp_path) -> None:
    root, _ = demo
    active = {}

    class Spy(__import__("lightning").Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            active.setdefault(trainer.current_epoch, pl_module.active_teacher() is not None)

    module = _module(distill_mode="self", self_start_epoch=2, ema_decay=0.5)
    _fit(module, root, tmp_path, epochs=3, callbacks=[Spy()])
    assert active == {0: False, 1: False, 2: True}
    assert module.active_teacher() is module.ema
    # the EMA followed the student (decay 0.5 over several steps) but is not the student itself
    s, e = module.model.score_fr.weight, module.ema.score_fr.weight
    assert not torch.equal(s, e) and (s - e).abs().max() < (s.abs().max() + 1e-6)


def test_self_distillation_resumes_with_its_snapshot_teacher(demo, tmp_path) -> None:
    """A resumed run keeps the snapshot taken at ``self_start_epoch``, not one of the resumed student."""
    import lightning as L

    root, _ = demo
    kw = {"distill_mode": "self", "self_teacher": "snapshot", "self_start_epoch": 1}
    module = _module(**kw)
    trainer = _fit(module, root, tmp_path, epochs=2)
    snapshot = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    assert not torch.equal(snapshot["score_fr.weight"], module.model.score_fr.weight)  # student moved on
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    assert "snapshot_state_dict" in torch.load(path, weights_only=True)

    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            t = pl_module.active_teacher()
            seen.append(all(torch.equal(snapshot[k], v) for k, v in t.state_dict().items()))

    _fit(_module(**kw), root, tmp_path / "resumed", epochs=3, callbacks=[Spy()], ckpt_path=path)
    assert seen and all(seen)


def test_logit_maps_distil_without_an_adapter(demo) -> None:
    """feature_key='out': channel-wise and pair-wise losses on the class logits, no 1x1 adapter needed."""
    _, ckpt = demo
    module = _module(teacher_checkpoint=str(ckpt), channel_weight=3.0, pairwise_weight=1.0, feature_key="out")
    assert module.adapter is None
    x = torch.randn(2, 3, 48, 64)
    student = module.model(x, return_features=True)
    with torch.no_grad():
        teacher = module.teacher(x, return_features=True)
    losses = module.distill_losses(student, teacher, None)
    assert set(losses) == {"kd", "pairwise", "channel"} and losses["channel"].item() > 0
    module._weighted(losses).backward()
    assert module.model.score_fr.weight.grad is not None
    with pytest.raises(ValueError, match="feature_key must be one of"):
        _module(teacher_checkpoint=str(ckpt), feature_key="c6")


def test_bf16_teacher_gives_fp32_targets_close_to_the_fp32_teacher(demo) -> None:
    """teacher_precision='bf16': the teacher runs under bf16 autocast, the losses get fp32 tensors whose
    KD loss is within bf16 rounding of the fp32 teacher's; the teacher's weights stay fp32."""
    _, ckpt = demo
    exact, fast = (
        _module(teacher_checkpoint=str(ckpt)),
        _module(teacher_checkpoint=str(ckpt), teacher_precision="bf16"),
    )
    x = torch.randn(2, 3, 48, 64)
    t32, t16 = exact.run_teacher(exact.teacher, x), fast.run_teacher(fast.teacher, x)
    assert set(t16) == set(t32) and all(v.dtype == torch.float32 for v in t16.values())
    assert not all(torch.equal(t16[k], t32[k]) for k in t32)  # it did run in bf16
    student = torch.randn_like(t32["out"])
    kd32 = pixel_kd_loss(student, t32["out"], temperature=1.0)
    kd16 = pixel_kd_loss(student, t16["out"], temperature=1.0)
    assert abs(kd16.item() - kd32.item()) < 0.02 * kd32.item()
    assert all(p.dtype == torch.float32 for p in fast.teacher.parameters())
    # under a bf16-mixed trainer's autocast, "32" still runs the teacher in fp32 and "bf16" in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t32_mixed, t16_mixed = exact.run_teacher(exact.teacher, x), fast.run_teacher(fast.teacher, x)
    assert all(torch.equal(t32_mixed[k], t32[k]) for k in t32)
    assert all(torch.equal(t16_mixed[k], t16[k]) for k in t16)
    with pytest.raises(ValueError, match="teacher_precision must be one of"):
        _module(teacher_checkpoint=str(ckpt), teacher_precision="fp16")


def test_distill_bad_configuration(demo) -> None:
    _, ckpt = demo
    with pytest.raises(CheckpointError, match="needs teacher_checkpoint"):
        _module(distill_mode="offline")
    with pytest.raises(ValueError, match="distill_mode must be one of"):
        _module(distill_mode="online", teacher_checkpoint=str(ckpt))
    with pytest.raises(CheckpointError, match="has 11 classes but the data has 19"):
        from fcn.lit import DistillationModule

        DistillationModule(model="student", num_classes=19, teacher_checkpoint=str(ckpt))


def _stored_labels(root, ckpt):
    """The demo teacher's soft labels of the demo training frames (predict --outputs probs), once."""
    from fcn.cli import predict_main

    out = root / "teacher_out"
    if not (out / "probs").is_dir():
        args = ["--checkpoint", ckpt, "--input", root / "train", "--output", out, "--outputs", "probs"]
        assert predict_main([str(a) for a in [*args, "--quiet"]]) == 0
    return out / "probs"


def _mode_args(config, demo, out, *, batch_size, epochs, self_start_epoch) -> list[str]:
    """``scripts/train.py`` arguments for one demo distillation config on the tiny demo data."""
    from fcn.train import CONFIG_DIR

    root, ckpt = demo
    args = [
        "fit", "--config", str(CONFIG_DIR / "demo" / f"{config}.yaml"),
        "--data.dataset", "camvid", "--data.data_root", str(root), "--data.num_workers", "0",
        "--data.batch_size", str(batch_size), "--data.crop_size", "[48, 64]",
        "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(out), "--checkpoint.dirpath", str(out / "ckpt"),
    ]  # fmt: skip
    if config == "distill_self":
        return [*args, "--model.init_args.self_start_epoch", str(self_start_epoch)]
    if config == "distill_stored":  # distill_offline.yaml's losses from the teacher's stored labels
        args[2] = str(CONFIG_DIR / "demo" / "distill_offline.yaml")
        labels = _stored_labels(root, ckpt)
        return [*args, "--model.init_args.distill_mode", "stored", "--model.init_args.teacher_checkpoint",
                "null", "--data.teacher_labels", str(labels)]  # fmt: skip
    args += ["--model.init_args.teacher_checkpoint", str(ckpt)]
    if config == "distill_semi":
        args += ["--data.unlabeled_root", str(root / "test")]
    return args


MODES = ["distill_offline", "distill_semi", "distill_self", "distill_stored"]


@pytest.mark.parametrize("config", MODES)
def test_each_mode_runs_through_the_cli(config, demo, tmp_path, capsys) -> None:
    from fcn.cli import train_main

    args = _mode_args(config, demo, tmp_path, batch_size=2, epochs=1, self_start_epoch=0)
    assert train_main([*args, "--trainer.logger", "false"]) == 0
    assert "val mIoU: " in capsys.readouterr().out


@pytest.mark.parametrize("config", MODES)
def test_each_mode_trains_under_ddp(config, demo, tmp_path) -> None:
    """Two CPU processes (gloo) through the real script: Lightning's DDP launcher re-runs scripts/train.py."""
    import csv
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fcn.checkpoint import load_model

    out = tmp_path / "out"
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}}]
    cmd = [
        sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "train.py"),
        *_mode_args(config, demo, out, batch_size=1, epochs=2, self_start_epoch=1),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.log_every_n_steps", "1", "--trainer.logger", json.dumps(logger),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val mIoU: " in proc.stdout
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    steps = [r for r in rows if r["train/loss"]]
    assert len(steps) == 4  # 4 labelled images, batch 1, 2 ranks: 2 steps per epoch, 2 epochs
    if config == "distill_self":  # the EMA teacher from epoch 1 on
        assert {int(r["epoch"]): float(r["train/teacher_active"]) for r in steps} == {0: 0.0, 1: 1.0}
    else:
        assert all(float(r["train/kd"]) > 0 and float(r["train/teacher_active"]) == 1.0 for r in steps)
    if config == "distill_semi":
        assert all(float(r["train/unlabeled_kd"]) > 0 for r in steps)
    state = torch.load(out / "ckpt" / "best.ckpt", weights_only=True)["state_dict"]
    assert state and not any(k.startswith(("teacher", "ema")) for k in state)
    model, info = load_model(out / "ckpt" / "best.ckpt")
    assert info.model_name == "student" and model(torch.randn(1, 3, 48, 64)).shape == (1, 11, 48, 64)
