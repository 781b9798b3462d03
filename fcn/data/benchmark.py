"""Data-pipeline throughput: read PNG + label, augment, normalise — per worker and through a DataLoader."""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fcn.data.camvid import CamVid
from fcn.data.datamodule import seed_worker
from fcn.data.demo import make_demo_dataset
from fcn.data.transforms import train_transform


def pipeline_images_per_second(ds: CamVid, *, n: int = 100) -> float:
    """In-process (one worker's) rate of ``ds[i]``: decode both PNGs, augment, normalise, to tensors."""
    n = min(n, len(ds))
    ds[0]  # warm-up (first decode, albumentations setup)
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - t0)


def epoch_seconds(ds: CamVid, *, batch_size: int = 8, num_workers: int = 2) -> float:
    """Wall time of one pass over ``ds`` through a shuffling DataLoader (workers started inside)."""
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(0),
    )
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-root", type=Path, default=None, help="CamVid (SegNet layout); default: demo data")
    p.add_argument("--crop", nargs=2, type=int, default=[360, 480], metavar=("H", "W"))
    p.add_argument("--n", type=int, default=100, help="images timed in-process")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a loader worker's setting
    root = args.data_root
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="fcn-demo-"))
        make_demo_dataset(root, n_train=120, n_val=0, size=(360, 480))
    tf = train_transform(crop_size=args.crop, scale_range=(0.5, 2.0))
    ds = CamVid(root, "train", transform=tf)
    ips = pipeline_images_per_second(ds, n=args.n)
    sec = epoch_seconds(ds, batch_size=args.batch_size, num_workers=args.workers)
    print(f"data: {root} train ({len(ds)} images), crop {args.crop[0]}x{args.crop[1]}")
    print(f"train pipeline, one worker: {ips:.1f} images/s")
    print(
        f"one epoch through the DataLoader ({args.workers} workers, batch {args.batch_size}): {sec:.2f} s "
        f"= {len(ds) / sec:.1f} images/s"
    )
    return 0
