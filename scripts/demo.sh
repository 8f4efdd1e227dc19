#!/usr/bin/env bash
# Set-up (if needed) + the main job end to end on the bundled benchmark model (a tiny random
# checkpoint of the same shape until the trained one lands):
# inspect -> fit a FitPrune recipe -> cost -> convert to ExecuTorch and GGUF -> run -> profile report.
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
echo; echo "== fit: FitPrune at 60% fewer prefill FLOPs, 32 calibration samples"
edge-prune fit "$MODEL" --method fitprune --flops-reduction 0.6 --calib bench:calib --n 32 -o "$OUT/fitprune-60.json"
edge-prune cost "$MODEL" --recipe "$OUT/fitprune-60.json" --text-tokens 20
echo; echo "== convert: ExecuTorch (XNNPACK, fp32) and GGUF (f16)"
edge-prune convert "$MODEL" --recipe "$OUT/fitprune-60.json" --format executorch --backend xnnpack --quant none \
  -o "$OUT/artifact-pte" --overwrite
edge-prune convert "$MODEL" --recipe "$OUT/fitprune-60.json" --format gguf --quant f16 -o "$OUT/artifact-gguf" --overwrite
echo; echo "== run: $QUESTION (truth: $(field answer))"
for target in "$MODEL" "$OUT/artifact-pte" "$OUT/artifact-gguf"; do
  echo "-- $target"
  edge-prune run "$target" --image "$IMAGE" --prompt "$QUESTION" --max-new-tokens 4 \
    $([ "$target" = "$MODEL" ] && echo --recipe "$OUT/fitprune-60.json")
done
echo; echo "== profile the ExecuTorch artifact against this machine (host) and write the report"
edge-prune profile "$OUT/artifact-pte" --profile host --runs 5 --image "$IMAGE" --prompt "$QUESTION" \
  --report "$OUT/report.html" || true   # exit code 1 only means a budget failed; the report says which
echo; echo "report: $OUT/report.html"
