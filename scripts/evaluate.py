#!/usr/bin/env python
"""Evaluate a checkpoint on a data split and write a report directory."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fcn.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
