"""Inference building blocks: image reading, prediction strategies, colours, atomic PNGs, predictors."""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import TINY, huge_header_image, randomize_scores
from torch import nn

from fcn.checkpoint import CheckpointError, ModelMeta, save_checkpoint
from fcn.data.errors import DataError
from fcn.data.io import (
    colorize,
    jpeg_truncated,
    overlay,
    probe_size,
    read_image,
    write_bytes_atomic,
    write_png_atomic,
)
from fcn.models import build_model
from fcn.predictor import (
    InferenceError,
    class_ids,
    labels_and_confidence,
    load_predictor,
    predict_logits,
    predict_sliding,
)


class PixelModel(nn.Module):
    """A 1x1 convolution: every pixel's logits depend only on that pixel (translation/flip equivariant)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# --- reading


def test_read_grayscale_rgba_and_16bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    out = read_image(tmp_path / "g.png")
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert (out == gray[..., None]).all()

    bgra = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    out = read_image(tmp_path / "a.png")
    assert out.shape == (20, 30, 3)
    assert (out == bgra[..., [2, 1, 0]]).all()  # RGB, alpha dropped

    rgb8 = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "w.png"), rgb8.astype(np.uint16) * 257)  # 16-bit, same picture
    out = read_image(tmp_path / "w.png")
    assert out.dtype == np.uint8
    assert (out == rgb8[..., ::-1]).all()


def test_read_applies_exif_orientation(tmp_path: Path) -> None:
    Image = pytest.importorskip("PIL.Image")
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[:8, :] = 255  # a white band at the top of the stored image
    for name, orientation in (("plain.jpg", 1), ("rot.jpg", 6)):
        im = Image.fromarray(pixels)
        exif = im.getexif()
        exif[0x0112] = orientation
        im.save(tmp_path / name, quality=100, exif=exif)
    plain = read_image(tmp_path / "plain.jpg")
    rot = read_image(tmp_path / "rot.jpg")
    assert plain.shape == (24, 40, 3) and rot.shape == (40, 24, 3)
    # orientation 6: the stored image is shown rotated 90 degrees clockwise
    assert np.array_equal(rot, np.rot90(plain, k=-1))
    assert probe_size(tmp_path / "rot.jpg") == (40, 24)
    assert probe_size(tmp_path / "plain.jpg") == (24, 40)


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("hello")
    _, jpeg = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))
    (tmp_path / "cut.jpg").write_bytes(jpeg.tobytes()[:-2])  # only the end marker is missing
    for name in ("bad.png", "empty.jpg", "notes.png", "missing.png", "cut.jpg"):
        with pytest.raises(DataError, match=name):
            read_image(tmp_path / name)
    assert probe_size(tmp_path / "bad.png") is None
    for kind in ("png", "jpg"):  # a header claiming 60000 x 60000 pixels: refused before decoding
        (tmp_path / f"huge.{kind}").write_bytes(huge_header_image(kind))
        with pytest.raises(DataError, match=f"huge.{kind}: its header claims .*MAX_IMAGE_PIXELS"):
            read_image(tmp_path / f"huge.{kind}")
    # OpenCV builds differ on JPEGs cut short; the end-marker check catches them whatever the build does
    full = np.frombuffer(jpeg.tobytes(), np.uint8)
    assert not jpeg_truncated(full) and jpeg_truncated(full[:-2]) and jpeg_truncated(full[: len(full) // 2])
    assert not jpeg_truncated(np.frombuffer(b"\x89PNG....", np.uint8))


# --- prediction


def test_sliding_window_equals_whole_image_for_a_pixelwise_model() -> None:
    model = PixelModel().eval()
    x = torch.randn(2, 3, 50, 70)
    whole = model(x)
    with torch.no_grad():
        for crop, stride in [
            ((32, 32), (16, 16)),
            ((20, 30), (20, 30)),
            ((64, 64), (8, 8)),
            ((17, 23), (5, 7)),
        ]:
            out = predict_sliding(model, x, crop=crop, stride=stride, window_batch=3)
            assert out.shape == whole.shape
            torch.testing.assert_close(out, whole, atol=1e-5, rtol=1e-5)


def test_sliding_window_averages_overlaps() -> None:
    class Offset(nn.Module):
        """Logit = the window's top-left-corner value: averaging shows up in overlaps."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1, :1, :1].expand(x.shape[0], 1, *x.shape[-2:]).clone()

    x = torch.arange(10.0).view(1, 1, 1, 10).expand(1, 3, 1, 10).contiguous()
    out = predict_sliding(Offset(), x, crop=(1, 4), stride=(1, 3))
    # windows start at 0, 3, 6 (and 6 is the last: 6 + 4 = 10): values 0, 3, 6
    expected = torch.tensor([0, 0, 0, 1.5, 3, 3, 4.5, 6, 6, 6])
    torch.testing.assert_close(out[0, 0, 0], expected)


