"""SegDataModule: the description linked into the model, loaders, seeding, semi-supervised and predict."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from fcn.data.camvid import CLASSES as CAMVID_CLASSES
from fcn.data.cityscapes import CLASSES as CS_CLASSES
from fcn.data.datamodule import PermutationStream, SegDataModule, build_dataset, collate, seed_worker
from fcn.data.demo import make_demo_dataset
from fcn.data.errors import DataError
from fcn.data.folder import UnlabeledImageFolder
from fcn.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SIZE = (48, 64)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    return make_demo_dataset(root, n_train=6, n_val=3, n_test=5, size=SIZE, seed=0)


def _dm(root: Path, **kw) -> SegDataModule:
    args = {
        "dataset": "camvid",
        "data_root": str(root),
        "batch_size": 2,
        "num_workers": 0,
        "crop_size": (40, 48),
    }
    return SegDataModule(**{**args, **kw})


def test_description_is_there_before_setup(tmp_path) -> None:
    cs = SegDataModule(dataset="cityscapes", data_root=str(tmp_path / "not-yet"))  # nothing read
    assert cs.num_classes == 19 and cs.class_names == list(CS_CLASSES) and cs.ignore_index == 255
    assert cs.palette[0] == [128, 64, 128] and all(isinstance(v, int) for c in cs.palette for v in c)
    assert cs.mean == list(IMAGENET_MEAN) and cs.std == list(IMAGENET_STD)
    cv = SegDataModule(dataset="demo", data_root=str(tmp_path / "d"), ignore_index=250)
    assert (cv.num_classes, cv.class_names, cv.ignore_index) == (11, list(CAMVID_CLASSES), 250)
    assert not (tmp_path / "d").exists()  # generated in prepare_data / setup, not at construction
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "classes.yaml").write_text("classes: [road, car]\nignore_index: 7\n")
    folder = SegDataModule(dataset="folder", data_root=str(tmp_path / "mine"))
    assert (folder.num_classes, folder.class_names, folder.ignore_index) == (2, ["road", "car"], 7)
    assert len(folder.palette) == 2


def test_loaders_give_batches_of_the_contract(demo) -> None:
    dm = _dm(demo, eval_size=(32, 48))
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 40, 48) and x.dtype == torch.float32
    assert (
        y.shape == (2, 40, 48)
        and y.dtype == torch.int64
        and set(y.unique().tolist()) <= set(range(11)) | {255}
    )
    assert len(dm.train_dataloader()) == 3  # 6 images, batch 2
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (1, 3, 32, 48) and yv.dtype == torch.int64
    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 3  # test split defaults to val (CamVid test is withheld)
    assert len(_dm(demo, test_split="test").test_dataloader().dataset) == 5  # set up on demand
    full = next(iter(_dm(demo).val_dataloader()))[0]
    assert full.shape == (1, 3, *SIZE)


def test_same_seed_same_batches_with_workers(demo) -> None:
    def first(seed: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
        dm = _dm(demo, seed=seed, num_workers=workers, persistent_workers=False)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    a, b, c = first(3, 0), first(3, 0), first(4, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    w1, w2 = first(3, 2), first(3, 2)
    assert torch.equal(w1[0], w2[0]) and torch.equal(w1[1], w2[1])


class _Resizing(Dataset):
    """Work big enough for OpenCV to use its thread pool."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(cv2.resize(np.zeros((720, 960, 3), np.uint8), (480, 360)))


def test_workers_survive_a_parent_that_used_opencv() -> None:
    """Forked workers after the parent ran OpenCV's thread pool must not hang (seed_worker's cv2 setup)."""
    big = np.zeros((1500, 2000, 3), np.uint8)
    for _ in range(3):
        cv2.resize(big, (1000, 750))  # starts OpenCV's pool in this process
    loader = DataLoader(_Resizing(), batch_size=2, num_workers=2, worker_init_fn=seed_worker, timeout=30)
    assert sum(len(x) for x in loader) == 4


def test_semi_supervised_loaders(demo) -> None:
    dm = _dm(demo, batch_size=4, unlabeled_root=str(demo / "test"), unlabeled_ratio=0.5)
    dm.setup("fit")
    loaders = dm.train_dataloader()
    assert set(loaders) == {"labeled", "unlabeled"}
    assert isinstance(loaders["unlabeled"].dataset, UnlabeledImageFolder)
    xu, yu = next(iter(loaders["unlabeled"]))
    assert xu.shape == (2, 3, 40, 48) and yu.dtype == torch.int64 and (yu == 255).all()  # round(4 * 0.5)
    combined = CombinedLoader(loaders, "max_size_cycle")  # what Lightning does with the dict
    batches = list(combined)
    # the labelled set sets the epoch: 6 // 4 = 1 batch, although the 5-image pool holds 2 batches of 2
    assert len(batches) == len(loaders["labeled"]) == len(loaders["unlabeled"]) == 1
    assert {k: v[0].shape[0] for k, v in batches[0][0].items()} == {"labeled": 4, "unlabeled": 2}


