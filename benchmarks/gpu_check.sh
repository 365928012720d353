#!/usr/bin/env bash
# The GPU checks of issue #11 in one go, for a session that has a CUDA machine:
#   1. benchmarks/gpu_throughput.py, BLIP-base shape K=1 and BLIP-large shape K=5, bf16,
#      capfilt against Hugging Face on the same weights (figures + FLOP-limit fraction);
#   2. pytest -m gpu (bf16 vs fp32 ITM scores and greedy captions, fused stage == two pools,
#      fast generation == the reference on CUDA).
# Everything it prints also lands in $OUT (default benchmarks/out): nvidia-smi.txt,
# base_k1.{txt,json}, large_k5.{txt,json}, pytest_gpu.txt, summary.txt.
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh   (about 5-8 minutes on one H100/H200)
set -u -o pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
status=0

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$OUT/nvidia-smi.txt"
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
  >> "$OUT/nvidia-smi.txt" 2>&1

run_bench() {  # name, then gpu_throughput.py arguments
  local name=$1; shift
  timeout 240 python benchmarks/gpu_throughput.py --device cuda --dtype bfloat16 --json "$OUT/$name.json" "$@" \
    2>&1 | tee "$OUT/$name.txt" || status=1
}
run_bench base_k1 --shape base --num-captions 1 --images 2048 --batch-size 256
run_bench large_k5 --shape large --num-captions 5 --images 512 --batch-size 128

timeout 300 python -m pytest -m gpu -q -s tests/unit/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.txt" || status=1

{
  echo "gpu_check.sh $(date -u +%FT%TZ) exit ${status}"
  tail -n 1 "$OUT/nvidia-smi.txt"  # torch, CUDA and GPU name
  for name in base_k1 large_k5; do
    echo "== $name"; tail -n 6 "$OUT/$name.txt"
  done
  echo "== pytest -m gpu"; tail -n 3 "$OUT/pytest_gpu.txt"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
exit $status
