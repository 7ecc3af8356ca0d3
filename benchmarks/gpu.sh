#!/usr/bin/env bash
# Usage: [BUDGET=500] [OUT=dir] benchmarks/gpu.sh [RUN ...]
# The SD1.5-size benchmarks on one GPU, with fused attention ('auto'; remat policies) and
# with XLA attention (no remat) for the ratio of the two, into $OUT (or ./gpu_out): one log per run, the JSON
# lines in results.jsonl, and for each profiled train step or sampling run where its time
# goes (NAME.ops.txt: by kernel category, then the top kernels; for sampling, the
# RealCustom loop and the CFG loop one after the other).
# RUNs (default: all, in this order: what no GPU has measured yet first, then the rest):
#   attention_check sampling_auto_b8 sampling_probs_b8 train_auto_b8 precompute_sd15
#   train_auto_b16 sampling_xla_b8 train_xla_b16 train_auto_b32_dots
# (sampling_probs_b8: the word maps' probabilities through XLA beside the fused kernel,
# config.model.fused_word_maps=False.)
# Runs go in order while BUDGET seconds last (an SD1.5 compile takes about a minute); a
# run with too little time left is skipped and says so.
# On a machine without the pins, install wheels first (diffusers 0.39.0, transformers 4.57.6,
# huggingface_hub 0.36.2, tokenizers 0.22.2, ml_collections 1.1.0) from ./.whl if present.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
end=$((SECONDS + ${BUDGET:-500}))
run() {  # name, least seconds it needs, command...
  local name=$1 least=$2; shift 2
  local left=$((end - SECONDS))
  if [ "$left" -lt "$least" ]; then echo "== $name skipped (${left} s of the budget left)"; return; fi
  echo "== $name (${left} s left)"
  local start=$SECONDS
  timeout "$left" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - start)) s"
  grep -v '^[WI][0-9]' "$OUT/$name.log" | tail -3
}
TRAIN="python3 -m benchmarks.train_step --config=configs/tiny.py --arch=sd15 --dtype=bfloat16 --peak_tflops=${PEAK_TFLOPS:-989} --steps=10"
SAMPLE="python3 -m benchmarks.sampling --config=configs/tiny.py --arch=sd15 --dtype=bfloat16 --steps=50 --compile_steps=50 --repeats=3"
summarise() {  # name, XLA module, trace dirs...: where the time goes, into NAME.ops.txt
  local name=$1 module=$2; shift 2
  for dir in "$@"; do
    [ -d "$dir" ] || continue
    echo "### $dir"
    python3 -m benchmarks.trace_summary "$dir" --module="$module" --by=category --top=10
    python3 -m benchmarks.trace_summary "$dir" --module="$module" --by=kernel --top=30
  done > "$OUT/$name.ops.txt" 2>&1
  grep '%' "$OUT/$name.ops.txt" | head -8
}
train() {  # name, flags...: the step, then where its time goes (three traced steps)
  local name=$1; shift
  run "$name" 100 $TRAIN "$@" --profile_dir="/tmp/prof_$name"
  summarise "$name" jit_step "/tmp/prof_$name"
}
sample() {  # name, least seconds, flags...: both loops timed, then one call of each traced
  local name=$1 least=$2; shift 2
  run "$name" "$least" $SAMPLE "$@" --profile_dir="/tmp/prof_$name"
  summarise "$name" "" "/tmp/prof_$name/realcustom" "/tmp/prof_$name/cfg"
}
one() {
  case $1 in
    attention_check) run attention_check 30 python3 -m benchmarks.attention_check ;;
    train_auto_b16) train train_auto_b16 --batch=16 --attention_impl=auto ;;
    sampling_auto_b8) sample sampling_auto_b8 150 --batch=8 --attention_impl=auto --unet_passes ;;
    sampling_probs_b8) run sampling_probs_b8 90 $SAMPLE --batch=8 --attention_impl=auto \
        --nofused_word_maps ;;
    sampling_xla_b8) sample sampling_xla_b8 100 --batch=8 --attention_impl=xla ;;
    train_xla_b16) train train_xla_b16 --batch=16 --attention_impl=xla ;;
    train_auto_b32_dots) train train_auto_b32_dots --batch=32 --attention_impl=auto --remat=dots ;;
    train_auto_b8) train train_auto_b8 --batch=8 --attention_impl=auto ;;
    precompute_sd15) run precompute_sd15 90 python3 -m benchmarks.precompute_speed --dtype=bfloat16 \
        --config=configs/tiny.py --arch=sd15 --batch=8 ;;
    *) echo "unknown run: $1" >&2; exit 2 ;;
  esac
}
if [ $# -eq 0 ]; then
  set -- attention_check sampling_auto_b8 sampling_probs_b8 train_auto_b8 precompute_sd15 \
         train_auto_b16 sampling_xla_b8 train_xla_b16 train_auto_b32_dots
fi
for name in "$@"; do one "$name"; done
grep -h '^{' "$OUT"/*.log > "$OUT/results.jsonl"; cat "$OUT/results.jsonl"
