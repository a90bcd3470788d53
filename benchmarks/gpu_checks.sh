#!/usr/bin/env bash
# The GPU measurements the docs report, in one go on a CUDA machine (each part bounded in time, so a slow
# part cannot starve the next; the claims grid is resumable and continues where a cut-off run stopped):
#   1. benchmarks/step_overhead.py --profile on 3x32x32 (conv4, resnet_tiny) and 1x28x28 (conv4):
#      step time over the bare step, aten ops, host syncs and peak memory per head (docs/performance.md);
#   2. benchmarks/claims.py at 600 steps x 3 seeds, several runs at a time on the one GPU (docs/results.md).
#
#   OUT=runs/gpu DATA=../shared/data bash benchmarks/gpu_checks.sh
#
# Environment: OUT (results: a few files), RUNS (the claims' run folders, $OUT/claims), DATA (the Omniglot root), DEVICE (cuda), JOBS (claims runs at a time),
# STEPS, SEEDS, OVERHEAD_S / CLAIMS_S (time limits of the parts, seconds), ROUNDS (timed steps per row).
set -u
OUT=${OUT:-runs/gpu}
RUNS=${RUNS:-$OUT/claims}
DATA=${DATA:-../shared/data}
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-8}
STEPS=${STEPS:-600}
SEEDS=${SEEDS:-0 1 2}
OVERHEAD_S=${OVERHEAD_S:-240}
CLAIMS_S=${CLAIMS_S:-300}
ROUNDS=${ROUNDS:-50}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

end=$((SECONDS + OVERHEAD_S))
timeout $((end - SECONDS)) python3 benchmarks/step_overhead.py --device "$DEVICE" --profile --rounds "$ROUNDS" \
    --json "$OUT/overhead_3x32.json" 2>&1 | tee "$OUT/overhead_3x32.log"
left=$((end - SECONDS))
if [ "$left" -gt 10 ]; then
    timeout "$left" python3 benchmarks/step_overhead.py --device "$DEVICE" --profile --rounds "$ROUNDS" \
        --backbones conv4 --size 28 --channels 1 --json "$OUT/overhead_1x28.json" 2>&1 | tee "$OUT/overhead_1x28.log"
fi

# shellcheck disable=SC2086  # SEEDS is a list
timeout "$CLAIMS_S" python3 benchmarks/claims.py --steps "$STEPS" --seeds $SEEDS --jobs "$JOBS" \
    --out "$RUNS" --doc "$OUT/results.md" -- "data.params.root=$DATA" "device=$DEVICE" \
    >"$OUT/claims.log" 2>&1
echo "claims: exit $? after $SECONDS s; $(ls "$RUNS"/*/result.json 2>/dev/null | wc -l) runs done"
tail -5 "$OUT/claims.log"
# the results in one file (runs cut off by the time limit leave only their logs)
tar czf "$OUT/claims.tgz" -C "$(dirname "$RUNS")" --exclude='checkpoints' --exclude='*.pt' "$(basename "$RUNS")"