def test_permutation_stream_covers_the_pool_across_epochs() -> None:
    stream = PermutationStream(10, num_samples=4, generator=torch.Generator().manual_seed(0))
    epochs = [list(stream) for _ in range(5)]
    assert all(len(e) == len(stream) == 4 for e in epochs)
    flat = [i for e in epochs for i in e]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a fresh permutation each pass
    with pytest.raises(DataError, match="num_samples"):
        PermutationStream(10, num_samples=0, generator=torch.Generator())


def test_ddp_ranks_share_one_unlabeled_stream(demo) -> None:
    """Under DDP Lightning shards the unlabeled sampler per rank (DistributedSamplerWrapper): the ranks
    together must walk one permutation stream of the pool, not each its own (overlapping) stream."""
    from collections import Counter
    from types import SimpleNamespace

    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    per_rank = []
    for rank in (0, 1):
        # 6 labelled images in batches of 3 -> 2 steps; 5 unlabeled crops per step -> 10 = twice the pool
        dm = _dm(demo, batch_size=3, unlabeled_root=str(demo / "test"), unlabeled_ratio=5 / 3)
        dm.trainer = SimpleNamespace(global_rank=rank)
        dm.setup("fit")
        sampler = dm.train_dataloader()["unlabeled"].sampler
        wrapped = DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=True, seed=0)
        epochs = []
        for epoch in range(3):
            wrapped.set_epoch(epoch)
            epochs.append(list(wrapped))
        per_rank.append(epochs)
    for epoch in range(3):
        r0, r1 = per_rank[0][epoch], per_rank[1][epoch]
        assert len(r0) == len(r1) == 5
        assert Counter(r0 + r1) == {i: 2 for i in range(5)}, (r0, r1)  # every pool image twice per epoch


def test_demo_is_generated_once_and_a_different_one_is_reported(tmp_path) -> None:
    root = tmp_path / "d"
    dm = SegDataModule(
        dataset="demo", data_root=str(root), num_workers=0, demo_train=2, demo_val=1, demo_size=SIZE
    )
    dm.prepare_data()
    assert len(list((root / "train").glob("*.png"))) == 2 and (root / "demo.json").is_file()
    stamp = (root / "train" / "demo_00000.png").stat().st_mtime_ns
    dm.setup("fit")
    assert (root / "train" / "demo_00000.png").stat().st_mtime_ns == stamp
    other = SegDataModule(dataset="demo", data_root=str(root), num_workers=0, demo_train=3, demo_size=SIZE)
    with pytest.warns(UserWarning, match="generated with .*n_train.*delete"):
        other.prepare_data()
    assert len(list((root / "train").glob("*.png"))) == 2  # left alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.prepare_data()  # the same settings: silent


def test_class_weights(demo) -> None:
    assert _dm(demo).class_weights is None
    w = _dm(demo, class_weighting="median_frequency").class_weights
    assert len(w) == 11 and all(v >= 0 for v in w) and max(w) > 1 > min(v for v in w if v > 0)
    soft = _dm(demo, class_weighting="sqrt_median_frequency").class_weights
    assert soft == pytest.approx([v**0.5 for v in w])  # same order of classes, a narrower range
    assert max(soft) / min(v for v in soft if v > 0) < max(w) / min(v for v in w if v > 0)
    with pytest.raises(DataError, match="class_weighting"):
        _dm(demo, class_weighting="inverse")


def test_exposure_target_auto_is_the_training_frames_mean_grey(demo, tmp_path) -> None:
    def grey(name: str) -> float:
        return float(cv2.cvtColor(cv2.imread(str(demo / "train" / name)), cv2.COLOR_BGR2GRAY).mean())

    names = sorted(p.name for p in (demo / "train").glob("*.png"))
    assert _dm(demo).exposure_target is None and _dm(demo, exposure_target=90).exposure_target == 90.0
    auto = _dm(demo, exposure_target="auto").exposure_target
    assert auto == pytest.approx(np.mean([grey(n) for n in names]), abs=0.051)  # every frame once, to 0.1
    listed = tmp_path / "labelled.txt"
    listed.write_text("demo_00001.png\ndemo_00004.png\n")
    subset = _dm(demo, exposure_target="auto", train_list=str(listed)).exposure_target
    assert subset == pytest.approx((grey("demo_00001.png") + grey("demo_00004.png")) / 2, abs=0.051)
    assert subset != auto
    for bad in (0, 300, "bright"):
        with pytest.raises(DataError, match=r"exposure_target .*or auto"):
            _dm(demo, exposure_target=bad)


