"""albumentations presets: image and mask stay aligned, masks stay integer, padding is ignored."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from fcn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

MEAN, STD = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)


def _denormalise(x: torch.Tensor) -> np.ndarray:
    return (x.permute(1, 2, 0).numpy() * STD + MEAN) * 255


def _blocks(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 120x160 image of 20x20 blocks whose colour encodes the block's label (11 classes)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (11, 3), dtype=np.uint8)
    mask = np.kron(rng.integers(0, 11, (6, 8)), np.ones((20, 20), np.int64)).astype(np.uint8)
    return colours[mask], mask, colours


def test_constants() -> None:
    assert pytest.approx((0.485, 0.456, 0.406)) == IMAGENET_MEAN
    assert pytest.approx((0.229, 0.224, 0.225)) == IMAGENET_STD


def test_train_pipeline_keeps_image_and_mask_aligned() -> None:
    """Colour encodes the label; after scale / pad / crop / flip the mask still matches the colour."""
    image, mask, colours = _blocks()
    tf = train_transform(crop_size=(128, 144), scale_range=(0.5, 2.0), color_jitter=False)
    checked, padded, shapes = 0, 0, set()
    for seed in range(10):
        tf.set_random_seed(seed)
        out = tf(image=image, mask=mask)
        x, y = out["image"], out["mask"]
        assert x.dtype == torch.float32 and x.shape == (3, 128, 144) and tuple(y.shape) == (128, 144)
        y = y.long().numpy()
        assert set(np.unique(y)) <= set(range(11)) | {255}  # nearest: no blended label values
        rgb = _denormalise(x)
        nearest = np.abs(rgb[:, :, None, :] - colours[None, None].astype(float)).sum(-1).argmin(-1)
        valid = y != 255
        # leave out the pixels next to label boundaries, where bilinear image resampling mixes colours
        edges = cv2.Laplacian(np.where(valid, y, 20).astype(np.float32), cv2.CV_32F) != 0
        band = cv2.dilate(edges.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        inner = valid & ~band
        assert inner.sum() > 0.3 * valid.sum()
        assert (nearest[inner] == y[inner]).mean() >= 0.99, seed
        # the check is sharp: a mask off by four pixels fails it
        off = inner[:, 4:]
        assert (nearest[:, 4:][off] == y[:, :-4][off]).mean() < 0.99
        if (
            ~valid
        ).any():  # padding: the mean colour in the image (0 after normalisation), ignore in the mask
            assert np.abs(x.permute(1, 2, 0).numpy()[~valid]).max() < 0.05
            padded += 1
        checked += inner.sum()
        shapes.add(y.tobytes())
    assert checked > 50_000 and padded >= 1 and len(shapes) == 10  # every draw differs, some pad


def test_random_scale_uses_the_range_and_nearest_masks() -> None:
    stripes = np.repeat(np.arange(16) % 11, 10)[None, :].repeat(120, 0).astype(np.uint8)  # 10-px columns
    image = np.zeros((120, 160, 3), np.uint8)
    for scale, run in ((2.0, 20), (1.0, 10)):
        tf = train_transform(crop_size=(60, 80), scale_range=(scale, scale), hflip=False, color_jitter=False)
        y = tf(image=image, mask=stripes)["mask"].numpy()[0]
        lengths = np.diff(np.flatnonzero(np.diff(y.astype(int)) != 0))
        assert np.median(lengths) == run, (scale, lengths)


def test_padding_is_ignore_index_and_mean_colour() -> None:
    image, mask, _ = _blocks()
    tf = train_transform(crop_size=(100, 120), scale_range=(0.5, 0.5), ignore_index=99, color_jitter=False)
    x, y = tf(image=image, mask=mask).values()  # 60x80 after scaling: 40 rows and 40 columns of padding
    y = y.long()
    assert y.dtype == torch.int64 and (y == 99).sum().item() == 100 * 120 - 60 * 80
    assert x[:, y == 99].abs().max() < 0.05


def test_colour_jitter_changes_pixels_not_labels() -> None:
    image, mask, _ = _blocks()
    on = train_transform(crop_size=(120, 160), scale_range=(1.0, 1.0), hflip=False)
    changed = 0
    for seed in range(5):
        on.set_random_seed(seed)
        x, y = on(image=image, mask=mask).values()
        assert np.array_equal(y.numpy(), mask)  # no geometry at scale 1 without flip: labels untouched
        changed += np.abs(_denormalise(x) - image).mean() > 2
    assert changed >= 2  # jitter fires with p=0.8


def test_brightness_range_sets_how_dark_the_jitter_goes() -> None:
    image = np.full((60, 80, 3), 200, np.uint8)
    mask = np.zeros((60, 80), np.uint8)

    def darkest(low: float) -> float:
        tf = train_transform(
            crop_size=(60, 80), scale_range=(1.0, 1.0), hflip=False, brightness_range=(low, low)
        )
        tf.set_random_seed(0)
        return min(_denormalise(tf(image=image, mask=mask)["image"]).mean() for _ in range(8))

    assert darkest(0.4) < 0.6 * darkest(1.0)  # factor 0.4 darkens (contrast/saturation jitter stay mild)


def test_eval_transform_keeps_size_or_resizes_with_nearest() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    mask = (np.arange(37 * 53).reshape(37, 53) % 11).astype(np.uint8)
    x, y = eval_transform()(image=img, mask=mask).values()
    assert x.shape == (3, 37, 53) and (y.numpy() == mask).all()
    assert np.abs(_denormalise(x) - img).max() < 1e-3  # exactly the normalisation, nothing else
    x, y = eval_transform(size=(20, 30))(image=img, mask=mask).values()
    assert x.shape == (3, 20, 30) and tuple(y.shape) == (20, 30)
    assert set(np.unique(y.numpy())) <= set(range(11))
    custom = eval_transform(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(image=img, mask=mask)["image"]
    assert custom.min() >= -1.0 and custom.max() <= 1.0 and custom.min() < -0.9
