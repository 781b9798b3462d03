"""The CPU CamVid recipes (configs/camvid_cpu/): each parses and trains one tiny epoch on generated data with
its callbacks; the shipped labelled quarter: deterministic, disjoint from the unlabeled pool, even."""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
import yaml

from fcn.checkpoint import read_checkpoint, save_checkpoint
from fcn.cli import predict_main, train_main
from fcn.data.camvid import CLASSES, PALETTE, camvid_pairs, sequence_of, spread_subset, write_subset_list
from fcn.data.datamodule import SegDataModule, read_frame_list
from fcn.data.demo import make_demo_dataset
from fcn.models import build_model

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "camvid_cpu"
CONFIGS = sorted(RECIPES.glob("*.yaml"))
QUARTER = RECIPES / "train_quarter.txt"
CAMVID = REPO.parent / "shared" / "data" / "camvid"
TINY_TEACHER = {"backbone": "vgg16_bn", "width_mult": 0.125, "fc_dim": 32}
SIZE = (48, 64)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, layout="camvid", n_train=8, n_val=2, size=SIZE, seed=0)
    write_subset_list(root, root / "quarter.txt")  # 2 of the 8 frames
    return root


def _camvid_checkpoint(folder: Path, model_name: str, kwargs: dict) -> Path:
    """A freshly initialised ``model_name`` with CamVid's classes, saved as ``folder/best.ckpt``."""
    net = build_model(model_name, num_classes=len(CLASSES), **kwargs)
    palette = [list(c) for c in PALETTE]
    return save_checkpoint(
        folder / "best.ckpt",
        model=net,
        model_name=model_name,
        model_kwargs=kwargs,
        class_names=list(CLASSES),
        palette=palette,
    )


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory) -> Path:
    """A student checkpoint for the second-stage recipes (``init_from``)."""
    return _camvid_checkpoint(tmp_path_factory.mktemp("first_stage"), "student", {"weights": None})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return _camvid_checkpoint(tmp_path_factory.mktemp("teacher"), "fcn8s", TINY_TEACHER)


def test_the_recipes_are_all_there() -> None:
    names = {c.stem for c in CONFIGS}
    assert names == {
        "student",
        "fcn8s",
        "fcn8s_loso",
        "distill_offline",
        "distill_stored",
        "distill_self",
        "student_quarter",
        "fcn8s_quarter",
        "distill_semi_quarter",
        "student_loso",
        "student_ft",
        "student_loso_ft",
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_recipe_settings_and_header(config: Path) -> None:
    name = config.stem
    text = config.read_text()
    cfg = yaml.safe_load(text)
    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]
    is_teacher = model["model"] != "student"
    precision = "bf16-mixed" if is_teacher else 32  # bf16 pays for VGG's convolutions only
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == ("cpu", 1, precision)
    assert data["brightness_range"] == [0.4, 1.4]
    assert data["exposure_target"] == "auto"  # the training frames' mean grey, into the checkpoint
    # the student-alone recipes and the teachers moved to the softer weights (RESULTS 8); the
    # distillation recipes keep the full weights they were measured with
    second_stage = name.endswith("_ft")  # whole frames from the first stage's best.ckpt
    first = name.removesuffix("_ft")
    softer = first in (
        "student",
        "student_loso",
        "student_quarter",
        "fcn8s",
        "fcn8s_loso",
        "fcn8s_quarter",
        "distill_stored",
    )
    assert data["class_weighting"] == ("sqrt_median_frequency" if softer else "median_frequency")
    assert data["num_workers"] == 2 and data["data_root"] == "data/camvid" and data["dataset"] == "camvid"
    assert data["crop_size"] == ([360, 480] if second_stage else [240, 320])
    assert "eval_size" not in data  # validation on full frames
    if second_stage:
        assert model["init_from"] == f"outputs/camvid_cpu/{first}/checkpoints/best.ckpt"
        assert model["lr"] < 0.002 and trainer["max_epochs"] == 10
    else:
        assert "init_from" not in model
    out = f"outputs/camvid_cpu/{name}"
    assert trainer["default_root_dir"] == out and cfg["checkpoint"]["dirpath"] == f"{out}/checkpoints"
    assert {lg["init_args"]["save_dir"] for lg in trainer["logger"]} == {out}
    callbacks = [c["class_path"] for c in trainer["callbacks"]]
    assert callbacks == ["fcn.callbacks.ProgressLine", "fcn.callbacks.ValPredictionGrid"]
    if not is_teacher:
        assert model["model_kwargs"] == {"weights": None}
    else:
        assert model["model"] == "fcn8s" and model["model_kwargs"]["backbone"] == "vgg16_bn"
    assert ("train_list" in data) == (name.endswith("_quarter") or first.endswith("_loso"))
    assert data.get("unlabeled_from_train", False) == (name == "distill_semi_quarter")
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"python scripts/train.py fit --config configs/camvid_cpu/{name}.yaml" in header
    assert f"--ckpt_path {out}/checkpoints/last.ckpt" in header
    assert "Wall time" in header
    if name == "distill_stored":  # the shipped teacher's labels, written as its header says
        assert data["teacher_labels"] == "outputs/camvid_cpu/fcn8s_probs/probs"
        assert "--output outputs/camvid_cpu/fcn8s_probs --outputs probs" in header
    else:
        assert "teacher_labels" not in data
    for key in ("teacher_checkpoint",):
        if key in model:
            teacher = "fcn8s_quarter" if name.endswith("_quarter") else "fcn8s"
            assert model[key] == f"outputs/camvid_cpu/{teacher}/checkpoints/best.ckpt"


