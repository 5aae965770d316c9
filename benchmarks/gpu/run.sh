#!/usr/bin/env bash
# The GPU measurement of the seed architectures at full size (see benchmarks/README.md, "Full size on a GPU").
#
#   bash benchmarks/gpu/run.sh                                  # on the GPU machine: full size, cuda, results in $OUT
#   bash benchmarks/gpu/run.sh --size tiny --device cpu --out /tmp/gpu-tiny   # the same script, tiny, on a CPU
#
# The GPU machine has torch but not diffusers: it is installed from wheels carried along, from
# $DITSCOPE_WHEELS or benchmarks/gpu/wheels: site.tar.xz (made here by benchmarks/gpu/fetch_wheels.sh) or
# diffusers-*.whl; name the folder in the device tool's `carry`. Other arguments go to measure.py.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${PYTHON:-python3}"
out="${OUT:-$root/gpu-results}"
for a in "$@"; do [ "${prev:-}" = "--out" ] && out="$a"; prev="$a"; done
mkdir -p "$out"

if ! "$py" -c "import diffusers" 2>/dev/null; then
    wheels="${DITSCOPE_WHEELS:-$here/wheels}"
    mkdir -p /tmp/ditscope-site
    if [ -f "$wheels/site.tar.xz" ]; then          # made by fetch_wheels.sh
        tar -xJf "$wheels/site.tar.xz" -C /tmp/ditscope-site || { echo "unpacking $wheels/site.tar.xz failed" >&2; exit 2; }
    elif ls "$wheels"/diffusers-*.whl >/dev/null 2>&1; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ditscope-site "$wheels"/*.whl \
            || { echo "installing the carried wheels failed" >&2; exit 2; }
    else
        echo "diffusers is not installed and $wheels has neither site.tar.xz nor a diffusers wheel (run benchmarks/gpu/fetch_wheels.sh here first)" >&2
        exit 2
    fi
    export PYTHONPATH="/tmp/ditscope-site${PYTHONPATH:+:$PYTHONPATH}"
    "$py" -c "import diffusers; print('diffusers', diffusers.__version__, 'from', diffusers.__file__)" || exit 2
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{ date -u; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$out/env.txt" 2>&1
# a hard stop a little under the machine's 10-minute limit; rows already written stay in the CSV
timeout "${DITSCOPE_GPU_TIMEOUT:-570}" "$py" "$here/measure.py" --out "$out" "$@" 2>&1 | tee "$out/run.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "run.sh: stopped by the ${DITSCOPE_GPU_TIMEOUT:-570}s timeout; the CSV has the architectures that finished" | tee -a "$out/run.log"
exit "$rc"
