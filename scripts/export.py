#!/usr/bin/env python
"""Export a checkpoint to ONNX or TorchScript with a parity check. See `python scripts/export.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fcn.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
