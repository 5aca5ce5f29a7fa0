#!/usr/bin/env bash
# The CUDA path on a GPU machine, in one go (docs/performance.md, "GPU"):
#   bash bench/gpu_check.sh        # from a checkout; writes log.txt and results.tsv to $OUT
#                                  # (or gpu-out/); PYTHON=... picks another interpreter
# Uses the machine's python3 (its torch must see the GPU). Wheels of what that python lacks
# (pyzmq, cryptography, opacus, ...) may sit in .whl/ and are installed to /tmp/site.
# Steps, most important first, each bounded in time: the CUDA tests (every topology's demo
# on the GPU, split == central on the GPU), the demo on GPU and CPU, the pinned-copy
# measurement, the bench's overhead section on the GPU, then CPU benches for comparison.
set -uo pipefail
out=${OUT:-gpu-out}
py=${PYTHON:-$(command -v python3)}
mkdir -p "$out"
tmp=$(mktemp -d)
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
script="$(dirname "$py")/sl-pipeline" # the console script, as `pip install` would make it
[ -x "$script" ] || printf '#!%s\nfrom workers.cli import console\nconsole()\n' "$py" >"$script"
chmod +x "$script"

step() { # step NAME SECONDS COMMAND...: run bounded; log its output; keep its JSON line
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout "$limit" "$@" >"$tmp/$name.out" 2>"$tmp/$name.err"
    rc=$?
    echo "== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/log.txt"
    {
        echo "-- stderr (tail)"
        tail -c 2500 "$tmp/$name.err"
        echo "-- stdout (tail)"
        tail -c 2500 "$tmp/$name.out"
    } >>"$out/log.txt"
    grep '^{' "$tmp/$name.out" | tail -1 | sed "s/^/$name\t/" >>"$out/results.tsv"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$py" -c 'import torch; print("torch", torch.__version__, torch.version.cuda, torch.cuda.is_available())'
    echo "cores $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg)"
} 2>&1 | tee -a "$out/log.txt"
step pytest_cuda 200 "$py" -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda.py
grep -E "passed|failed|error|skipped" "$tmp/pytest_cuda.out" | tail -3
step demo_cuda 120 "$script" demo --device cuda --json
step demo_cpu 120 "$script" demo --device cpu --json
step gpu_copy 90 "$py" -m bench.gpu_copy
step bench_cuda 150 "$py" -m bench --quick --json --only overhead --device cuda
for i in 1 2 3; do step "bench_crypto_$i" 60 "$py" -m bench --quick --json --only crypto_rt; done
step bench_cpu 150 "$py" -m bench --quick --json --only overhead
cut -c1-600 "$out/results.tsv"
rm -rf "$tmp"
