#!/usr/bin/env bash
# The GPU measurements the docs report, in one go on a CUDA machine. Each part is bounded in time, so a slow
# part cannot starve the next, and writes its own files, so a part cut off loses only itself:
#   1. benchmarks/step_overhead.py --profile, one backbone at a time (3x32x32: conv4, resnet18, resnet_tiny;
#      then 1x28x28: conv4): step time over the bare step, aten ops, host syncs and peak memory per head
#      (docs/performance.md);
#   1b. the same rows' throughput: step_overhead.py --chain $CHAIN, steps back to back as a training loop runs
#      them (part 1 times each step to completion; THROUGHPUT_S > 0);
#   2. benchmarks/linalg_solve.py: the ridge head's two solves, five ways (LINALG_S > 0);
#   3. benchmarks/compile_speed.py: train.compile=true against eager, images/s and compile time (COMPILE_S > 0);
#   4. benchmarks/claims.py at 600 steps x 3 seeds, several runs at a time on the one GPU (docs/results.md;
#      CLAIMS_S > 0; resumable: it continues where a cut-off run stopped).
#
#   OUT=runs/gpu DATA=../shared/data bash benchmarks/gpu_checks.sh
#
# Environment: OUT (results), RUNS (the claims' run folders, $OUT/claims), DATA (the Omniglot root), DEVICE (cuda),
# BACKBONES (part 1, 3x32x32), JOBS (claims runs at a time), STEPS, SEEDS, ROUNDS (timed steps per row),
# CHAIN (steps per timing in part 1b), OVERHEAD_S / THROUGHPUT_S / LINALG_S / COMPILE_S / CLAIMS_S (time limits
# of the parts, seconds; 0 skips a part).
set -u
OUT=${OUT:-runs/gpu}
RUNS=${RUNS:-$OUT/claims}
DATA=${DATA:-../shared/data}
DEVICE=${DEVICE:-cuda}
BACKBONES=${BACKBONES:-conv4 resnet18 resnet_tiny}
JOBS=${JOBS:-8}
STEPS=${STEPS:-600}
SEEDS=${SEEDS:-0 1 2}
OVERHEAD_S=${OVERHEAD_S:-300}
THROUGHPUT_S=${THROUGHPUT_S:-120}
CHAIN=${CHAIN:-20}
LINALG_S=${LINALG_S:-60}
COMPILE_S=${COMPILE_S:-200}
CLAIMS_S=${CLAIMS_S:-300}
ROUNDS=${ROUNDS:-50}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

overhead() {  # name, then step_overhead.py's arguments; within the part's time left
    local name=$1 left=$((end - SECONDS))
    shift
    [ "$left" -gt 10 ] || { echo "skipped (time): $name"; return; }
    timeout "$left" python3 benchmarks/step_overhead.py --device "$DEVICE" "$@" --json "$OUT/overhead_$name.json"
}
if [ "$OVERHEAD_S" -gt 0 ]; then
    end=$((SECONDS + OVERHEAD_S))
    for bb in $BACKBONES; do
        overhead "3x32_$bb" --profile --rounds "$ROUNDS" --backbones "$bb"
    done
    overhead 1x28_conv4 --profile --rounds "$ROUNDS" --backbones conv4 --size 28 --channels 1
fi

if [ "$THROUGHPUT_S" -gt 0 ]; then
    end=$((SECONDS + THROUGHPUT_S))
    for bb in $BACKBONES; do  # the SVM head reads the host once a step: chaining cannot hide its launches
        overhead "3x32_${bb}_chain$CHAIN" --chain "$CHAIN" --rounds 10 --heads contrastive protonet r2d2 \
            --backbones "$bb"
    done
fi

if [ "$LINALG_S" -gt 0 ]; then
    timeout "$LINALG_S" python3 benchmarks/linalg_solve.py --device "$DEVICE" --json "$OUT/linalg_solve.json"
fi

if [ "$COMPILE_S" -gt 0 ]; then
    timeout "$COMPILE_S" python3 benchmarks/compile_speed.py --device "$DEVICE" --batch 256 --rounds 30 --warmup 5 \
        --heads contrastive r2d2 --backbones conv4 resnet18 --json "$OUT/compile.json"
fi

if [ "$CLAIMS_S" -gt 0 ]; then
    # shellcheck disable=SC2086  # SEEDS is a list
    timeout "$CLAIMS_S" python3 benchmarks/claims.py --steps "$STEPS" --seeds $SEEDS --jobs "$JOBS" \
        --out "$RUNS" --doc "$OUT/results.md" -- "data.params.root=$DATA" "device=$DEVICE" \
        >"$OUT/claims.log" 2>&1
    echo "claims: exit $? after $SECONDS s; $(ls "$RUNS"/*/result.json 2>/dev/null | wc -l) runs done"
    tail -5 "$OUT/claims.log"
    # the results in one file (runs cut off by the time limit leave only their logs)
    tar czf "$OUT/claims.tgz" -C "$(dirname "$RUNS")" --exclude='checkpoints' --exclude='*.pt' "$(basename "$RUNS")"
fi
echo "done after $SECONDS s"
