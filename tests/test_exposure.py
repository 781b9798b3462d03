"""Exposure normalisation (fcn.exposure): the gain, its range checks, and how the target travels with a model
(training module, checkpoint, export metadata, predictor, predict_logits)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import TINY, randomize_scores
from torch import nn

from fcn.checkpoint import CheckpointError, save_checkpoint
from fcn.export import export_onnx, export_torchscript
from fcn.exposure import ExposureNorm, check_exposure_target, exposure_argument, mean_grey
from fcn.lit import SegmentationModule, SettingError
from fcn.models import build_model
from fcn.palette import IMAGENET_MEAN, IMAGENET_STD
from fcn.predictor import Predictor, load_predictor, predict_logits, set_exposure_target

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _normalise(rgb: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> a normalised ``(1, 3, H, W)`` batch."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    return (x - MEAN) / STD


def _rgb255(x: torch.Tensor) -> torch.Tensor:
    return (x * STD + MEAN) * 255.0


def _dark_image(seed: int = 0, height: int = 24, width: int = 32) -> np.ndarray:
    """A dusk-like frame: values 10-90, brighter on the left, so that windows differ in brightness."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 0, width)[None, :, None]
    return (rng.integers(10, 50, (height, width, 3)) + ramp).astype(np.uint8)


def test_the_gain_brings_the_mean_grey_to_the_target_and_keeps_ratios() -> None:
    rgb = _dark_image()
    norm = ExposureNorm(107.0, IMAGENET_MEAN, IMAGENET_STD)
    out = _rgb255(norm(_normalise(rgb)))
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float64).mean()  # OpenCV's weights
    assert mean_grey(_rgb255(_normalise(rgb)) / 255.0).item() == pytest.approx(grey, abs=0.5)
    assert mean_grey(out / 255.0).item() == pytest.approx(107.0, abs=1e-3)
    gain = 107.0 / mean_grey(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0).item()
    expected = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() * gain  # no pixel reaches 255 here
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-4)


def test_the_gain_clips_at_white_and_is_per_image() -> None:
    bright = np.full((8, 8, 3), 240, np.uint8)
    bright[:, :4] = 20  # mean grey 130: x 150/130 takes 240 past 255
    dim = np.full((8, 8, 3), 40, np.uint8)
    dim[::2] = 50  # mean grey 45: x 150/45, nothing clipped
    norm = ExposureNorm(150.0, IMAGENET_MEAN, IMAGENET_STD)
    out = _rgb255(norm(torch.cat([_normalise(bright), _normalise(dim)])))
    assert out[0].max().item() == pytest.approx(255.0, abs=1e-3)  # clipped, as a camera's gain
    assert out[0, :, :, :4].mean().item() == pytest.approx(20 * 150 / 130, abs=1e-2)
    assert mean_grey(out[1:] / 255.0).item() == pytest.approx(150.0, abs=1e-2)  # its own gain
    black = _rgb255(norm(_normalise(np.zeros((4, 4, 3), np.uint8))))
    assert torch.isfinite(black).all() and black.abs().max().item() < 1e-2  # no division by zero


@pytest.mark.parametrize("bad", [0, -5.0, 255.5, math.nan, math.inf, True, "107"])
def test_bad_targets_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="exposure_target"):
        check_exposure_target(bad)
    with pytest.raises(ValueError, match="exposure_target"):
        ExposureNorm(bad, IMAGENET_MEAN, IMAGENET_STD)  # type: ignore[arg-type]


def test_the_command_line_value() -> None:
    assert check_exposure_target(None) is None and check_exposure_target(107) == 107.0
    assert exposure_argument(" OFF ") == "off" and exposure_argument("107.5") == 107.5
    for text in ("0", "300", "bright", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="grey level"):
            exposure_argument(text)


