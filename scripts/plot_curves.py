#!/usr/bin/env python
"""Plot val mIoU and train loss of several CSVLogger runs against epoch into one PNG (see fcn/curves.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fcn.cli import plot_curves_main

if __name__ == "__main__":
    sys.exit(plot_curves_main())
