#!/usr/bin/env bash
# The README's main job (lspretrain/demo.py: DINOv2 on Fashion-MNIST, tiny ViT, CPU).
# On first use installs what it needs: Debian's dataset-fashion-mnist (the images) and
# lspretrain with its Python dependencies (torch pinned to 2.13.0 CPU by constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CONSTRAINT="$PWD/constraints.txt"
if ! python3 -c "import lspretrain, torch, fvcore, deepspeed, webdataset" 2>/dev/null; then
  echo "[demo] installing lspretrain and its dependencies (torch 2.13.0 CPU) ..."
  python3 -m pip install -q torch==2.13.0
  python3 -m pip install -q -e '.[test]'
fi
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[demo] installing Debian's dataset-fashion-mnist ..."
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
exec python3 -m lspretrain.demo "$@"
