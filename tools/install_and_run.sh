#!/usr/bin/env bash
# Install glag and everything it needs, then run the whole pipeline on the default data
# (Fashion-MNIST-LT): stage one with GraLoss, feature extraction, AFG stage two.
# Needs root (or sudo) for the one apt package; pip installs into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${GLAG_DATA_ROOT:-}" ]; then
  $SUDO apt-get update
  $SUDO apt-get install -y dataset-fashion-mnist
fi
# torch is pinned to the CPU build in setup.py; everything else comes from setup.py too.
python -m pip install -e .

if [ "${GLAG_SKIP_PIPELINE:-0}" != "1" ]; then
  python tools/pipeline.py --out "${GLAG_PIPELINE_OUT:-runs/pipeline}" "$@"
fi
