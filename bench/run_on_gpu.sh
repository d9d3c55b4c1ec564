#!/usr/bin/env bash
# The GPU measurements of the closing notes, in one command on the lent GPU (device tool):
#   run(command="bash bench/run_on_gpu.sh WHAT", carry=[".whl"])
# WHAT: all (the original set), or one of attention, steps, nofit, train3b, cuda, and the open
# issues' runs, each under 10 minutes: ft (#33, ~5 min), serve (#34, ~6 min), train7 (#37,
# ~8 min), decode7 (#38, ~6 min). .whl holds the wheels the GPU image lacks (ml_collections,
# rwkv, tensorboardX, fla and fla-core; .whl/serve: fastapi, uvicorn, pydantic, ...); the data
# is the sample bundled in the package. Tables land in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl $(ls .whl/serve/*.whl 2>/dev/null) || exit 1
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
if [[ $what == ft ]]; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 540 python3 bench/finetune_memory.py --out /tmp/ft1b5 \
    --table "$OUT/ft_table.md" --only lora,full --steps 4 2>&1 | tee "$OUT/ft.log" | grep -E "^\||Error|Traceback"
fi
if [[ $what == serve ]]; then
  for v in 7 4; do
    timeout 270 python3 bench/serve.py --random $v --n_layer 24 --n_embd 2048 --vocab 65536 --bf16 \
      --prompt_len 128 --new_tokens 256 --clients 1,8,32,128 --row_s 8 2>&1 | tee "$OUT/serve$v.log" | tail -14
  done
fi
if [[ $what == train7 ]]; then
  timeout 560 python3 bench/train7_fla.py --out /tmp/t7 --profile --steps 8 --warmup 3 --timeout 240 \
    --remat default,dots_and_wkv_saveable 2>&1 | tee "$OUT/train7.log" | grep -vE "^  |^\[|^[IW][0-9]" | tail -70
fi
if [[ $what == decode7 ]]; then
  timeout 560 python3 bench/decode.py --version 7 --gpu --out /tmp/d7 2>&1 | tee "$OUT/decode7.log" | tail -20
fi
