#!/usr/bin/env bash
# Usage: [TRAIN_BUDGET=400] benchmarks/gpu.sh [all|sampling|train]. Runs the SD1.5-size benchmarks on one GPU, each printing a JSON line, into $OUT (or ./gpu_out).
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
  # Runs in order while the time budget lasts (TRAIN_BUDGET seconds for all train runs): the
  # SD1.5 train-step compile takes about a minute, so the most informative run goes first.
  TRAIN="python3 -m benchmarks.train_step --config=configs/tiny.py --arch=${ARCH:-sd15} --dtype=bfloat16 --peak_tflops=${PEAK_TFLOPS:-989} --steps=10"
  end=$((SECONDS + ${TRAIN_BUDGET:-400}))
  for variant in ${TRAIN_VARIANTS:-"train_bf16_xla_b8,--batch=8" "train_bf16_cudnn_b8,--batch=8,--attention_impl=cudnn" \
                 "train_bf16_xla_b16,--batch=16" "train_bf16_cudnn_b16,--batch=16,--attention_impl=cudnn"}; do
    IFS=, read -r -a args <<< "$variant"; set -- "${args[@]}"; name=$1; shift
    left=$((end - SECONDS))
    if [ "$left" -lt 120 ]; then echo "== $name skipped (${left} s of the budget left)"; continue; fi
    run "$name" "$left" $TRAIN "$@" --profile_dir="/tmp/prof_$name"
    # Where the step's time goes (a few steps traced after the timed ones).
    python3 -m benchmarks.trace_summary "/tmp/prof_$name" --top=30 > "$OUT/$name.ops.txt" 2>&1 &&
      head -16 "$OUT/$name.ops.txt"
  done
fi
grep -h '^{' "$OUT"/*.log > "$OUT/results.jsonl"; cat "$OUT/results.jsonl"
