#!/usr/bin/env bash
# One command per step for a GPU session (H100/H200 lent through the device tool), run from the
# repository root on the device machine:
#
#     bash benchmarks/run_gpu.sh <step>
#
# Steps (each fits one 600 s command: every command runs under `timeout` with what is left of a
# 590 s budget for the whole step, setup included):
#
#   check            nvidia-smi, versions, tests/test_triton_cuda.py (compiled kernels on the GPU)
#   check-interp     tests/test_triton_kernels.py (the interpreter tests, as in CI; own process:
#                    whichever file imports the kernels first decides compiled vs interpreted)
#   kernels-quick    bench_kernels.py --quick (4096x4096, M 1 and 16, 2 and 4 bits)
#   kernels-<i>      bench_kernels.py, the full grid for shape i (all M, all bits):
#                      1 = 4096x4096, 2 = 4096x14336, 3 = 14336x4096, 4 = 8192x8192, 5 = 28672x8192
#   kernels-<i>a     shape i, bits 1,1.58,2 (+ bf16 and torchao int4 baselines)
#   kernels-<i>b     shape i, bits 3,4 (+ bf16 baseline; no int4)
#                    (a cold machine compiles ~100 Triton kernels per bit width: use the a/b
#                    halves first, whole shapes once the Triton cache is warm)
#   decode-tiny      bench_decode.py --tiny on the GPU (bf16, int4, pq2): a 1-minute flow check
#   decode-<n>       bench_decode.py on Llama-3-8B, split as its docstring says (subsets of
#                    --variants, each merging the previous part's JSON):
#                      1 = bf16,int4   2 = pq4,pq3   3 = pq2,pq1.58   4 = pq1
#   decode-<list>    any comma list of bf16, int4, paretoq, pq4, pq3, pq2, pq1.58, pq1
#   sass             kernel_sass.py: default configs (bits 1,2,3,4, M 1 and 16) and every M=1
#                    2-bit autotune candidate, sm_90
#
# Outputs go to benchmarks/results/ (the scripts name them by device and date) together with a log
# of the step (run_gpu_<step>_<device>_<date>.log); when $OUT is set (the device tool), the files of
# this step are also copied there (at most 8). The kernels steps also write the autotuner's choices
# (triton_configs_<device>_<step>_<date>.json, bench_kernels.py --save-configs): merge the parts
# with paretoq_ao.triton_kernels.load_configs + save_configs into triton_kernels/configs/<gpu>.json
# to ship them (shipped files that list the GPU are loaded before tuning, so the benchmarks then
# reuse them instead of tuning). decode-<n> merges the newest
# benchmarks/results/bench_decode_<device>_gpu_*.json: copy the files each part returns into
# benchmarks/results/ here before running the next part.
#
# Setup, done by every step: TRITON_INTERPRET is unset; wheels in .whl/ (WHEEL_DIR), e.g. torchao
# 0.18.0 (paretoq_ao imports it; the GPU image has none), are installed into /tmp/site and put on
# PYTHONPATH (carry .whl with the run); the project is installed editable without dependencies if
# `import paretoq_ao.triton_kernels` fails. Environment knobs: PYTHON (python3), PEAK_TBPS
# (detected from the GPU name: H200 4.8, H100 PCIe 2.0, else 3.35), EXTRA_ARGS (appended to the
# benchmark command), PYTEST_WORKERS (pytest-xdist workers for check, 4; 0 = serial),
# RUN_GPU_BUDGET_S (590).
set -euo pipefail

SHAPES=(4096x4096 4096x14336 14336x4096 8192x8192 28672x8192)
DECODE_PARTS=("bf16,int4" "pq4,pq3" "pq2,pq1.58" "pq1")

