#!/usr/bin/env bash
# Usage: benchmarks/gpu.sh [all|sampling|train]. Runs the SD1.5-size benchmarks on one GPU, each printing a JSON line, into $OUT (or ./gpu_out).
# On a machine without the pins, install wheels first (diffusers 0.39.0, transformers 4.57.6,
# huggingface_hub 0.36.2, tokenizers 0.22.2, ml_collections 1.1.0) from ./.whl if present.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v '^W\|^I0' | tail -4
}
WHAT=${1:-all}  # all | sampling | train
if [ "$WHAT" != train ]; then
  run sampling_bf16_b1 200 python3 -m benchmarks.sampling --config=configs/tiny.py --arch=sd15 --dtype=bfloat16 --batch=1
  run sampling_bf16_b4 200 python3 -m benchmarks.sampling --config=configs/tiny.py --arch=sd15 --dtype=bfloat16 --batch=4 --compile_steps=50
fi
if [ "$WHAT" != sampling ]; then
  TRAIN="python3 -m benchmarks.train_step --config=configs/tiny.py --arch=sd15 --dtype=bfloat16 --batch=8 --peak_tflops=989 --steps=8"
  run train_bf16_xla ${TRAIN_LIMIT:-400} $TRAIN
  run train_bf16_cudnn ${TRAIN_LIMIT:-400} $TRAIN --attention_impl=cudnn
fi
grep -h '^{' "$OUT"/*.log > "$OUT/results.jsonl"; cat "$OUT/results.jsonl"
