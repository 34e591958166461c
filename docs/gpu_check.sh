#!/usr/bin/env bash
# The GPU paths of recsqueeze, in one go, on a machine with one CUDA GPU (issue 17, item 6).
#
#   bash docs/gpu_check.sh            # from the repository root; OUT=dir (default
#                                     # bench-results/gpu) receives everything it measures
#
# Needs the environment `make .venv` builds, with a CUDA build of torch (`make .venv
# TORCH_INDEX=https://download.pytorch.org/whl/cu128`, or VENV=path to one that has it).
# What it runs:
#   1. the CUDA unit tests (tests/unit/test_cuda_paths.py: stages training on the GPU, fp16/bf16
#      and quantized modules there) and 2:4 sparsity on the sparse tensor cores
#      (tests/unit/test_prune_schedules.py) - skipped without a GPU, so here they must pass;
#   2. a one-node local stack whose Ray node reports num_gpus=1 (`recsqueeze up`: a node is
#      started with --num-gpus=0 only where torch sees no CUDA);
#   3. the tiny flow with GPU stages end to end (gpus_per_stage 1) and every default candidate
#      timed on the GPU (serving_device cuda), its result as JSON;
#   4. the leaderboard's GPU latencies, rendered for docs/benchmarks.md.
set -euo pipefail
VENV=${VENV:-.venv}
OUT=${OUT:-bench-results/gpu}
BIN="$VENV/bin"
STATE=$(mktemp -d /tmp/rsq-gpu-XXXXXX)
mkdir -p "$OUT"
export PREFECT_SERVER_ANALYTICS_ENABLED=false RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1

"$BIN/python" - <<'PY' | tee "$OUT/device.json"
import json, torch
assert torch.cuda.is_available(), "torch here sees no CUDA GPU: nothing on this script can run"
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0),
                  "capability": list(torch.cuda.get_device_capability(0))}))
PY

# 1. unit tests on the GPU: a skip here is a failure (-W error would not catch it; -rs lists them)
"$BIN/python" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/cuda-unit.xml" \
  tests/unit/test_cuda_paths.py tests/unit/test_prune_schedules.py 2>&1 | tee "$OUT/cuda-unit.log"
if grep -q "SKIPPED" "$OUT/cuda-unit.log"; then echo "GPU tests were skipped" >&2; exit 1; fi

# 2. one Ray node with the GPU; always taken down again
trap '"$BIN/recsqueeze" down --state-dir "$STATE" >/dev/null 2>&1 || true' EXIT
"$BIN/recsqueeze" up --state-dir "$STATE" --workers 1
"$BIN/python" -c 'import json, ray; ray.init(address="auto", log_to_driver=False); \
print(json.dumps(ray.cluster_resources()))' | tee "$OUT/ray-resources.json" || true

# 3. the tiny flow, GPU stages, the default candidates timed on the GPU
cat > "$STATE/request.json" <<'JSON'
{"dataset": {"builtin": "tiny"},
 "resources": {"gpus_per_stage": 1, "serving_device": "cuda", "timing_seconds": 120}}
JSON
"$BIN/recsqueeze" run --state-dir "$STATE" --request "$STATE/request.json" --json --quiet \
  > "$OUT/tiny-gpu.json"

# 4. the rows, with the device each was timed on
"$BIN/python" - "$OUT/tiny-gpu.json" <<'PY' | tee "$OUT/tiny-gpu.md"
import json, sys
result = json.load(open(sys.argv[1]))
rows = result["leaderboard"]
print("| candidate | size x | p99 ms (bs 512) | latency ratio (95% CI) | timed on | passed |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['candidate']} | {r['size_ratio']:.2f} | {r['p99_ms_bs512']} | "
          f"{r['latency_ratio']} ({r['latency_ratio_low']}-{r['latency_ratio_high']}) | "
          f"{r['latency_device']} | {r['passed']} |")
assert result["status"] != "stopped", result["reason"]
# a candidate with no CUDA kernel (dynamic int8 Linear, fbgemm tables) is timed on CPU, and
# says so; the baseline and the fp16/bf16/2:4/TT candidates must have been timed on the GPU
on_gpu = [r["candidate"] for r in rows if (r["latency_device"] or "").startswith("cuda")]
assert on_gpu, "no candidate was timed on the GPU"
print(f"\ntimed on the GPU: {', '.join(on_gpu)}")
PY
