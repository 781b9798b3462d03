"""Data sets and file reading: label tables (Cityscapes oracle), CamVid, folders, unlabeled folders, odd
image files, and every bad-input message."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import huge_header_image

from fcn.data.base import UNKNOWN, SegmentationDataset
from fcn.data.benchmark import run as run_benchmark
from fcn.data.camvid import CLASSES as CAMVID_CLASSES
from fcn.data.camvid import PALETTE as CAMVID_PALETTE
from fcn.data.camvid import CamVid, camvid_table, median_frequency_weights
from fcn.data.cityscapes import (
    CLASSES as CS_CLASSES,
)
from fcn.data.cityscapes import (
    LABELS,
    PALETTE,
    TRAIN_ID_TO_LABEL_ID,
    Cityscapes,
    cityscapes_table,
    train_ids_to_label_ids,
)
from fcn.data.datamodule import build_dataset
from fcn.data.demo import make_demo_dataset
from fcn.data.errors import DataError
from fcn.data.folder import FolderDataset, UnlabeledImageFolder, read_class_file
from fcn.data.io import MAX_IMAGE_PIXELS, exif_orientation, oversized, read_image, read_mask
from fcn.data.transforms import eval_transform

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CS_SAMPLE = SHARED / "cityscapes_sample"
CAMVID = SHARED / "camvid"


def _png(path: Path, array: np.ndarray) -> Path:
    """Write RGB (converted to OpenCV's BGR) or single-channel arrays."""
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


def _cityscapes_tree(root: Path, frames: dict[str, list[str]], *, train_ids: bool = False) -> Path:
    rng = np.random.default_rng(1)
    for city, names in frames.items():
        for name in names:
            _png(
                root / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png",
                np.zeros((8, 16, 3), np.uint8),
            )
            ids = rng.choice(sorted(k for k in LABELS if k >= 0), (8, 16)).astype(np.uint8)
            _png(root / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png", ids)
            if train_ids:
                tid = cityscapes_table("labelIds")[ids].astype(np.uint8)
                _png(root / "gtFine" / "val" / city / f"{name}_gtFine_labelTrainIds.png", tid)
    return root


# -- Cityscapes -------------------------------------------------------------------------------------------
# The official cityscapesScripts table, written out independently: labelId -> trainId of the 19 classes.
OFFICIAL = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12}
OFFICIAL |= {26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def test_cityscapes_tables_are_official() -> None:
    lut = cityscapes_table("labelIds")
    for label_id in range(34):
        assert lut[label_id] == OFFICIAL.get(label_id, 255), label_id
    assert LABELS[-1][0] == "license plate" and LABELS[-1][1] == 255
    assert lut[34:].tolist() == [UNKNOWN] * (256 - 34)  # unknown values stay detectable
    assert TRAIN_ID_TO_LABEL_ID.tolist() == sorted(OFFICIAL, key=OFFICIAL.get)
    assert train_ids_to_label_ids(np.array([[0, 18], [255, 13]])).tolist() == [[7, 33], [0, 26]]
    assert CS_CLASSES[:3] == ("road", "sidewalk", "building") and CS_CLASSES[-1] == "bicycle"
    assert len(CS_CLASSES) == len(PALETTE) == 19
    assert PALETTE[0] == (128, 64, 128) and PALETTE[10] == (70, 130, 180) and PALETTE[18] == (119, 11, 32)
    train = cityscapes_table("labelTrainIds", ignore_index=99)
    assert train[:19].tolist() == list(range(19)) and train[255] == 99 and train[19] == UNKNOWN
    with pytest.raises(DataError, match="label_type"):
        cityscapes_table("colour")


@pytest.mark.skipif(not CS_SAMPLE.is_dir(), reason="../shared/data/cityscapes_sample not present")
def test_cityscapes_mapping_matches_official_train_ids() -> None:
    ds = Cityscapes(CS_SAMPLE, "val")
    assert len(ds) == 1 and ds.label_type == "labelIds"
    image, ours = ds[0]
    assert image.dtype == np.uint8 and ours.dtype == np.int64
    label_ids = cv2.imread(str(ds.samples[0][1]), cv2.IMREAD_UNCHANGED)
    official = cv2.imread(str(ds.samples[0][1]).replace("labelIds", "labelTrainIds"), cv2.IMREAD_UNCHANGED)
    assert image.shape[:2] == ours.shape == official.shape
    assert len(np.unique(label_ids)) >= 10
    for lid in np.unique(label_ids):
        values, counts = np.unique(official[label_ids == lid], return_counts=True)
        assert set(np.unique(ours[label_ids == lid])) == {values[counts.argmax()]}, f"labelId {lid}"
    agreement = (ours == official).mean()
    assert agreement >= 0.997, agreement
    by_train_ids = Cityscapes(CS_SAMPLE, "val", label_type="labelTrainIds")
    assert (by_train_ids[0][1] == official).all()
    auto = Cityscapes(CS_SAMPLE, "val", label_type="auto")
    assert auto.label_type == "labelTrainIds" and auto.samples[0][1].name.endswith("labelTrainIds.png")


def test_cityscapes_pairs_frames_by_city(tmp_path) -> None:
    root = _cityscapes_tree(tmp_path, {"aachen": ["x_000001", "x_000002"], "bonn": ["x_000001"]})
    ds = Cityscapes(root, "val")
    assert [(img.parent.name, lab.parent.name) for img, lab in ds.samples] == [
        ("aachen", "aachen"),
        ("aachen", "aachen"),
        ("bonn", "bonn"),
    ]
    assert all(img.name[:8] == lab.name[:8] for img, lab in ds.samples)
    assert Cityscapes(root, "val", label_type="auto").label_type == "labelIds"  # no trainIds files
    (root / "gtFine" / "val" / "bonn" / "x_000001_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) without a label.*bonn"):
        Cityscapes(root, "val")


# -- CamVid -------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason="../shared/data/camvid not present")
def test_real_camvid_loads() -> None:
    train, val = CamVid(CAMVID, "train"), CamVid(CAMVID, "val")
    assert (len(train), len(val)) == (367, 101)
    image, mask = val[0]
    assert image.shape == (360, 480, 3) and image.dtype == np.uint8
    assert mask.shape == (360, 480) and mask.dtype == np.int64
    assert set(np.unique(mask)) <= set(range(11)) | {255} and len(np.unique(mask)) >= 6
    assert train.classes == CAMVID_CLASSES and len(train.palette) == 11
    x, y = CamVid(CAMVID, "val", transform=eval_transform())[0]
    assert x.shape == (3, 360, 480) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.from_numpy(mask))


def test_camvid_classes_palette_and_void(tmp_path) -> None:
    assert CAMVID_CLASSES == (
        "Sky",
        "Building",
        "Pole",
        "Road",
        "Pavement",
        "Tree",
        "SignSymbol",
        "Fence",
        "Car",
        "Pedestrian",
        "Bicyclist",
    )
    assert CAMVID_PALETTE[0] == (128, 128, 128) and CAMVID_PALETTE[3] == (128, 64, 128)
    assert CAMVID_PALETTE[10] == (0, 128, 192) and len(set(CAMVID_PALETTE)) == 11
    root = _camvid_tree(tmp_path)
    _, mask = CamVid(root, "train")[0]
    raw = cv2.imread(str(root / "trainannot" / "f0.png"), cv2.IMREAD_UNCHANGED)
    assert (raw == 11).any() and (mask[raw == 11] == 255).all() and (mask[raw < 11] == raw[raw < 11]).all()
    _, mask = CamVid(root, "train", ignore_index=-1)[0]  # an ignore index outside uint8
    assert mask.dtype == np.int64 and (mask[raw == 11] == -1).all()
    assert camvid_table(7)[11] == 7


def test_median_frequency_weights_by_hand(tmp_path) -> None:
    a = np.array([0] * 8 + [1] * 8, np.uint8).reshape(4, 4)  # class 0: 8 px, class 1: 8 px
    b = np.array([0] * 12 + [2] * 3 + [11], np.uint8).reshape(4, 4)  # class 0: 12, class 2: 3, void: 1
    for name, lab in (("a", a), ("b", b)):
        _png(tmp_path / "train" / f"{name}.png", np.zeros((4, 4, 3), np.uint8))
        _png(tmp_path / "trainannot" / f"{name}.png", lab)
    # freq = pixels of c / pixels of the images containing c: 20/32, 8/16, 3/16 -> median 0.5
    w = median_frequency_weights(tmp_path)
    assert w[:3] == pytest.approx([0.5 / (20 / 32), 1.0, 0.5 / (3 / 16)])
    assert w[3:] == [0.0] * 8 and len(w) == 11


def test_fast_label_path_equals_the_generic_one() -> None:
    ds = SegmentationDataset(
        [(Path("x"), Path("y"))],
        classes=CAMVID_CLASSES,
        palette=CAMVID_PALETTE,
        lut=camvid_table(255),
        unknown_labels="ignore",
    )
    raw = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    fast = ds.map_labels(raw)
    generic = ds.map_labels(raw.astype(np.uint16))
    assert fast.dtype == np.uint8 and np.array_equal(fast, generic)
    expected = np.where(raw < 11, raw, 255)
    assert np.array_equal(fast, expected)


# -- folders -----------------------------------------------------------------------------------------------
def test_folder_dataset_pairs_by_relative_path(tmp_path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "classes.yaml").write_text(
        "classes: [road, car, person]\npalette: [[1, 2, 3], [4, 5, 6], [7, 8, 9]]\nignore_index: 9\n"
    )
    row = np.array([0, 1, 2, 9, 0] * 2, np.uint8)
    for split in ("train", "val"):
        _png(root / split / "images" / "a.jpg", np.zeros((8, 10, 3), np.uint8))
        _png(root / split / "masks" / "a.png", np.tile(row, (8, 1)))
        _png(root / split / "images" / "seq1" / "a.png", np.zeros((8, 10, 3), np.uint8))  # same stem, nested
        _png(root / split / "masks" / "seq1" / "a.png", np.tile(row[::-1], (8, 1)))
    ds = FolderDataset(root, "train")
    assert ds.classes == ("road", "car", "person") and ds.ignore_index == 9
    assert ds.palette == ((1, 2, 3), (4, 5, 6), (7, 8, 9))
    assert [p.relative_to(root).as_posix() for p, _ in ds.samples] == [
        "train/images/a.jpg",
        "train/images/seq1/a.png",
    ]
    assert [m.relative_to(root).as_posix() for _, m in ds.samples] == [
        "train/masks/a.png",
        "train/masks/seq1/a.png",
    ]
    assert ds[0][1][0].tolist() == row.tolist() and ds[1][1][0].tolist() == row[::-1].tolist()
    assert len(build_dataset("folder", root, "val")) == 2
    assert FolderDataset(root, "val", ignore_index=200).ignore_index == 200


def test_folder_16bit_masks_and_unknown_labels(tmp_path) -> None:
    (tmp_path / "classes.yaml").write_text("classes: [a, b, c]\nignore_index: 1000\n")
    _png(tmp_path / "images" / "x.png", np.zeros((4, 5, 3), np.uint8))
    mask = np.array([[0, 1, 2, 1000, 2]] * 4, np.uint16)
    _png(tmp_path / "masks" / "x.png", mask)
    ds = FolderDataset(tmp_path, None)
    assert ds[0][1].dtype == np.int64 and ds[0][1].tolist() == mask.astype(np.int64).tolist()
    _png(tmp_path / "masks" / "x.png", np.array([[0, 1, 2, 300, 7]] * 4, np.uint16))
    with pytest.raises(DataError, match=r"x.png has values \[7, 300\]"):
        ds[0]
    ignored = FolderDataset(tmp_path, None, unknown_labels="ignore")[0][1]
    assert ignored[0].tolist() == [0, 1, 2, 1000, 1000]


def test_palette_png_masks_give_indices(tmp_path) -> None:
    from PIL import Image

    idx = np.array([[0, 1, 2, 255]] * 3, np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette([128, 64, 128, 70, 70, 70, 0, 0, 142] + [255, 255, 255] * 253)
    path = tmp_path / "p.png"
    im.save(path)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).ndim == 3  # OpenCV alone would give colours
    got = read_mask(path)
    assert got.dtype == np.uint8 and got.tolist() == idx.tolist()


def test_class_file_errors(tmp_path) -> None:
    f = tmp_path / "classes.yaml"
    with pytest.raises(DataError, match="does not exist.*classes: \\[name"):
        read_class_file(f)
    for text, match in (
        ("classes: [a, b\n", "not valid YAML"),
        ("names: [a, b]\n", "non-empty list"),
        ("classes: [a, a]\n", "twice"),
        ("classes: [a, b]\npalette: [[1, 2, 3]]\n", "one \\[r, g, b\\]"),
        ("classes: [a, b]\npalette: [[1, 2, 300], [0, 0, 0]]\n", "0-255"),
        ("classes: [a, b]\nignore_index: 1\n", "collides"),
    ):
        f.write_text(text)
        with pytest.raises(DataError, match=match):
            read_class_file(f)
    f.write_text("classes: [a, b, c]\n")
    meta = read_class_file(f)
    assert (
        meta["ignore_index"] == 255
        and len(meta["palette"]) == 3
        and len(set(map(tuple, meta["palette"]))) == 3
    )


def test_unlabeled_folder_is_recursive_and_case_insensitive(tmp_path) -> None:
    for rel in ("a.png", "sub/b.JPG", "sub/deeper/c.Tiff", "d.webp", "e.bmp", "f.jpeg"):
        _png(tmp_path / rel, np.full((6, 7, 3), 50, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    _png(tmp_path / ".hidden.png", np.zeros((6, 7, 3), np.uint8))
    ds = UnlabeledImageFolder(tmp_path, ignore_index=77)
    assert [p.as_posix() for p in ds.relative_paths] == sorted(
        ["a.png", "d.webp", "e.bmp", "f.jpeg", "sub/b.JPG", "sub/deeper/c.Tiff"]
    )
    assert ds.paths[0] == tmp_path / ds.relative_paths[0]
    image, mask = ds[4]
    assert image.shape == (6, 7, 3) and mask.dtype == np.int64 and (mask == 77).all()
    x, y = UnlabeledImageFolder(tmp_path, transform=eval_transform())[0]
    assert x.shape == (3, 6, 7) and y.dtype == torch.int64 and (y == 255).all()


# -- image files of every kind -----------------------------------------------------------------------------
def test_gray_rgba_16bit_and_float_images(tmp_path) -> None:
    gray = _png(tmp_path / "g.png", np.full((5, 6), 77, np.uint8))
    rgba = tmp_path / "a.png"
    cv2.imwrite(
        str(rgba), np.dstack([np.full((5, 6, 3), (10, 20, 30), np.uint8), np.full((5, 6), 128, np.uint8)])
    )
    deep = tmp_path / "d.png"
    cv2.imwrite(str(deep), np.full((5, 6, 3), (65535, 4096, 0), np.uint16))
    deep_gray = tmp_path / "dg.png"
    cv2.imwrite(str(deep_gray), np.full((5, 6), 32768, np.uint16))
    flt = tmp_path / "f.tiff"
    cv2.imwrite(str(flt), np.full((5, 6, 3), 0.5, np.float32))
    assert read_image(gray).shape == (5, 6, 3) and (read_image(gray) == 77).all()
    assert read_image(rgba)[0, 0].tolist() == [30, 20, 10]  # BGRA on disk -> RGB
    assert read_image(deep).dtype == np.uint8 and read_image(deep)[0, 0].tolist() == [0, 16, 255]
    assert read_image(deep_gray)[0, 0].tolist() == [128, 128, 128]
    assert read_image(flt)[0, 0].tolist() == [127, 127, 127]
    from PIL import Image

    Image.fromarray(np.dstack([np.full((5, 6), 90, np.uint8), np.full((5, 6), 200, np.uint8)]), "LA").save(
        tmp_path / "la.png"
    )
    assert read_image(tmp_path / "la.png")[0, 0].tolist() == [90, 90, 90]
    # the same through a data set: a grayscale frame loads as RGB
    root = _camvid_tree(tmp_path / "cv")
    _png(root / "train" / "f0.png", np.full((24, 32), 9, np.uint8))
    image, _ = CamVid(root, "train")[0]
    assert image.shape == (24, 32, 3) and (image == 9).all()


# -- bad input ---------------------------------------------------------------------------------------------
def test_missing_root_and_split_show_the_layout(tmp_path) -> None:
    with pytest.raises(DataError, match=r"(?s)nope does not exist. Expected layout:\n.*trainannot"):
        CamVid(tmp_path / "nope", "train")
    root = _camvid_tree(tmp_path / "cv")
    with pytest.raises(DataError, match=r"(?s)split folder 'test' .*does not exist.*\n.*testannot"):
        CamVid(root, "test")
    (root / "valannot").rename(root / "labels")
    with pytest.raises(DataError, match="label folder 'valannot'"):
        CamVid(root, "val")
    with pytest.raises(DataError, match="leftImg8bit"):
        Cityscapes(root, "val")
    with pytest.raises(
        DataError, match=r"(?s)unlabeled image folder .*nothing does not exist.*ROOT/\*\*/\*.png"
    ):
        UnlabeledImageFolder(tmp_path / "nothing")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "classes.yaml").write_text("classes: [a]\n")
    with pytest.raises(DataError, match=r"(?s)split folder .*mine/train does not exist.*\n.*classes.yaml"):
        FolderDataset(tmp_path / "mine", "train")
    with pytest.raises(DataError, match="unknown dataset 'kitti'"):
        build_dataset("kitti", root, "train")


def test_unmatched_and_duplicate_files_are_listed(tmp_path) -> None:
    root = _camvid_tree(tmp_path)
    _png(root / "train" / "lonely.png", np.zeros((24, 32, 3), np.uint8))
    _png(root / "trainannot" / "orphan.png", np.zeros((24, 32), np.uint8))
    with pytest.raises(
        DataError, match=r"image\(s\) without a label.*lonely.png.*label\(s\) without an image.*orphan"
    ):
        CamVid(root, "train")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "classes.yaml").write_text("classes: [a]\n")
    _png(tmp_path / "mine" / "images" / "x.png", np.zeros((4, 4, 3), np.uint8))
    _png(tmp_path / "mine" / "images" / "x.jpg", np.zeros((4, 4, 3), np.uint8))
    _png(tmp_path / "mine" / "masks" / "x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"used twice.*images/x.jpg / .*images/x.png"):
        FolderDataset(tmp_path / "mine")


def test_size_mismatch_and_unknown_labels(tmp_path) -> None:
    root = _camvid_tree(tmp_path, label_value=3)
    _png(root / "trainannot" / "f1.png", np.zeros((20, 32), np.uint8))
    with pytest.raises(DataError, match="f1.png is 24x32 but its label .*f1.png is 20x32.*same size"):
        CamVid(root, "train")[1]
    lab = np.full((24, 32), 3, np.uint8)
    lab[0, :3] = (42, 12, 200)
    _png(root / "valannot" / "f2.png", lab)
    with pytest.raises(DataError) as info:
        CamVid(root, "val")[2]
    assert "valannot/f2.png has values [12, 42, 200]" in str(info.value)
    # the hint names the flag of each command that reads data sets
    assert "--data.unknown_labels ignore" in str(info.value) and "--unknown-labels ignore" in str(info.value)
    ignored = CamVid(root, "val", unknown_labels="ignore")[2][1]
    assert ignored[0, :4].tolist() == [255, 255, 255, 3] and (ignored[1:] == 3).all()
    with pytest.raises(DataError, match="unknown_labels must be one of"):
        CamVid(root, "val", unknown_labels="skip")


def test_read_image_applies_exif_orientation(tmp_path) -> None:
    """All eight EXIF orientations, against Pillow's exif_transpose (exact on PNG); JPEGs equal to
    OpenCV's own EXIF handling. Label maps are read as stored."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(0)
    pixels = cv2.resize(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8), (40, 24))
    for orientation in range(1, 9):
        for ext in ("png", "jpg"):
            path = tmp_path / f"o{orientation}.{ext}"
            im = Image.fromarray(pixels)
            exif = im.getexif()
            exif[0x0112] = orientation
            im.save(path, exif=exif, **({"quality": 95} if ext == "jpg" else {}))
            assert exif_orientation(np.fromfile(path, np.uint8)) == orientation
            with Image.open(path) as stored:
                shown = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
            got = read_image(path)
            assert got.shape == shown.shape == ((24, 40, 3) if orientation < 5 else (40, 24, 3))
            if ext == "png":
                np.testing.assert_array_equal(got, shown)
            else:  # two JPEG decoders: close, and the same orientation
                assert np.abs(got.astype(int) - shown).mean() < 3
                opencv = cv2.imread(str(path), cv2.IMREAD_COLOR)  # OpenCV applies EXIF orientation itself
                np.testing.assert_array_equal(got, cv2.cvtColor(opencv, cv2.COLOR_BGR2RGB))
    plain = tmp_path / "plain.png"
    cv2.imwrite(str(plain), pixels)
    assert exif_orientation(np.fromfile(plain, np.uint8)) == 1
    mask = tmp_path / "mask.png"
    Image.fromarray(pixels[..., 0]).save(mask, exif=exif)  # orientation 8 in a label map: ignored
    assert read_mask(mask).shape == (24, 40)


def test_unreadable_truncated_and_colour_files(tmp_path) -> None:
    root = _camvid_tree(tmp_path, size=(64, 80))
    (root / "train" / "f0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="cannot read image .*f0.png.*replace or remove it"):
        CamVid(root, "train")[0]
    noise = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    for ext in ("png", "jpg"):
        _, buf = cv2.imencode(f".{ext}", noise)
        path = tmp_path / f"cut.{ext}"
        path.write_bytes(buf.tobytes()[: len(buf) // 2])
        with pytest.raises(DataError, match=f"cannot read image .*cut.{ext}.*truncated"):
            read_image(path)
        path.write_bytes(buf.tobytes())
        assert read_image(path).shape == (64, 80, 3)  # the whole file is fine
        path.write_bytes(buf.tobytes() + bytes(8192))  # data after the end (phone cameras append some)
        assert read_image(path).shape == (64, 80, 3)
    (root / "trainannot" / "f1.png").write_bytes(b"")
    with pytest.raises(DataError, match="cannot read label file .*f1.png"):
        CamVid(root, "train")[1]
    ds = CamVid(root, "train")
    (root / "train" / "f2.png").unlink()  # vanished after listing
    with pytest.raises(DataError, match="cannot read image .*f2.png"):
        ds[2]
    colour = np.zeros((64, 80, 3), np.uint8)
    colour[:, :, 1] = 5
    _png(root / "valannot" / "f0.png", colour)
    with pytest.raises(DataError, match="valannot/f0.png is a colour image"):
        CamVid(root, "val")[0]
    _png(root / "valannot" / "f0.png", np.dstack([np.full((64, 80), 4, np.uint8)] * 3))  # gray stored as RGB
    assert (CamVid(root, "val")[0][1] == 4).all()


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_image_whose_header_claims_a_huge_size_is_a_data_error(tmp_path, kind) -> None:
    """Refused from the header (OpenCV would raise cv2.error, or allocate the pixels), image and label."""
    root = _camvid_tree(tmp_path)
    (root / "train" / "f0.png").write_bytes(huge_header_image(kind))
    with pytest.raises(DataError, match=r"cannot read image .*f0.png: .*MAX_IMAGE_PIXELS.*replace or remove"):
        CamVid(root, "train")[0]
    (root / "trainannot" / "f1.png").write_bytes(huge_header_image(kind))
    with pytest.raises(DataError, match=r"cannot read label file .*f1.png: .*MAX_IMAGE_PIXELS"):
        CamVid(root, "train")[1]
    width = int(np.sqrt(MAX_IMAGE_PIXELS))
    assert oversized(np.frombuffer(huge_header_image(kind, width, width), np.uint8)) is None  # at the limit
    assert oversized(np.frombuffer(huge_header_image(kind, width + 1, width), np.uint8)) is not None


def test_empty_data_sets(tmp_path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "trainannot").mkdir()
    with pytest.raises(DataError, match=r"(?s)CamVid train .* is empty.*\n.*trainannot"):
        CamVid(tmp_path, "train")
    with pytest.raises(DataError, match="holds no images"):
        UnlabeledImageFolder(tmp_path)
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    (tmp_path / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match="Cityscapes val .* is empty"):
        Cityscapes(tmp_path, "val")


# -- throughput helpers ------------------------------------------------------------------------------------
def test_benchmark_reports_figures(tmp_path) -> None:
    root = make_demo_dataset(tmp_path, n_train=6, n_val=0, size=(60, 80))
    r = run_benchmark(root, crop=(48, 64), n=6, workers=0, batch_size=2)
    assert r["images"] == 6 and r["image_size"] == "60x80" and r["crop"] == "48x64"
    assert r["images_per_second_one_worker"] > 0 and r["epoch_seconds"] > 0
    assert r["load_ms"] > 0 and r["augment_ms"] > 0


def test_non_ascii_file_names(tmp_path) -> None:
    """Non-ASCII file names work (the bytes are read by numpy, not by OpenCV's path handling)."""
    path = _png(tmp_path / "ascii.png", np.full((3, 4, 3), (1, 2, 3), np.uint8))
    odd = path.rename(tmp_path / "straße_é.png")
    assert read_image(odd)[0, 0].tolist() == [1, 2, 3]
