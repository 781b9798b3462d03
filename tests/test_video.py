"""Video in predict: outputs and their frame counts, labels equal to the frames as images, frame selection,
truncated videos, interruption, resume, smoothing and flicker, exported models."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import TINY, randomize_scores

import fcn
from fcn.checkpoint import load_model, save_checkpoint
from fcn.cli import predict_main
from fcn.inputs import collect_inputs
from fcn.models import build_model
from fcn.pipeline import PredictInterrupted, PredictOptions, run_predict
from fcn.predictor import Predictor
from fcn.video import SoftmaxWindow, flicker, frame_range, probe_video

PALETTE = [[128, 64, 128], [70, 70, 70], [107, 142, 35], [70, 130, 180]]
H, W, FPS, N = 64, 96, 10.0, 40


def _scene(t: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A BGR frame: smooth colour fields drifting right by 2 px a frame (plus noise with ``rng``)."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    phase = (x - 2 * t) / 12.0
    frame = np.stack(
        [128 + 100 * np.sin(phase), 128 + 100 * np.cos(y / 9.0), 128 + 90 * np.sin(phase + y / 15)]
    )
    frame = frame.transpose(1, 2, 0)
    if rng is not None:
        frame = frame + rng.normal(0, 40, frame.shape)
    return np.clip(frame, 0, 255).astype(np.uint8)


def write_video(path: Path, frames: int = N, *, fourcc: str = "mp4v", noise: int | None = None) -> Path:
    rng = np.random.default_rng(noise) if noise is not None else None
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (W, H))
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} {path.suffix} here"
    for t in range(frames):
        writer.write(_scene(0 if rng is not None else t, rng))
    writer.release()
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = randomize_scores(build_model("fcn8s", num_classes=len(PALETTE), **TINY))
    path = tmp_path_factory.mktemp("video") / "tiny.ckpt"
    return save_checkpoint(path, model=model, model_name="fcn8s", model_kwargs=TINY, palette=PALETTE)


def _run(*args: object) -> int:
    return predict_main([str(a) for a in args] + ["--quiet"])


def read_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video as RGB uint8, as predict decodes them."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while (bgr := cap.read()[1]) is not None:
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


def _video_props(path: Path) -> tuple[int, tuple[int, int], float]:
    frames = read_frames(path)
    info = probe_video(path)
    assert info is not None
    return len(frames), info.size, info.fps


def _labels(folder: Path) -> dict[int, np.ndarray]:
    return {int(p.stem): cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.glob("*.png"))}


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob(".fcn-tmp-*")]


def test_video_beside_an_image_gives_videos_and_frame_labels(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    clip = write_video(src / "clip.mp4")
    cv2.imwrite(str(src / "still.png"), _scene(3))
    out = tmp_path / "out"
    assert (
        _run("--checkpoint", ckpt, "--input", src, "--output", out, "--outputs", "label,color,overlay") == 0
    )
    assert "done 2 (1 videos, 40 frames), skipped 0, failed 0" in capsys.readouterr().out
    for kind in ("color", "overlay"):
        assert _video_props(out / kind / "clip.mp4") == (N, (H, W), FPS)
    assert (out / "label" / "still.png").is_file() and (out / "color" / "still.png").is_file()
    labels = _labels(out / "label" / "clip")
    assert sorted(labels) == list(range(N)) and (out / "label" / "clip" / "000039.png").is_file()
    model = fcn.load(ckpt)
    frames = np.stack(read_frames(clip))  # the codec is lossy: compare decoded frames
    expected = np.concatenate([model.segment(frames[i : i + 4]) for i in range(0, N, 4)])
    assert len(np.unique(expected)) > 1  # the model tells regions apart
    np.testing.assert_array_equal(np.stack([labels[i] for i in range(N)]), expected)
    colour = read_frames(out / "color" / "clip.mp4")[0].astype(int)
    assert np.abs(colour - model.colorize(expected[0])).mean() < 8  # the colours, through a lossy codec
    assert not _leftovers(out)


def test_every_start_end_select_frames(ckpt: Path, tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--input", clip, "--output", out, "--outputs", "label,color"]
    assert _run(*args, "--every", 3, "--start", 1.0, "--end", 3.0) == 0
    kept = list(range(10, 30, 3))  # seconds 1..3 at 10 fps, one frame in three
    assert sorted(_labels(out / "label" / "clip")) == kept
    count, size, fps = _video_props(out / "color" / "clip.mp4")
    assert (count, size) == (len(kept), (H, W)) and fps == pytest.approx(FPS / 3, rel=1e-3)
    info = probe_video(clip)
    assert info is not None and list(frame_range(info, start=3.5)) == list(range(35, N))


def test_probs_are_refused_for_videos_before_anything_is_written(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_video(src / "drive.avi", frames=3, fourcc="MJPG")
    out = tmp_path / "out"
    assert _run("--checkpoint", ckpt, "--input", src, "--output", out, "--outputs", "label,probs") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --outputs probs is for images") and "drive.avi" in err and "\n" not in err
    assert not out.exists()


def test_truncated_videos_fail_alone(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_video(src / "good.avi", fourcc="MJPG")
    for name, fourcc in (("cut.avi", "MJPG"), ("cut.mp4", "mp4v")):
        data = write_video(tmp_path / name, fourcc=fourcc).read_bytes()
        (src / name).write_bytes(data[: len(data) // 2])  # an AVI plays its first half, an MP4 nothing
    out = tmp_path / "out"
    assert _run("--checkpoint", ckpt, "--input", src, "--output", out, "--outputs", "label,color") == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2, captured.err
    cut_avi = next(line for line in failed if "cut.avi" in line)
    read = int(cut_avi.split(" read ")[1].split(" of ")[0])
    assert 0 < read < N and f"of the {N} frames its container declares" in cut_avi
    assert "cut.mp4" in next(line for line in failed if "cut.avi" not in line)
    assert "done 1 (1 videos, 40 frames), skipped 0, failed 2" in captured.out
    assert _video_props(out / "color" / "good.mp4")[0] == N and len(_labels(out / "label" / "good")) == N
    assert not (out / "color" / "cut_avi.mp4").exists() and not (out / "label" / "cut_avi").exists()
    assert sorted(p.name for p in (out / "color").iterdir()) == ["good.mp4"] and not _leftovers(out)


class _CtrlC(Predictor):
    """The real predictor, with Ctrl-C pressed during its ``after``-th forward pass."""

    def __init__(self, inner: Predictor, after: int) -> None:
        self.inner, self.after, self.calls = inner, after, 0
        self.meta, self.device, self.channels_last = inner.meta, inner.device, inner.channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.after:
            raise KeyboardInterrupt
        return self.inner(x)


@pytest.mark.parametrize("overlap", [False, True])
def test_interrupted_run_leaves_no_partial_video_and_resumes(
    ckpt: Path, tmp_path: Path, overlap: bool
) -> None:
    write_video(tmp_path / "a.mp4")
    write_video(tmp_path / "b.mp4", frames=24)
    out = tmp_path / "out"
    items, _ = collect_inputs(tmp_path, exclude=out)
    options = PredictOptions(out, kinds=("label", "color", "overlay"), overlap=overlap, progress=False)
    # 4 frames a batch: a.mp4 takes 10 forward passes; Ctrl-C in b.mp4's third
    with pytest.raises(PredictInterrupted) as stop:
        run_predict(_CtrlC(fcn.load(ckpt), after=13), items, options, log=lambda _msg: None)
    assert stop.value.summary.done == 1 and stop.value.summary.frames == N
    assert (out / "color" / "a.mp4").is_file() and len(_labels(out / "label" / "a")) == N
    assert not (out / "color" / "b.mp4").exists() and not (out / "overlay" / "b.mp4").exists()
    assert not (out / "label" / "b").exists() and not _leftovers(out)
    resumed = run_predict(
        fcn.load(ckpt), items, PredictOptions(out, **{**_kw(options), "skip_existing": True})
    )
    assert (resumed.done, resumed.skipped, resumed.frames) == (1, 1, 24)
    assert _video_props(out / "overlay" / "b.mp4") == (24, (H, W), FPS)
    again = run_predict(fcn.load(ckpt), items, PredictOptions(out, **{**_kw(options), "skip_existing": True}))
    assert (again.done, again.skipped) == (0, 2)


def _kw(options: PredictOptions) -> dict:
    return {"kinds": options.kinds, "overlap": options.overlap, "progress": False}


def test_flicker_measures_label_changes() -> None:
    a = np.zeros((4, 5), np.uint8)
    b = a.copy()
    b[0, :] = 1  # 5 of 20 pixels change
    assert flicker([a, a]) == 0.0 and flicker([a]) == 0.0
    assert flicker([a, b, b]) == pytest.approx(0.125)  # (0.25 + 0) / 2
    window = SoftmaxWindow(2)
    p, q, r = (torch.full((1, 1, 1), v) for v in (0.0, 1.0, 3.0))
    sums = [window.push(t).item() / len(window) for t in (p, q, r)]  # the mean of the last two
    assert sums == [0.0, 0.5, 2.0]


def test_smooth_reduces_flicker_on_a_noisy_sequence(ckpt: Path, tmp_path: Path) -> None:
    clip = write_video(tmp_path / "noisy.avi", frames=24, fourcc="MJPG", noise=0)  # one scene, new noise
    results = {}
    for k in (1, 5):
        out = tmp_path / f"smooth{k}"
        assert (
            _run(
                "--checkpoint",
                ckpt,
                "--input",
                clip,
                "--output",
                out,
                "--outputs",
                "label,confidence",
                "--smooth",
                k,
            )
            == 0
        )
        labels = _labels(out / "label" / "noisy")
        confidence = _labels(out / "confidence" / "noisy")  # max of the mean softmax: 1/4 .. 1 of 255
        assert sorted(confidence) == sorted(labels) and min(c.min() for c in confidence.values()) >= 255 // 4
        results[k] = flicker(labels[i] for i in sorted(labels))
    assert results[1] > 0.002  # the noise makes labels flicker
    assert results[5] < 0.6 * results[1], results


def test_exported_torchscript_predicts_videos_like_the_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    from fcn.export import export_torchscript

    model, meta = load_model(ckpt)
    scripted = export_torchscript(model, meta, tmp_path / "tiny.pt", size=(H, W))
    clip = write_video(tmp_path / "clip.mp4", frames=8)
    outs = {}
    for name, model_file in (("ckpt", ckpt), ("ts", scripted)):
        outs[name] = tmp_path / name
        args = ["--checkpoint", model_file, "--input", clip, "--output", outs[name], "--outputs", "label"]
        assert _run(*args, "--no-fuse") == 0
    ours, theirs = _labels(outs["ckpt"] / "label" / "clip"), _labels(outs["ts"] / "label" / "clip")
    assert sorted(ours) == list(range(8))
    agree = np.mean([np.mean(ours[i] == theirs[i]) for i in ours])
    assert agree > 0.999
