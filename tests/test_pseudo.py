"""Offline semi-supervision: predict.py with an ensemble of checkpoints writes pseudo labels and confidences,
the data module trains on them (low-confidence pixels void) beside the labelled frames; every bad input."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fcn.checkpoint import save_checkpoint
from fcn.cli import predict_main
from fcn.data.base import median_frequency_weights
from fcn.data.camvid import CLASSES, CamVid
from fcn.data.datamodule import SegDataModule
from fcn.data.demo import make_demo_dataset
from fcn.data.errors import DataError
from fcn.data.io import read_image, read_mask
from fcn.data.pseudo import PseudoLabelled
from fcn.models import build_model
from fcn.predictor import EnsemblePredictor, InferenceError, load_predictor, load_predictors

SIZE = (48, 64)
C = len(CLASSES)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, layout="camvid", n_train=6, n_val=2, size=SIZE, seed=0)
    (root / "labelled.txt").write_text("demo_00001.png\ndemo_00004.png\n")
    return root


def _student(path: Path, *, seed: int, classes=CLASSES) -> Path:
    torch.manual_seed(seed)
    model = build_model("student", num_classes=len(classes), weights=None)
    with torch.no_grad():  # the score layers start at zero (one class everywhere); make predictions vary
        for name, p in model.named_parameters():
            if name.startswith("score"):
                p.normal_(0.0, 0.5)
    return save_checkpoint(path, model=model, model_name="student", class_names=list(classes))


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("students")
    return [_student(folder / f"s{seed}.ckpt", seed=seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def pseudo(demo, students, tmp_path_factory) -> Path:
    """The ensemble's labels and confidences of every training frame, as predict writes them."""
    out = tmp_path_factory.mktemp("pseudo")
    args = ["--checkpoint", *map(str, students), "--input", str(demo / "train"), "--output", str(out)]
    args += ["--outputs", "label,confidence", "--flip", "--device", "cpu", "--quiet"]
    assert predict_main(args) == 0
    return out


def _dm(root: Path, **kw) -> SegDataModule:
    args = {
        "dataset": "camvid",
        "data_root": str(root),
        "batch_size": 2,
        "num_workers": 0,
        "crop_size": (40, 48),
    }
    return SegDataModule(**{**args, **kw})


# -- the ensemble -----------------------------------------------------------------------------------------
def test_ensemble_logits_are_the_log_mean_softmax_of_its_members(students) -> None:
    members = [load_predictor(path, device="cpu") for path in students]
    ensemble = load_predictors(students, device="cpu")
    assert isinstance(ensemble, EnsemblePredictor) and ensemble.num_classes == C
    x = torch.randn(2, 3, *SIZE)
    for strategy in ({}, {"flip": True, "scales": (0.75, 1.0)}):
        mean = sum(m.logits(x, **strategy).softmax(1) for m in members) / 2
        assert torch.allclose(ensemble.logits(x, **strategy).exp(), mean, atol=1e-5)
    single = load_predictors(students[:1], device="cpu")
    assert not isinstance(single, EnsemblePredictor)  # one file: the model itself
    assert torch.equal(single.logits(x), members[0].logits(x))


def test_an_ensemble_of_models_for_other_classes_is_refused(students, tmp_path) -> None:
    other = _student(tmp_path / "other.ckpt", seed=2, classes=[*CLASSES[:-1], "Dog"])
    with pytest.raises(InferenceError, match=r"other\.ckpt cannot join an ensemble"):
        load_predictors([students[0], other], device="cpu")


# -- predict's pseudo labels in training ------------------------------------------------------------------
def test_predict_writes_the_ensembles_labels_and_confidences(demo, students, pseudo) -> None:
    ensemble = load_predictors(students, device="cpu")
    for image in sorted((demo / "train").glob("*.png")):
        labels, conf = (read_mask(pseudo / kind / image.name) for kind in ("label", "confidence"))
        expected = ensemble.segment(read_image(image), flip=True)
        assert (labels == expected).mean() > 0.99  # the same up to float rounding of near-ties
        assert conf.dtype == np.uint8 and conf.min() >= 255 // C  # the top of 11 probabilities: >= 1/11


