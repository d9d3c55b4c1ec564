#!/usr/bin/env bash
# The GPU measurements of the closing notes, in one command on the lent GPU (device tool):
#   run(command="bash bench/run_on_gpu.sh", carry=[".whl"])
# .whl holds the wheels the GPU image lacks (ml_collections, rwkv, tensorboardX); the data is
# the sample bundled in the package.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DATA="--config.output_dir=/tmp/runs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
what=${1:-all}
if [[ $what == all || $what == attention ]]; then
  python3 bench/attention.py 2>&1 | tee "$OUT/attention.md" | tail -8
fi
if [[ $what == all || $what == steps ]]; then
  for impl in ${IMPLS:-chunked assoc}; do
    python3 bench/train_step.py --config=configs/model_169m.py $DATA --config.efficiency.wkv_impl=$impl \
      --steps=8 --warmup=3 --label="169M wkv=$impl" --table="$OUT/train_step.md" 2>&1 | grep -E "^\||loss|Error|error" | tail -4
  done
  for policy in ${POLICIES:-nothing_saveable}; do
    python3 bench/train_step.py --config=configs/model_3b_rwkv.py $DATA --steps=5 --warmup=2 \
      --config.efficiency.remat_policy=$policy --label="3B hybrid" --table="$OUT/train_step.md" 2>&1 \
      | tee -a "$OUT/bench_3b.log" | grep -E "^\||loss|memory|GiB|Error|error" | tail -16
  done
fi
if [[ $what == all || $what == nofit ]]; then
  # The memory plan stops a config that cannot fit before anything compiles.
  python3 train.py --config=configs/model_3b_rwkv.py $DATA --config.efficiency.remat=False \
    --config.logging.progress=False 2>&1 | grep -vE "^[IW][0-9]" | tail -12; echo "exit code $?"
fi
if [[ $what == all || $what == train3b ]]; then
  python3 train.py --config=configs/model_3b_rwkv.py $DATA --config.train.steps=${STEPS3B:-20} --config.optimizer.warmup_steps=4 \
    --config.logging.every=4 --config.logging.eval_every=0 --config.checkpoint.every=0 \
    --config.logging.progress=False 2>&1 | tee "$OUT/train_3b.log" | grep -vE "^W[0-9]" | tail -20
fi
echo; cat "$OUT/train_step.md" 2>/dev/null
if [[ $what == all || $what == cuda ]]; then
  # The CUDA decode block: its tests, and 3B decoding end to end against XLA's products.
  python3 -m pytest -q tests/ops/test_cuda_decode.py 2>&1 | grep -E "^E |Error|passed|failed" | tail -25
  python3 bench/decode.py --gpu --models 3B --variants xla,cuda --no_rwkv --out "$OUT/decode" 2>&1 \
    | grep -A4 "^| model | ours"
fi