def test_flip_and_multiscale_tta() -> None:
    model = PixelModel().eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        single = predict_logits(model, x)
        torch.testing.assert_close(single, model(x))  # one view: the raw logits
        flipped = predict_logits(model, x, flip=True)
        # a pixel-wise model is flip-equivariant: the average of both views is the single view
        torch.testing.assert_close(flipped, model(x).log_softmax(1), atol=1e-5, rtol=1e-5)
        multi = predict_logits(model, x, scales=(0.5, 1.0, 1.5), flip=True)
    assert multi.shape == (1, 4, 40, 56)
    torch.testing.assert_close(multi.exp().sum(1), torch.ones(1, 40, 56))
    fcn = randomize_scores(build_model("fcn8s", num_classes=4, **TINY))
    with torch.no_grad():
        out = predict_logits(fcn, x, scales=(0.75, 1.25), crop=(32, 32), stride=(16, 16))
        assert out.shape == (1, 4, 40, 56)
        assert not torch.allclose(out.softmax(1), fcn(x).softmax(1), atol=1e-3)
    with pytest.raises(InferenceError):
        predict_logits(model, x, resize=(32, 32), crop=(16, 16))
    with pytest.raises(InferenceError):
        predict_logits(model, x, scales=(0.0,))


def test_labels_and_confidence() -> None:
    logits = torch.randn(2, 5, 7, 9)
    labels, conf = labels_and_confidence(logits, confidence=True)
    assert torch.equal(labels, logits.argmax(1))
    torch.testing.assert_close(conf, logits.softmax(1).amax(1))
    assert labels_and_confidence(logits)[1] is None


@pytest.mark.parametrize("classes", [2, 11, 255, 300])
def test_class_ids_equal_numpy_argmax(classes: int) -> None:
    """Channels-last views (the CPU model's logits) and plain (C, H, W) arrays, first maximum winning on
    ties (small integers tie often); uint8 ids up to 256 classes, uint16 beyond; float64 via NumPy."""
    rng = np.random.default_rng(classes)
    smooth = rng.standard_normal((classes, 37, 53)).astype(np.float32)
    ties = rng.integers(0, 3, (classes, 37, 53)).astype(np.float32)
    for chw in (smooth, ties):
        ref = chw.argmax(0)
        for logits in (
            chw,
            np.ascontiguousarray(chw.transpose(1, 2, 0)).transpose(2, 0, 1),
            chw.astype(np.float64),
        ):
            ids = class_ids(logits)
            assert ids.dtype == (np.uint8 if classes <= 256 else np.uint16)
            np.testing.assert_array_equal(ids, ref)
    with pytest.raises(ValueError, match="C, H, W"):
        class_ids(smooth[0])


# --- colours, PNGs


def test_colorize_overlay_confidence() -> None:
    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    labels = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    color = colorize(labels, palette)
    assert color.tolist() == [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 0, 0]]]
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    assert np.array_equal(overlay(image, color, alpha=0.0), image)
    assert np.array_equal(overlay(image, color, alpha=1.0), color)
    assert overlay(image, color, alpha=0.5)[0, 0].tolist() == [178, 50, 50]
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, color, alpha=1.5)
    assert colorize(np.array([[-1, 1]]), palette).tolist() == [[[0, 0, 0], [0, 255, 0]]]  # negative: black