usage() {
    cat >&2 <<'EOF'
usage: bash benchmarks/run_gpu.sh <step>

steps:
  check                     GPU tests (tests/test_triton_cuda.py)
  check-interp              interpreter tests (tests/test_triton_kernels.py)
  kernels-quick             bench_kernels.py --quick
  kernels-1 .. kernels-5    bench_kernels.py full grid, one shape each:
                            1=4096x4096 2=4096x14336 3=14336x4096 4=8192x8192 5=28672x8192
  kernels-1a .. kernels-5a  one shape, bits 1,1.58,2 (+ bf16, int4 baselines)
  kernels-1b .. kernels-5b  one shape, bits 3,4 (+ bf16 baseline)
  decode-tiny               bench_decode.py --tiny (flow check on the GPU)
  decode-1 .. decode-4      bench_decode.py Llama-3-8B parts: 1=bf16,int4 2=pq4,pq3
                            3=pq2,pq1.58 4=pq1 (each merges the newest earlier part's JSON)
  decode-<list>             bench_decode.py --variants <list> (bf16,int4,paretoq,pq4,pq3,pq2,pq1.58,pq1)
  sass                      kernel_sass.py static SASS reports (sm_90)

The full kernel grid does not fit one 600 s command: run kernels-1 .. kernels-5 (or their a/b halves).
EOF
    exit 2
}

# ------------------------------------------------------------------------------------------------
# The step (validated before anything else runs)
# ------------------------------------------------------------------------------------------------

[ $# -eq 1 ] || usage
STEP="$1"
KIND=""
SHAPE=""
BITS=""
VARIANTS=""
case "$STEP" in
    check | check-interp | kernels-quick | decode-tiny | sass) KIND="$STEP" ;;
    kernels-[1-5] | kernels-[1-5][ab])
        KIND="kernels"
        i="${STEP#kernels-}"
        SHAPE="${SHAPES[$(( ${i:0:1} - 1 ))]}"
        case "$i" in
            *a) BITS="1,1.58,2" ;;
            *b) BITS="3,4" ;;
        esac
        ;;
    decode-[1-4])
        KIND="decode"
        VARIANTS="${DECODE_PARTS[$(( ${STEP#decode-} - 1 ))]}"
        ;;
    decode-?*)
        KIND="decode"
        VARIANTS="${STEP#decode-}"
        IFS=',' read -r -a _items <<< "$VARIANTS"
        for v in "${_items[@]}"; do
            case "$v" in
                bf16 | int4 | paretoq | pq4 | pq3 | pq2 | pq1.58 | pq1) ;;
                *) echo "run_gpu.sh: unknown decode variant '$v' in step '$STEP'" >&2; usage ;;
            esac
        done
        ;;
    *) echo "run_gpu.sh: unknown step '$STEP'" >&2; usage ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
RESULTS="$ROOT/benchmarks/results"
PY="${PYTHON:-python3}"
BUDGET_S="${RUN_GPU_BUDGET_S:-590}"
START="$(date +%s)"
STAMP="$(date +%Y%m%d-%H%M%S)"
WHEEL_DIR="${WHEEL_DIR:-.whl}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
mkdir -p "$RESULTS"
STEP_SAFE="$(printf '%s' "$STEP" | tr -c 'A-Za-z0-9._-' '_')"

# The GPU (names the log and the results; sets the peak bandwidth of the reports).
GPU_INFO="$("$PY" - <<'EOF' || true
import re
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    slug = re.sub(r"[^a-z0-9]+", "-", p.name.lower()).strip("-")
    print(slug, p.multi_processor_count, p.name)
EOF
)"
read -r SLUG SMS GPU_NAME <<< "$GPU_INFO" || true
if [ -z "${SLUG:-}" ]; then
    echo "run_gpu.sh: no CUDA device ($PY: torch.cuda.is_available() is False or torch is missing);" \
        "this script is for the GPU machine" >&2
    exit 1
fi
if [ -z "${PEAK_TBPS:-}" ]; then
    case "$GPU_NAME" in
        *H200*) PEAK_TBPS=4.8 ;;
        *H100*PCIe*) PEAK_TBPS=2.0 ;;
        *) PEAK_TBPS=3.35 ;;
    esac
fi
LOG="$RESULTS/run_gpu_${STEP_SAFE}_${SLUG}_${STAMP}.log"
MARK="$(mktemp)"  # files in benchmarks/results newer than this belong to this step

left_s() { echo $(( START + BUDGET_S - $(date +%s) )); }

# Print the step, the date and the exact command, then run it under what is left of the budget.
run_cmd() {
    local left
    left="$(left_s)"
    if [ "$left" -lt 15 ]; then
        echo "== [$STEP] $(date -Iseconds): only ${left}s left of ${BUDGET_S}s, not starting: $*"
        return 124
    fi
    echo
    echo "== [$STEP] $(date -Iseconds)"
    echo "+ timeout -k 5 $left $*"
    timeout -k 5 "$left" "$@"
}

setup() {
    unset TRITON_INTERPRET
    export PYTHONUNBUFFERED=1
    if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
        if [ ! -f /tmp/site/.run_gpu_installed ] || [ "$WHEEL_DIR" -nt /tmp/site/.run_gpu_installed ]; then
            run_cmd "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target /tmp/site "$WHEEL_DIR"/*.whl
            mkdir -p /tmp/site && touch /tmp/site/.run_gpu_installed
        fi
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if ! "$PY" -c "import paretoq_ao.triton_kernels" >/dev/null 2>&1; then
        if ! "$PY" -c "import torchao" >/dev/null 2>&1; then
            echo "run_gpu.sh: torchao is not installed (paretoq_ao imports it). Carry its wheel: here," >&2
            echo "  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\" >&2
            echo "    --implementation cp --platform manylinux_2_28_x86_64 -d .whl torchao==0.18.0" >&2
            echo "  (with /.whl/ in .git/info/exclude), and run with carry=['.whl']." >&2
            exit 1
        fi
        run_cmd "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
    fi
    "$PY" -c "import paretoq_ao.triton_kernels" || {
        echo "run_gpu.sh: paretoq_ao.triton_kernels still cannot be imported" >&2; exit 1; }
}

