#!/usr/bin/env python
"""Speed, FLOPs and memory of the registered models. See `python scripts/benchmark.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fcn.cli import benchmark_main

if __name__ == "__main__":
    sys.exit(benchmark_main())
