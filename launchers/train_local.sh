#!/usr/bin/env bash
# Single-node training without SLURM: NPROC processes (one per GPU; gloo on CPU) under torchrun.
# usage: launchers/train_local.sh NPROC RECIPE.yaml [key=value ...]
# Every argument after NPROC reaches the trainer unchanged ("$@"), spaces and quotes included.
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 NPROC RECIPE.yaml [key=value ...]" >&2
    exit 2
fi
nproc=$1
shift
# --standalone: a private rendezvous on a free local port, so two runs on one machine do not clash.
exec torchrun --standalone --nproc-per-node "$nproc" -m lspretrain.train "$@"
