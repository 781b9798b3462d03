"""Training end to end: the CLI, checkpoints, staged init, bad input, DDP metric equality, real data."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from fcn.checkpoint import load_model, save_checkpoint
from fcn.cli import DEMO_CONFIG, train_main
from fcn.data.datamodule import SegDataModule
from fcn.data.demo import make_demo_dataset
from fcn.lit import SegmentationModule
from fcn.models import build_model

TINY = {"width_mult": 0.125, "fc_dim": 32, "dropout": 0.0}
CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, layout="camvid", n_train=8, n_val=4, size=(64, 80), seed=0)
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(DEMO_CONFIG),
        "--data.dataset",
        "camvid",
        "--data.data_root",
        str(root),
        "--data.batch_size",
        "4",
        "--data.num_workers",
        "0",
        "--data.crop_size",
        "[64, 80]",
        "--model.init_args.model_kwargs",
        '{"width_mult": 0.125, "fc_dim": 32}',
        "--trainer.max_epochs",
        "2",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger",
        "false",
        "--checkpoint.dirpath",
        str(out / "ckpt"),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def test_fit_prints_miou_and_writes_self_describing_checkpoints(demo_root, tmp_path, capsys) -> None:
    assert train_main(_args(demo_root, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "val mIoU: " in out
    best = Path(out.split("best checkpoint: ")[1].split()[0])
    assert best.is_file() and (tmp_path / "ckpt" / "last.ckpt").is_file()
    model, info = load_model(best)  # weights_only=True and validated
    assert info.model_name == "fcn8s" and info.num_classes == 11
    assert info.class_names[0] == "Sky" and len(info.palette) == 11
    assert model(torch.randn(1, 3, 37, 53)).shape == (1, 11, 37, 53)
    # validate / resume from it through the CLI
    val = ["validate", *_args(demo_root, tmp_path)[1:], "--ckpt_path", str(best)]
    assert train_main(val) == 0
    resume = [*_args(demo_root, tmp_path, "--trainer.max_epochs", "3"), "--ckpt_path", str(best)]
    assert train_main(resume) == 0


def test_staged_init_from_coarser_checkpoint(tmp_path) -> None:
    coarse = build_model("fcn32s", num_classes=11, **TINY)
    torch.nn.init.normal_(coarse.score_fr.weight)
    ckpt = save_checkpoint(tmp_path / "fcn32s.ckpt", model=coarse, model_name="fcn32s", model_kwargs=TINY)
    module = SegmentationModule(model="fcn16s", model_kwargs=TINY, num_classes=11, init_from=str(ckpt))
    torch.testing.assert_close(module.model.score_fr.weight, coarse.score_fr.weight)
    assert module.model.score_pool4.weight.abs().sum() == 0


def test_bad_input_is_one_clear_error(demo_root, tmp_path, capsys) -> None:
    # unknown model name lists the known ones
    assert train_main(_args(demo_root, tmp_path, "--model.init_args.model", "fcn4s")) == 2
    assert "known models" in capsys.readouterr().err
    # missing resume checkpoint
    assert train_main([*_args(demo_root, tmp_path), "--ckpt_path", str(tmp_path / "nope.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a file that is not a checkpoint, as init_from
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    assert train_main(_args(demo_root, tmp_path, "--model.init_args.init_from", str(junk))) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    # num_classes mismatch names both numbers
    other = save_checkpoint(
        tmp_path / "c19.ckpt", model=build_model("fcn32s", num_classes=19, **TINY), model_name="fcn32s"
    )
    assert train_main(_args(demo_root, tmp_path, "--model.init_args.init_from", str(other))) == 2
    err = capsys.readouterr().err
    assert "19 classes" in err and "11" in err
    # output dir not writable (a path below a regular file)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert train_main(_args(demo_root, blocker / "out")) == 2
    assert "not writable" in capsys.readouterr().err


def test_nan_loss_stops_with_step_and_hint(demo_root, tmp_path, capsys) -> None:
    code = train_main(
        _args(demo_root, tmp_path, "--model.init_args.lr", "1e12", "--model.init_args.warmup_steps", "0")
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "at global step" in err and "lower the learning rate" in err


def test_print_config_is_complete(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        train_main(["fit", "--config", str(DEMO_CONFIG), "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key in ("seed_everything:", "trainer:", "model:", "data:", "checkpoint:", "poly_power:"):
        assert key in out


def _validate(root: Path, ckpt: Path, devices: int, out: Path) -> float:
    dm = SegDataModule(dataset="camvid", data_root=str(root), batch_size=2, num_workers=0, val_batch_size=1)
    module = SegmentationModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    return trainer.validate(module, datamodule=dm, verbose=False)[0]["val/mIoU"]


def test_ddp_two_processes_report_the_single_process_metric(demo_root, tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    module = SegmentationModule(model="fcn8s", model_kwargs=TINY, num_classes=11)
    for layer in (module.model.score_fr, module.model.score_pool4, module.model.score_pool3):
        torch.nn.init.normal_(layer.weight, std=0.5)  # non-trivial predictions
    trainer = L.Trainer(max_epochs=0, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    # One intra-op thread in every process: a random tiny model has pixels whose two best logits
    # differ by ~1e-5, and another thread count may sum a convolution in another order and flip one of
    # them (one pixel moves this mIoU by ~1e-3); equal threads give bit-identical logits.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _validate(demo_root, ckpt, 1, tmp_path)
    finally:
        torch.set_num_threads(threads)
    double = _validate(demo_root, ckpt, 2, tmp_path)  # gloo, 2 CPU processes, 2 val images each
    assert single > 0
    assert double == pytest.approx(single, abs=1e-6)


@pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason="../shared/data/camvid not present")
def test_loss_decreases_on_real_camvid_batch() -> None:
    from fcn.data.camvid import CamVid
    from fcn.data.transforms import eval_transform

    torch.manual_seed(0)
    ds = CamVid(CAMVID, "train", transform=eval_transform(size=(96, 128)))
    images, masks = zip(*(ds[i] for i in range(4)))
    x, y = torch.stack(images), torch.stack(masks)
    module = SegmentationModule(model="student", num_classes=11, optimizer="adamw", lr=1e-3)
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = module.loss(module(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(
    "config", sorted(str(p.relative_to(DEMO_CONFIG.parent)) for p in DEMO_CONFIG.parent.rglob("*.yaml"))
)
def test_every_shipped_config_parses(config, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        train_main(["fit", "--config", str(DEMO_CONFIG.parent / config), "--print_config"])
    assert exc.value.code == 0
    assert "class_path: fcn.lit." in capsys.readouterr().out