@pytest.mark.parametrize("name", ["student_loso", "student_loso_ft", "fcn8s_loso"])
def test_leave_one_sequence_out_recipe_is_its_base_but_for_the_frames(name: str) -> None:
    """The copies stay copies: a change to the base recipe must reach its leave-one-sequence-out twin."""

    def settings(stem: str) -> dict:
        cfg = yaml.safe_load((RECIPES / f"{stem}.yaml").read_text())
        del cfg["trainer"]["default_root_dir"], cfg["trainer"]["logger"], cfg["checkpoint"]  # output paths
        cfg["model"]["init_args"].pop("init_from", None)  # the first stage's own best.ckpt
        return cfg

    loso, base = settings(name), settings(name.replace("_loso", ""))
    assert loso["data"].pop("train_list") == "configs/camvid_cpu/train_without_0001TP.txt"
    assert "train_list" not in base["data"]
    assert loso == base


def _tiny_epoch_args(config: Path, demo_root: Path) -> list[str]:
    """``fit`` with ``config`` on the demo data: one epoch of 2 batches of 2 tiny crops, one val batch."""
    args = ["fit", "--config", str(config), "--data.data_root", str(demo_root)]
    args += ["--data.crop_size", "[32, 48]", "--data.batch_size", "2", "--data.num_workers", "0"]
    args += ["--trainer.max_epochs", "1"]
    args += ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    return [*args, "--trainer.check_val_every_n_epoch", "1"]


@pytest.fixture(scope="module")
def teacher_labels(demo_root, teacher, tmp_path_factory) -> Path:
    """The tiny teacher's soft labels of the demo training frames, written by predict as the header says."""
    out = tmp_path_factory.mktemp("teacher_labels")
    args = ["--checkpoint", teacher, "--input", demo_root / "train", "--output", out, "--outputs", "probs"]
    assert predict_main([str(a) for a in [*args, "--flip", "--quiet"]]) == 0
    return out / "probs"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_recipe_trains_one_tiny_epoch(
    config, demo_root, teacher, first_stage, tmp_path, monkeypatch, caplog, request
) -> None:
    monkeypatch.chdir(tmp_path)  # the recipe's relative outputs/ land here
    text = config.read_text()
    args = _tiny_epoch_args(config, demo_root)
    if "model: fcn8s" in text:
        args += ["--model.init_args.model_kwargs", json.dumps(TINY_TEACHER)]
    if "teacher_checkpoint:" in text:
        args += ["--model.init_args.teacher_checkpoint", str(teacher)]
    if "init_from:" in text:
        args += ["--model.init_args.init_from", str(first_stage)]
    if "train_list:" in text:
        args += ["--data.train_list", str(demo_root / "quarter.txt")]
    if "teacher_labels:" in text:
        args += ["--data.teacher_labels", str(request.getfixturevalue("teacher_labels"))]
    assert train_main(args) == 0
    out = tmp_path / "outputs" / "camvid_cpu" / config.stem
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "checkpoints" / "best.ckpt").is_file()
    _, meta = read_checkpoint(out / "checkpoints" / "best.ckpt")
    assert meta.exposure_target is not None and 0 < meta.exposure_target <= 255  # auto, resolved
    assert (out / "val_grids" / "epoch_000.png").is_file()  # the last epoch always gets a grid
    assert list((out / "logs").glob("version_*/metrics.csv"))
    assert re.search(r"epoch 1/1  step \d+  train [\d.]+ img/s  val mIoU \d\.\d{3}", caplog.text)


# -- the labelled quarter ---------------------------------------------------------------------------------
SEQUENCES = {"0001TP": 62, "0006R0": 101, "0016E5": 204}  # CamVid's 367 training frames