step_check() {
    local rc=0 xdist=()
    run_cmd nvidia-smi || rc=$?
    run_cmd "$PY" - <<'EOF' || rc=$?
import platform, sys
import torch, triton
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("triton", triton.__version__)
try:
    import torchao
    print("torchao", torchao.__version__)
except Exception as e:  # noqa: BLE001
    print("torchao unavailable:", type(e).__name__, e)
p = torch.cuda.get_device_properties(0)
print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
      round(p.total_memory / 2**30, 1), "GiB")
import paretoq_ao.triton_kernels as tk
print("paretoq_ao.triton_kernels from", tk.__file__)
EOF
    if [ "${PYTEST_WORKERS:-4}" != 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
        xdist=(-n "${PYTEST_WORKERS:-4}")
    fi
    # The interpreter tests run in their own step (check-interp): whichever test file imports
    # paretoq_ao.triton_kernels first decides whether the kernels are compiled or interpreted for
    # the whole process, and both files together may not fit one 600 s command.
    run_cmd "$PY" -m pytest -q -p no:cacheprovider -rs --durations=15 ${xdist[@]+"${xdist[@]}"} \
        tests/test_triton_cuda.py || rc=$?
    return "$rc"
}

step_check_interp() {
    local xdist=()
    if [ "${PYTEST_WORKERS:-4}" != 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
        xdist=(-n "${PYTEST_WORKERS:-4}")
    fi
    run_cmd "$PY" -m pytest -q -p no:cacheprovider -x ${xdist[@]+"${xdist[@]}"} tests/test_triton_kernels.py
}

step_kernels() {
    # --save-configs: the configs the autotuner chose, to ship as triton_kernels/configs/<gpu>.json
    local args=(--peak-tbps "$PEAK_TBPS" --out-dir "$RESULTS"
                --save-configs "$RESULTS/triton_configs_${SLUG}_${STEP_SAFE}_${STAMP}.json")
    if [ "$KIND" = kernels-quick ]; then
        args+=(--quick)
    else
        args+=(--shapes "$SHAPE")
        [ -n "$BITS" ] && args+=(--bits "$BITS")
        [ "$BITS" = "3,4" ] && args+=(--no-int4)
    fi
    run_cmd "$PY" benchmarks/bench_kernels.py "${args[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
}

step_decode() {
    local args=(--peak-tbps "$PEAK_TBPS" --results-dir "$RESULTS") prev left
    if [ "$KIND" = decode-tiny ]; then
        args+=(--tiny --variants bf16,int4,pq2 --tag gpu-tiny)
    else
        args+=(--variants "$VARIANTS" --tag gpu)
        prev="$(ls -1 "$RESULTS"/bench_decode_"${SLUG}"_gpu_2*.json 2>/dev/null | sort | tail -n 1 || true)"
        if [ -n "$prev" ]; then
            args+=(--merge "$prev")
        fi
        left="$(left_s)"
        # stop starting variants that would not finish inside this command (recorded as skipped)
        args+=(--time-budget-s "$(( left > 120 ? left - 45 : 60 ))")
    fi
    run_cmd "$PY" benchmarks/bench_decode.py "${args[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
}

step_sass() {
    local rc=0 common=(--peak-tbps "$PEAK_TBPS" --sms "$SMS")
    run_cmd "$PY" benchmarks/kernel_sass.py "${common[@]}" \
        --out "$RESULTS/kernel_sass_${SLUG}_${STAMP}.md" ${EXTRA[@]+"${EXTRA[@]}"} || rc=$?
    run_cmd "$PY" benchmarks/kernel_sass.py "${common[@]}" --candidates --bits 2 --m 1 \
        --out "$RESULTS/kernel_sass_candidates_${SLUG}_${STAMP}.md" ${EXTRA[@]+"${EXTRA[@]}"} || rc=$?
    return "$rc"
}

main() {
    echo "== [$STEP] $(date -Iseconds) in $ROOT, budget ${BUDGET_S}s"
    echo "== [$STEP] GPU $GPU_NAME ($SMS SMs), peak HBM bandwidth assumed $PEAK_TBPS TB/s"
    setup
    case "$KIND" in
        check) step_check ;;
        check-interp) step_check_interp ;;
        kernels | kernels-quick) step_kernels ;;
        decode | decode-tiny) step_decode ;;
        sass) step_sass ;;
    esac
}

# Copy this step's files (log first) to $OUT: the device tool returns at most 8 files.
collect() {
    local n=0 f
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    for f in "$LOG" $(find "$RESULTS" -maxdepth 1 -type f -newer "$MARK" ! -name "$(basename "$LOG")" | sort); do
        [ -f "$f" ] || continue
        if [ "$n" -ge 8 ]; then
            echo "run_gpu.sh: not copied to \$OUT (8 files at most): $f" >&2
            continue
        fi
        cp "$f" "$OUT"/ && n=$(( n + 1 ))
    done
    echo "== [$STEP] copied $n file(s) to \$OUT"
}

set +e
(set -e; main) 2>&1 | tee "$LOG"
rc="${PIPESTATUS[0]}"
set -e
echo "== [$STEP] $(date -Iseconds) exit status $rc after $(( $(date +%s) - START ))s; log $LOG" | tee -a "$LOG"
collect
rm -f "$MARK"
exit "$rc"
