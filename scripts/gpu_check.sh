#!/usr/bin/env bash
# FaceBench GPU check (issue 19): one prepared command for a bare GPU machine, known to work before it
# meets the GPU (its CPU dry run is tests/test_gpu_check_script.py).
#
#   scripts/gpu_check.sh OUTDIR                 one CUDA GPU (H100 / H200): under 8 minutes in all
#   scripts/gpu_check.sh --cpu-dry-run OUTDIR   the same steps at tiny sizes on the CPU
#
# No pip install and no network: it runs from the repository root on the machine's python3
# ($PYTHON overrides) with PYTHONPATH=. (`python3 -m bench ...`), which needs torch, torchvision, numpy,
# pandas, scipy, scikit-learn, matplotlib, seaborn, tabulate, typer, rich, PyYAML, Pillow, pytest and
# pytest-benchmark. Everything it prints is also written to OUTDIR/gpu_check.log (PYTHONUNBUFFERED=1).
#
# Steps, each under `timeout` with its own limit and all under one deadline; a failed step does not stop
# the others (so the log always comes back); the exit status is 1 if any step failed, 2 on a usage error:
#   environment  python, torch and the device (GPU mode stops here when CUDA is absent)
#   gpu-tests    python -m pytest tests/gpu (marked gpu): AMP training of every method, heads CUDA = CPU,
#                Partial FC at 1M classes, IJB-C- and MegaFace-sized evaluation; values -> gpu_tests.json
#   run          bench run with results/baselines/gpu.yaml, every registered method, a small budget
#   profile      bench profile --device cuda --classes 10k,100k,1M,4M,10M
#   baseline     bench baseline save -> OUTDIR/gpu.json (and results/baselines/gpu.json when absent)
#   check        bench check of those records against OUTDIR/gpu.json (it must accept them: exit 0)
#   report       bench report -> OUTDIR/results.md and OUTDIR/profile-<device>.png
#   pack         OUTDIR/records.tar.gz: the run records (no checkpoints) and the whole report
#
# OUTDIR must be empty or absent; it receives at most 8 flat files, each under 16 MiB: gpu_check.log,
# gpu_tests.json, gpu.json, results.md, profile-<device>.png, records.tar.gz. Scratch (records, report)
# goes to $FACEBENCH_GPU_CHECK_WORK (default: a new temporary directory); generated data to the default
# data root (datasets/, kept between runs on one machine) in GPU mode and to the scratch folder in the
# dry run. The baseline gpu.json holds the preset's configuration (its budget is part of each key), the
# same one the GPU workflow trains and checks.
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PRESET="results/baselines/gpu.yaml"

# --- sizes and limits (seconds) ----------------------------------------------------------------------
# GPU: the preset as it is (r50, 112 x 112, batch 256, AMP, 1,000 identities, 20 steps per method).
GPU_RUN_SETS=()  # the preset as it is: the workflow trains it unchanged and checks it against gpu.json
GPU_PROFILE=(--device cuda --classes 10k,100k,1M,4M,10M --methods arcface,pfc-0.1,dcq,pm,sst
             --memory-budget-gb 60 --steps 3)
GPU_LIMITS=(environment=15 gpu-tests=130 run=130 profile=160 baseline=15 check=15 report=40 pack=10)
GPU_DEADLINE=450
# Dry run: the small CPU backbone at 32 x 32, a few identities, a few steps, one thread.
# (8 steps are too few to demand the GPU check's 20 % fall of the loss: the dry run asks that it falls.)
DRY_TEST_SIZES=(FACEBENCH_GPU_BACKBONE=small FACEBENCH_GPU_IMAGE_SIZE=32 FACEBENCH_GPU_EMBEDDING_SIZE=64
                FACEBENCH_GPU_TRAIN_STEPS=8 FACEBENCH_GPU_TRAIN_BATCH=32 FACEBENCH_GPU_TRAIN_IDENTITIES=32
                FACEBENCH_GPU_LOSS_WINDOW=3 FACEBENCH_GPU_MIN_LOSS_FALL=0 FACEBENCH_GPU_HEAD_CLASSES=200
                FACEBENCH_GPU_HEAD_BATCH=32 FACEBENCH_GPU_PFC_CLASSES=20000 FACEBENCH_GPU_EVAL_IDENTITIES=8
                FACEBENCH_GPU_EVAL_IMAGES_PER_IDENTITY=2 FACEBENCH_GPU_IJBC_TEMPLATES=500
                FACEBENCH_GPU_IJBC_PAIRS=20000 FACEBENCH_GPU_MEGAFACE_PROBES=200
                FACEBENCH_GPU_MEGAFACE_DISTRACTORS=20000)