@pytest.mark.parametrize(
    "array",
    [
        np.arange(60, dtype=np.uint8).reshape(6, 10),
        (np.arange(60, dtype=np.uint16) * 1000).reshape(6, 10),
        np.arange(180, dtype=np.uint8).reshape(6, 10, 3),
    ],
)
def test_write_png_atomic_round_trip(tmp_path: Path, array: np.ndarray) -> None:
    path = write_png_atomic(tmp_path / "x.png", array)
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array.ndim == 3:
        back = back[..., ::-1]  # stored as RGB
    assert back.dtype == array.dtype and np.array_equal(back, array)
    assert os.listdir(tmp_path) == ["x.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_indexed_colour_png_decodes_to_the_palette(tmp_path: Path) -> None:
    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    labels = np.array([[0, 1, 2], [2, 255, 7]], dtype=np.uint8)
    path = write_png_atomic(tmp_path / "c.png", labels, palette=palette)
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert np.array_equal(back, colorize(labels, palette))
    wide = np.array([[0, 300]], dtype=np.uint16)  # more than 256 classes: written as RGB
    back = cv2.imread(str(write_png_atomic(tmp_path / "w.png", wide, palette=palette)))[..., ::-1]
    assert back.tolist() == [[[255, 0, 0], [0, 0, 0]]]


def test_label_pngs_decode_exactly() -> None:
    """Grayscale and indexed label PNGs: Pillow and OpenCV both read back the exact ids / colours."""
    from PIL import Image

    from fcn.data.io import encode_png

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, (37, 53)).astype(np.uint8)
    labels[:5, :20] = 255  # void: past the palette, black
    palette = [[10 * i, 255 - 10 * i, 3 * i] for i in range(11)]
    gray, indexed = encode_png(labels), encode_png(labels, palette=palette)
    assert np.array_equal(cv2.imdecode(np.frombuffer(gray, np.uint8), cv2.IMREAD_UNCHANGED), labels)
    with Image.open(io.BytesIO(indexed)) as im:
        assert im.mode == "P" and np.array_equal(np.asarray(im), labels)
        assert np.array_equal(np.asarray(im.convert("RGB")), colorize(labels, palette))
    rgb = cv2.imdecode(np.frombuffer(indexed, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert np.array_equal(rgb, colorize(labels, palette))


def test_write_png_atomic_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.png"
    write_png_atomic(target, np.zeros((4, 4), np.uint8))
    before = target.read_bytes()

    def boom(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_png_atomic(target, np.ones((4, 4), np.uint8))
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.png"]  # the temporary file is gone


def test_write_bytes_atomic_new_replace_and_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files are created and replaced whole, with the usual permissions (not mkstemp's 0600), nothing is
    left behind, and a failed write leaves no file (or the old one)."""
    target = tmp_path / "a.png"
    write_bytes_atomic(target, b"first")
    write_bytes_atomic(target, b"second, longer")
    assert target.read_bytes() == b"second, longer" and os.listdir(tmp_path) == ["a.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask

    def boom(*_: object) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    for path in (tmp_path / "b.png", target):
        with pytest.raises(OSError, match="disk full"):
            write_bytes_atomic(path, b"never", fsync=True)
    assert os.listdir(tmp_path) == ["a.png"] and target.read_bytes() == b"second, longer"


def test_readme_python_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's three lines run as written (its paths in a temporary folder): the labels are the
    model's arg-max on the normalised image, for a file, an array and a batch; colours in its palette."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip()]) == 3
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = randomize_scores(build_model("fcn8s", num_classes=4, **TINY))
    (tmp_path / "outputs/demo/checkpoints").mkdir(parents=True)
    save_checkpoint("outputs/demo/checkpoints/best.ckpt", model=model, model_name="fcn8s", model_kwargs=TINY)
    rgb = cv2.resize(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8), (64, 48))
    cv2.imwrite("photo.jpg", rgb[..., ::-1])
    scope: dict = {}
    exec(code, scope)
    labels, loaded = scope["labels"], scope["model"]
    image = read_image("photo.jpg")
    with torch.no_grad():
        ref = model(loaded.normalize(torch.from_numpy(image)[None])).argmax(1)[0].numpy()
    assert labels.shape == (48, 64) and labels.dtype == np.uint8 and (labels == ref).mean() > 0.999
    assert np.array_equal(loaded.segment(np.stack([image, image]))[1], labels)
    assert np.array_equal(loaded.colorize(labels), colorize(labels, loaded.meta.palette))


def test_load_predictor_from_checkpoint(tmp_path: Path) -> None:
    model = randomize_scores(build_model("fcn8s", num_classes=3, **TINY))
    ckpt = save_checkpoint(
        tmp_path / "m.ckpt", model=model, model_name="fcn8s", model_kwargs=TINY, class_names=["a", "b", "c"],
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    )  # fmt: skip
    pred = load_predictor(ckpt, device="cpu")
    assert pred.meta.class_names == ["a", "b", "c"] and pred.num_classes == 3
    images = torch.randint(0, 256, (2, 30, 40, 3), dtype=torch.uint8)
    x = pred.normalize(images)
    expected = (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, expected)
    with torch.no_grad():
        ref = model(expected)
    torch.testing.assert_close(pred(x), ref, atol=1e-4, rtol=1e-4)
    bf16 = load_predictor(ckpt, device="cpu", precision="bf16")
    out = bf16(x)
    assert out.dtype == torch.float32
    assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.8


def test_predictor_folds_batchnorm_by_default(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_scores(build_model("student", num_classes=4))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(std=0.1)
            m.running_var.uniform_(0.5, 2.0)
    ckpt = save_checkpoint(tmp_path / "s.ckpt", model=model, model_name="student")
    fused, plain = load_predictor(ckpt, device="cpu"), load_predictor(ckpt, device="cpu", fuse=False)
    assert fused.fused == 46 and plain.fused == 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.model.modules())
    x = torch.randn(2, 3, 64, 80)
    ref = plain(x)
    torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch without oneDNN")
def test_onednn_convolutions_equal_conv2d() -> None:
    """One thread, where PyTorch would take its reference kernel for 1x1 convolutions: the oneDNN path
    gives Conv2d's results for 1x1, strided, depthwise, dilated and bias-free layers in both memory
    formats; float64 and autocast keep the usual path (bf16 output under autocast)."""
    from fcn.models.fuse import OneDNNConv2d, use_onednn_convolutions

    torch.manual_seed(0)
    layers = [
        nn.Conv2d(16, 24, 1),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Conv2d(16, 16, 5, padding=2, groups=16),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for layer in layers:
            x = torch.randn(2, layer.in_channels, 23, 31)
            refs = [layer(x), layer(x.contiguous(memory_format=torch.channels_last))]
            assert use_onednn_convolutions(nn.Sequential(layer)) == 1 and type(layer) is OneDNNConv2d
            for ref, inp in zip(refs, (x, x.contiguous(memory_format=torch.channels_last)), strict=True):
                torch.testing.assert_close(layer(inp), ref, rtol=1e-5, atol=1e-5)
            assert layer.double()(x.double()).dtype == torch.float64
            layer.float()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert layer(x).dtype == torch.bfloat16
    finally:
        torch.set_num_threads(threads)


def test_predictor_uses_onednn_convolutions_on_cpu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_scores(build_model("student", num_classes=4))
    ckpt = save_checkpoint(tmp_path / "s.ckpt", model=model, model_name="student")
    predictor = load_predictor(ckpt, device="cpu", onednn=True)
    convs = sum(type(m) is nn.Conv2d for m in model.modules())
    assert predictor.onednn == convs > 50  # the ones BatchNorm was folded into included
    model.eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(predictor(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_load_predictor_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_predictor(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(CheckpointError):
        load_predictor(tmp_path / "junk.ckpt")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(CheckpointError):
        load_predictor(tmp_path / "junk.onnx", device="cpu")
    model = build_model("student", num_classes=2)
    ckpt = save_checkpoint(tmp_path / "s.ckpt", model=model, model_name="student")
    with pytest.raises(InferenceError, match="precision"):
        load_predictor(ckpt, precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(InferenceError, match="CUDA"):
            load_predictor(ckpt, device="cuda")


def test_model_meta_onnx_props_round_trip() -> None:
    meta = ModelMeta(
        model_name="student", num_classes=2, class_names=["road", "sky"], palette=[[1, 2, 3], [4, 5, 6]],
        ignore_index=255, mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6], model_kwargs={"width_mult": 1.0},
    )  # fmt: skip
    props = meta.to_onnx_props()
    assert all(isinstance(v, str) for v in props.values())
    assert ModelMeta.from_onnx_props(props, source="m.onnx") == meta
    del props["fcn.palette"]
    with pytest.raises(CheckpointError, match="palette"):
        ModelMeta.from_onnx_props(props, source="m.onnx")
