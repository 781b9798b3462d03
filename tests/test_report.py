"""Tests for fcn.report: the evaluation report directory."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

import fcn.report as R
from fcn.metrics import segmentation_scores
from fcn.report import ReportError, format_summary_table, write_report

NAMES = ["road", "car", "person", "train", "bicycle"]
PALETTE = [(128, 64, 128), (0, 0, 142), (220, 20, 60), (0, 80, 100), (119, 11, 32)]


@pytest.fixture
def confmat() -> torch.Tensor:
    # "train" (3) is never in gt nor predicted: IoU n/a; "bicycle" (4) is predicted but never in gt
    return torch.tensor(
        [
            [50, 3, 0, 0, 2],
            [4, 30, 1, 0, 0],
            [0, 2, 8, 0, 1],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ]
    )


def worst_image(name: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 5, (6, 8))
    target[0, 0] = 255  # void
    return {
        "name": name,
        "image": rng.integers(0, 256, (6, 8, 3), dtype=np.uint8),
        "target": target,
        "pred": torch.as_tensor(rng.integers(0, 5, (6, 8))),
        "mean_iou": 0.25,
    }


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def num(cell: str) -> float | None:
    return None if cell == "n/a" else float(cell)


def test_writes_every_file_with_consistent_numbers(tmp_path, confmat):
    out = tmp_path / "eval" / "nested"  # created, parents included
    per_image = [
        {"file": "a.png", "mean_iou": 0.5, "pixel_accuracy": 0.9},
        {"file": "b.png", "mean_iou": None, "pixel_accuracy": None, "seconds": 0.1},
    ]
    meta = {"checkpoint": Path("runs/best.ckpt"), "dataset": "camvid", "split": "test", "images": 2}
    result = write_report(
        out,
        confmat=confmat,
        class_names=NAMES,
        palette=PALETTE,
        per_image=per_image,
        worst_images=[worst_image("seq/frame_001.png", 0), worst_image("seq/frame 002.png", 1)],
        meta=meta,
    )
    expected = segmentation_scores(confmat, NAMES)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == {
        "report.md",
        "metrics.json",
        "per_class.csv",
        "confusion_matrix.png",
        "per_image.csv",
        "worst/01_frame_001.png",
        "worst/02_frame_002.png",
    }

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"):
        assert metrics[key] == pytest.approx(expected[key])
    assert metrics["per_class_iou"] == pytest.approx(expected["per_class_iou"])
    assert metrics["per_class_iou"][3] is None and metrics["per_class_accuracy"][4] is None
    assert metrics["confusion_matrix"] == confmat.tolist()
    assert metrics["meta"]["checkpoint"] == "runs/best.ckpt"
    assert metrics["per_image"]["count"] == 2 and metrics["per_image"]["mean_of_mean_iou"] == 0.5

    rows = read_csv(out / "per_class.csv")
    assert [r["class"] for r in rows] == NAMES
    for i, r in enumerate(rows):
        assert int(r["class_id"]) == i
        for col, key in [
            ("iou", "per_class_iou"),
            ("accuracy", "per_class_accuracy"),
            ("pixel_share", "pixel_share"),
        ]:
            want = expected[key][i]
            assert (num(r[col]) is None) if want is None else num(r[col]) == pytest.approx(want, abs=1e-12)
        assert int(r["gt_pixels"]) == expected["gt_pixels"][i]
    assert rows[3]["iou"] == "n/a" and rows[4]["accuracy"] == "n/a" and rows[4]["iou"] == "0.0"

    img_rows = read_csv(out / "per_image.csv")
    assert list(img_rows[0]) == ["file", "mean_iou", "pixel_accuracy", "seconds"]
    assert img_rows[0]["file"] == "a.png" and float(img_rows[0]["mean_iou"]) == 0.5
    assert img_rows[1]["mean_iou"] == "n/a"

    md = (out / "report.md").read_text()
    assert "| mean IoU | {:.2f} |".format(100 * expected["mean_iou"]) in md
    assert "| 3 | train | n/a | n/a | 0.00 |" in md
    assert "| 4 | bicycle | 0.00 | n/a | 0.00 |" in md
    assert "runs/best.ckpt" in md and "camvid" in md
    assert "![confusion matrix](confusion_matrix.png)" in md and "worst/01_frame_001.png" in md
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind


def test_confusion_matrix_png_is_a_real_image(tmp_path, confmat):
    write_report(tmp_path, confmat=confmat, class_names=NAMES)
    path = tmp_path / "confusion_matrix.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] >= 400 and img.shape[1] >= 400
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_confusion_matrix_png_scales_to_19_classes():
    cm = torch.randint(0, 100, (19, 19)) + torch.diag(torch.full((19,), 1000))
    png = R.confusion_matrix_png(cm, [f"class_name_{i}" for i in range(19)])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_worst_image_overlay_is_image_gt_pred_side_by_side(tmp_path, confmat):
    w = worst_image("x.png", 3)
    write_report(tmp_path, confmat=confmat, class_names=NAMES, palette=PALETTE, worst_images=[w])
    panel = mpimg.imread(tmp_path / "worst" / "01_x.png")
    panel = (panel[..., :3] * 255).round().astype(np.uint8)
    h, wd = w["target"].shape
    assert panel.shape == (h, 3 * wd + 2 * 4, 3)
    np.testing.assert_array_equal(panel[:, :wd], w["image"])
    gt = panel[:, wd + 4 : 2 * wd + 4]
    pred = panel[:, 2 * wd + 8 :]
    lut = np.array(PALETTE, dtype=np.uint8)
    assert (gt[0, 0] == 0).all()  # void drawn black
    np.testing.assert_array_equal(gt[1:], lut[w["target"][1:]])
    np.testing.assert_array_equal(pred, lut[w["pred"].numpy()])


def test_comparison_mode(tmp_path, confmat):
    teacher = confmat.clone()
    teacher[1, 1] += 20  # the teacher gets more cars right
    result = write_report(
        tmp_path, confmat=confmat, class_names=NAMES, compare={"teacher": teacher}, model_name="student"
    )
    s, t = segmentation_scores(confmat, NAMES), segmentation_scores(teacher, NAMES)
    comp = json.loads((tmp_path / "metrics.json").read_text())["comparison"]
    assert comp == result["comparison"]
    assert set(comp["models"]) == {"student", "teacher"}
    assert comp["models"]["teacher"]["mean_iou"] == pytest.approx(t["mean_iou"])
    assert comp["delta"]["teacher"]["mean_iou"] == pytest.approx(s["mean_iou"] - t["mean_iou"])
    assert comp["delta"]["teacher"]["mean_iou"] < 0
    car = comp["delta"]["teacher"]["per_class_iou"][1]
    assert car == pytest.approx(s["per_class_iou"][1] - t["per_class_iou"][1])
    assert comp["delta"]["teacher"]["per_class_iou"][3] is None  # n/a on both sides
    md = (tmp_path / "report.md").read_text()
    assert "| | student | teacher | Δ vs teacher |" in md
    delta_pts = 100 * (s["mean_iou"] - t["mean_iou"])
    assert f"| mean IoU | {100 * s['mean_iou']:.2f} | {100 * t['mean_iou']:.2f} | {delta_pts:+.2f} |" in md
    assert "| train | n/a | n/a | n/a |" in md


def test_bad_inputs_raise_before_writing(tmp_path, confmat):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="class names"):
        write_report(out, confmat=confmat, class_names=NAMES[:3])
    with pytest.raises(ValueError, match="same classes"):
        write_report(out, confmat=confmat, class_names=NAMES, compare={"other": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="palette"):
        write_report(
            out, confmat=confmat, class_names=NAMES, palette=PALETTE[:2], worst_images=[worst_image("a", 0)]
        )
    bad = worst_image("a", 0)
    bad["pred"] = bad["pred"][:3]
    with pytest.raises(ValueError, match="resolution"):
        write_report(out, confmat=confmat, class_names=NAMES, worst_images=[bad])
    assert not out.exists()


def test_directory_under_a_regular_file_raises_report_error(tmp_path, confmat):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    target = blocker / "report"
    with pytest.raises(ReportError, match="is not writable") as info:
        write_report(target, confmat=confmat, class_names=NAMES)
    assert isinstance(info.value, OSError)
    assert str(target) in str(info.value) and "writable" in str(info.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_raises_report_error(tmp_path, confmat):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ReportError, match=str(ro)):
            write_report(ro, confmat=confmat, class_names=NAMES)
    finally:
        ro.chmod(0o755)


def test_interrupted_write_keeps_the_previous_file(tmp_path, confmat, monkeypatch):
    write_report(tmp_path, confmat=confmat, class_names=NAMES)
    before = (tmp_path / "metrics.json").read_bytes()

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(R.os, "replace", failing_replace)
    other = confmat.clone()
    other[0, 0] = 0
    with pytest.raises(ReportError, match="No space left"):
        write_report(tmp_path, confmat=other, class_names=NAMES)
    assert (tmp_path / "metrics.json").read_bytes() == before
    assert not list(tmp_path.glob(".*"))  # the temporary file was removed


def test_format_summary_table(confmat):
    scores = segmentation_scores(confmat, NAMES)
    text = format_summary_table(scores)
    assert f"{100 * scores['mean_iou']:.2f}" in text and "frequency-weighted IoU" in text
    train = next(line for line in text.splitlines() if " train " in line)
    assert train.split()[-3:] == ["n/a", "n/a", "0.00"]
    assert all(name in text for name in NAMES)


def test_empty_matrix_reports_na(tmp_path):
    result = write_report(tmp_path, confmat=torch.zeros(2, 2, dtype=torch.long), class_names=["a", "b"])
    assert result["mean_iou"] is None
    assert "| mean IoU | n/a |" in (tmp_path / "report.md").read_text()
