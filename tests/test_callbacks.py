"""fcn.callbacks (progress line, validation prediction grids) and fcn.curves (plot_curves.py)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from fcn.callbacks import ProgressLine, ValPredictionGrid, count_images, format_duration, prediction_grid
from fcn.cli import plot_curves_main
from fcn.curves import main as curves_main
from fcn.curves import read_curves
from fcn.data.camvid import PALETTE
from fcn.data.datamodule import SegDataModule
from fcn.data.demo import make_demo_dataset
from fcn.lit import SegmentationModule
from fcn.train import last_checkpoints

SIZE = (48, 64)
TINY = {"width_mult": 0.125, "fc_dim": 32, "dropout": 0.0}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    return make_demo_dataset(root, layout="camvid", n_train=4, n_val=3, size=SIZE, seed=0)


def test_tiny_fit_writes_grids_and_prints_progress(demo_root, tmp_path, caplog) -> None:
    dm = SegDataModule(
        dataset="camvid", data_root=str(demo_root), batch_size=2, num_workers=0, crop_size=(32, 48)
    )
    module = SegmentationModule(
        model="fcn8s", model_kwargs=TINY, palette=dm.palette, class_names=dm.class_names, optimizer="adamw"
    )
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        default_root_dir=tmp_path,
        logger=[CSVLogger(tmp_path, name="csv"), tb],
        callbacks=[ProgressLine(every_n_steps=1), ValPredictionGrid(every_n_epochs=1, num_images=2)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,  # the sanity check must neither write a grid nor set a best value
    )
    trainer.fit(module, datamodule=dm)
    grids = sorted((tmp_path / "val_grids").glob("*.png"))
    assert [g.name for g in grids] == ["epoch_000.png", "epoch_001.png"]
    grid = cv2.imread(str(grids[-1]))
    assert grid.shape == (2 * SIZE[0], 3 * SIZE[1], 3)  # 2 rows of image | ground truth | prediction
    # the ground truth column holds palette colours and black (void) only
    gt = cv2.cvtColor(grid[:, SIZE[1] : 2 * SIZE[1]], cv2.COLOR_BGR2RGB).reshape(-1, 3)
    assert {tuple(c) for c in np.unique(gt, axis=0)} <= {*PALETTE, (0, 0, 0)}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("val/predictions")) == 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    ends = [line for line in lines if line.startswith("epoch 2/2  step 4 ")]
    assert len(lines) == 4 + 2 and ends  # every step (every_n_steps=1) and every epoch end
    assert re.fullmatch(
        r"epoch 2/2  step 4  train \d+\.\d img/s  val mIoU (\d\.\d{3}) \(best (\d\.\d{3})\)  "
        r"elapsed \d+s  ETA 0s",
        ends[-1],
    )
    assert lines[0].startswith("epoch 1/2  step 1  ") and "val mIoU -" in lines[0]  # sanity check ignored


class _SigtermInValidation(L.Callback):
    """Stop the run as ``kill <pid>`` would, while the first epoch validates (its training batches done)."""

    def on_validation_batch_end(self, *args) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_progress_line_after_a_resume_from_a_stop_in_validation(demo_root, tmp_path, caplog) -> None:
    # last.ckpt then holds the first epoch with all its batches run: the resumed run starts with an empty
    # epoch, which must neither print a line ("train - img/s") nor halve the ETA's mean epoch time.
    def fit(callbacks: list, ckpt_path: str | None = None) -> None:
        dm = SegDataModule(
            dataset="camvid", data_root=str(demo_root), batch_size=2, num_workers=0, crop_size=(32, 48)
        )
        module = SegmentationModule(
            model="fcn8s", model_kwargs=TINY, palette=dm.palette, class_names=dm.class_names
        )
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=3,
            default_root_dir=tmp_path,
            logger=False,
            callbacks=[ProgressLine(), *last_checkpoints(tmp_path / "ckpt", every_minutes=0), *callbacks],
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)

    with pytest.raises(SystemExit):
        fit([_SigtermInValidation()])
    caplog.clear()
    fit([], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split("  ")[0] for line in lines] == ["epoch 2/3", "epoch 3/3"]
    assert all(" - img/s" not in line for line in lines)
    eta = re.search(r"elapsed (\d+)s  ETA (\d+)s", lines[0])
    assert eta and int(eta[2]) >= 0.7 * int(eta[1])  # one epoch left, timed from one full epoch


def test_progress_line_keeps_the_best_across_a_resume() -> None:
    line = ProgressLine()
    line.best, line.last = 0.53, 0.51
    other = ProgressLine()
    other.load_state_dict(line.state_dict())
    assert (other.best, other.last) == (0.53, 0.51)
    with pytest.raises(ValueError, match="every_n_steps"):
        ProgressLine(every_n_steps=-1)
    with pytest.raises(ValueError, match="every_n_epochs"):
        ValPredictionGrid(every_n_epochs=0)


def test_helpers() -> None:
    assert [format_duration(s) for s in (42, 312, 7500)] == ["42s", "5m12s", "2h05m"]
    assert format_duration(1860, precise=False) == "31m"
    x = torch.zeros(4, 3, 8, 8)
    assert count_images((x, x)) == 4
    assert count_images({"labeled": (x, x), "unlabeled": (x[:2], x[:2])}) == 6


def test_grid_predictions_use_the_modules_exposure(demo_root, tmp_path) -> None:
    """The grid shows what the val pass scores: predictions of exposure-scaled frames."""
    dm = SegDataModule(dataset="camvid", data_root=str(demo_root), num_workers=0)
    torch.manual_seed(0)
    module = SegmentationModule(model="fcn8s", model_kwargs=TINY, palette=dm.palette, exposure_target=40.0)
    for layer in (module.model.score_fr, module.model.score_pool4, module.model.score_pool3):
        torch.nn.init.normal_(layer.weight, std=0.5)  # predictions that vary with the input
    grid_cb = ValPredictionGrid(every_n_epochs=1, num_images=2)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, callbacks=[grid_cb], default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.validate(module, datamodule=dm, verbose=False)
    written = cv2.cvtColor(cv2.imread(str(tmp_path / "val_grids" / "epoch_000.png")), cv2.COLOR_BGR2RGB)
    images, masks = grid_cb._samples(trainer)
    with torch.no_grad():
        scaled, plain = (module(x).argmax(1) for x in (module.exposure(images), images))

    def grid(preds: torch.Tensor) -> np.ndarray:
        return prediction_grid(images, masks, preds, palette=dm.palette, ignore_index=255)

    assert np.array_equal(written, grid(scaled))
    assert not np.array_equal(written, grid(plain))  # the target (40: much darker) changes the picture


def test_prediction_grid_colours_and_void() -> None:
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    rgb = torch.tensor([10, 128, 250], dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 2, 3) / 255
    images = (rgb - 0.5) / 0.25
    masks = torch.tensor([[[0, 1, 255], [3, 3, 3]]])
    preds = torch.tensor([[[2, 2, 2], [10, 0, 1]]])
    grid = prediction_grid(images, masks, preds, palette=PALETTE, ignore_index=255, mean=mean, std=std)
    assert grid.shape == (2, 9, 3) and grid.dtype == np.uint8
    assert (grid[:, :3] == [10, 128, 250]).all()  # normalisation undone
    assert (
        tuple(grid[0, 3]) == PALETTE[0] and tuple(grid[0, 4]) == PALETTE[1] and tuple(grid[0, 5]) == (0, 0, 0)
    )
    assert tuple(grid[1, 6]) == PALETTE[10] and tuple(grid[0, 8]) == PALETTE[2]


def _metrics(path: Path, rows: list[tuple]) -> Path:
    """A CSVLogger-like metrics.csv: (epoch, step, train/loss, val/mIoU), '' where nothing was logged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["epoch,step,train/loss,train/lr,val/mIoU"]
    lines += [
        ",".join(str(v) for v in (e, s, loss, 0.001 if loss != "" else "", m)) for e, s, loss, m in rows
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plot_curves_from_two_runs(tmp_path) -> None:
    a = _metrics(
        tmp_path / "a" / "logs" / "version_0" / "metrics.csv",
        [(0, 4, 2.0, ""), (0, 9, 1.0, ""), (0, 9, "", 0.2)],
    )
    # a resumed run: version_1 goes on from epoch 1 (and re-logs epoch 1 after a crash)
    _metrics(tmp_path / "a" / "logs" / "version_1" / "metrics.csv", [(1, 14, 0.8, ""), (1, 19, "", 0.3)])
    _metrics(tmp_path / "a" / "logs" / "version_10" / "metrics.csv", [(1, 19, "", 0.35), (2, 29, "", 0.4)])
    b = _metrics(tmp_path / "b.csv", [(0, 9, 1.5, ""), (0, 9, "", 0.1), (1, 19, 1.2, ""), (1, 19, "", 0.15)])
    run = read_curves(tmp_path / "a")
    assert run.label == "a" and run.metric == {0: 0.2, 1: 0.35, 2: 0.4} and run.loss == {0: 1.5, 1: 0.8}
    assert read_curves(a, label="x").metric == {0: 0.2}
    out = tmp_path / "plots" / "curves.png"
    assert (
        curves_main([str(tmp_path / "a"), str(b), "--labels", "student", "distilled", "--output", str(out)])
        == 0
    )
    image = cv2.imread(str(out))
    assert image is not None and image.shape == (420, 1100, 3)
    assert not list(out.parent.glob(".*"))  # no temporary file left


def test_plot_curves_errors(tmp_path, capsys) -> None:
    assert plot_curves_main([str(tmp_path / "nowhere"), "--output", str(tmp_path / "c.png")]) == 2
    assert "error: run " in capsys.readouterr().err and not (tmp_path / "c.png").exists()
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert plot_curves_main([str(tmp_path / "bad.csv")]) == 2
    assert "not a CSVLogger metrics file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        curves_main([str(tmp_path / "bad.csv"), "--labels", "x", "y"])
    assert exit_info.value.code == 2
