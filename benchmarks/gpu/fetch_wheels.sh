#!/usr/bin/env bash
# What run.sh installs on the bare GPU machine (it has torch, numpy, safetensors, huggingface_hub, regex,
# requests, filelock and Pillow, but not diffusers). Run here, where pip reaches an index. The wheels are
# unpacked and packed again as one xz tarball, benchmarks/gpu/wheels/site.tar.xz (about 2 MB against
# 6.4 MB of wheels: the device tool's 64 MiB limit on what travels is nearly filled by the repo's tracked
# files, the zoo weights above all). The folder is git-ignored; name it in the device tool's
# `carry: ["benchmarks/gpu/wheels"]`.
set -euo pipefail
dest="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/wheels"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: -d "$work/whl" "diffusers==${DIFFUSERS_VERSION:-0.42.1}" importlib_metadata
mkdir -p "$work/site" "$dest"
python3 - "$work/whl" "$work/site" <<'PY'
import sys, zipfile, pathlib
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    zipfile.ZipFile(wheel).extractall(sys.argv[2])
    print("unpacked", wheel.name)
PY
rm -f "$dest"/*.whl
tar -cJf "$dest/site.tar.xz" -C "$work/site" .
ls -la "$dest"
