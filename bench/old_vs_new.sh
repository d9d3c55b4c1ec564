#!/usr/bin/env bash
# The restructure's speed check: this tree against an older one, in one run on one GPU.
#   git archive OLD_COMMIT | tar -x -C .old      # the older tree, ignored by git
#   run(command="bash bench/old_vs_new.sh .old", carry=[".whl", ".old"])
# 169M train step tokens/s (bench/train_step.py) and 3B batch-1 decode through the CUDA kernel
# (bench/decode.py), each for the old tree then this one; prints a table.
set -uo pipefail
OLD=${1:?the older tree}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/data
python3 -c "import lzma,sys; [open(f'/tmp/data/{s}.txt','wb').write(lzma.open(f'rwkv_jax/samples/shakespeare/{s}.txt.xz').read()) for s in ('train','val')]"
nvidia-smi --query-gpu=name --format=csv,noheader
for tree in "$OLD" .; do
  label=$([ "$tree" = . ] && echo new || echo old)
  (cd "$tree" && PYTHONPATH=/tmp/site:$PWD python3 bench/train_step.py --config=configs/model_169m.py \
     --config.data.train_file=/tmp/data/train.txt --config.data.val_file=/tmp/data/val.txt \
     --config.output_dir=/tmp/runs_$label --steps=10 --warmup=3 --label="169M $label" \
     --table="$OUT/train_step.md" 2>&1 | grep -E "^\||Error" | tail -2)
  (cd "$tree" && PYTHONPATH=/tmp/site:$PWD python3 bench/decode.py --gpu --models 3B --variants cuda \
     --no_rwkv --budget_s 150 --out "$OUT/decode_$label" 2>&1 | grep -E "^\||Error" | tail -12)
done
cat "$OUT/train_step.md"
