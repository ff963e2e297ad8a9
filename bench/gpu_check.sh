#!/usr/bin/env bash
# The device check: everything the project claims about a GPU, measured in one short run, written into OUT_DIR.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# On a machine with CUDA and the project installed it finishes in under 10 minutes (its parts' limits add up to 550 s);
# without CUDA it runs the same code as a CPU smoke run (tiny preset, tiny kernel shapes, under 5 minutes;
# tests/test_gpu_check.py runs it, so this script cannot rot). It leaves eight files (what the device tool brings
# back): summary.md (the device, the versions, each part's exit code and time, every figure against its goal, then
# every part's output), memory-<device>.csv/.png (bench/bench_memory.py), kernels-<device>.csv/.png
# (bench/bench_kernels.py), step-<device>.csv/.png (bench/bench_step.py) and dequant-<device>.csv
# (bench/bench_dequant.py).
# Each part runs under its own time limit, so a part that fails or hangs still leaves the others' results.
#
# bitsandbytes on a GPU machine that lacks it: its 0.50.2 manylinux wheel carries its CUDA library. Where pip can
# reach PyPI, in the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# then, on the GPU machine, with .whl/ copied there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 -m pip install -q --no-deps --no-build-isolation -e .
set -u
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
: > "$out/parts.txt"
: > "$out/logs.txt"
rm -f "$out/summary.md"             # the logs are appended to it: never to an earlier run's
smoke="" steps=3 graphs=tiny,reduced budgets=24G,6G,3G,2G dequant="--tokens 512,2048,4096 --repeats 10" stretch=1
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    # the smoke run's limits only catch a hang: its parts share two busy cores, so they get three times as long
    smoke="--smoke" steps=1 graphs=tiny budgets=24G,2G dequant="--scale 16 --tokens 64 --repeats 1" stretch=3
    export TRITON_INTERPRET=1      # Triton runs on the CPU only through its interpreter
fi

part() {   # part NAME SECONDS COMMAND...: run it under its limit; its log, exit code and time go to its own files
    local name=$1 limit=$(( $2 * stretch )) start rc
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee "$out/log-$name.txt"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >> "$out/log-$name.txt" 2>&1
    rc=$?
    echo "$name $rc $(( $(date +%s) - start ))" > "$out/part-$name.txt"
    echo "   $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$out/log-$name.txt"
}
# On a GPU the parts run one after another: each times the device alone. The CPU smoke run times nothing that
# counts, so there they run side by side, a thread each (the suite runs it: a minute saved there).
if [ -n "$smoke" ]; then
    export OMP_NUM_THREADS=1
    launch() { "$@" & }
else
    launch() { "$@"; }
fi

python3 bench/gpu_summary.py --versions > "$out/versions.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv \
    >> "$out/versions.txt" 2>/dev/null
cat "$out/versions.txt"
launch part gpu-tests 110 python3 -m pytest -q -m gpu -p no:cacheprovider
launch part memory 150 python3 bench/bench_memory.py --budgets $budgets --steps $steps --out "$out" $smoke
launch part kernels 120 python3 bench/bench_kernels.py --quick --out "$out" $smoke
launch part step 70 python3 bench/bench_step.py --graphs $graphs --repeats $steps --out "$out"
launch part dequant 40 python3 bench/bench_dequant.py $dequant --out "$out"
launch part calibrate 60 python3 bench/calibrate.py $smoke     # the device profile: in the cache root and the log
wait
for name in gpu-tests memory kernels step dequant calibrate; do      # the logs and the parts' lines, in this order
    cat "$out/log-$name.txt" >> "$out/logs.txt" 2>/dev/null
    cat "$out/part-$name.txt" >> "$out/parts.txt" 2>/dev/null
    rm -f "$out/log-$name.txt" "$out/part-$name.txt"
done
python3 bench/gpu_summary.py "$out" $smoke > /dev/null 2>> "$out/logs.txt" || echo "summary failed: see its logs"
# The device tool brings back 8 files: the logs go at the end of summary.md.
{ printf '\n## Every part'"'"'s output\n\n````\n'; cat "$out/logs.txt"; printf '````\n'; } >> "$out/summary.md"
rm -f "$out/versions.txt" "$out/parts.txt" "$out/logs.txt" "$out"/*.tmp   # in summary.md; a killed write
echo "summary: $out/summary.md"
