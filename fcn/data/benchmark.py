"""Data-pipeline throughput: read PNG + label, augment, normalise — per worker and through a DataLoader.

``python scripts/benchmark_data.py [--data-root data/camvid]`` (default: demo data generated at 360x480).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import torch
from torch.utils.data import DataLoader

from fcn.data.base import SegmentationDataset, apply_transform
from fcn.data.camvid import CamVid
from fcn.data.datamodule import collate, seed_worker
from fcn.data.demo import make_demo_dataset
from fcn.data.transforms import train_transform


def stage_milliseconds(ds: SegmentationDataset, *, n: int = 100) -> dict[str, float]:
    """Mean in-process (one worker's) milliseconds per ``ds[i]`` of its two stages: ``load`` (decode both
    PNGs, label table) and ``augment`` (transform, to tensors)."""
    n = min(n, len(ds))
    ds[0]  # warm-up (first decode, albumentations setup)
    load = augment = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        image, mask = ds.load(i)
        t1 = time.perf_counter()
        apply_transform(ds.transform, image, mask)  # ds[i] is these two steps
        load, augment = load + t1 - t0, augment + time.perf_counter() - t1
    return {"load": 1000 * load / n, "augment": 1000 * augment / n}


def epoch_seconds(ds: SegmentationDataset, *, batch_size: int = 8, num_workers: int = 2) -> float:
    """Wall time of one pass over ``ds`` through a shuffling DataLoader (starting the workers included)."""
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(0),
        collate_fn=collate,
    )
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def run(
    root: Path, *, crop: Sequence[int], n: int, workers: int, batch_size: int
) -> dict[str, float | int | str]:
    """All figures for the train split of a CamVid-layout data set at ``root``."""
    ds = CamVid(root, "train", transform=train_transform(crop_size=crop, scale_range=(0.5, 2.0)))
    h, w = ds.load(0)[0].shape[:2]
    ms = stage_milliseconds(ds, n=n)
    sec = epoch_seconds(ds, batch_size=batch_size, num_workers=workers)
    return {
        "data": str(root),
        "images": len(ds),
        "image_size": f"{h}x{w}",
        "crop": f"{crop[0]}x{crop[1]}",
        "load_ms": round(ms["load"], 2),
        "augment_ms": round(ms["augment"], 2),
        "images_per_second_one_worker": round(1000 / (ms["load"] + ms["augment"]), 1),
        "workers": workers,
        "batch_size": batch_size,
        "epoch_seconds": round(sec, 3),
        "epoch_images_per_second": round(len(ds) / sec, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=None, help="CamVid (SegNet layout); default: demo data")
    p.add_argument("--crop", nargs=2, type=int, default=[360, 480], metavar=("H", "W"))
    p.add_argument("--n", type=int, default=100, help="images timed in-process")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--demo-images", type=int, default=120, help="demo frames generated without --data-root")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # what a loader worker gets
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory(prefix="fcn-demo-") as tmp:
        root = args.data_root
        if root is None:
            root = make_demo_dataset(Path(tmp), n_train=args.demo_images, n_val=0, size=(360, 480))
        r = run(root, crop=args.crop, n=args.n, workers=args.workers, batch_size=args.batch_size)
    print(f"data: {r['data']} train ({r['images']} images of {r['image_size']}), crop {r['crop']}")
    print(f"per image: load (2 PNG decodes + label table) {r['load_ms']} ms, augment {r['augment_ms']} ms")
    print(f"train pipeline, one worker: {r['images_per_second_one_worker']} images/s")
    print(
        f"one epoch through the DataLoader ({r['workers']} workers, batch {r['batch_size']}): "
        f"{r['epoch_seconds']} s = {r['epoch_images_per_second']} images/s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0
