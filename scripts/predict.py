#!/usr/bin/env python
"""Batch inference over images, folders, globs or path lists. See `python scripts/predict.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fcn.cli import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
