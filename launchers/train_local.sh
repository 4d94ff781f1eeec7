#!/usr/bin/env bash
# Single-node training without SLURM: NPROC processes (one per GPU; gloo on CPU) under torchrun.
# usage: launchers/train_local.sh NPROC RECIPE.yaml [key=value ...]
# Every argument after NPROC reaches the trainer unchanged ("$@"), spaces and quotes included.
# The exit status is the run's (0 completed, 2 config refused, 3 aborted, 75 preempted with a
# checkpoint), where torchrun alone would exit 1 for any non-zero worker; a stop signal sent here
# reaches the workers once. See lspretrain/launch/local.py and docs/LAUNCH.md.
set -euo pipefail
exec python3 -m lspretrain.launch.local "$@"
