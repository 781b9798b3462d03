"""Data layer: label tables (Cityscapes oracle), CamVid / folder / unlabeled data sets, transforms,
the data module, the demo generator and every bad-input message."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fcn.data.camvid import CLASSES as CAMVID_CLASSES
from fcn.data.camvid import CamVid, median_frequency_weights
from fcn.data.cityscapes import LABELS, Cityscapes, cityscapes_table, train_ids_to_label_ids
from fcn.data.datamodule import SegDataModule, build_dataset
from fcn.data.demo import make_demo_dataset
from fcn.data.errors import DataError
from fcn.data.folder import FolderDataset, UnlabeledImageFolder
from fcn.data.io import read_image
from fcn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CS_SAMPLE = SHARED / "cityscapes_sample"
CAMVID = SHARED / "camvid"


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 and array.shape[2] == 3 else array
    assert cv2.imwrite(str(path), arr)
    return path


def _camvid_tree(root: Path, n: int = 3, size=(24, 32), label_value: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(n):
            _png(root / split / f"f{i}.png", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
            lab = (
                rng.integers(0, 12, size, dtype=np.uint8)
                if label_value is None
                else np.full(size, label_value, np.uint8)
            )
            _png(root / f"{split}annot" / f"f{i}.png", lab)
    return root


# -- Cityscapes -------------------------------------------------------------------------------------------
def test_cityscapes_table_is_official() -> None:
    lut = cityscapes_table("labelIds")
    assert [lut[i] for i in (7, 8, 11, 26, 33)] == [0, 1, 2, 13, 18]
    assert all(lut[i] == 255 for i in (0, 1, 6, 9, 10, 14, 15, 16, 18, 29, 30))
    assert sum(1 for _, t in LABELS.values() if t != 255) == 19
    train = np.arange(19)
    back = train_ids_to_label_ids(train)
    assert (lut[back] == train).all()  # trainId → labelId → trainId round trip


@pytest.mark.skipif(not CS_SAMPLE.is_dir(), reason="../shared/data/cityscapes_sample not present")
def test_cityscapes_mapping_matches_official_train_ids() -> None:
    ds = Cityscapes(CS_SAMPLE, "val")
    assert len(ds) == 1
    image, ours = ds[0]
    label_ids = cv2.imread(str(ds.samples[0][1]), cv2.IMREAD_UNCHANGED)
    official = cv2.imread(str(ds.samples[0][1]).replace("labelIds", "labelTrainIds"), cv2.IMREAD_UNCHANGED)
    assert image.shape[:2] == ours.shape == official.shape
    for lid in np.unique(label_ids):
        values, counts = np.unique(official[label_ids == lid], return_counts=True)
        assert ours[label_ids == lid][0] == values[counts.argmax()], f"labelId {lid}"
    agreement = (ours == official).mean()
    assert agreement >= 0.997, agreement
    trainids = Cityscapes(CS_SAMPLE, "val", label_type="labelTrainIds")[0][1]
    assert (trainids == official).all()


# -- CamVid -------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason="../shared/data/camvid not present")
def test_real_camvid_loads() -> None:
    train, val = CamVid(CAMVID, "train"), CamVid(CAMVID, "val")
    assert (len(train), len(val)) == (367, 101)
    image, mask = val[0]
    assert image.shape == (360, 480, 3) and image.dtype == np.uint8
    assert mask.dtype == np.int64 and set(np.unique(mask)) <= set(range(11)) | {255}
    assert train.classes == CAMVID_CLASSES and len(train.palette) == 11


def test_camvid_void_is_ignored_and_weights(tmp_path) -> None:
    root = _camvid_tree(tmp_path)
    _, mask = CamVid(root, "train")[0]
    raw = cv2.imread(str(root / "trainannot" / "f0.png"), cv2.IMREAD_UNCHANGED)
    assert (mask[raw == 11] == 255).all() and (mask[raw < 11] == raw[raw < 11]).all()
    w = median_frequency_weights(root)
    assert len(w) == 11 and all(v > 0 for v in w)
    assert np.median(w) == pytest.approx(1.0, abs=0.3)


# -- folders -----------------------------------------------------------------------------------------------
def test_folder_dataset_and_unlabeled(tmp_path) -> None:
    root = tmp_path / "mine"
    (root).mkdir()
    (root / "classes.yaml").write_text("classes: [road, car, person]\nignore_index: 9\n")
    _png(root / "images" / "a.jpg", np.zeros((8, 10, 3), np.uint8))
    _png(root / "masks" / "a.png", np.array([[0, 1, 2, 9, 0] * 2] * 8, np.uint8))
    ds = FolderDataset(root)
    assert ds.classes == ("road", "car", "person") and ds.ignore_index == 9 and len(ds.palette) == 3
    assert set(np.unique(ds[0][1])) == {0, 1, 2, 9}
    dm = SegDataModule(dataset="folder", data_root=str(root), num_workers=0)
    assert dm.num_classes == 3 and dm.ignore_index == 9 and dm.class_names == ["road", "car", "person"]
    un = UnlabeledImageFolder(tmp_path)  # recursive, finds images at any depth
    assert len(un) == 2 and Path("mine/images/a.jpg") in un.relative_paths
    image, mask = un[0]
    assert (mask == 255).all() and mask.shape == image.shape[:2]


# -- transforms --------------------------------------------------------------------------------------------
def test_train_pipeline_keeps_image_and_mask_aligned() -> None:
    """Colour encodes the label; after scale/pad/crop/flip the mask still matches the colour."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (11, 3), dtype=np.uint8)
    mask = np.kron(rng.integers(0, 11, (12, 16)), np.ones((10, 10), np.int64))  # 120x160 blocks
    image = colours[mask]
    tf = train_transform(crop_size=(128, 144), scale_range=(0.5, 2.0), color_jitter=False)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    checked = 0
    for seed in range(8):
        tf.set_random_seed(seed)
        x, y = tf(image=image, mask=mask).values()
        assert x.dtype == torch.float32 and y.dtype in (torch.int64, torch.int32, torch.uint8)
        y = y.long().numpy()
        rgb = ((x.permute(1, 2, 0).numpy() * std + mean) * 255).round()
        dist = np.abs(rgb[:, :, None, :] - colours[None, None].astype(float)).sum(-1)
        nearest = dist.argmin(-1)
        valid = y != 255
        # ignore a 2-pixel band at label boundaries, where bilinear image resampling mixes colours
        edge = cv2.dilate(
            (cv2.Laplacian(np.where(valid, y, 20).astype(np.float32), cv2.CV_32F) != 0).astype(np.uint8),
            np.ones((5, 5)),
        )
        inner = valid & (edge == 0)
        assert (nearest[inner] == y[inner]).mean() > 0.99
        pad = ~valid
        if pad.any():  # padding: the mean colour in the image, ignore in the mask
            assert np.abs(x.permute(1, 2, 0).numpy()[pad]).max() < 0.05
        checked += inner.sum()
    assert checked > 10000


