#!/usr/bin/env bash
# The rehearsal profile on a CUDA machine: every rule of `all` and `b2` with their GPU code paths (bf16 autocast,
# claimed devices), then per-stage wall time, throughput (images or texts per second where a stage has a count)
# and peak GPU memory as JSON. Usage, from the repository root after `make setup`:
#   bash benchmarks/gpu_check.sh [OUT_JSON]        (default benchmarks/results/gpu_check.json)
# Needs a CUDA torch; refuses to run on a machine without one (the CPU rehearsal is `make rehearsal`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu_check.json}
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch; run `make rehearsal` for the CPU rehearsal")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", file=sys.stderr)
PY
python -m clipbackdoor.pipeline.rehearsal --out data/rehearsal
GPUS=$(nvidia-smi -L | wc -l)
time snakemake all --cores "$(nproc)" --resources gpu="$GPUS" --configfile configs/rehearsal.yaml --forceall
time snakemake b2 --cores "$(nproc)" --resources gpu="$GPUS" --configfile configs/rehearsal.yaml --forceall
python benchmarks/collect_stage_metrics.py data/benchmarks data/logs "$OUT"