class PixelModel(nn.Module):
    """Per-pixel logits: a sliding window gives the whole image's result unless windows differ in gain."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_predict_logits_scales_whole_images_before_windows_and_views() -> None:
    model, x = PixelModel().eval(), _normalise(_dark_image())
    norm = ExposureNorm(107.0, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        expected = model(norm(x))
        torch.testing.assert_close(predict_logits(model, x, exposure=norm), expected)
        # windows of 12x16 differ in brightness (a ramp): one gain for the image, not one per window
        windows = predict_logits(model, x, crop=(12, 16), stride=(6, 8), exposure=norm)
        torch.testing.assert_close(windows, expected, atol=1e-5, rtol=1e-5)
        per_window = torch.cat([model(norm(x[..., :16])), model(norm(x[..., 16:]))], dim=-1)
        assert (per_window - expected).abs().max() > 1e-2  # so the check above could fail
        assert (predict_logits(model, x) - expected).abs().max() > 1e-2  # the gain changes the logits


def test_the_target_travels_in_checkpoints_and_export_metadata(tmp_path: Path) -> None:
    torch.manual_seed(0)  # a student whose labels follow the brightness (checked below)
    model = randomize_scores(build_model("student", num_classes=3))
    ckpt = save_checkpoint(tmp_path / "m.ckpt", model=model, model_name="student", exposure_target=107)
    pred = load_predictor(ckpt, device="cpu")
    assert pred.meta.exposure_target == 107.0
    assert pred.exposure == ExposureNorm(107.0, pred.meta.mean, pred.meta.std)
    rgb = _dark_image(height=48, width=64)
    with torch.no_grad():
        expected = model(ExposureNorm(107.0, IMAGENET_MEAN, IMAGENET_STD)(_normalise(rgb))).argmax(1)[0]
    expected = expected.numpy()

    def agree(predictor: Predictor) -> float:
        return float((predictor.segment(rgb) == expected).mean())

    # the predictor folds BatchNorm and onnxruntime sums in its own order: near-tied pixels may differ
    assert agree(pred) > 0.99
    # exports embed the metadata, and their predictors apply it
    for path in (
        export_onnx(model, pred.meta, tmp_path / "m.onnx", size=(48, 64)),
        export_torchscript(model, pred.meta, tmp_path / "m.pt", size=(48, 64)),
    ):
        exported = load_predictor(path, device="cpu")
        assert exported.meta == pred.meta and exported.exposure == pred.exposure
        assert agree(exported) > 0.99, path.name
    set_exposure_target(exported, "off")
    assert agree(exported) < 0.9  # so the checks above could fail
    set_exposure_target(pred, None)  # the option not given: the model's stays
    assert pred.meta.exposure_target == 107.0
    set_exposure_target(pred, 90.0)
    assert pred.exposure is not None and pred.exposure.target == 90.0
    set_exposure_target(pred, "off")
    assert pred.exposure is None
    plain = save_checkpoint(tmp_path / "p.ckpt", model=model, model_name="student")
    assert load_predictor(plain, device="cpu").exposure is None  # the default: off

    data = torch.load(ckpt, weights_only=True)
    data["hyper_parameters"]["exposure_target"] = 300
    torch.save(data, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"bad\.ckpt: exposure_target must be a mean grey level"):
        load_predictor(tmp_path / "bad.ckpt", device="cpu")


def test_the_training_module_checks_stores_and_validates_with_it() -> None:
    with pytest.raises(SettingError, match="exposure_target"):
        SegmentationModule(model="fcn8s", model_kwargs=TINY, num_classes=3, exposure_target=0)
    module = SegmentationModule(model="fcn8s", model_kwargs=TINY, num_classes=3, exposure_target=107.0)
    assert module.hparams.exposure_target == 107.0  # saved with the checkpoint's hyper-parameters
    randomize_scores(module.model)
    x, masks = _normalise(_dark_image()), torch.zeros(1, 24, 32, dtype=torch.long)
    with torch.no_grad():
        module.validation_step((x, masks), 0)
        expected = module.model(ExposureNorm(107.0, IMAGENET_MEAN, IMAGENET_STD)(x)).argmax(1)
    predicted = module.val_confmat.compute().sum(0)  # pixels per predicted class
    assert torch.equal(predicted, torch.bincount(expected.flatten(), minlength=3))
