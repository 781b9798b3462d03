"""A teacher's stored soft labels: predict writes them, the training crops carry them aligned, and the
``stored`` distillation mode learns from them; bad folders and settings are one clear error."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from fcn.checkpoint import save_checkpoint
from fcn.cli import predict_main
from fcn.data.datamodule import SegDataModule
from fcn.data.demo import make_demo_dataset
from fcn.data.errors import DataError
from fcn.data.io import read_mask
from fcn.lit import DistillationModule, SegmentationModule, SettingError
from fcn.models import build_model

TINY = {"width_mult": 0.125, "fc_dim": 32}
SIZE = (48, 64)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("soft")
    make_demo_dataset(root / "data", n_train=4, n_val=2, size=SIZE, seed=0)
    torch.manual_seed(0)
    teacher = build_model("fcn8s", num_classes=11, **TINY)
    torch.nn.init.normal_(teacher.score_fr.weight, std=0.5)
    ckpt = save_checkpoint(root / "teacher.ckpt", model=teacher, model_name="fcn8s", model_kwargs=TINY)
    args = ["--checkpoint", ckpt, "--input", root / "data" / "train", "--output", root / "pred"]
    assert predict_main([str(a) for a in [*args, "--outputs", "probs", "--flip", "--quiet"]]) == 0
    return {"data": root / "data", "probs": root / "pred" / "probs", "ckpt": ckpt}


def _datamodule(data: Path, probs: Path, **kw) -> SegDataModule:
    return SegDataModule(
        dataset="camvid", data_root=str(data), batch_size=2, num_workers=0, crop_size=(32, 48),
        teacher_labels=str(probs), **kw,
    )  # fmt: skip


def _one_hot_labels(data: Path, folder: Path) -> Path:
    """Soft labels that are the ground truth itself: 255 on each pixel's class (void: all zero)."""
    folder.mkdir()
    for label in sorted((data / "trainannot").glob("*.png")):
        mask = read_mask(label)
        soft = np.stack([(mask == c) * 255 for c in range(11)]).astype(np.uint8)
        np.save(folder / f"{label.stem}.npy", soft)
    return folder


def test_crops_carry_their_soft_labels_aligned(demo, tmp_path) -> None:
    dm = _datamodule(demo["data"], _one_hot_labels(demo["data"], tmp_path / "gt"), scale_range=(0.5, 2.0))
    dm.setup("fit")
    ds = dm.train_dataloader().dataset
    checked = 0
    for seed in range(6):  # scales, crops and flips differ by seed
        ds.transform.set_random_seed(seed)
        for i in range(len(ds)):
            image, mask, soft = ds[i]
            assert image.shape == (3, 32, 48) and soft.shape == (11, 32, 48) and soft.dtype == torch.uint8
            valid = mask != 255
            assert torch.equal(soft.argmax(0)[valid], mask[valid])  # the same pixels, the same geometry
            assert torch.all(soft.amax(0)[valid] == 255)
            checked += int(valid.sum())
    assert checked > 6 * len(ds) * 32 * 48 // 2


def test_bad_soft_label_folders_name_the_file_and_the_fix(demo, tmp_path) -> None:
    folder = tmp_path / "some"
    folder.mkdir()
    first = sorted(demo["probs"].glob("*.npy"))[0]
    (folder / first.name).write_bytes(first.read_bytes())
    with pytest.raises(DataError, match=r"no soft labels for 3 of the 4 training frames.*--outputs probs"):
        _datamodule(demo["data"], folder).setup("fit")
    with pytest.raises(DataError, match="is not a folder"):
        _datamodule(demo["data"], tmp_path / "nowhere").setup("fit")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in demo["probs"].glob("*.npy"):
        np.save(wrong / f.name, np.load(f)[:, :-1])  # one row short
    dm = _datamodule(demo["data"], wrong)
    dm.setup("fit")
    with pytest.raises(DataError, match=r"are uint8 \(11, 47, 64\), expected uint8 \(11, 48, 64\)"):
        dm.train_dataloader().dataset[0]
    with pytest.raises(DataError, match="does not combine with an unlabeled pool"):
        _datamodule(demo["data"], demo["probs"], unlabeled_root=str(demo["data"] / "val"))


def _fit(module: L.LightningModule, dm: SegDataModule, tmp_path: Path, *, epochs: int = 1) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=1,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return trainer


def _stored(**kw) -> DistillationModule:
    kw = {"distill_mode": "stored", "temperature": 1.0, "feature_key": "out", "channel_weight": 3.0} | kw
    return DistillationModule(
        **{"model": "student", "num_classes": 11, "optimizer": "adamw", "lr": 1e-3} | kw
    )


def test_stored_mode_trains_with_every_term(demo, tmp_path) -> None:
    torch.manual_seed(0)
    module = _stored()
    before = module.model.score_fr.weight.clone()
    trainer = _fit(module, _datamodule(demo["data"], demo["probs"]), tmp_path)
    logged = trainer.callback_metrics
    assert logged["train/kd"] > 0 and logged["train/channel"] > 0 and logged["train/teacher_active"] == 1
    assert not torch.equal(before, module.model.score_fr.weight)


def test_stored_labels_alone_teach_the_student(demo, tmp_path) -> None:
    """No CE: the stored labels (here the ground truth, one-hot) are the only signal, and the student
    learns to predict them."""
    dm = _datamodule(demo["data"], _one_hot_labels(demo["data"], tmp_path / "gt"), scale_range=(1.0, 1.0))

    def accuracy(module: DistillationModule) -> float:
        module.eval()
        images, masks, _ = next(iter(dm.train_dataloader()))
        with torch.no_grad():
            pred = module.model(images).argmax(1)
        valid = masks != 255
        return float((pred[valid] == masks[valid]).float().mean())

    torch.manual_seed(0)
    module = _stored(ce_weight=0.0, channel_weight=0.0, lr=1e-2)
    start = accuracy(module)
    _fit(module, dm, tmp_path, epochs=8)
    assert accuracy(module) > start + 0.25  # 0.10 -> 0.48 here


def test_stored_mode_settings_are_checked(demo, tmp_path) -> None:
    with pytest.raises(SettingError, match="takes no teacher_checkpoint"):
        _stored(teacher_checkpoint=str(demo["ckpt"]))
    with pytest.raises(SettingError, match="set pairwise_weight: 0 and feature_key: out"):
        _stored(pairwise_weight=1.0)
    with pytest.raises(SettingError, match="set pairwise_weight: 0 and feature_key: out"):
        _stored(feature_key="c5")
    plain = SegDataModule(dataset="camvid", data_root=str(demo["data"]), batch_size=2, num_workers=0)
    with pytest.raises(SettingError, match="distill_mode: stored needs data.teacher_labels"):
        _fit(_stored(), plain, tmp_path)
    student = SegmentationModule(model="student", num_classes=11)
    with pytest.raises(SettingError, match="DistillationModule and distill_mode: stored"):
        _fit(student, _datamodule(demo["data"], demo["probs"]), tmp_path)
