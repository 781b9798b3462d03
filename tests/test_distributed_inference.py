"""predict and evaluate under torchrun (2 CPU processes, gloo): the same files and report as one process;
the deterministic, size-balanced split of the inputs over the ranks (fcn.distributed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch
from helpers import TINY, randomize_scores

from fcn.checkpoint import save_checkpoint
from fcn.data.datamodule import build_dataset
from fcn.data.demo import make_demo_dataset
from fcn.distributed import DistributedError, World, split_balanced, world_from_env
from fcn.evaluate import main as evaluate
from fcn.inputs import input_weights
from fcn.models import build_model
from fcn.predict import main as predict

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMING = ("seconds", "images_per_second", "metric_seconds", "metric_overhead")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    data = make_demo_dataset(root / "camvid", layout="camvid", n_train=0, n_val=8, size=(48, 64))
    images = root / "images"
    images.mkdir()
    for k, src in enumerate(sorted((data / "val").glob("*.png"))):
        image = cv2.imread(str(src))
        if k < 2:  # two larger images: the split balances pixels, not counts
            image = cv2.resize(image, (128, 96))
        cv2.imwrite(str(images / src.name), image)
    ds = build_dataset("camvid", data, "val")
    torch.manual_seed(0)
    model = randomize_scores(build_model("fcn8s", num_classes=len(ds.classes), **TINY))
    ckpt = save_checkpoint(
        root / "tiny.ckpt",
        model=model,
        model_name="fcn8s",
        model_kwargs=TINY,
        class_names=list(ds.classes),
        palette=[list(c) for c in ds.palette],
    )
    return {"data": data, "images": images, "ckpt": ckpt}


@pytest.fixture
def one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: str, *args: object) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), str(ROOT / "scripts" / script),
               *map(str, args)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_predict_on_two_processes_writes_the_single_process_files(
    setup: dict[str, Path], tmp_path: Path, one_process: None, capsys: pytest.CaptureFixture
) -> None:
    common = ["--checkpoint", setup["ckpt"], "--input", setup["images"], "--outputs", "label,color,overlay"]
    assert predict([*map(str, common), "--output", str(tmp_path / "one"), "--quiet"]) == 0
    assert "done 8, skipped 0, failed 0" in capsys.readouterr().out

    proc = _torchrun("predict.py", *common, "--output", tmp_path / "two")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("done 8, skipped 0, failed 0"), proc.stdout  # rank 0 only
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 3 * 8 + 1  # three kinds of 8 images, and the output marker
    assert two.keys() == one.keys()
    assert [k for k in one if one[k] != two[k]] == []

    # --skip-existing across the ranks: each rank checks its own share, the summary counts all of them
    (tmp_path / "two" / "label" / "demo_00003.png").unlink()
    proc = _torchrun("predict.py", *common, "--output", tmp_path / "two", "--skip-existing")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("done 1, skipped 7, failed 0"), proc.stdout
    assert _files(tmp_path / "two") == one


def test_evaluate_on_two_processes_writes_the_single_process_report(
    setup: dict[str, Path], tmp_path: Path, one_process: None, capsys: pytest.CaptureFixture
) -> None:
    common = ["--checkpoint", setup["ckpt"], "--dataset", "camvid", "--data-root", setup["data"],
              "--num-workers", "0", "--worst", "3", "--no-progress"]  # fmt: skip
    assert evaluate([*map(str, common), "--output", str(tmp_path / "one")]) == 0
    capsys.readouterr()

    proc = _torchrun("evaluate.py", *common, "--output", tmp_path / "two")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("report: ") == 1, proc.stdout  # rank 0 only
    reports = []
    for name in ("one", "two"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        for key in (*TIMING, "per_image_seconds", "per_image_overhead"):
            metrics["meta"].pop(key)
        reports.append(metrics)
    assert reports[0]["meta"]["images"] == 8
    assert reports[1] == reports[0]
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert one.keys() == two.keys()
    same = ["per_image.csv", "per_class.csv", "confusion_matrix.png"] + [
        k for k in one if k.startswith("worst/")
    ]
    assert len(same) == 6 and [k for k in same if one[k] != two[k]] == []


def test_split_is_deterministic_and_balanced() -> None:
    assert split_balanced([5, 4, 3, 3, 3], 2) == [[0, 3], [1, 2, 4]]  # heaviest first, to the lightest share
    weights = [(i * 7919) % 101 + 1 for i in range(60)]
    for parts in (1, 2, 3, 7):
        shares = split_balanced(weights, parts)
        assert shares == split_balanced(list(weights), parts)
        assert sorted(i for s in shares for i in s) == list(range(60))
        assert all(s == sorted(s) for s in shares)  # each share keeps the input order
        totals = [sum(weights[i] for i in s) for s in shares]
        assert max(totals) - min(totals) <= max(weights)
    assert split_balanced([1, 1], 3) == [[0], [1], []]


def test_input_weights_are_pixels(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), cv2.UMat(30, 40, cv2.CV_8UC3).get())
    cv2.imwrite(str(tmp_path / "b.png"), cv2.UMat(10, 20, cv2.CV_8UC3).get())
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths = [tmp_path / n for n in ("a.png", "b.png", "bad.png")]
    assert input_weights(paths) == [1200, 200, 700]  # unknown: the mean of the others


def test_world_from_env() -> None:
    assert world_from_env({}) == World()
    assert world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) == World()
    world = world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.local_rank, world.main, world.distributed) == (3, 4, 1, False, True)
    for env in ({"WORLD_SIZE": "two"}, {"WORLD_SIZE": "2", "RANK": "2"}):
        with pytest.raises(DistributedError, match="torchrun"):
            world_from_env(env)
