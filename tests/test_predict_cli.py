"""The predict command end to end: inputs, outputs, odd images, resume, interruption, user errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import TINY, huge_header_image, randomize_scores, signal_when_ready
from PIL import Image

from fcn.checkpoint import save_checkpoint
from fcn.cli import predict_main
from fcn.inputs import OUTPUT_MARKER, collect_inputs
from fcn.models import build_model
from fcn.pipeline import PredictOptions, run_predict, size_batches, spare_cores
from fcn.predictor import Predictor, load_predictor, set_exposure_target
from fcn.tuning import PREDICT_SPINCOUNT, short_openmp_spin

ROOT = Path(__file__).resolve().parents[1]
PALETTE = [[128, 64, 128], [70, 70, 70], [107, 142, 35], [70, 130, 180]]
MEAN, STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)


def _ckpt(path: Path, name: str = "fcn8s", kwargs: dict | None = None) -> Path:
    kwargs = TINY if kwargs is None else kwargs
    torch.manual_seed(0)
    model = randomize_scores(build_model(name, num_classes=len(PALETTE), **kwargs))
    return save_checkpoint(
        path, model=model, model_name=name, model_kwargs=kwargs, palette=PALETTE, mean=MEAN, std=STD
    )


def _img(rng: np.random.Generator, h: int, w: int, c: int = 3, dtype: type = np.uint8) -> np.ndarray:
    """A smooth random picture (so a JPEG keeps it) with some structure for the model to react to."""
    top = 65535 if dtype == np.uint16 else 255
    small = rng.integers(0, top + 1, (max(2, h // 8), max(2, w // 8), c)).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    big = big.reshape(h, w, c) if c > 1 else big.reshape(h, w)
    return big.astype(dtype)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    src = root / "images"
    (src / "city" / "day").mkdir(parents=True)
    (src / "odd").mkdir()
    (src / ".hidden").mkdir()
    rng = np.random.default_rng(0)
    rgb = _img(rng, 48, 64)
    cv2.imwrite(str(src / "a.png"), rgb)
    cv2.imwrite(str(src / "city" / "b.jpg"), _img(rng, 48, 64))
    cv2.imwrite(str(src / "city" / "day" / "c.png"), _img(rng, 40, 56))
    cv2.imwrite(str(src / "city" / "day" / "d.jpeg"), _img(rng, 48, 64))
    gray = _img(rng, 33, 47, c=1)
    cv2.imwrite(str(src / "odd" / "gray.png"), gray)
    cv2.imwrite(str(src / "odd" / "gray_as_rgb.png"), np.repeat(gray[..., None], 3, axis=2))
    bgra = np.dstack([rgb, rng.integers(0, 256, (48, 64), dtype=np.uint8)])
    cv2.imwrite(str(src / "odd" / "rgba.png"), bgra)
    cv2.imwrite(str(src / "odd" / "deep16.png"), rgb.astype(np.uint16) * 257)  # same picture, 16 bit
    (src / "odd" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (src / "README.md").write_text("not an image")
    cv2.imwrite(str(src / ".hidden" / "skip.png"), rgb)
    im = Image.fromarray(_img(rng, 30, 52))
    exif = im.getexif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 52 x 30
    im.save(src / "odd" / "exif.jpg", exif=exif)
    return {"root": root, "src": src, "ckpt": _ckpt(root / "model.ckpt")}


GOOD = [
    "a",
    "city/b",
    "city/day/c",
    "city/day/d",
    "odd/gray",
    "odd/gray_as_rgb",
    "odd/rgba",
    "odd/deep16",
    "odd/exif",
]


def _run(*args: object) -> int:
    return predict_main([str(a) for a in args])


def _read(path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None, path
    return arr


@pytest.mark.parametrize("pipeline", ["--overlap", "--no-overlap"])
def test_folder_all_outputs(
    pipeline: str, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Both schedules (decoding and writing beside the forward pass, or between forward passes); the hidden
    --num-workers of older commands is still accepted."""
    out = tmp_path / "out"
    rc = _run(
        "--checkpoint", data["ckpt"], "--input", data["src"], "--output", out, pipeline,
        "--outputs", "label,color,overlay,confidence", "--batch-size", 3, "--num-workers", 2, "--quiet",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 1  # one corrupt file
    assert "corrupt.png" in captured.err
    assert "done 9, skipped 0, failed 1, 1 non-image files ignored" in captured.out
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    expected = sorted(
        f"{kind}/{rel}.png" for kind in ("label", "color", "overlay", "confidence") for rel in GOOD
    )
    # mirrored paths, nothing for corrupt / hidden / non-image files; the marker of predict's outputs
    assert written == sorted([OUTPUT_MARKER, *expected])
    for rel in GOOD:
        label = _read(out / "label" / f"{rel}.png")
        color = _read(out / "color" / f"{rel}.png")[..., ::-1]
        assert label.dtype == np.uint8 and label.max() < len(PALETTE)
        assert np.array_equal(color, np.asarray(PALETTE, dtype=np.uint8)[label])
        assert _read(out / "overlay" / f"{rel}.png").shape == (*label.shape, 3)
        assert _read(out / "confidence" / f"{rel}.png").shape == label.shape
    assert _read(out / "label" / "odd/exif.png").shape == (52, 30)  # EXIF rotation applied
    assert _read(out / "label" / "odd/gray.png").shape == (33, 47)
    # a grayscale picture gives the labels of its 3-channel copy; a 16-bit one those of its 8-bit twin
    assert np.array_equal(_read(out / "label/odd/gray.png"), _read(out / "label/odd/gray_as_rgb.png"))
    assert np.array_equal(_read(out / "label/odd/deep16.png"), _read(out / "label/a.png"))
    assert np.array_equal(_read(out / "label/odd/rgba.png"), _read(out / "label/a.png"))
    assert len(np.unique(_read(out / "label/a.png"))) > 1  # the model is not constant


def test_labels_match_the_model(data: dict[str, Path], tmp_path: Path) -> None:
    """The pipeline (decode, normalise with the checkpoint's mean/std, forward, argmax) matches by hand."""
    from fcn.checkpoint import load_model

    out = tmp_path / "out"
    assert (
        _run("--checkpoint", data["ckpt"], "--input", data["src"] / "a.png", "--output", out, "--quiet") == 0
    )
    model, _ = load_model(data["ckpt"])
    rgb = cv2.imread(str(data["src"] / "a.png"))[..., ::-1].astype(np.float32) / 255
    x = torch.from_numpy(((rgb - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        ref = model(x).argmax(1)[0].numpy()
    label = _read(out / "label" / "a.png")
    assert (label == ref).mean() > 0.99
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "color", "label"]  # the defaults


def test_list_file_and_glob(data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = data["src"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# images\n{src / 'city/b.jpg'}\n\n{src / 'city/day/c.png'}\n")
    out = tmp_path / "from_list"
    assert _run("--checkpoint", data["ckpt"], "--input", listing, "--output", out, "--quiet") == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "color/b.png", "color/day/c.png", "label/b.png", "label/day/c.png",
    ]  # fmt: skip
    out = tmp_path / "from_glob"
    assert (
        _run("--checkpoint", data["ckpt"], "--input", f"{src}/city/**/*.*", "--output", out, "--quiet") == 0
    )
    labels = sorted(str(p.relative_to(out / "label")) for p in (out / "label").rglob("*.png"))
    assert labels == ["b.png", "day/c.png", "day/d.png"]  # relative to the glob's fixed part
    assert "done 3, skipped 0, failed 0" in capsys.readouterr().out


def test_collect_inputs(tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("x.png", "x.jpg", "sub/y.PNG", "sub/z.txt"):
        (tmp_path / "in" / name).write_bytes(b"")
    (tmp_path / "in" / "out").mkdir()
    (tmp_path / "in" / "out" / "w.png").write_bytes(b"")
    items, ignored = collect_inputs(tmp_path / "in", exclude=tmp_path / "in" / "out")
    assert [(str(i.path.relative_to(tmp_path / "in")), str(i.rel)) for i in items] == [
        ("x.jpg", "x_jpg"), ("x.png", "x_png"), ("sub/y.PNG", "sub/y"),
    ]  # fmt: skip
    assert ignored == 1
    listing = tmp_path / "in" / "sub" / "files.lst"
    listing.write_text("y.PNG\n../x.png\nmissing.png\n")
    items, _ = collect_inputs(listing)
    assert [str(i.rel) for i in items] == ["sub/y", "x", "sub/missing"]  # listed files are all tried
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        collect_inputs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_inputs(tmp_path / "nope")


def test_size_grouped_batch_sampler() -> None:
    keys = [(4, 4), (8, 8), (4, 4), None, (4, 4), (8, 8), (4, 4), (4, 4)]
    batches = size_batches(keys, batch_size=3)
    assert batches == [[0, 2, 4], [1, 5], [3], [6, 7]]
    assert sorted(i for b in batches for i in b) == list(range(len(keys)))
    assert all(len({keys[i] for i in b}) == 1 for b in batches)


def test_spare_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    assert spare_cores(torch.device("cuda"), 64)  # a GPU model leaves the cores free
    assert not spare_cores(torch.device("cpu"), cores) and not spare_cores(torch.device("cpu"), cores - 1)
    assert spare_cores(torch.device("cpu"), max(1, cores - 2)) == (cores >= 3)


def test_predict_command_shortens_openmp_spin_before_torch_loads() -> None:
    code = (
        "import os, sys; from fcn.tuning import short_openmp_spin; "
        "print(short_openmp_spin(), os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}

    def run(extra: dict[str, str]) -> list[str]:
        cmd = [sys.executable, "-c", code]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, **extra}, check=True)
        return proc.stdout.split()

    assert run({}) == ["True", PREDICT_SPINCOUNT, "False"]
    assert run({"GOMP_SPINCOUNT": "5"}) == ["False", "5", "False"]  # the user's setting wins
    assert run({"OMP_WAIT_POLICY": "PASSIVE"}) == ["False", "None", "False"]
    assert not short_openmp_spin()  # torch is loaded in this process: too late, nothing changes


MALLINFO = """
import ctypes, sys
from fcn.tuning import keep_freed_memory, keeps_freed_memory
done = keep_freed_memory() if sys.argv[1] == "tune" else False
libc = ctypes.CDLL("libc.so.6")
names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in names]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
kept = []
for size in (20 << 20, 48 << 20):  # below and above glibc's 32 MiB ceiling for the mmap threshold
    libc.free(ctypes.c_void_p(libc.malloc(size)))
    kept.append(libc.mallinfo2().fordblks >= size)
print(done, keeps_freed_memory(), *kept)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_keeps_a_freed_batch_in_the_process() -> None:
    """Freed 20 and 48 MiB blocks (a batch's activations, oneDNN's buffer for the student's upsampling)
    stay in the heap for the next batch instead of being unmapped; the user's malloc settings or a
    preloaded allocator switch it off."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 (glibc >= 2.33)
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env = {k: v for k, v in env.items() if k not in ("GLIBC_TUNABLES", "FCN_DEFAULT_MALLOC", "LD_PRELOAD")}

    def run(mode: str, extra: dict[str, str] | None = None) -> list[str]:
        cmd = [sys.executable, "-c", MALLINFO, mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, **(extra or {})}, check=True)
        return proc.stdout.split()

    assert run("default") == ["False"] * 4  # glibc unmaps the freed blocks
    assert run("tune") == ["True"] * 4
    assert run("tune", {"MALLOC_TOP_PAD_": "0"}) == ["False"] * 4  # the user's setting wins
    assert run("tune", {"MALLOC_MMAP_MAX_": "1"}) == ["False"] * 4
    assert run("tune", {"FCN_DEFAULT_MALLOC": "1"}) == ["False"] * 4


def test_mixed_sizes_batched_like_single(data: dict[str, Path], tmp_path: Path) -> None:
    args = ["--checkpoint", data["ckpt"], "--input", data["src"] / "city", "--quiet", "--num-workers", 0]
    assert _run(*args, "--output", tmp_path / "b1", "--batch-size", 1) == 0
    assert _run(*args, "--output", tmp_path / "b4", "--batch-size", 4, "--no-overlap") == 0
    assert _run(*args, "--output", tmp_path / "o4", "--batch-size", 4, "--overlap") == 0
    for rel in ("city/b", "city/day/c", "city/day/d"):
        name = rel.split("/", 1)[1]
        one, four = _read(tmp_path / "b1/label" / f"{name}.png"), _read(tmp_path / "b4/label" / f"{name}.png")
        assert one.shape == four.shape and (one == four).mean() > 0.999
        for kind in ("label", "color"):  # the two pipelines write the same bytes
            same = (tmp_path / "o4" / kind / f"{name}.png").read_bytes()
            assert same == (tmp_path / "b4" / kind / f"{name}.png").read_bytes()


def test_resize_sliding_tta_and_16bit_confidence(data: dict[str, Path], tmp_path: Path) -> None:
    base = ["--checkpoint", data["ckpt"], "--input", data["src"] / "city", "--quiet", "--num-workers", 0]
    variants = {
        "resize": ["--resize", 32, 40, "--outputs", "label,overlay"],
        "sliding": ["--sliding-window", "--crop", 32, 32, "--stride", 16, 16],
        "tta": [
            "--flip",
            "--scales",
            0.75,
            1.0,
            "--outputs",
            "label,confidence",
            "--confidence-bits",
            16,
        ],
    }
    results = {}
    for name, extra in variants.items():
        assert _run(*base, *extra, "--output", tmp_path / name) == 0, name
        results[name] = _read(tmp_path / name / "label" / "day" / "c.png")
        assert results[name].shape == (40, 56), name  # back at the original size
    assert _read(tmp_path / "resize" / "overlay" / "day" / "c.png").shape == (40, 56, 3)
    conf = _read(tmp_path / "tta" / "confidence" / "day" / "c.png")
    assert conf.dtype == np.uint16 and conf.min() >= 65535 // len(PALETTE)
    assert not np.array_equal(results["resize"], results["sliding"])


def test_probs_are_the_tta_softmax_as_uint8(data: dict[str, Path], tmp_path: Path) -> None:
    tta = ["--flip", "--scales", 0.75, 1.0]
    out = tmp_path / "out"
    base = ["--checkpoint", data["ckpt"], "--input", data["src"] / "city", "--quiet", "--output", out]
    assert _run(*base, *tta, "--outputs", "label,probs") == 0
    probs = np.load(out / "probs" / "day" / "c.npy", allow_pickle=False)
    assert probs.dtype == np.uint8 and probs.shape == (len(PALETTE), 40, 56)
    assert np.abs(probs.sum(0).astype(int) - 255).max() <= len(PALETTE)  # each value rounded once
    # the same probabilities as the predictor's own TTA softmax, to the rounding
    predictor = load_predictor(data["ckpt"], device="cpu")
    image = torch.from_numpy(cv2.imread(str(data["src"] / "city" / "day" / "c.png"))[..., ::-1].copy())
    with torch.inference_mode():
        logits = predictor.logits(predictor.normalize(image[None]), scales=(0.75, 1.0), flip=True)
    expected = logits[0].softmax(0).mul(255).numpy()
    assert np.abs(probs - expected).max() <= 0.5 + 1e-3
    # the label output is their arg-max wherever the stored maximum is unique
    label = _read(out / "label" / "day" / "c.png")
    top2 = np.sort(probs, axis=0)[-2:]
    clear = top2[1] > top2[0] + 1
    assert clear.mean() > 0.5 and np.array_equal(label[clear], probs.argmax(0)[clear])
    # probs alone: one .npy per image, no PNGs; --skip-existing sees them
    alone = tmp_path / "alone"
    assert _run(*base[:-1], alone, "--outputs", "probs") == 0
    assert sorted(p.relative_to(alone).as_posix() for p in alone.rglob("*.*") if p.name[0] != ".") == [
        "probs/b.npy",
        "probs/day/c.npy",
        "probs/day/d.npy",
    ]
    resized = tmp_path / "resized"  # inferred at another size, stored at the image's
    assert _run(*base[:-1], resized, "--outputs", "probs", "--resize", 32, 40) == 0
    assert np.load(resized / "probs" / "day" / "c.npy").shape == (len(PALETTE), 40, 56)
    stamp = (alone / "probs" / "b.npy").stat().st_mtime_ns
    assert _run(*base[:-1], alone, "--outputs", "probs", "--skip-existing") == 0
    assert (alone / "probs" / "b.npy").stat().st_mtime_ns == stamp


def test_flip_old_spelling(data: dict[str, Path], tmp_path: Path) -> None:
    """``--tta flip`` of older commands is ``--flip``: the same confidences, which differ without a flip."""
    base = ["--checkpoint", data["ckpt"], "--input", data["src"] / "city", "--quiet", "--scales", 0.75, 1.0]
    base += ["--outputs", "confidence", "--confidence-bits", 16]
    conf = {}
    for name, extra in {"flip": ["--flip"], "tta_flip": ["--tta", "flip"], "none": []}.items():
        assert _run(*base, *extra, "--output", tmp_path / name) == 0, name
        conf[name] = _read(tmp_path / name / "confidence" / "day" / "c.png")
    assert np.array_equal(conf["flip"], conf["tta_flip"])
    assert not np.array_equal(conf["flip"], conf["none"])


def test_exposure_target_reaches_the_batch_pipeline(data: dict[str, Path], tmp_path: Path) -> None:
    """``--exposure-target`` scales each image before the model, on the pipeline's cv2.LUT path too."""
    base = ["--checkpoint", data["ckpt"], "--input", data["src"] / "city", "--quiet", "--outputs", "label"]
    assert _run(*base, "--exposure-target", 200, "--output", tmp_path / "exposure") == 0
    assert _run(*base, "--output", tmp_path / "plain") == 0
    predictor = load_predictor(data["ckpt"], device="cpu")
    set_exposure_target(predictor, 200.0)
    image = data["src"] / "city" / "day" / "c.png"
    labels = _read(tmp_path / "exposure" / "label" / "day" / "c.png")
    assert np.array_equal(labels, predictor.segment(image))
    assert not np.array_equal(labels, _read(tmp_path / "plain" / "label" / "day" / "c.png"))
    with pytest.raises(SystemExit):
        predict_main([*map(str, base), "--exposure-target", "-1", "--output", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_skip_existing_resumes(data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = ["--checkpoint", data["ckpt"], "--input", data["src"] / "city", "--output", out, "--quiet"]
    assert _run(*args, "--num-workers", 0) == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert len(stamps) == 6
    capsys.readouterr()
    assert _run(*args, "--skip-existing") == 0
    assert "done 0, skipped 3, failed 0" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps
    (out / "color" / "day" / "c.png").unlink()  # one output missing: only that image is redone
    assert _run(*args, "--skip-existing", "--num-workers", 0) == 0
    assert "done 1, skipped 2, failed 0" in capsys.readouterr().out
    assert (out / "color" / "day" / "c.png").is_file()
    assert _run(*args, "--skip-existing", "--outputs", "label,color,overlay", "--num-workers", 0) == 0
    assert "done 3, skipped 0" in capsys.readouterr().out  # a new output kind: every image is redone

    def no_model() -> Predictor:
        raise AssertionError("nothing to do: the model must not be loaded")

    items, _ = collect_inputs(data["src"] / "city")
    summary = run_predict(no_model, items, PredictOptions(output=out, skip_existing=True, progress=False))
    assert (summary.skipped, summary.done) == (3, 0)


def test_benchmark_flag(data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--checkpoint", data["ckpt"], "--input", data["src"] / "city", "--output", tmp_path, "--quiet"]
    assert _run(*args, "--benchmark", 2, "--num-workers", 0) == 0
    out = capsys.readouterr().out
    assert out.count("done 3, skipped 0, failed 0") == 2
    assert "benchmark run 2: predict" in out and "(same process, medians of 2) ->" in out
    assert "overlap False, malloc " in out and out.rstrip().endswith(", new files")
    # the first run's outputs stay; the second run wrote into a temporary folder that is gone
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    city = ("b", "day/c", "day/d")
    expected = [f"{kind}/{name}.png" for kind in ("color", "label") for name in city]
    assert written == sorted([OUTPUT_MARKER, *expected])
    assert _run(*args, "--benchmark", 2, "--benchmark-rewrite", "--num-workers", 0) == 0
    assert capsys.readouterr().out.rstrip().endswith("replacing existing files")


def test_benchmark_times_each_stage(data: dict[str, Path], tmp_path: Path) -> None:
    """--benchmark's account of the per-image work: CPU time of every stage that ran, in this process's
    threads, and the forward passes' wall time, collected by the timer it hands to run_predict."""
    from fcn.benchmark import benchmark_predict
    from fcn.predictor import load_predictor

    predictor = load_predictor(data["ckpt"], device="cpu")
    items, _ = collect_inputs(data["src"] / "city")
    options = PredictOptions(output=tmp_path / "a", batch_size=2, overlap=False, progress=False)
    report = benchmark_predict(predictor, items, options, repeats=2)
    assert set(report["stages"]) == {"decode", "normalise", "arg-max", "encode", "write"}
    assert all(ms > 0 for ms in report["stages"].values()) and report["forward_wall"] > 0
    options = PredictOptions(output=tmp_path / "b", kinds=("overlay",), batch_size=2, overlap=False)
    report = benchmark_predict(predictor, items, options, repeats=1)
    assert set(report["stages"]) == {"decode", "normalise", "arg-max", "write", "other outputs"}


def test_normalise_table_equals_normalize(data: dict[str, Path]) -> None:
    """The decoding threads' cv2.LUT normalisation is bit-identical to Predictor.normalize."""
    from fcn.predictor import load_predictor

    predictor = load_predictor(data["ckpt"], device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    table = predictor.normalize_table()
    lut = np.stack([cv2.LUT(im, table) for im in image])
    ref = predictor.normalize(torch.from_numpy(image))
    assert torch.equal(predictor.normalize(torch.from_numpy(lut)), ref)


def test_library_calls_leave_the_process_settings_alone(data: dict[str, Path], tmp_path: Path) -> None:
    """predict_main([...]) in-process (a test, a notebook) changes no process setting: only the console
    command (argv None) applies fcn.tuning's."""
    from fcn.tuning import keeps_freed_memory, onednn_convolutions

    cv2_threads, threads = cv2.getNumThreads(), torch.get_num_threads()
    args = ["--checkpoint", data["ckpt"], "--input", data["src"] / "city", "--quiet", "--threads", 1]
    assert _run(*args, "--output", tmp_path / "o") == 0
    assert (cv2.getNumThreads(), torch.get_num_threads()) == (cv2_threads, threads)
    assert not keeps_freed_memory() and not onednn_convolutions()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "no images found"),
        ("unwritable", "is not writable"),
        ("no_checkpoint", "does not exist"),
        ("resize_and_sliding", "not both"),
    ],
)
def test_user_errors_are_one_line(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, case: str, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    args = {"--checkpoint": data["ckpt"], "--input": data["src"] / "a.png", "--output": tmp_path / "out"}
    extra: list[object] = []
    if case == "missing":
        args["--input"] = tmp_path / "nowhere"
    elif case == "empty":
        args["--input"] = tmp_path / "empty"
    elif case == "unwritable":
        args["--output"] = tmp_path / "a_file" / "out"  # below a file: cannot be created, even by root
    elif case == "no_checkpoint":
        args["--checkpoint"] = tmp_path / "none.ckpt"
    else:
        extra = ["--resize", 32, 32, "--sliding-window"]
    rc = _run(*[v for kv in args.items() for v in kv], *extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err


def test_script_subprocess(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "predict.py"), "--checkpoint", str(data["ckpt"]),
         "--input", str(data["src"] / "odd"), "--output", str(out), "--num-workers", "1"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # odd/ holds the corrupt file
    assert "corrupt.png" in proc.stderr and "Traceback" not in proc.stderr
    assert "done 5, skipped 0, failed 1" in proc.stdout
    assert (out / "label" / "exif.png").is_file()


def _slow_run(tmp_path: Path, n: int, *extra: str) -> tuple[Path, list[str], dict[str, str]]:
    """``n`` PNGs, a small checkpoint and a slow one-thread predict command over them (TTA, batch 1), for
    the tests that stop a run midway: (output folder, command, environment)."""
    src = tmp_path / "many"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        cv2.imwrite(str(src / f"{i:03d}.png"), _img(rng, 96, 128))
    ckpt = _ckpt(tmp_path / "m.ckpt", kwargs={"fc_dim": 64, "width_mult": 0.25})
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "predict.py"), "--checkpoint", str(ckpt), "--input", str(src),
        "--output", str(out), *extra, "--batch-size", "1", "--num-workers", "1", "--flip",
        "--scales", "1.0", "1.5", "--quiet",
    ]  # fmt: skip
    return out, cmd, {**os.environ, "OMP_NUM_THREADS": "1"}


def test_interrupted_run_leaves_only_whole_pngs(tmp_path: Path) -> None:
    """SIGKILL mid-run: every PNG present decodes fully, no temp file looks like an output; resume works."""
    n = 60
    out, cmd, env = _slow_run(tmp_path, n, "--outputs", "label,color,overlay")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            # overlays are written first: three of them mean some images are complete
            if (out / "overlay").is_dir() and len(list((out / "overlay").glob("*.png"))) >= 3:
                break
            time.sleep(0.005)
        still_running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert still_running, "the run ended before it could be interrupted; make it slower"
    pngs = list(out.rglob("*.png"))
    assert 0 < len(pngs) < 3 * n
    for p in pngs:
        _read(p)  # cv2 gives None for a truncated PNG
        with Image.open(p) as im:
            im.load()  # raises on a truncated file
    visible = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert all(p.suffix == ".png" for p in visible)
    plain = cmd[: cmd.index("--flip")]  # the same command without TTA
    resumed = subprocess.run(
        [*plain, "--quiet", "--skip-existing"], capture_output=True, text=True, env=env, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "failed 0" in resumed.stdout
    done = int(resumed.stdout.split("done ")[1].split(",")[0])
    skipped = int(resumed.stdout.split("skipped ")[1].split(",")[0])
    assert done + skipped == n and 0 < skipped < n
    assert all((out / k / f"{i:03d}.png").is_file() for k in ("label", "color", "overlay") for i in range(n))


@pytest.mark.parametrize("pipeline", ["--overlap", "--no-overlap"])
def test_image_with_a_huge_header_is_one_failed_line(
    tmp_path: Path, data: dict[str, Path], capsys: pytest.CaptureFixture, pipeline: str
) -> None:
    """A header claiming 60000 x 60000 pixels fails that image only; the rest of the folder is done."""
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), _img(np.random.default_rng(0), 48, 64))
    (src / "b.png").write_bytes(huge_header_image("png"))
    (src / "c.jpg").write_bytes(huge_header_image("jpg"))
    out = tmp_path / "out"
    rc = _run("--checkpoint", data["ckpt"], "--input", src, "--output", out, "--quiet", pipeline,
              "--num-workers", 1)  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 1 and "Traceback" not in captured.err
    failed = [line for line in captured.err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 2 and all("MAX_IMAGE_PIXELS" in line for line in failed)
    assert "done 1, skipped 0, failed 2" in captured.out
    assert (out / "label" / "a.png").is_file() and not (out / "label" / "b.png").exists()


def test_earlier_runs_outputs_inside_the_input_are_not_inputs(
    tmp_path: Path, data: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(src / name), _img(rng, 48, 64))
    common = ("--checkpoint", data["ckpt"], "--quiet", "--num-workers", 0)
    for spec, output in (
        (src, src / "o1"),
        (src, src / "o1"),
        (src, src / "o2"),
        (f"{src}/**/*.png", src / "o3"),
    ):
        assert _run(*common, "--input", spec, "--output", output) == 0
        assert "done 2, skipped 0, failed 0" in capsys.readouterr().out, (spec, output)
    assert not (src / "o2" / "label" / "o1").exists()


def _bad_checkpoint(path: Path, source: Path, case: str) -> Path:
    ckpt = torch.load(source, weights_only=True)
    hp = ckpt["hyper_parameters"]
    if case == "palette_999":
        hp["palette"][1] = [0, 999, 0]
    elif case == "palette_short":
        hp["palette"] = hp["palette"][:2]
    elif case == "mean_2":
        hp["mean"] = [0.4, 0.5]
    elif case == "std_0":
        hp["std"] = [0.2, 0.0, 0.3]
    elif case == "std_nan":
        hp["std"] = [0.2, float("nan"), 0.3]
    elif case == "names":
        hp["class_names"] = ["one"]
    elif case == "ignore_index":
        hp["ignore_index"] = "void"
    elif case == "num_classes":  # the weights' score layers have 4 outputs
        hp["num_classes"], hp["class_names"], hp["palette"] = (
            5,
            [*hp["class_names"], "x"],
            [*hp["palette"], [1, 2, 3]],
        )
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("text", "is not a readable checkpoint (UnpicklingError); it must be a Lightning .ckpt"),
        ("folder", "is a folder"),
        ("palette_999", "palette values must be in 0..255"),
        ("palette_short", "palette must hold 4 colours"),
        ("mean_2", "mean must be 3 numbers"),
        ("std_0", "std must be positive"),
        ("std_nan", "std must be finite"),
        ("names", "class_names must list 4 names"),
        ("ignore_index", "ignore_index must be an integer"),
        ("num_classes", "weights do not fit fcn8s with num_classes 5"),
    ],
)
def test_bad_checkpoints_are_one_error_line(
    tmp_path: Path, data: dict[str, Path], capsys: pytest.CaptureFixture, case: str, needle: str
) -> None:
    """Every field read from a checkpoint is checked; the message names it and the file, on one line, and
    never suggests turning weights_only off. Nothing is written, the checkpoint stays as it was."""
    if case == "text":
        ckpt = tmp_path / "notes.ckpt"
        ckpt.write_text("not a checkpoint\n")
    elif case == "folder":
        ckpt = tmp_path / "run.ckpt"
        ckpt.mkdir()
    else:
        ckpt = _bad_checkpoint(tmp_path / "bad.ckpt", data["ckpt"], case)
    before = ckpt.read_bytes() if ckpt.is_file() else None
    out = tmp_path / "new" / "out"
    rc = _run("--checkpoint", ckpt, "--input", data["src"] / "a.png", "--output", out, "--quiet")
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle in err and str(ckpt) in err and "weights_only" not in err, err
    assert not (tmp_path / "new").exists()  # the output folders this run made are gone again
    assert before is None or ckpt.read_bytes() == before


def test_ctrl_c_prints_one_line_and_how_to_resume(tmp_path: Path) -> None:
    """SIGINT mid-run: exit 130, one 'interrupted:' line with the count and the resume flag, no traceback,
    only whole PNGs."""
    n = 40
    out, cmd, env = _slow_run(tmp_path, n)

    def two_written() -> bool:
        return (out / "color").is_dir() and len(list((out / "color").glob("*.png"))) >= 2

    still_running, code, stderr = signal_when_ready(cmd, two_written, signal.SIGINT, wait=60, env=env)
    assert still_running, "the run ended before it could be interrupted; make it slower"
    assert code == 130, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    done = int(stderr.split("interrupted: ")[1].split(" of ")[0])
    assert f"of {n} images have their outputs in {out}" in stderr and "--skip-existing" in stderr
    labels = sorted(p.name for p in (out / "label").glob("*.png"))
    assert 2 <= done < n and len(labels) == done
    for p in out.rglob("*.png"):
        with Image.open(p) as im:
            im.load()  # raises on a truncated file


def test_ctrl_c_outside_the_run_is_one_line(capsys: pytest.CaptureFixture) -> None:
    from fcn.cli import _guard

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert _guard(interrupted) == 130
    assert capsys.readouterr().err == "interrupted\n"