DRY_RUN_SETS=(--device cpu --backbone small --budget 64 --batch-size 32 --eval synth-tail
              --set data.synthface.num_identities=40 --set data.synthface.images_per_identity=4
              --set data.synthface.image_size=32 --set train.embedding_size=32 --set train.threads=1
              --set train.log_every=1)
DRY_PROFILE=(--device cpu --classes 1k,4k --methods arcface,pfc-0.1,dcq,pm,sst --memory-budget-gb 4
             --steps 1 --threads 1)
DRY_LIMITS=(environment=30 gpu-tests=240 run=240 profile=60 baseline=30 check=30 report=90 pack=15)
DRY_DEADLINE=600
# Tolerances stored in gpu.json: these runs are short and CUDA training is not bit-reproducible.
BASELINE_TOLERANCES="--max-accuracy-drop 2.0 --max-throughput-drop 0.2 --max-memory-growth 0.1"
# The quick closing steps: the long steps before them never eat into their limits.
CLOSING_STEPS=(baseline check report pack)
# What comes back from the GPU machine: at most 8 flat files, each at most 16 MiB.
MAX_FILES=8
MAX_FILE_BYTES=$((16 * 1024 * 1024))

usage_error() {
    echo "error: $1 (usage: scripts/gpu_check.sh [--cpu-dry-run] OUTDIR)" >&2
    exit 2
}

MODE=gpu
OUT=""
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) MODE=dry ;;
        -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) usage_error "unknown option '$arg'" ;;
        *) [[ -z "$OUT" ]] || usage_error "give one OUTDIR, got '$OUT' and '$arg'"; OUT="$arg" ;;
    esac
done
[[ -n "$OUT" ]] || usage_error "missing OUTDIR"
mkdir -p "$OUT" 2>/dev/null || usage_error "cannot create OUTDIR '$OUT'"
OUT="$(cd "$OUT" && pwd)"
[[ -z "$(ls -A "$OUT")" ]] || usage_error "OUTDIR '$OUT' is not empty (this script never overwrites a run's outputs)"
[[ -w "$OUT" ]] || usage_error "OUTDIR '$OUT' is not writable"
WORK="${FACEBENCH_GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/facebench-gpu-check.XXXXXX")}"
mkdir -p "$WORK" || usage_error "cannot create the scratch folder '$WORK'"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || usage_error "no python interpreter '$PY' (set PYTHON)"
LOG="$OUT/gpu_check.log"

cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export MPLBACKEND=Agg MPLCONFIGDIR="$WORK/matplotlib"
if [[ "$MODE" == dry ]]; then
    # One thread: the dry run shares small CPUs. Large blocks come from mmap at once, so the process RSS
    # measures one Partial FC step at 20k classes as it does at 1M (glibc's dynamic threshold would keep
    # freed blocks of a few MB in the heap).
    export FACEBENCH_GPU_TESTS_DEVICE=cpu OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=131072
    export "${DRY_TEST_SIZES[@]}"
    RUN_SETS=("${DRY_RUN_SETS[@]}" --data-root "$WORK/data")
    PROFILE=("${DRY_PROFILE[@]}")
    LIMITS=("${DRY_LIMITS[@]}")
    DEADLINE=$DRY_DEADLINE