def test_eval_transform_keeps_size_or_resizes_with_nearest() -> None:
    img = np.zeros((37, 53, 3), np.uint8)
    mask = np.arange(37 * 53).reshape(37, 53) % 11
    x, y = eval_transform()(image=img, mask=mask).values()
    assert x.shape == (3, 37, 53) and (y.numpy() == mask).all()
    x, y = eval_transform(size=(20, 30))(image=img, mask=mask).values()
    assert x.shape == (3, 20, 30) and set(np.unique(y.numpy())) <= set(range(11))


# -- data module and demo ----------------------------------------------------------------------------------
def test_demo_is_deterministic_and_loads(tmp_path) -> None:
    a = make_demo_dataset(tmp_path / "a", n_train=3, n_val=2, size=(48, 64), seed=5)
    b = make_demo_dataset(tmp_path / "b", n_train=3, n_val=2, size=(48, 64), seed=5)
    c = make_demo_dataset(tmp_path / "c", n_train=3, n_val=2, size=(48, 64), seed=6)
    fa, fb, fc = (p / "train" / "demo_00001.png" for p in (a, b, c))
    assert fa.read_bytes() == fb.read_bytes() and fa.read_bytes() != fc.read_bytes()
    labels = np.concatenate([CamVid(a, "train")[i][1].ravel() for i in range(3)])
    assert len(np.unique(labels[labels != 255])) >= 6  # a street scene, not a toy
    cs = make_demo_dataset(tmp_path / "cs", layout="cityscapes", n_train=2, n_val=1, size=(48, 64))
    assert len(Cityscapes(cs, "val")) == 1


