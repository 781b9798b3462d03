"""Tests for fcn.evaluate: the evaluate CLI, its report, sliding window / TTA, compare mode and bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import huge_header_image

from fcn.checkpoint import load_model, save_checkpoint
from fcn.cli import evaluate_main
from fcn.data.cityscapes import TRAIN_ID_TO_LABEL_ID
from fcn.data.datamodule import build_dataset
from fcn.data.demo import make_demo_dataset
from fcn.data.transforms import eval_transform
from fcn.evaluate import class_mismatch, labelid_filename, main
from fcn.exposure import ExposureNorm
from fcn.metrics import image_scores, segmentation_scores
from fcn.models import build_model
from fcn.predictor import predict_logits

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"
SIZE = (48, 64)
N_VAL = 4


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("camvid")
    make_demo_dataset(path, layout="camvid", n_train=1, n_val=N_VAL, size=SIZE, seed=0)
    return path


@pytest.fixture(scope="module")
def data_info(root) -> dict:
    ds = build_dataset("camvid", root, "val")
    return {"classes": list(ds.classes), "palette": [list(c) for c in ds.palette], "ignore": ds.ignore_index}


def _student_ckpt(path: Path, classes: list[str], *, seed: int, palette=None) -> Path:
    torch.manual_seed(seed)
    model = build_model("student", num_classes=len(classes))
    with torch.no_grad():  # the score layers start at zero (one class everywhere); make predictions vary
        for name, p in model.named_parameters():
            if name.startswith("score"):
                p.normal_(0.0, 0.5)
    return save_checkpoint(path, model=model, model_name="student", class_names=classes, palette=palette)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, data_info) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    return _student_ckpt(d / "student.ckpt", data_info["classes"], seed=0, palette=data_info["palette"])


@pytest.fixture(scope="module")
def ckpt2(tmp_path_factory, data_info) -> Path:
    d = tmp_path_factory.mktemp("ckpt2")
    return _student_ckpt(d / "other.ckpt", data_info["classes"], seed=1)


def _args(ckpt: Path, root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--checkpoint",
        str(ckpt),
        "--dataset",
        "camvid",
        "--data-root",
        str(root),
        "--split",
        "val",
        "--output",
        str(out),
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _reference(ckpt: Path, root: Path, **predict: object) -> tuple[np.ndarray, list[dict]]:
    """Confusion matrix and per-image scores computed here, independently of fcn.evaluate.

    ``predict``: sliding-window / TTA keywords of :func:`fcn.predictor.predict_logits` (default: whole image).
    """
    model, info = load_model(ckpt)
    ds = build_dataset("camvid", root, "val", transform=eval_transform(mean=info.mean, std=info.std))
    c = info.num_classes
    cm = np.zeros((c, c), dtype=np.int64)
    rows = []
    with torch.inference_mode():
        for i in range(len(ds)):
            image, mask = ds[i]
            logits = predict_logits(model, image[None], **predict) if predict else model(image[None])
            pred = logits.argmax(1)[0].numpy()
            gt = mask.numpy()
            keep = (gt >= 0) & (gt < c) & (gt != ds.ignore_index)
            cm += np.bincount(gt[keep] * c + pred[keep], minlength=c * c).reshape(c, c)
            rows.append({"name": Path(ds.samples[i][0]).name, **image_scores(pred, gt, num_classes=c)})
    return cm, rows


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _error(capsys) -> str:
    """The one ``error:`` message (DataError messages may add an indented layout block), no traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err, err
    return err


