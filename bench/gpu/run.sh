#!/usr/bin/env bash
# The GPU check of issue 12 part 9, in one script that finishes in under 8 minutes on a fresh,
# offline GPU machine (the `device` tool's H100/H200): installs the project from wheels carried in
# .whl/ (make them here with `bench/gpu/run.sh --wheels`), runs the CUDA tests, then kvbench load
# and reuse for the full-size Qwen3-4B config (random bf16 weights) at 3,774 and 16,384 tokens,
# and writes everything under ${OUT:-bench/results}/gpu-<gpu name>/.
#
#   bench/gpu/run.sh --wheels     # on the dev box: download the wheels the GPU machine needs
#   bench/gpu/run.sh              # on the GPU machine (via `run`, carry .whl): measure
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=.whl

if [[ "${1:-}" == "--wheels" ]]; then
  # the GPU machine's own CUDA torch stays; everything else comes from here
  mkdir -p "$WHEELS"
  python3 -m pip download -q -d "$WHEELS" --only-binary=:all: --python-version 3.11 \
    "grpcio>=1.60" "grpcio-tools>=1.60" "grpcio-health-checking>=1.60" "protobuf>=4.25" "lmdb>=1.4" \
    "lz4>=4" "zstandard>=0.22" "xxhash>=3.4" "prometheus-client>=0.19" "numpy>=1.26" \
    "transformers>=5.0,<5.20" "safetensors>=0.4" "gguf>=0.10" "accelerate>=1.0" "matplotlib>=3.8" \
    "tqdm>=4.66" "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100"
  du -sh "$WHEELS"
  exit 0
fi

START=$(date +%s)
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))"
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower().replace(' ', '-'))" 2>/dev/null | tail -1)
DEST="${OUT:-bench/results}/gpu-${GPU:-cuda}"
mkdir -p "$DEST"
python3 -m pip install -q --no-index --find-links "$WHEELS" -e . 2>&1 | tail -2 || true
python3 tools/gen_proto.py
export GRPC_VERBOSITY=NONE PYTHONUNBUFFERED=1

# 1. the CUDA tests (skipped on a machine without a GPU; here they must run)
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$DEST/cuda-tests.txt" | tail -3

# 2. load paths and prefill vs reuse on the full-size config (random bf16 weights)
timeout 240 python3 -m bench.cli load --model qwen3-4b-random --device cuda --dtype bfloat16 \
  --lengths 3774,16384 --reuse-lengths 3774,16384 --repeats 3 --no-progress --out "$DEST" \
  2>&1 | tail -20
timeout 120 python3 -m bench.cli reuse --model qwen3-4b-random --device cuda --dtype bfloat16 \
  --lengths 3774,16384 --transports colocated,grpc --threads 0 --repeats 3 --no-progress --out "$DEST" \
  2>&1 | tail -10
echo "gpu run: $(( $(date +%s) - START )) s; results in $DEST"
