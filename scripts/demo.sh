#!/usr/bin/env bash
# Set-up (if needed) + the main job end to end on the bundled benchmark model:
# inspect -> recipe under a FLOPs budget -> cost -> run unpruned and pruned -> accuracy on the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-out/demo}
mkdir -p "$OUT"
inputs=$(python examples/demo_inputs.py "$OUT" 2>/dev/null)
field() { python -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$inputs" "$1"; }
MODEL=$(field model); IMAGE=$(field image); QUESTION=$(field question)
echo "== model"; edge-prune inspect "$MODEL"
echo; echo "== a FastV recipe at 60% fewer prefill FLOPs"
edge-prune baseline "$MODEL" --method fastv --k 2 --flops-reduction 0.6 --text-tokens 20 -o "$OUT/fastv-60.json"
edge-prune cost "$MODEL" --recipe "$OUT/fastv-60.json" --text-tokens 20
echo; echo "== run: $QUESTION (truth: $(field answer))"
echo "unpruned:"; edge-prune run "$MODEL" --image "$IMAGE" --prompt "$QUESTION" --max-new-tokens 4
echo "pruned (fastv-60):"; edge-prune run "$MODEL" --image "$IMAGE" --prompt "$QUESTION" --max-new-tokens 4 --recipe "$OUT/fastv-60.json"
if [ -f benchmarks/models/toyvqa-llava/config.json ]; then
  echo; echo "== accuracy on 210 test items, unpruned vs the recipe"
  edge-prune eval "$MODEL" --n 210
  edge-prune eval "$MODEL" --n 210 --recipe "$OUT/fastv-60.json"
fi