def test_pseudo_labelled_frames_train_beside_the_labelled_ones(demo, pseudo) -> None:
    pool = sorted(
        set((demo / "train").glob("*.png"))
        - {demo / "train" / "demo_00001.png", demo / "train" / "demo_00004.png"}
    )
    level = int(np.median([read_mask(pseudo / "confidence" / p.name) for p in pool]))  # half the pixels void
    dm = _dm(
        demo, train_list=str(demo / "labelled.txt"), pseudo_labels=str(pseudo), pseudo_threshold=level / 255
    )
    ds = dm.make_dataset("train")
    names = [image.name for image, _ in ds.samples]
    assert names == ["demo_00001.png", "demo_00004.png", *(p.name for p in pool)]
    real = CamVid(demo, "train")
    truth = {image.name: i for i, (image, _) in enumerate(real.samples)}
    void = kept = 0
    for i, name in enumerate(names):
        mask = ds.mask(i)
        if i < 2:  # the listed frames keep their real labels
            assert np.array_equal(mask, real.mask(truth[name]))
            continue
        labels, conf = (read_mask(pseudo / kind / name) for kind in ("label", "confidence"))
        low = conf < level
        assert (mask[low] == 255).all() and np.array_equal(mask[~low], labels[~low])
        void, kept = void + low.sum(), kept + (~low).sum()
    assert void > 0 and kept > 0
    image, target = ds[3]  # through the training transform
    assert image.shape == (3, 40, 48) and target.shape == (40, 48)
    # class weights and the exposure come from what is trained on: pseudo labels and their frames included
    weighted = _dm(demo, train_list=str(demo / "labelled.txt"), pseudo_labels=str(pseudo), pseudo_threshold=0)
    weighted.class_weighting = "median_frequency"
    every = [weighted.make_dataset("train").mask(i) for i in range(6)]
    assert weighted.class_weights == pytest.approx(median_frequency_weights(every, num_classes=C))
    listed_only = _dm(demo, train_list=str(demo / "labelled.txt"), class_weighting="median_frequency")
    assert weighted.class_weights != pytest.approx(listed_only.class_weights)
    auto = _dm(demo, train_list=str(demo / "labelled.txt"), pseudo_labels=str(pseudo), exposure_target="auto")
    assert auto.exposure_target == _dm(demo, exposure_target="auto").exposure_target  # all six frames


def test_sixteen_bit_confidences_use_the_same_threshold(demo, pseudo, tmp_path) -> None:
    (tmp_path / "label").mkdir()
    (tmp_path / "confidence").mkdir()
    for path in (pseudo / "label").glob("*.png"):
        (tmp_path / "label" / path.name).write_bytes(path.read_bytes())
        conf = read_mask(pseudo / "confidence" / path.name).astype(np.uint16) * 257  # 8 -> 16 bits
        cv2.imwrite(str(tmp_path / "confidence" / path.name), conf)
    listed = str(demo / "labelled.txt")
    eight = _dm(demo, train_list=listed, pseudo_labels=str(pseudo)).make_dataset("train")
    sixteen = _dm(demo, train_list=listed, pseudo_labels=str(tmp_path)).make_dataset("train")
    for i in range(len(eight)):
        assert np.array_equal(eight.mask(i), sixteen.mask(i))


# -- bad input --------------------------------------------------------------------------------------------
def _copy(pseudo: Path, to: Path) -> Path:
    for kind in ("label", "confidence"):
        (to / kind).mkdir(parents=True)
        for path in (pseudo / kind).glob("*.png"):
            (to / kind / path.name).write_bytes(path.read_bytes())
    return to


def test_missing_pseudo_labels_name_the_file_and_the_command(demo, pseudo, tmp_path) -> None:
    broken = _copy(pseudo, tmp_path / "p")
    (broken / "confidence" / "demo_00002.png").unlink()
    dm = _dm(demo, train_list=str(demo / "labelled.txt"), pseudo_labels=str(broken))
    with pytest.raises(DataError, match=r"confidence/demo_00002\.png.*python scripts/predict\.py"):
        dm.make_dataset("train")


def test_bad_pseudo_files_are_data_errors(demo, pseudo, tmp_path) -> None:
    broken = _copy(pseudo, tmp_path / "p")
    listed = str(demo / "labelled.txt")
    cv2.imwrite(str(broken / "confidence" / "demo_00002.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(broken / "label" / "demo_00003.png"), np.full(SIZE, C, np.uint8))  # no such class
    ds = _dm(demo, train_list=listed, pseudo_labels=str(broken)).make_dataset("train")
    index = {image.name: i for i, (image, _) in enumerate(ds.samples)}
    with pytest.raises(DataError, match=r"confidence .*demo_00002\.png is 8x8 but its label"):
        ds.mask(index["demo_00002.png"])
    with pytest.raises(DataError, match=r"label/demo_00003\.png has values \[11\]"):
        ds.mask(index["demo_00003.png"])


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"pseudo_labels": "p"}, "pseudo_labels needs train_list"),
        (
            {"pseudo_labels": "p", "train_list": "x.txt", "unlabeled_from_train": True},
            "replaces the unlabeled",
        ),
        ({"pseudo_labels": "p", "train_list": "x.txt", "unlabeled_root": "u"}, "replaces the unlabeled"),
        ({"pseudo_threshold": 1.5}, r"pseudo_threshold must be a probability in \[0, 1\], got 1.5"),
    ],
)
def test_inconsistent_pseudo_label_options_are_refused(demo, tmp_path, options, needle) -> None:
    (tmp_path / "x.txt").write_text("demo_00001.png\n")
    if "train_list" in options:
        options = {**options, "train_list": str(tmp_path / "x.txt")}
    with pytest.raises(DataError, match=needle):
        _dm(demo, **options)


def test_pseudo_labelled_takes_a_threshold_in_zero_one(demo, pseudo) -> None:
    with pytest.raises(DataError, match="got -0.1"):
        PseudoLabelled(CamVid(demo, "train"), [], pseudo, threshold=-0.1)
