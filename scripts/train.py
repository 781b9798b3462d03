#!/usr/bin/env python
"""Train, validate or test with LightningCLI; no arguments runs the CPU demo."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fcn.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
