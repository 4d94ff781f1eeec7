#!/usr/bin/env python
"""Submit a training run to SLURM through submitit; see docs/LAUNCH.md and ``--help``."""
import sys

from lspretrain.launch.submit import main

if __name__ == "__main__":
    sys.exit(main())
