#!/usr/bin/env bash
# The wheels run.sh installs on the bare GPU machine (it has torch, numpy, safetensors, huggingface_hub,
# regex, requests, filelock, Pillow, but not diffusers). Run here, where pip reaches an index; the folder
# is git-ignored and travels with the device tool's `carry: ["benchmarks/gpu/wheels"]` (about 6.5 MB).
set -euo pipefail
dest="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/wheels"
mkdir -p "$dest"
python3 -m pip download --no-deps --only-binary=:all: -d "$dest" "diffusers==${DIFFUSERS_VERSION:-0.42.1}" importlib_metadata
ls -la "$dest"
