#!/usr/bin/env bash
# Multi-GPU throughput of launch.py on one host, every mesh of the README's scaling table in one
# device call, then scaling.json (bench/scaling_summary.py). From the project root:
#   OUT=$OUT bash bench/scaling.sh            # on a 4-GPU machine (2-GPU rows on GPUs 0,1)
#   RUNS="one data4" OUT=$OUT bash bench/scaling.sh   # only the runs named (default: all)
#   EXTRA="--config.mesh.shard_optimizer=true" ...    # flags added to every run
# configs/gpt.py as shipped, PER_GPU x 1024 tokens per GPU, STEPS steps on a 4.5M-token corpus
# tokenized from text every Python ships; then GPT-2 1.5B (48 x 1600, 25 heads, unrolled as
# configs/gpt.py ships) with fsdp=4 at 8 x 1024 per GPU. tokens/s and MFU are the medians of the logged steps
# past FROM_STEP: an H200 reaches its power limit about 0.9 s into a run and runs slower from then on.
set -u
OUT=${OUT:-bench/results/scaling}; mkdir -p "$OUT"
PER_GPU=${PER_GPU:-16}; STEPS=${STEPS:-150}; FROM_STEP=${FROM_STEP:-75}  # logged every 5: 15 for the medians
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
data=/tmp/scaling_data  # .npy shards (read without a manifest): no `datasets` needed
if [ ! -f $data/scaling_train_1.npy ]; then python3 - $data <<'PY'
import pathlib, sys
import numpy as np, pydoc_data.topics
from jaxpt.data import get_tokenizer  # GPT-2's BPE offline
gpt2 = get_tokenizer("gpt2")
ids = gpt2.encode(" ".join(pydoc_data.topics.topics.values())) + [gpt2.eot_id]
ids = np.tile(np.array(ids, np.uint16), 30)  # about 4.5M tokens
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True)
np.save(out / "scaling_val_0.npy", ids[:200_000]); np.save(out / "scaling_train_1.npy", ids[200_000:])
PY
fi
common="--config=configs/gpt.py --config.data.dataset=$data --config.train.steps=$STEPS --config.eval.every_steps=1000 --config.eval.batches=2 --config.checkpoint.every_steps=1000 --config.log.every_steps=5"
# run NAME GPUS PER_GPU MESH [flags...]: MESH like data=2,fsdp=2 (the other axes 1), on the host's
# first GPUS GPUs or on DEVICES. RUNS="one" picks one_gpu1... too.
run() { name=$1; gpus=$2; per=$3; mesh=$4; shift 4
  [[ -z ${RUNS:-} || " $RUNS " == *" ${name%_gpu*} "* ]] || return 0
  flags="--config.mesh.data=1"
  for kv in ${mesh//,/ }; do flags="$flags --config.mesh.${kv%%=*}=${kv#*=}"; done
  s=$(date +%s); echo "date: $(date -u +%F) flags: $flags $* ${EXTRA:-}" >"$OUT/$name.log"
  CUDA_VISIBLE_DEVICES=${DEVICES:-$(seq -s, 0 $((gpus - 1)))} timeout 300 python3 launch.py $common \
    --workdir="$OUT/$name" --config.train.batch_size=$((per * gpus)) $flags "$@" ${EXTRA:-} >>"$OUT/$name.log" 2>&1
  echo "$name: $gpus GPU, $mesh, rc=$?, $(( $(date +%s) - s )) s"; rm -rf "$OUT/$name/checkpoints"; }
# One GPU alone on each GPU at once ("one" on the first, one_gpu<i> on the others), as the other runs
# load them all: linear is N x their mean (at the power limit one host's GPUs differ by a few %).
ids=${CUDA_VISIBLE_DEVICES:-$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd,)}
for i in ${ids//,/ }; do
  name=one_gpu$i; [ "$i" = "${ids%%,*}" ] && name=one
  DEVICES=$i run $name 1 $PER_GPU data=1 &  # most telling first: a call cut short keeps those
done; wait
run data4 4 $PER_GPU data=4
run fsdp4 4 $PER_GPU fsdp=4
run xl_fsdp4 4 8 fsdp=4 --config.model.n_layer=48 --config.model.n_embed=1600 \
  --config.model.n_head=25 --config.model.n_kv_head=25 --config.model.n_mlp_hidden=6400
run data2 2 $PER_GPU data=2
run fsdp2 2 $PER_GPU fsdp=2
run data2_fsdp2 4 $PER_GPU data=2,fsdp=2
python3 bench/scaling_summary.py --runs="$OUT" --out="$OUT" --from_step=$FROM_STEP
