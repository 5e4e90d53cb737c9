#!/usr/bin/env bash
# The GPU check: everything the CUDA path promises, measured in one go on one GPU, in < 8 minutes.
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT or gpu_check/
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh  # the same plumbing on the CPU, in ~1 minute
#
# 1. the CUDA-marked tests (bf16 + compile training, engine and KV cache on the GPU vs the CPU);
# 2. `small` preset training (20 x 640, ~95M params), bf16 autocast, compile off and on:
#    tokens/s, MFU against the device's datasheet peak, peak memory (benchmarks/bench_train.py);
# 3. exact-query throughput of the same shape (benchmarks/bench_query.py), k = 0 and 16.
# Writes OUT_DIR/summary.json (one JSON object: device, torch, the tests' counts, the benchmark
# lines) and the logs beside it. Each stage has its own time limit, so one hung stage costs its
# limit, not the whole budget; a failed stage is recorded and the next one still runs.
# Run it whenever a GPU is lent, then copy the numbers into docs/results.md ("The GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
if [ -n "${GPU_CHECK_SMOKE:-}" ]; then  # CPU: tiny shapes, to keep this script working
  dev=cpu; train_args=(--presets tiny --steps 3 --compile off --threads 2)
  query_args=(--preset tiny --single 3 --batch 16 --naive 2 --samples 50)
  tests_limit=120; train_limit=240; query_limit=240
else
  dev=cuda; train_args=(--presets small --steps 12 --compile both)
  query_args=(--preset small --single 30 --batch 256 --naive 10 --samples 1000)
  tests_limit=150; train_limit=210; query_limit=60
fi

stage() {  # name, limit (s), command...: runs it, logs it, records its exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$out/stages.jsonl"
  echo "gpu_check: $name rc=$rc ($((SECONDS - t0)) s)" >&2
}

rm -f "$out/stages.jsonl"
python - > "$out/device.json" <<'EOF'
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                  "gpus": torch.cuda.device_count(),
                  "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30
                  if cuda else None}))
EOF
if [ -z "${GPU_CHECK_SMOKE:-}" ]; then
  stage cuda_tests "$tests_limit" python -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py
fi
stage train "$train_limit" python benchmarks/bench_train.py --device "$dev" "${train_args[@]}"
stage query_k0 "$query_limit" python benchmarks/bench_query.py --device "$dev" "${query_args[@]}"
stage query_k16 "$query_limit" python benchmarks/bench_query.py --device "$dev" --context 16 \
  "${query_args[@]}"

python - "$out" <<'EOF'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
def last_json(name):  # a benchmark's last line is its JSON object
    p = out / f"{name}.log"
    lines = [ln for ln in p.read_text().splitlines() if ln.startswith("{")] if p.exists() else []
    return json.loads(lines[-1]) if lines else None
tests = (out / "cuda_tests.log").read_text() if (out / "cuda_tests.log").exists() else ""
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tests)}
summary = {
    "device": json.loads((out / "device.json").read_text()),
    "stages": [json.loads(ln) for ln in (out / "stages.jsonl").read_text().splitlines()],
    "cuda_tests": counts or None,
    "train": last_json("train"),
    "query_k0": last_json("query_k0"),
    "query_k16": last_json("query_k16"),
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary))
EOF
