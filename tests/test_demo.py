"""The synthetic street-scene generator: deterministic, manifest-guarded, learnable but not trivial."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fcn.data.camvid import CamVid, camvid_table
from fcn.data.cityscapes import Cityscapes, cityscapes_table
from fcn.data.demo import TO_CITYSCAPES, VERSION, make_demo_dataset, render_scene
from fcn.data.errors import DataError


def test_deterministic_given_the_seed(tmp_path) -> None:
    a = make_demo_dataset(tmp_path / "a", n_train=3, n_val=2, size=(48, 64), seed=5)
    b = make_demo_dataset(tmp_path / "b", n_train=3, n_val=2, size=(48, 64), seed=5)
    c = make_demo_dataset(tmp_path / "c", n_train=3, n_val=2, size=(48, 64), seed=6)
    for rel in ("train/demo_00001.png", "trainannot/demo_00001.png", "val/demo_00000.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "train/demo_00001.png").read_bytes() != (c / "train/demo_00001.png").read_bytes()
    assert (a / "train/demo_00000.png").read_bytes() != (a / "train/demo_00001.png").read_bytes()
    manifest = json.loads((a / "demo.json").read_text())
    assert manifest["seed"] == 5 and manifest["version"] == VERSION and manifest["size"] == [48, 64]
    assert len(CamVid(a, "train")) == 3 and len(CamVid(a, "val")) == 2


def test_regenerated_only_when_the_manifest_differs(tmp_path) -> None:
    root = make_demo_dataset(tmp_path, n_train=3, n_val=1, size=(48, 64))
    frame = root / "train" / "demo_00000.png"
    stamp = frame.stat().st_mtime_ns
    make_demo_dataset(tmp_path, n_train=3, n_val=1, size=(48, 64))
    assert frame.stat().st_mtime_ns == stamp  # same manifest: nothing written
    (root / "notes.txt").write_text("mine")
    make_demo_dataset(tmp_path, n_train=2, n_val=1, size=(48, 64), seed=1)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["demo_00000.png", "demo_00001.png"]
    assert len(list((root / "trainannot").iterdir())) == 2 and (root / "notes.txt").is_file()
    assert json.loads((root / "demo.json").read_text())["seed"] == 1
    with pytest.raises(DataError, match="layout"):
        make_demo_dataset(tmp_path / "x", layout="kitti")


def test_scenes_look_like_streets() -> None:
    h, w = 120, 160
    labels = np.stack([render_scene(np.random.default_rng([0, i]), (h, w))[1] for i in range(12)])
    assert labels.dtype == np.uint8 and labels.max() <= 11
    present = np.bincount(labels.ravel(), minlength=12)
    assert (present[:11] > 0).all()  # all 11 classes appear in a dozen frames
    assert present[11] / labels.size < 0.05  # a little void, as in CamVid
    assert (labels[:, : h // 5] == 0).mean() > 0.5  # sky at the top
    assert (labels[:, -h // 6 :] == 3).mean() > 0.3  # road at the bottom
    per_frame = [len(np.unique(f[f < 11])) for f in labels]
    assert min(per_frame) >= 6


def test_learnable_but_not_trivial() -> None:
    """A nearest-colour-centroid classifier does far better than the majority class but is far from
    perfect: colour helps, texture, shape and position are needed too."""
    frames = [render_scene(np.random.default_rng([0, i]), (120, 160)) for i in range(12)]
    x = np.concatenate([f[0].reshape(-1, 3) for f in frames]).astype(np.float64)
    y = np.concatenate([f[1].ravel() for f in frames])
    half = len(y) // 2
    classes = [c for c in range(11) if (y[:half] == c).any()]
    centroids = np.stack([x[:half][y[:half] == c].mean(0) for c in classes])
    test_x, test_y = x[half:], y[half:]
    keep = test_y != 11
    pred = np.asarray(classes)[((test_x[keep, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    accuracy = (pred == test_y[keep]).mean()
    majority = np.bincount(test_y[keep]).max() / keep.sum()
    assert accuracy > majority + 0.2 and accuracy < 0.85, (accuracy, majority)


def test_cityscapes_layout_carries_the_same_scenes(tmp_path) -> None:
    cam = make_demo_dataset(tmp_path / "cv", n_train=0, n_val=2, size=(48, 64), seed=3)
    cs = make_demo_dataset(tmp_path / "cs", layout="cityscapes", n_train=0, n_val=2, size=(48, 64), seed=3)
    a, b = CamVid(cam, "val"), Cityscapes(cs, "val")
    assert len(b) == 2 and b.samples[0][1].name == "demo_00000_gtFine_labelIds.png"
    image_a, raw_camvid = a.load(0)
    image_b, train_ids = b[0]
    assert np.array_equal(image_a, image_b)
    # CamVid class -> Cityscapes labelId -> trainId, pixel by pixel
    cs_lut, camvid_lut = cityscapes_table("labelIds"), camvid_table()
    for camvid_id, label_id in TO_CITYSCAPES.items():
        sel = raw_camvid == camvid_lut[camvid_id]
        assert (train_ids[sel] == cs_lut[label_id]).all()
