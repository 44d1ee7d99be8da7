#!/usr/bin/env bash
# Create a venv with torch 2.1.2, gradxform's declared floor (docs/support.md), the cheapest honest way:
# the registry has only the CUDA build, whose `import torch` loads the CUDA libraries even without a
# GPU, so it installs torch and exactly the twelve nvidia-* wheels torch 2.1.2 pins (no triton: it only
# compiles GPU kernels), all with --no-deps, then numpy<2, the pure-Python dependencies and the test
# tools. About 2.4 GB of wheels, a 4.6 GB venv.
#
# Usage: .ci/floor_venv.sh VENV_DIR
# Wheels are downloaded into ${GX_WHEEL_CACHE:-$HOME/.cache/gradxform/wheels}; files already there are
# reused (pip download skips them), so a warm cache saves the download but is never required.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$1"
wheels="${GX_WHEEL_CACHE:-$HOME/.cache/gradxform/wheels}"
py="$(command -v python3.11 || command -v python3)"
case "$("$py" -c 'import sys; print(sys.version_info[:2] <= (3, 11))')" in
  True) ;;
  *) echo "floor venv: torch 2.1.2 has wheels for Python 3.8-3.11 only; $py is newer" >&2; exit 1 ;;
esac
mkdir -p "$wheels"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
pins=(torch==2.1.2
  nvidia-cuda-nvrtc-cu12==12.1.105 nvidia-cuda-runtime-cu12==12.1.105 nvidia-cuda-cupti-cu12==12.1.105
  nvidia-cudnn-cu12==8.9.2.26 nvidia-cublas-cu12==12.1.3.1 nvidia-cufft-cu12==11.0.2.54
  nvidia-curand-cu12==10.3.2.106 nvidia-cusolver-cu12==11.4.5.107 nvidia-cusparse-cu12==12.1.0.106
  nvidia-nccl-cu12==2.18.1 nvidia-nvtx-cu12==12.1.105 nvidia-nvjitlink-cu12==12.1.105)
"$venv/bin/pip" download --quiet --no-deps --only-binary=:all: -d "$wheels" "${pins[@]}"
# install exactly the pinned files from the wheel directory (it may hold other versions too)
"$venv/bin/pip" install --quiet --no-deps --no-index --find-links "$wheels" "${pins[@]}"
"$venv/bin/pip" install --quiet filelock typing-extensions sympy networkx jinja2 fsspec "numpy<2" \
  optree pytest hypothesis scikit-learn
"$venv/bin/pip" install --quiet --no-deps -e .
"$venv/bin/python" -c "import torch, gradxform; print('floor venv: torch', torch.__version__, '| gradxform', gradxform.__version__)"