def test_bad_settings_are_data_errors(demo, tmp_path) -> None:
    for kw, match in (
        ({"dataset": "kitti"}, "unknown dataset 'kitti'"),
        ({"unknown_labels": "drop"}, "unknown_labels"),
        ({"label_type": "color"}, "label_type"),
        ({"crop_size": (0, 10)}, "crop_size must be positive"),
        ({"crop_size": (10,)}, "crop_size must be two numbers"),
        ({"scale_range": (2.0, 0.5)}, "low <= high"),
        ({"brightness_range": (1.4, 0.4)}, "brightness_range must be"),
        ({"brightness_range": (0.0, 1.0)}, "brightness_range must be positive"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"unlabeled_ratio": 0}, "unlabeled_ratio"),
        ({"ignore_index": 3}, "collides"),
    ):
        with pytest.raises(DataError, match=match):
            _dm(demo, **kw)
    with pytest.raises(DataError, match="class file .*classes.yaml does not exist"):
        SegDataModule(dataset="folder", data_root=str(tmp_path))
    with pytest.raises(DataError, match="(?s)CamVid root .*nowhere does not exist.*trainannot"):
        _dm(tmp_path / "nowhere").setup("fit")


def test_batches_of_different_sizes_say_what_to_do(tmp_path) -> None:
    batch = [(torch.zeros(3, 4, 5), torch.zeros(4, 5)), (torch.zeros(3, 6, 5), torch.zeros(6, 5))]
    with pytest.raises(DataError, match=r"different sizes \[\(4, 5\), \(6, 5\)\].*val_batch_size 1"):
        collate(batch)
    x, y = collate([(torch.zeros(3, 4, 5), torch.zeros(4, 5, dtype=torch.long))] * 2)
    assert x.shape == (2, 3, 4, 5) and y.dtype == torch.int64


def test_build_dataset_names(demo) -> None:
    for name in ("camvid", "demo"):
        ds = build_dataset(name, demo, "val", unknown_labels="ignore")
        assert len(ds) == 3 and ds.classes == CAMVID_CLASSES
    image, mask = ds[0]
    assert image.dtype == np.uint8 and mask.dtype == np.int64


def test_train_list_restricts_the_labelled_set_and_the_rest_is_the_pool(demo, tmp_path) -> None:
    listed = tmp_path / "labelled.txt"
    listed.write_text("# two of the six\ndemo_00001.png\n\ndemo_00004.png\n")
    dm = _dm(demo, train_list=str(listed))
    dm.setup("fit")
    assert [img.name for img, _ in dm.train_dataloader().dataset.samples] == [
        "demo_00001.png",
        "demo_00004.png",
    ]
    assert len(dm.val_dataloader().dataset) == 3  # validation untouched
    weights = _dm(demo, train_list=str(listed), class_weighting="median_frequency").class_weights
    assert (
        weights != _dm(demo, class_weighting="median_frequency").class_weights
    )  # from the listed labels only
    semi = _dm(demo, train_list=str(listed), unlabeled_from_train=True, unlabeled_ratio=1.5)
    semi.setup("fit")
    loaders = semi.train_dataloader()
    pool = loaders["unlabeled"].dataset
    assert isinstance(pool, UnlabeledImageFolder)
    assert [p.name for p in pool.paths] == [
        "demo_00000.png",
        "demo_00002.png",
        "demo_00003.png",
        "demo_00005.png",
    ]
    assert pool.relative_paths[0] == Path("demo_00000.png")
    xu, yu = next(iter(loaders["unlabeled"]))
    assert xu.shape == (3, 3, 40, 48) and (yu == 255).all()  # round(2 * 1.5) random crops, no labels
    assert len(loaders["labeled"]) == len(loaders["unlabeled"]) == 1


def test_train_list_errors(demo, tmp_path) -> None:
    listed = tmp_path / "l.txt"
    listed.write_text("demo_00001.png\nnot_a_frame.png\n")
    with pytest.raises(DataError, match=r"l.txt names 1 frame\(s\) that are not in .*'not_a_frame.png'"):
        _dm(demo, train_list=str(listed)).setup("fit")
    listed.write_text("demo_00001.png\ndemo_00001.png\n")
    with pytest.raises(DataError, match="more than once"):
        _dm(demo, train_list=str(listed))
    listed.write_text("# nothing\n")
    with pytest.raises(DataError, match="lists no frames"):
        _dm(demo, train_list=str(listed))
    with pytest.raises(DataError, match="frame list .*missing.txt cannot be read"):
        _dm(demo, train_list=str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unlabeled_from_train needs train_list"):
        _dm(demo, unlabeled_from_train=True)
    listed.write_text("demo_00001.png\n")
    with pytest.raises(DataError, match="either unlabeled_root or unlabeled_from_train"):
        _dm(demo, train_list=str(listed), unlabeled_from_train=True, unlabeled_root=str(demo / "test"))
    listed.write_text("".join(f"demo_{i:05d}.png\n" for i in range(6)))
    with pytest.raises(DataError, match="holds every training frame"):
        _dm(demo, train_list=str(listed), unlabeled_from_train=True).setup("fit")
