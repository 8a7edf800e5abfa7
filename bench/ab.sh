#!/usr/bin/env bash
# A/B of a bench (the train step by default): this tree's jaxpt against other copies of it in
# one device call, the variants alternating round by round so that drift hits them all alike.
# From the project root, each DIR a folder holding a `jaxpt` package, e.g.
# `mkdir .b-old && git archive REV jaxpt | tar -x -C .b-old` (ignored: list it in
# .git/info/exclude, and carry it to the device machine):
#   OUT=$OUT bash bench/ab.sh .b-old [DIR...]
#   ARGS="--preset=smollm --batches=8 --seq=2048" ROUNDS=3 OUT=$OUT bash bench/ab.sh .b-old
#   BENCH=generate ARGS="--dtype=bfloat16 --noreference --batches=1" bash bench/ab.sh .b-new
#   GPUS="0 1 2 3" bash bench/ab.sh .b-a .b-b .b-c .b-d   # each variant on its own GPU
# Every variant runs this tree's bench/$BENCH.py (train_step: GPT-2, 16 x 1024) with ARGS on
# the first GPU; prints each run's median milliseconds (a step; for generate, a whole call),
# one figure per row of its JSON, then each variant's median of the first over the rounds.
# With several GPUS the variants are dealt out to them in turn and each GPU compares its own
# against this tree at the same time (a host's GPUs differ by a percent or so: compare a
# variant only with the tree on its GPU).
set -u
[ $# -ge 1 ] || { echo "name at least one folder holding a jaxpt package to compare with" >&2; exit 2; }
for dir in "$@"; do
  [ -d "$dir/jaxpt" ] || { echo "$dir holds no jaxpt package; copy one there first" >&2; exit 2; }
done
OUT=${OUT:-bench/results/ab}; mkdir -p "$OUT"
read -ra gpus <<<"${GPUS:-}"
if [ ${#gpus[@]} -gt 1 ]; then
  dirs=("$@")
  for i in "${!gpus[@]}"; do
    mine=(); for ((j = i; j < ${#dirs[@]}; j += ${#gpus[@]})); do mine+=("${dirs[j]}"); done
    [ ${#mine[@]} -gt 0 ] || continue
    GPUS= CUDA_VISIBLE_DEVICES=${gpus[i]} OUT=$OUT/gpu${gpus[i]} bash "$0" "${mine[@]}" \
      >"$OUT/gpu${gpus[i]}.txt" 2>&1 &
  done
  wait
  for i in "${gpus[@]}"; do [ -f "$OUT/gpu$i.txt" ] && { echo "== GPU $i"; cat "$OUT/gpu$i.txt"; }; done
  exit 0
fi
BENCH=${BENCH:-train_step}; ARGS=${ARGS:---batches=16}; ROUNDS=${ROUNDS:-2}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-${gpus[0]:-0}} PYTHONUNBUFFERED=1
base=${PYTHONPATH:-}
for round in $(seq "$ROUNDS"); do
  for dir in . "$@"; do
    name=$(basename "$(cd "$dir" && pwd)"); [ "$dir" = . ] && name=tree
    PYTHONPATH=$dir${base:+:$base} python3 "bench/$BENCH.py" $ARGS --out="$OUT/$name-$round" \
      >"$OUT/$name-$round.log" 2>&1
    ms=$(python3 -c 'import json,sys; print(" ".join("%.2f" % (r.get("median_step_s", r.get("median_s")) * 1e3) for r in json.load(open(sys.argv[1]))["rows"]))' \
      "$OUT/$name-$round/$BENCH.json" 2>/dev/null || echo "failed (see $name-$round.log)")
    echo "round $round $name: $ms ms"
  done
done | tee "$OUT/ab.txt"
python3 - "$OUT/ab.txt" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    head, _, rest = line.partition(": ")
    if rest.split()[0].replace(".", "", 1).isdigit():
        runs[head.split()[2]].append(float(rest.split()[0]))
base = statistics.median(runs["tree"]) if runs.get("tree") else None
print(f"{'variant':<20} {'median ms':>15} {'vs tree':>8}")
for name, times in runs.items():
    median = statistics.median(times)
    ratio = f"{base / median:.3f}x" if base else "-"
    print(f"{name:<20} {median:>15.2f} {ratio:>8}")
PY