def test_shipped_quarter_list_is_92_frames_spread_over_the_sequences() -> None:
    names = read_frame_list(QUARTER)
    assert len(names) == len(set(names)) == 92 and names == sorted(names)
    assert all(re.fullmatch(r"0001TP_\d{6}\.png|0006R0_f\d{5}\.png|0016E5_\d{5}\.png", n) for n in names)
    counts = Counter(sequence_of(n) for n in names)
    assert counts == {"0001TP": 16, "0006R0": 25, "0016E5": 51}  # a quarter of each (62/4 = 15.5 -> 16)


def test_spread_subset_is_deterministic_and_even() -> None:
    frames = [f"{seq}_{i:05d}.png" for seq, n in SEQUENCES.items() for i in range(n)]
    chosen = spread_subset(frames[::-1])  # input order does not matter
    assert chosen == spread_subset(frames) and len(chosen) == 92
    assert Counter(sequence_of(n) for n in chosen) == {"0001TP": 16, "0006R0": 25, "0016E5": 51}
    index = {seq: sorted(int(n[7:12]) for n in chosen if n.startswith(seq)) for seq in SEQUENCES}
    assert index["0016E5"] == list(range(2, 204, 4))  # exactly every 4th frame
    for seq, taken in index.items():
        gaps = {b - a for a, b in pairwise(taken)}
        assert gaps <= {3, 4, 5}, (seq, gaps)  # evenly spaced in time
        assert taken[0] <= 3 and taken[-1] >= SEQUENCES[seq] - 4  # the whole sequence is covered


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"real CamVid not at {CAMVID}")
def test_quarter_list_regenerates_from_real_camvid_and_the_pool_is_the_rest(tmp_path) -> None:
    assert write_subset_list(CAMVID, tmp_path / "q.txt") == read_frame_list(QUARTER)
    assert (tmp_path / "q.txt").read_text() == QUARTER.read_text()
    dm = SegDataModule(
        dataset="camvid",
        data_root=str(CAMVID),
        train_list=str(QUARTER),
        unlabeled_from_train=True,
        num_workers=0,
    )
    dm.setup("fit")
    labelled = {image.name for image, _ in dm.make_dataset("train").samples}
    pool = {p.name for p in dm.train_dataloader()["unlabeled"].dataset.paths}
    every = {image.name for image, _ in camvid_pairs(CAMVID, "train")}
    assert len(labelled) == 92 and len(pool) == 275 and not labelled & pool and labelled | pool == every


# -- the GPU recipes (configs/camvid_gpu/): full resolution, staged FCN-32s -> 16s -> 8s -------------------
GPU_CONFIGS = sorted((REPO / "configs" / "camvid_gpu").glob("*.yaml"))
COARSER = {"fcn16s": "fcn32s", "fcn8s": "fcn16s"}


def test_the_gpu_recipes_are_the_staged_fcns_the_student_and_its_distillation() -> None:
    assert {c.stem for c in GPU_CONFIGS} == {"fcn32s", "fcn16s", "fcn8s", "student", "distill_offline"}


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda c: c.stem)
def test_gpu_recipe_trains_one_tiny_epoch_on_cpu(config, demo_root, teacher, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the recipe's relative outputs/ land here
    cfg = yaml.safe_load(config.read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]
    assert (cfg["trainer"]["accelerator"], cfg["trainer"]["precision"]) == ("gpu", "bf16-mixed")
    assert data["crop_size"] == [360, 480] and model["model_kwargs"]["weights"] is None
    out = f"outputs/camvid_gpu/{config.stem}"
    assert cfg["checkpoint"]["dirpath"] == f"{out}/checkpoints"
    args = [*_tiny_epoch_args(config, demo_root), "--trainer.accelerator", "cpu", "--trainer.precision", "32"]
    if model["model"] != "student":
        assert model["model_kwargs"]["backbone"] == "vgg16_bn" and "fc_dim" not in model["model_kwargs"]
        args += ["--model.init_args.model_kwargs", json.dumps({**TINY_TEACHER, "weights": None})]
    if model["model"] in COARSER:  # stages 2 and 3 start from the coarser stage's best.ckpt
        coarser = COARSER[model["model"]]
        assert model["init_from"] == f"outputs/camvid_gpu/{coarser}/checkpoints/best.ckpt"
        (tmp_path / "init").mkdir()
        init = _camvid_checkpoint(tmp_path / "init", coarser, TINY_TEACHER)
        args += ["--model.init_args.init_from", str(init)]
    if "teacher_checkpoint" in model:
        assert model["teacher_checkpoint"] == "outputs/camvid_gpu/fcn8s/checkpoints/best.ckpt"
        args += ["--model.init_args.teacher_checkpoint", str(teacher)]
    assert train_main(args) == 0
    assert (tmp_path / out / "checkpoints" / "best.ckpt").is_file()
