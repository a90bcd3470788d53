#!/usr/bin/env bash
# The wheel runs on its own: build it, install it into a fresh virtual environment (torch pinned first, then
# the wheel with its declared dependencies, numpy 2 included), and train two steps on digits from a folder
# that holds no source tree. Usage: bash scripts/wheel_check.sh [python]   (default: python3)
set -euo pipefail
PY=${1:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m build --wheel --no-isolation --outdir "$work/dist" "$ROOT" >/dev/null
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
"$work/venv/bin/pip" install -q "$work"/dist/episodic-*.whl
cd "$work"
"$work/venv/bin/python" - <<'PYCODE'
import numpy, episodic
major = int(numpy.__version__.split(".")[0])
assert major >= 2, f"the base install should take numpy 2, got {numpy.__version__}"
print(f"episodic {episodic.__version__} from {episodic.__file__}, numpy {numpy.__version__}")
PYCODE
"$work/venv/bin/episodic-train" train.steps=2 train.progress=false eval.fewshot.episodes=20 eval.plots=false \
    eval.knn_every=0 device=cpu hydra.run.dir="$work/run"
test -f "$work/run/results.json" && test -f "$work/run/checkpoints/last.pt"
echo "wheel check passed"