def test_datamodule_links_and_loaders(tmp_path) -> None:
    dm = SegDataModule(
        dataset="demo",
        data_root=str(tmp_path / "d"),
        batch_size=2,
        num_workers=0,
        crop_size=(40, 48),
        demo_train=4,
        demo_val=2,
        demo_size=(48, 64),
        unlabeled_root=None,
    )
    assert (dm.num_classes, dm.ignore_index, len(dm.palette)) == (11, 255, 11)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 40, 48) and y.shape == (2, 40, 48) and y.dtype == torch.int64
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (1, 3, 48, 64)
    semi = SegDataModule(
        dataset="camvid",
        data_root=str(tmp_path / "d"),
        batch_size=2,
        num_workers=0,
        crop_size=(40, 48),
        unlabeled_root=str(tmp_path / "d" / "val"),
        unlabeled_ratio=1.0,
    )
    semi.setup("fit")
    loaders = semi.train_dataloader()
    assert set(loaders) == {"labeled", "unlabeled"}
    xu, yu = next(iter(loaders["unlabeled"]))
    assert xu.shape == (2, 3, 40, 48) and (yu == 255).all()


# -- bad input ---------------------------------------------------------------------------------------------
def test_missing_root_and_split_show_the_layout(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist. Expected layout"):
        CamVid(tmp_path / "nope", "train")
    root = _camvid_tree(tmp_path / "cv")
    with pytest.raises(DataError, match="'test'"):
        CamVid(root, "test")
    with pytest.raises(DataError, match="leftImg8bit"):
        Cityscapes(root, "val")
    with pytest.raises(DataError, match="unknown dataset"):
        build_dataset("kitti", root, "train")


def test_unmatched_files_are_listed(tmp_path) -> None:
    root = _camvid_tree(tmp_path)
    _png(root / "train" / "lonely.png", np.zeros((24, 32, 3), np.uint8))
    _png(root / "trainannot" / "orphan.png", np.zeros((24, 32), np.uint8))
    with pytest.raises(
        DataError, match=r"image\(s\) without a label.*lonely.png.*label\(s\) without an image.*orphan"
    ):
        CamVid(root, "train")


def test_size_mismatch_and_unknown_labels(tmp_path) -> None:
    root = _camvid_tree(tmp_path, label_value=3)
    _png(root / "trainannot" / "f1.png", np.zeros((20, 32), np.uint8))
    with pytest.raises(DataError, match="f1.png is 24x32 but its label .* is 20x32"):
        CamVid(root, "train")[1]
    _png(root / "valannot" / "f2.png", np.full((24, 32), 42, np.uint8))
    with pytest.raises(DataError, match=r"values \[42\].*unknown_labels='ignore'"):
        CamVid(root, "val")[2]
    assert (CamVid(root, "val", unknown_labels="ignore")[2][1] == 255).all()


def test_unreadable_and_odd_images(tmp_path) -> None:
    root = _camvid_tree(tmp_path)
    (root / "train" / "f0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="cannot read image .*f0.png"):
        CamVid(root, "train")[0]
    gray = _png(tmp_path / "g.png", np.full((5, 6), 77, np.uint8))
    rgba = tmp_path / "a.png"
    cv2.imwrite(
        str(rgba), np.dstack([np.full((5, 6, 3), (10, 20, 30), np.uint8), np.full((5, 6), 128, np.uint8)])
    )
    deep = tmp_path / "d.png"
    cv2.imwrite(str(deep), np.full((5, 6, 3), 65535, np.uint16))
    assert read_image(gray).shape == (5, 6, 3) and (read_image(gray) == 77).all()
    assert read_image(rgba)[0, 0].tolist() == [30, 20, 10]  # BGRA on disk → RGB
    assert read_image(deep).dtype == np.uint8 and (read_image(deep) == 255).all()


def test_empty_dataset(tmp_path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "trainannot").mkdir()
    with pytest.raises(DataError, match="empty"):
        CamVid(tmp_path, "train")
    with pytest.raises(DataError, match="holds no images"):
        UnlabeledImageFolder(tmp_path)