else
    RUN_SETS=("${GPU_RUN_SETS[@]}")
    PROFILE=("${GPU_PROFILE[@]}")
    LIMITS=("${GPU_LIMITS[@]}")
    DEADLINE=$GPU_DEADLINE
fi
export FACEBENCH_GPU_TESTS_OUT="$OUT"
RESULTS="$WORK/results"
REPORT="$WORK/report"

STARTED=$SECONDS
SUMMARY=()
FAILED=0

limit_of() {  # the limit (s) of step $1
    local pair
    for pair in "${LIMITS[@]}"; do [[ "${pair%%=*}" == "$1" ]] && { echo "${pair#*=}"; return; }; done
    echo 60
}

reserve_after() {  # seconds kept, out of the deadline, for the quick closing steps after step $1
    local total=0 tail
    for tail in "${CLOSING_STEPS[@]}"; do
        (( $(step_index "$tail") > $(step_index "$1") )) && total=$(( total + $(limit_of "$tail") ))
    done
    echo "$total"
}

step_index() {  # position of step $1 in LIMITS
    local index=0 pair
    for pair in "${LIMITS[@]}"; do
        [[ "${pair%%=*}" == "$1" ]] && { echo "$index"; return; }
        index=$(( index + 1 ))
    done
    echo "$index"
}

step() {  # step NAME COMMAND...: run under timeout, log its status; never stops the script
    local name="$1" shown; shift
    shown="$*"
    # A function of this script runs in a child bash (exported below), so that timeout can end it.
    declare -F "$1" >/dev/null && set -- bash -c '"$@"' _ "$@"
    local budget left limit begin rc status
    budget=$(limit_of "$name")
    left=$(( DEADLINE - (SECONDS - STARTED) - $(reserve_after "$name") ))
    limit=$(( budget < left ? budget : left ))
    if (( limit < 5 )); then
        echo "=== [$name] not run: no time left before the ${DEADLINE} s deadline"
        SUMMARY+=("$name|not run|0|$budget"); FAILED=1; return
    fi
    echo "=== [$name] $(date -u +%H:%M:%S) (limit ${limit} s): $shown"
    begin=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@"
    rc=$?
    if (( rc == 0 )); then status=ok
    elif (( rc == 124 || rc == 137 )); then status="timed out"; FAILED=1
    else status="failed (exit $rc)"; FAILED=1
    fi
    echo "=== [$name] $status after $(( SECONDS - begin )) s"
    SUMMARY+=("$name|$status|$(( SECONDS - begin ))|$limit")
}

bench() { "$PY" -m bench "$@"; }

environment() {
    echo "mode: $MODE; repository: $REPO; commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "outdir: $OUT; scratch: $WORK; python: $(command -v "$PY")"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" - "$MODE" "$WORK/methods.txt" <<'PYTHON'
import platform, sys
import torch
from methods.base import METHODS
mode, methods_file = sys.argv[1:]
with open(methods_file, "w") as handle:  # every registered method: what the run step trains
    handle.write(",".join(METHODS.names()))
print(f"methods: {', '.join(METHODS.names())}")
print(f"python {platform.python_version()} ({platform.machine()}), torch {torch.__version__}, "
      f"CUDA available: {torch.cuda.is_available()}, CPU threads: {torch.get_num_threads()}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}")
if mode == "gpu" and not torch.cuda.is_available():
    print("error: CUDA is not available; the GPU check needs one CUDA GPU (or use --cpu-dry-run)")
    sys.exit(1)
PYTHON
}

