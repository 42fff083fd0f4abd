#!/usr/bin/env bash
# Run the pack's three benchmarks on one CUDA GPU and write a summary.
#
#   bash benchmarks/run_gpu.sh --fetch-wheels     # HERE (network to PyPI): fill .cache/gpu-wheels
#   bash benchmarks/run_gpu.sh [STAGE ...]        # on the GPU machine; STAGE: reward lora train memory
#                                                 # (default: all four, in that order; `memory` alone
#                                                 # fits one 10-minute command: real cells of the
#                                                 # simulated memory table, benchmarks/memory_gpu.py)
#
# The lent GPU machine (see benchmarks/README.md) has python3 with torch, transformers, peft,
# safetensors, accelerate, timm, psutil, pillow, but no diffusers / open-clip-torch / ftfy and no
# network. Those pure-Python wheels travel in .cache/gpu-wheels (git-ignored, so the runner must
# be told to carry it) and are installed into /tmp/site here, without touching the image's own
# packages. The repo root is the package `easyanimate_reward`: a symlink under /tmp makes it
# importable under that name.
#
# One command on that machine may run 10 minutes: the stages share a deadline (DEADLINE seconds,
# default 570) and each gets a time limit; a stage cut off is reported as such, with what it printed.
# Sizes (override with the environment): LORA_LAYERS=48 (the whole 12b: 24 GB bf16 on the GPU,
# ~75 GB of CPU RAM for backups and reference snapshots), TRAIN_LAYERS=48, REWARD_BATCH=49 frames.
# Output: the summary on stdout and in $OUT/gpu_benchmarks.txt (or out/gpu-bench/ when OUT is unset),
# each benchmark's full stdout+stderr beside it as <name>.log.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
WHEELS=.cache/gpu-wheels
WHEEL_PINS=(diffusers==0.42.1 open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)

if [[ ${1:-} == --fetch-wheels ]]; then
    # The GPU machine runs Python 3.12 on x86-64; all but wcwidth are py3-none-any.
    mkdir -p "$WHEELS"
    exec "${PYTHON:-.venv/bin/python}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$WHEELS" "${WHEEL_PINS[@]}"
fi

STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(reward lora train memory)
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-570}
LORA_LAYERS=${LORA_LAYERS:-48}
TRAIN_LAYERS=${TRAIN_LAYERS:-48}
REWARD_BATCH=${REWARD_BATCH:-49}
LOGS=${OUT:-$REPO/out/gpu-bench}
mkdir -p "$LOGS"
SUMMARY=$LOGS/gpu_benchmarks.txt
: >"$SUMMARY"

say() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }

# ---- environment -------------------------------------------------------------------------------
# Reuse the image's torch; add only what it lacks, from carried wheels (nothing can be downloaded).
if ! "$PY" -c 'import diffusers, open_clip, ftfy; assert diffusers.__version__ == "0.42.1"' 2>/dev/null; then
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        say "missing Python packages (${WHEEL_PINS[*]}) and no wheels in $WHEELS."
        say "Run 'bash benchmarks/run_gpu.sh --fetch-wheels' on a machine with PyPI access and carry $WHEELS."
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || { say "pip install of $WHEELS failed"; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p /tmp/easyanimate-pkgroot
ln -sfn "$REPO" /tmp/easyanimate-pkgroot/easyanimate_reward
export PYTHONPATH=/tmp/easyanimate-pkgroot${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    say "no CUDA device visible to $PY; nothing run"
    exit 3
fi
say "== EasyAnimate reward pack: GPU benchmarks ($(date -u +%Y-%m-%dT%H:%MZ))"
say "$("$PY" -c 'import torch, diffusers, transformers, open_clip, sys
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; python {sys.version.split()[0]}, "
      f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
      f"open_clip {open_clip.__version__}")' 2>&1)"
say "$(nproc) CPU cores, $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2 / 2^20}' /proc/meminfo)"

# ---- stages --------------------------------------------------------------------------------------
# run_stage NAME CAP_SECONDS COMMAND...: runs within min(CAP, time left before DEADLINE).
run_stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - SECONDS - 5))
    local limit=$((cap < left ? cap : left))
    say ""
    say "== $name: $*"
    if ((limit < 30)); then
        say "   skipped: only ${left}s left before the ${DEADLINE}s deadline (run this stage alone)"
        return
    fi
    local started=$SECONDS rc
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    if ((rc == 0)); then
        # The results are what the benchmark printed to stdout; progress lines went to stderr
        # but share the log, so keep from the first result line on.
        sed -n "/$(stage_marker "$name")/,\$p" "$LOGS/$name.log" | tee -a "$SUMMARY"
    else
        if ((rc == 124 || rc == 130 || rc == 137)); then
            say "   CUT OFF after $((SECONDS - started))s (limit ${limit}s); last lines (the interrupt's traceback left out):"
            grep -v -E '^(Traceback|  File |    |KeyboardInterrupt)' "$LOGS/$name.log" | tail -n 25 \
                | sed 's/^/   | /' | tee -a "$SUMMARY"
        else
            say "   FAILED (exit $rc) after $((SECONDS - started))s; last lines:"
            tail -n 25 "$LOGS/$name.log" | sed 's/^/   | /' | tee -a "$SUMMARY"
        fi
    fi
    say "   ($((SECONDS - started))s)"
}

stage_marker() {
    case $1 in
        reward_throughput) echo '^[^ ].* cuda, batch' ;;
        lora_merge) echo '^torch ' ;;
        train_memory) echo '^GPU ' ;;
        memory_gpu) echo '^GPU ' ;;
    esac
}

for stage in "${STAGES[@]}"; do
    case $stage in
        reward)
            run_stage reward_throughput 150 "$PY" benchmarks/reward_throughput.py --device cuda --model ViT-H-14 \
                --batch "$REWARD_BATCH" --repeats 3 ;;
        lora)
            run_stage lora_merge 240 "$PY" benchmarks/lora_merge.py --device cuda --layers "$LORA_LAYERS" ;;
        train)
            run_stage train_memory 600 "$PY" benchmarks/train_memory.py --gpu --layers "$TRAIN_LAYERS" ;;
        memory)
            run_stage memory_gpu 540 "$PY" benchmarks/memory_gpu.py --simulated benchmarks/memory_table_simulated.json ;;
        *)
            say "unknown stage '$stage' (reward, lora, train, memory)"; exit 2 ;;
    esac
done
say ""
say "== done in ${SECONDS}s; logs in $LOGS"
