#!/usr/bin/env python
"""Distil a draft model for a target: thin wrapper around `rsd_bench.distill.main` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rsd_bench.distill import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