# -- the report ---------------------------------------------------------------------------------------
def test_report_files_and_numbers_match_an_independent_confusion_matrix(ckpt, root, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(_args(ckpt, root, out, "--worst", "2", "--batch-size", "3")) == 0
    printed = capsys.readouterr().out
    assert "mean IoU" in printed and f"report: {out}" in printed
    for name in ("report.md", "metrics.json", "per_class.csv", "confusion_matrix.png", "per_image.csv"):
        assert (out / name).is_file(), name
    cm, rows = _reference(ckpt, root)
    metrics = _metrics(out)
    assert np.array_equal(np.array(metrics["confusion_matrix"]), cm)
    expected = segmentation_scores(cm, metrics["class_names"])
    for key in ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12)
    assert metrics["per_class_iou"] == pytest.approx(expected["per_class_iou"], nan_ok=True)

    with (out / "per_image.csv").open(newline="") as fh:
        per_image = list(csv.DictReader(fh))
    assert len(per_image) == N_VAL
    by_name = {Path(r["file"]).name: r for r in per_image}
    for ref in rows:
        got = by_name[ref["name"]]
        assert float(got["mean_iou"]) == pytest.approx(ref["mean_iou"])
        assert float(got["pixel_accuracy"]) == pytest.approx(ref["pixel_accuracy"])
    # the two worst images, worst first, as overlays
    assert len({r["mean_iou"] for r in rows}) == N_VAL and (cm.sum(axis=0) > 0).sum() >= 2  # not degenerate
    worst = sorted(rows, key=lambda r: r["mean_iou"])[:2]
    assert [Path(w["name"]).name for w in metrics["worst_images"]] == [w["name"] for w in worst]
    assert len(list((out / "worst").glob("*.png"))) == 2
    with (out / "per_class.csv").open(newline="") as fh:
        per_class = list(csv.DictReader(fh))
    assert [int(r["gt_pixels"]) for r in per_class] == cm.sum(axis=1).tolist()

    meta = metrics["meta"]
    assert meta["images"] == N_VAL and meta["split"] == "val" and meta["dataset"] == "camvid"
    assert meta["checkpoint"] == str(ckpt) and meta["options"]["batch_size"] == 3
    assert meta["seconds"] > 0 and meta["images_per_second"] > 0
    assert 0 < meta["metric_seconds"] < meta["seconds"] and 0 < meta["metric_overhead"] < 1
    md = (out / "report.md").read_text()
    assert "metric_overhead" in md and "worst/01_" in md


def test_sliding_window_with_crop_equal_to_image_matches_whole_image(ckpt, root, tmp_path):
    whole, slide, small = tmp_path / "whole", tmp_path / "slide", tmp_path / "small"
    h, w = SIZE
    assert main(_args(ckpt, root, whole, "--worst", "0")) == 0
    crop = ["--sliding-window", "--crop", str(h), str(w), "--stride", str(h), str(w), "--worst", "0"]
    assert main(_args(ckpt, root, slide, *crop)) == 0
    a, b = _metrics(whole), _metrics(slide)
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert b["meta"]["options"]["sliding_window"] and b["meta"]["options"]["crop"] == [h, w]
    # overlapping windows smaller than the image cover every pixel exactly once in the matrix
    crop = ["--sliding-window", "--crop", "32", "32", "--stride", "16", "24", "--worst", "0"]
    assert main(_args(ckpt, root, small, *crop)) == 0
    expected = _reference(ckpt, root, crop=(32, 32), stride=(16, 24))[0]
    assert np.array_equal(np.array(_metrics(small)["confusion_matrix"]), expected)
    assert _metrics(small)["num_pixels"] == a["num_pixels"]


def test_flip_and_multi_scale_tta_run(ckpt, root, tmp_path):
    out = tmp_path / "tta"
    assert main(_args(ckpt, root, out, "--flip", "--scales", "0.75", "1.0", "--worst", "1")) == 0
    metrics = _metrics(out)
    expected = _reference(ckpt, root, scales=(0.75, 1.0), flip=True)[0]
    assert np.array_equal(np.array(metrics["confusion_matrix"]), expected)
    assert not np.array_equal(expected, _reference(ckpt, root)[0])  # TTA changed some predictions
    assert metrics["meta"]["options"]["flip"] is True
    assert metrics["meta"]["options"]["scales"] == [0.75, 1.0]
    assert "flip" in metrics["meta"]["prediction"]


