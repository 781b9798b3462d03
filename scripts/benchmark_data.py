#!/usr/bin/env python
"""Data-pipeline throughput (read PNG + label, augment, normalise) per worker and per epoch."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fcn.data.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
