#!/usr/bin/env bash
# The README's main job. Installs lspretrain (torch pinned to 2.13.0 CPU by constraints.txt)
# when it is not importable yet, then runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CONSTRAINT="$PWD/constraints.txt"
if ! python3 -c "import lspretrain, torch, fvcore" 2>/dev/null; then
  echo "[demo] installing lspretrain and its dependencies (torch 2.13.0 CPU) ..."
  python3 -m pip install -q torch==2.13.0
  python3 -m pip install -q -e '.[test]'
fi
exec python3 tools/report.py --arch vit_large_patch14 --spec paper --compare none --img-size 224 98 "$@"