save_baseline() {
    # shellcheck disable=SC2086  # BASELINE_TOLERANCES is a list of words
    bench baseline save --results "$RESULTS" --out "$OUT/gpu.json" $BASELINE_TOLERANCES \
        --note "scripts/gpu_check.sh ($MODE): $PRESET, every method, reduced as in the script; $(date -u +%F)" \
        || return
    local committed="$REPO/results/baselines/gpu.json"
    if [[ "$MODE" == gpu && ! -e "$committed" ]]; then
        cp "$OUT/gpu.json" "$committed" && echo "wrote $committed (commit it from OUTDIR/gpu.json)"
    elif [[ "$MODE" == gpu ]]; then
        echo "left $committed as it was (it exists); the new baseline is OUTDIR/gpu.json"
    fi
}

write_report() {
    bench report --results "$RESULTS" --out "$REPORT" || return
    cp "$REPORT/results.md" "$OUT/results.md" || return
    local png found=0
    for png in "$REPORT"/figures/profile-*.png; do
        [[ -f "$png" ]] && { cp "$png" "$OUT/$(basename "$png")"; found=1; }
    done
    (( found )) || { echo "error: bench report drew no profile figure"; return 1; }
}

pack() {
    local parts=()
    [[ -d "$RESULTS" ]] && parts+=(results)
    [[ -d "$REPORT" ]] && parts+=(report)
    (( ${#parts[@]} )) || { echo "error: nothing to pack (no records, no report)"; return 1; }
    tar -czf "$OUT/records.tar.gz" --exclude=checkpoints --exclude='*.lock' -C "$WORK" "${parts[@]}"
}

check_outdir() {  # what comes back: at most MAX_FILES flat files with safe names, each small enough
    local count=0 bad=0 path name size
    for path in "$OUT"/* "$OUT"/.[!.]*; do
        [[ -e "$path" ]] || continue
        name="$(basename "$path")"
        count=$(( count + 1 ))
        size=$(stat -c %s "$path" 2>/dev/null || echo 0)
        printf '  %-28s %12s bytes\n' "$name" "$size"
        [[ -f "$path" && "$name" =~ ^[A-Za-z0-9._-]+$ ]] \
            || { echo "error: $name is not a plain file with a safe name"; bad=1; }
        (( size <= MAX_FILE_BYTES )) || { echo "error: $name is over 16 MiB"; bad=1; }
    done
    (( count <= MAX_FILES )) || { echo "error: $count files in OUTDIR, at most $MAX_FILES come back"; bad=1; }
    return "$bad"
}

main() {
    echo "FaceBench GPU check ($MODE) started $(date -u +%FT%TZ); deadline ${DEADLINE} s"
    step environment environment
    if [[ "${SUMMARY[0]}" != "environment|ok|"* && "$MODE" == gpu ]]; then
        echo "=== stopping: no usable CUDA device, the other steps would only burn the machine's time"
    else
        local methods
        methods="$(cat "$WORK/methods.txt" 2>/dev/null)"
        step gpu-tests "$PY" -m pytest tests/gpu -m gpu -v -p no:cacheprovider
        step run "$PY" -m bench run --config "$PRESET" --methods "${methods:-(none: see the environment step)}" \
            --out "$RESULTS" --no-progress "${RUN_SETS[@]}"
        step profile "$PY" -m bench profile "${PROFILE[@]}" --out "$RESULTS"
        step baseline save_baseline
        step check "$PY" -m bench check --baseline "$OUT/gpu.json" --results "$RESULTS"
        step report write_report
        step pack pack
    fi
    echo "=== summary ($(( SECONDS - STARTED )) s in all, deadline ${DEADLINE} s)"
    local line
    for line in "${SUMMARY[@]}"; do
        IFS='|' read -r name status seconds limit <<<"$line"
        printf '  %-12s %-18s %5s s (limit %s s)\n' "$name" "$status" "$seconds" "$limit"
    done
    echo "=== OUTDIR $OUT"
    check_outdir || FAILED=1
    if (( FAILED )); then echo "FAILED: see the steps above"; return 1; fi
    echo "OK: every step passed"
}

export -f bench environment save_baseline write_report pack
export MODE OUT WORK PY PRESET RESULTS REPORT REPO BASELINE_TOLERANCES
main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