def test_exposure_target_matches_an_independent_pass_and_is_reported(ckpt, root, tmp_path, data_info):
    out = tmp_path / "exposure"
    assert main(_args(ckpt, root, out, "--exposure-target", "200")) == 0
    info = load_model(ckpt)[1]
    cm, _ = _reference(ckpt, root, exposure=ExposureNorm(200.0, info.mean, info.std))
    metrics = _metrics(out)
    assert np.array_equal(np.array(metrics["confusion_matrix"]), cm)
    assert not np.array_equal(cm, _reference(ckpt, root)[0])  # the gain changed predictions
    assert metrics["meta"]["exposure_target"] == 200.0
    assert metrics["meta"]["prediction"] == "whole image, exposure to grey 200"
    # a checkpoint that carries the target applies it unasked; `off` drops it
    model, _ = load_model(ckpt)
    carried = save_checkpoint(tmp_path / "e.ckpt", model=model, model_name="student",
                              class_names=data_info["classes"], exposure_target=200)  # fmt: skip
    assert main(_args(carried, root, tmp_path / "carried")) == 0
    assert _metrics(tmp_path / "carried")["confusion_matrix"] == metrics["confusion_matrix"]
    assert main(_args(carried, root, tmp_path / "off", "--exposure-target", "off")) == 0
    assert _metrics(tmp_path / "off")["meta"]["exposure_target"] is None
    assert np.array_equal(np.array(_metrics(tmp_path / "off")["confusion_matrix"]), _reference(ckpt, root)[0])


