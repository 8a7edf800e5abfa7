#!/usr/bin/env bash
# Every single-GPU figure of the README in one device call, jaxpt and its references side by
# side, then bench/results/gpu.json (bench/gpu_summary.py). From the project root, with the
# references at shared/bench or ../shared/bench (REF=...):
#   OUT=$OUT bash bench/gpu.sh
# On a host of several GPUs everything runs on the first (CUDA_VISIBLE_DEVICES, unless set);
# PRESETS_GPU=1 times the presets (jaxpt alone, no reference) on that GPU meanwhile: on a
# 4 x H200 host the call took 326 s so, against over 560 in turn. PRESETS names the presets
# timed (default: the README's seven): on a one-GPU machine, time some in a second call.
set -u
OUT=${OUT:-bench/results/gpu}; mkdir -p "$OUT"
REF=${REF:-$( [ -d shared/bench ] && echo shared/bench || echo ../shared/bench )}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
run() { name=$1; shift; s=$(date +%s); "$@" >"$OUT/$name.log" 2>&1; echo "$name rc=$? $(( $(date +%s) - s ))s"; }
PRESETS=${PRESETS:-gpt gqa_glu_rope smollm tiny_moe tiny_moe_2 tiny_moe_3 charformer}
presets() { run presets python3 bench/presets.py --out="$OUT" --warmup=2 --steps=6 $PRESETS; }
[ -z "${PRESETS_GPU:-}" ] || CUDA_VISIBLE_DEVICES=$PRESETS_GPU presets &
run train python3 bench/train_step.py --out="$OUT" --batches=16,32
run torch python3 "$REF/ref_torch_gpt2.py" --out="$OUT" --configs=compile:16,compile:32
run launch env RUNS=one OUT="$OUT/launch" bash bench/scaling.sh  # the whole loop, on one GPU
run decode python3 bench/generate.py --out="$OUT" --dtype=bfloat16 --noreference
run decode_unrolled python3 bench/generate.py --out="$OUT/unrolled" --dtype=bfloat16 --noreference --noscan_layers
run hf python3 "$REF/ref_hf_generate.py" --out="$OUT" --with-compiled-static
[ -n "${PRESETS_GPU:-}" ] || presets
wait
python3 bench/gpu_summary.py --runs="$OUT" --out="$OUT"
