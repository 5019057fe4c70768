#!/usr/bin/env bash
# Build the data the cwltest suite runs on (demo assets and two small updates) in DIR
# (default: cwl/tests/data, which git ignores). Needs xffl-cwl installed; takes about 30 s.
set -euo pipefail
out=${1:-$(cd "$(dirname "$0")" && pwd)/data}
rm -rf "$out"
xffl-cwl demo-assets --out "$out" --facilities 2 --samples 400 --test-samples 30 >/dev/null
pids=()
for facility in leonardo lumi; do
  xffl-cwl train --model "$out/model" --dataset "$out/data/$facility" --out "$out/updates/$facility" \
    --facility "$facility" --local-steps 2 --seq-len 64 --lr 0.003 --no-progress >/dev/null &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
printf '{"text": "fine"}\n{not json\n' >"$out/broken.jsonl"  # for the train_failed case
echo "cwltest data ready in $out"
