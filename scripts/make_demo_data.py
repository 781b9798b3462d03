#!/usr/bin/env python
"""Write the synthetic street-scene demo data set (CamVid or Cityscapes layout)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fcn.data.demo import make_demo_dataset

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", default="data/demo")
    p.add_argument("--layout", choices=["camvid", "cityscapes"], default="camvid")
    p.add_argument("--n-train", type=int, default=160)
    p.add_argument("--n-val", type=int, default=40)
    p.add_argument("--n-test", type=int, default=0)
    p.add_argument("--size", nargs=2, type=int, default=[120, 160], metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    root = make_demo_dataset(
        a.root,
        layout=a.layout,
        n_train=a.n_train,
        n_val=a.n_val,
        n_test=a.n_test,
        size=tuple(a.size),
        seed=a.seed,
    )
    print(f"demo data set in {root}")
