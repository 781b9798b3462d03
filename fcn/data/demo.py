"""Synthetic street scenes with CamVid's 11 classes (sky, buildings, a road in perspective, pavements,
fences, trees, poles with signs, cars, pedestrians, cyclists; textures, noise, varied lighting), written in
CamVid (or Cityscapes) layout. Deterministic given the seed; labels are CamVid's (0-10, 11 void), so demo
checkpoints also run on real CamVid.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from fcn.data.camvid import CLASSES, VOID
from fcn.data.errors import DataError
from fcn.data.io import write_png_atomic

VERSION = 1
SKY, BUILDING, POLE, ROAD, PAVEMENT, TREE, SIGN, FENCE, CAR, PEDESTRIAN, BICYCLIST = range(11)
# CamVid class -> Cityscapes labelId, for the Cityscapes layout (void -> 0 "unlabeled")
TO_CITYSCAPES = {SKY: 23, BUILDING: 11, POLE: 17, ROAD: 7, PAVEMENT: 8, TREE: 21, SIGN: 20, FENCE: 13}
TO_CITYSCAPES |= {CAR: 26, PEDESTRIAN: 24, BICYCLIST: 25, VOID: 0}


def _fill(
    img: np.ndarray, lab: np.ndarray, mask: np.ndarray, colour, cls: int, rng, tex: float = 8.0
) -> None:
    h, w = mask.shape
    base = np.asarray(colour, dtype=np.float32)[None, None, :] + rng.normal(0.0, tex, (h, w, 1))
    img[mask] = base[mask]
    lab[mask] = cls


def _jitter(rng: np.random.Generator, colour, amount: float = 25.0) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def render_scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 frame and its CamVid label map (0-10, 11 void)."""
    h, w = size
    img = np.zeros((h, w, 3), np.float32)
    lab = np.full((h, w), VOID, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    horizon = int(h * rng.uniform(0.38, 0.55))
    vanish_x = w * rng.uniform(0.35, 0.65)

    # sky: vertical gradient
    sky_top, sky_bottom = _jitter(rng, (110, 150, 215), 20), _jitter(rng, (190, 210, 235), 15)
    t = (yy / max(horizon, 1))[..., None]
    sky = sky_top * (1 - t) + sky_bottom * t + rng.normal(0.0, 3, (h, w, 1))
    m = yy < horizon
    img[m], lab[m] = sky[m], SKY

    # buildings: a skyline of blocks with window grids
    x = int(rng.integers(-10, 5))
    while x < w:
        bw = int(rng.integers(w // 8, w // 3))
        top = int(horizon - rng.uniform(0.15, 0.9) * horizon)
        block = (xx >= x) & (xx < x + bw) & (yy >= top) & (yy < horizon + 2)
        colour = rng.choice([(150, 90, 70), (170, 160, 150), (120, 110, 100), (200, 180, 150)])
        _fill(img, lab, block, _jitter(rng, colour, 20), BUILDING, rng, tex=6)
        step_y, step_x = int(rng.integers(6, 11)), int(rng.integers(6, 11))
        windows = block & ((yy - top) % step_y < step_y // 2) & ((xx - x) % step_x < step_x // 2)
        windows &= yy > top + 2
        img[windows] = _jitter(rng, (60, 70, 90), 15)
        x += bw + int(rng.integers(0, 6))

    # ground: road trapezoid towards the vanishing point, pavements on both sides
    below = yy >= horizon
    depth = np.clip((yy - horizon) / max(h - horizon, 1), 0, 1)
    half_road = (0.04 + 0.55 * depth) * w * rng.uniform(0.8, 1.1)
    road = below & (np.abs(xx - vanish_x) < half_road)
    pave = below & ~road
    _fill(img, lab, pave, _jitter(rng, (175, 165, 150), 15), PAVEMENT, rng, tex=5)
    tiles = pave & (((yy // 4) + (xx // 6)) % 2 == 0)
    img[tiles] *= 0.9
    _fill(img, lab, road, _jitter(rng, (85, 85, 90), 12), ROAD, rng, tex=6)
    dash = road & (np.abs(xx - vanish_x) < 0.6 + 2.0 * depth) & (((yy - horizon) // 5) % 2 == 0)
    img[dash] = (235, 235, 230)  # lane markings belong to Road, as in CamVid

    # fence along one pavement
    if rng.random() < 0.7:
        side = rng.choice([-1, 1])
        fence_top = horizon + int(rng.uniform(0.0, 0.12) * h)
        fence = pave & (yy >= fence_top) & (yy < fence_top + int(0.12 * h))
        fence &= (xx - vanish_x) * side > half_road + 4
        _fill(img, lab, fence, _jitter(rng, (120, 100, 80), 15), FENCE, rng, tex=4)
        slats = fence & (xx % 4 == 0)
        img[slats] *= 0.6

    # trees: trunk + noisy green crown
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0, w), horizon + rng.uniform(-0.05, 0.1) * h
        r = rng.uniform(0.07, 0.16) * h
        trunk = (np.abs(xx - cx) < max(1.5, r * 0.15)) & (yy > cy) & (yy < cy + r * 1.4)
        _fill(img, lab, trunk, _jitter(rng, (90, 60, 35), 10), TREE, rng, tex=5)
        crown = (xx - cx) ** 2 / 1.2 + (yy - cy + r * 0.6) ** 2 < r**2 * rng.uniform(0.8, 1.2)
        crown &= rng.random((h, w)) < 0.97
        _fill(img, lab, crown, _jitter(rng, (60, 120, 45), 20), TREE, rng, tex=18)

    # poles with sign symbols
    for _ in range(int(rng.integers(1, 3))):
        px = rng.uniform(0, w)
        base_y = horizon + rng.uniform(0.1, 0.35) * (h - horizon)
        top = base_y - rng.uniform(0.35, 0.6) * h
        pole = (np.abs(xx - px) < 1.2) & (yy > top) & (yy < base_y)
        _fill(img, lab, pole, _jitter(rng, (140, 140, 140), 10), POLE, rng, tex=4)
        if rng.random() < 0.8:
            s = rng.uniform(0.03, 0.06) * h
            sign = (np.abs(xx - px) < s) & (np.abs(yy - top - s) < s)
            colour = _jitter(rng, rng.choice([(210, 40, 40), (40, 80, 200), (230, 200, 40)]), 10)
            _fill(img, lab, sign, colour, SIGN, rng, tex=4)

    # cars on the road, far ones first so near ones overlap them
    for depth_v in sorted(rng.uniform(0.15, 0.95, int(rng.integers(1, 4)))):
        cy = horizon + depth_v * (h - horizon)
        scale = 0.1 + 0.9 * depth_v
        cw, ch = 0.28 * w * scale, 0.16 * h * scale + 3
        cx = vanish_x + rng.uniform(-0.8, 0.8) * (0.04 + 0.55 * depth_v) * w
        body = (np.abs(xx - cx) < cw / 2) & (yy > cy - ch) & (yy < cy)
        paint = rng.choice([(180, 30, 30), (30, 60, 160), (220, 220, 220), (40, 40, 40), (200, 170, 40)])
        _fill(img, lab, body, _jitter(rng, paint, 20), CAR, rng, tex=5)
        glass = body & (yy < cy - ch * 0.55) & (np.abs(xx - cx) < cw * 0.35)
        img[glass] = _jitter(rng, (50, 60, 80), 10)
        for wx in (cx - cw * 0.3, cx + cw * 0.3):
            wheel = (xx - wx) ** 2 + (yy - cy) ** 2 < (0.12 * cw) ** 2
            _fill(img, lab, wheel, (25, 25, 25), CAR, rng, tex=3)

    # pedestrians on the pavement and cyclists on the road
    for _ in range(int(rng.integers(0, 4))):
        d = rng.uniform(0.2, 1.0)
        fy = horizon + d * (h - horizon)
        ph = (0.12 + 0.3 * d) * h
        on_road = rng.random() < 0.35
        off = (0.04 + 0.55 * d) * w * (rng.uniform(0.2, 0.7) if on_road else rng.uniform(1.15, 1.6))
        px = vanish_x + rng.choice([-1, 1]) * off
        cls = BICYCLIST if on_road else PEDESTRIAN
        body = ((xx - px) ** 2 / (0.18 * ph) ** 2 + (yy - (fy - ph * 0.55)) ** 2 / (0.35 * ph) ** 2) < 1
        head = (xx - px) ** 2 + (yy - (fy - ph * 0.95)) ** 2 < (0.1 * ph) ** 2
        legs = (np.abs(xx - px) < 0.1 * ph) & (yy > fy - ph * 0.3) & (yy < fy)
        clothes = _jitter(rng, rng.choice([(200, 60, 60), (60, 60, 180), (60, 150, 60), (220, 200, 60)]), 30)
        _fill(img, lab, body | legs, clothes, cls, rng, tex=8)
        _fill(img, lab, head, _jitter(rng, (225, 180, 150), 20), cls, rng, tex=4)
        if on_road:
            for wx in (px - 0.3 * ph, px + 0.3 * ph):
                wheel = np.abs(np.hypot(xx - wx, yy - fy) - 0.18 * ph) < 1.0
                _fill(img, lab, wheel, (20, 20, 20), cls, rng, tex=2)

    # lighting, sensor noise, and a little void (e.g. an occluded corner)
    img = img * rng.uniform(0.7, 1.25) + rng.uniform(-15, 15, 3)[None, None, :]
    img += rng.normal(0.0, 4, (h, w, 1))  # sensor noise
    if rng.random() < 0.3:
        corner = (yy > h * 0.9) & (xx < w * rng.uniform(0.1, 0.3))
        img[corner], lab[corner] = 0, VOID
    return np.clip(img, 0, 255).astype(np.uint8), lab


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png_atomic(path, array)


def make_demo_dataset(
    root: str | Path,
    *,
    layout: str = "camvid",
    n_train: int = 160,
    n_val: int = 40,
    n_test: int = 0,
    size: tuple[int, int] = (120, 160),
    seed: int = 0,
) -> Path:
    """Write the demo data set under ``root`` unless one with the same manifest ``demo.json`` (seed, sizes,
    generator version) is there; returns ``root``. An older demo set's frames are replaced, other files
    left alone. About 60 frames/s at 120x160 on one CPU core."""
    if layout not in ("camvid", "cityscapes"):
        raise DataError(f"layout must be 'camvid' or 'cityscapes', got {layout!r}")
    h, w = (int(v) for v in size)
    if h < 32 or w < 32 or min(n_train, n_val, n_test) < 0:
        raise DataError(
            f"demo data needs sizes of at least 32x32 and counts >= 0, got {size}, {n_train}/{n_val}"
        )
    root = Path(root)
    manifest = {
        "generator": "fcn.data.demo",
        "version": VERSION,
        "layout": layout,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "size": [h, w],
        "seed": seed,
        "classes": list(CLASSES),
    }
    path = root / "demo.json"
    if path.is_file():
        with contextlib.suppress(ValueError):
            if json.loads(path.read_text()) == manifest:
                return root
        path.unlink()  # written last: a half-written set never looks complete
        for old in root.glob("**/demo_*.png"):  # frames of the previous demo set
            old.unlink()
    lut = np.zeros(256, np.uint8)
    lut[list(TO_CITYSCAPES)] = list(TO_CITYSCAPES.values())
    for k, (split, count) in enumerate(zip(("train", "val", "test"), (n_train, n_val, n_test))):
        for i in range(count):
            rng = np.random.default_rng([seed, 1_000_000 * k + i])
            image, label = render_scene(rng, (h, w))
            name = f"demo_{i:05d}"
            if layout == "camvid":
                _write(root / split / f"{name}.png", image)
                _write(root / f"{split}annot" / f"{name}.png", label)
            else:
                _write(root / "leftImg8bit" / split / "demo" / f"{name}_leftImg8bit.png", image)
                _write(root / "gtFine" / split / "demo" / f"{name}_gtFine_labelIds.png", lut[label])
    path.write_text(json.dumps(manifest, indent=2))
    return root