def test_compare_puts_both_models_in_one_report(ckpt, ckpt2, root, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = _args(ckpt, root, out, "--compare", str(ckpt2), "--compare-name", "teacher", "--worst", "0")
    assert main(args) == 0
    assert "mean IoU teacher" in capsys.readouterr().out
    metrics = _metrics(out)
    cmp = metrics["comparison"]
    assert set(cmp["models"]) == {"student", "teacher"}
    ref2 = segmentation_scores(_reference(ckpt2, root)[0])
    assert cmp["models"]["teacher"]["mean_iou"] == pytest.approx(ref2["mean_iou"])
    assert cmp["delta"]["teacher"]["mean_iou"] == pytest.approx(metrics["mean_iou"] - ref2["mean_iou"])
    assert metrics["meta"]["compare_checkpoint"] == str(ckpt2) and metrics["meta"]["compare_seconds"] > 0
    assert "## Comparison" in (out / "report.md").read_text()


def test_compare_without_name_gets_a_distinct_name(ckpt, ckpt2, root, tmp_path):
    out = tmp_path / "cmp"
    assert main(_args(ckpt, root, out, "--compare", str(ckpt2), "--worst", "0", "--limit", "1")) == 0
    assert set(_metrics(out)["comparison"]["models"]) == {"student", "student (other)"}


def test_limit_evaluates_the_first_images(ckpt, root, tmp_path):
    out = tmp_path / "lim"
    assert main(_args(ckpt, root, out, "--limit", "2", "--worst", "0")) == 0
    metrics = _metrics(out)
    assert metrics["meta"]["images"] == 2 and metrics["per_image"]["count"] == 2
    assert metrics["num_pixels"] <= 2 * SIZE[0] * SIZE[1]


# -- bad input: one error line, exit 2 ----------------------------------------------------------------
def test_checkpoint_with_other_classes_is_refused(root, tmp_path, capsys, data_info):
    five = _student_ckpt(tmp_path / "five.ckpt", ["road", "car", "sky", "person", "tree"], seed=0)
    assert evaluate_main(_args(five, root, tmp_path / "out")) == 2
    err = _error(capsys)
    assert "5 classes" in err and f"{len(data_info['classes'])}" in err and "'road'" in err
    assert not (tmp_path / "out" / "report.md").exists()
    renamed = list(data_info["classes"])
    renamed[2] = "lamp post"
    same_count = _student_ckpt(tmp_path / "renamed.ckpt", renamed, seed=0)
    assert evaluate_main(_args(same_count, root, tmp_path / "out")) == 2
    err = _error(capsys)
    assert "names differ" in err and "'lamp post'" in err and repr(data_info["classes"][2]) in err


def test_compare_checkpoint_with_other_classes_is_refused(ckpt, root, tmp_path, capsys):
    five = _student_ckpt(tmp_path / "five.ckpt", ["a", "b", "c", "d", "e"], seed=0)
    assert evaluate_main(_args(ckpt, root, tmp_path / "out", "--compare", str(five))) == 2
    err = _error(capsys)
    assert "--compare checkpoint" in err and "5" in err


def test_missing_data_root_is_a_data_error(ckpt, tmp_path, capsys):
    assert evaluate_main(_args(ckpt, tmp_path / "nowhere", tmp_path / "out")) == 2
    assert "nowhere" in _error(capsys)
    assert not (tmp_path / "out").exists()  # a failed run leaves no empty report folder


def test_missing_labels_and_empty_split_are_data_errors(ckpt, root, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    lonely = sorted((broken / "valannot").iterdir())[0]
    lonely.unlink()
    assert evaluate_main(_args(ckpt, broken, tmp_path / "out")) == 2
    err = _error(capsys)
    assert "without a label" in err and lonely.name in err
    shutil.rmtree(broken / "valannot")
    assert evaluate_main(_args(ckpt, broken, tmp_path / "out")) == 2
    assert "valannot" in _error(capsys)
    for folder in ("val", "valannot"):
        shutil.rmtree(broken / folder, ignore_errors=True)
        (broken / folder).mkdir()
    assert evaluate_main(_args(ckpt, broken, tmp_path / "out")) == 2
    assert "empty" in _error(capsys)
    assert evaluate_main(_args(ckpt, root, tmp_path / "out", "--split", "test")) == 2
    assert "'test'" in _error(capsys)


def test_unwritable_report_directory_fails_before_evaluating(ckpt, root, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    assert evaluate_main(_args(ckpt, root, blocker / "report")) == 2
    err = _error(capsys)
    assert "file.txt" in err and "report" in err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--sliding-window"], "--crop"),
        (["--sliding-window", "--crop", "16", "16", "--stride", "32", "8"], "stride"),
        (["--crop", "16", "16"], "--sliding-window"),
        (["--write-labelids", "x"], "cityscapes"),
        (["--compare-name", "t"], "--compare"),
        (["--classes-file", "c.yaml"], "folder"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--precision", "fp64"], "cuda"),
    ],
)
def test_inconsistent_options_are_refused(ckpt, root, tmp_path, capsys, extra, needle):
    assert evaluate_main(_args(ckpt, root, tmp_path / "out", *extra)) == 2
    assert needle in _error(capsys)


def test_a_bad_exposure_target_is_a_usage_error(ckpt, root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_args(ckpt, root, tmp_path / "out", "--exposure-target", "300"))
    assert exc.value.code == 2 and not (tmp_path / "out").exists()
    assert "--exposure-target: '300' is not a mean grey level in (0, 255]" in capsys.readouterr().err


def test_missing_checkpoint_is_refused(root, tmp_path, capsys):
    assert evaluate_main(_args(tmp_path / "none.ckpt", root, tmp_path / "out")) == 2
    assert "none.ckpt" in _error(capsys)
    assert not (tmp_path / "out").exists()
    (tmp_path / "run.ckpt").mkdir()
    assert evaluate_main(_args(tmp_path / "run.ckpt", root, tmp_path / "a" / "out")) == 2
    assert "run.ckpt is a folder" in _error(capsys)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_unknown_label_values_hint_at_evaluates_own_flag(ckpt, root, tmp_path, capsys, workers):
    """The hint names --unknown-labels (evaluate's flag), also when a loader worker found the values."""
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    label = sorted((bad / "valannot").iterdir())[1]
    mask = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
    mask[:2, :2] = 200
    cv2.imwrite(str(label), mask)
    out = tmp_path / "out"
    assert evaluate_main(_args(ckpt, bad, out, "--num-workers", workers)) == 2
    err = _error(capsys)
    assert "\n" not in err and label.name in err and "[200]" in err
    assert "evaluate.py: --unknown-labels ignore" in err
    assert not out.exists()
    assert evaluate_main(_args(ckpt, bad, out, "--num-workers", workers, "--unknown-labels", "ignore")) == 0
    assert _metrics(out)["meta"]["images"] == N_VAL


def test_image_with_a_huge_header_is_one_error_line(ckpt, root, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    image = sorted((bad / "val").iterdir())[2]
    image.write_bytes(huge_header_image("png"))
    out = tmp_path / "out"
    assert evaluate_main(_args(ckpt, bad, out, "--num-workers", "1")) == 2
    err = _error(capsys)
    assert "\n" not in err and image.name in err and "MAX_IMAGE_PIXELS" in err
    assert not out.exists()


def test_class_mismatch_wording():
    assert class_mismatch(["a", "b"], ["a", "b"], expected_label="x", actual_label="y") is None
    text = class_mismatch(["a", "b", "c"], ["a", "d"], expected_label="x", actual_label="y")
    assert "x has 3 classes but y has 2" in text and "'b', 'c'" in text and "'d'" in text


# -- Cityscapes labelIds ----------------------------------------------------------------------------
def test_write_labelids_for_the_cityscapes_server(tmp_path):
    root = make_demo_dataset(tmp_path / "cs", layout="cityscapes", n_train=0, n_val=2, size=SIZE, seed=1)
    classes = list(build_dataset("cityscapes", root, "val").classes)
    assert len(classes) == 19
    ckpt = _student_ckpt(tmp_path / "cs.ckpt", classes, seed=0)
    labelids = tmp_path / "labelids"
    args = _args(ckpt, root, tmp_path / "out", "--write-labelids", str(labelids), "--worst", "0")
    args[args.index("camvid")] = "cityscapes"
    assert main(args) == 0
    model, info = load_model(ckpt)
    ds = build_dataset("cityscapes", root, "val", transform=eval_transform(mean=info.mean, std=info.std))
    written = sorted(p.name for p in labelids.iterdir())
    assert written == sorted(Path(img).name for img, _ in ds.samples)  # *_leftImg8bit.png, nothing else
    for i, (img, _) in enumerate(ds.samples):
        with torch.inference_mode():
            pred = model(ds[i][0][None]).argmax(1)[0].numpy()
        got = cv2.imread(str(labelids / Path(img).name), cv2.IMREAD_UNCHANGED)
        assert got.dtype == np.uint8 and got.shape == SIZE
        assert np.array_equal(got, TRAIN_ID_TO_LABEL_ID[pred])
        assert set(np.unique(got).tolist()) <= set(TRAIN_ID_TO_LABEL_ID.tolist())


def test_labelid_filename():
    assert (
        labelid_filename("a/frankfurt_000000_000294_leftImg8bit.png")
        == "frankfurt_000000_000294_leftImg8bit.png"
    )
    assert labelid_filename("x/b.jpg") == "b_leftImg8bit.png"


# -- real data ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not (CAMVID / "val").is_dir(), reason=f"CamVid not found at {CAMVID}")
def test_real_camvid_val_images(tmp_path, data_info):
    ckpt = _student_ckpt(tmp_path / "s.ckpt", data_info["classes"], seed=0)
    out = tmp_path / "real"
    args = [
        "--checkpoint",
        str(ckpt),
        "--dataset",
        "camvid",
        "--data-root",
        str(CAMVID),
        "--output",
        str(out),
    ]
    assert main([*args, "--limit", "2", "--num-workers", "0", "--device", "cpu", "--worst", "1"]) == 0
    metrics = _metrics(out)
    assert metrics["meta"]["images"] == 2 and metrics["num_pixels"] > 0.8 * 2 * 360 * 480
    assert len(list((out / "worst").glob("*.png"))) == 1
