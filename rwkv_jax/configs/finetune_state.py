"""State tuning of a released RWKV model (.pth) on a chat jsonl: only the initial state of each
layer trains (RWKV-PEFT's scripts/demo-state-tuning.sh: lr 1 decaying to 0.01, no warm-up).
Export the tuned state for ChatRWKV / RWKV-Runner / ai00 with
`infer.py --run_dir runs/finetune_state --export_state state.pth`.
    python train.py --config=finetune_state --config.train.init_from=RWKV-x070-World-1.5B.pth \\
        --config.data.train_file=chat.jsonl --config.data.val_file=chat_val.jsonl
"""

from rwkv_jax.configs.finetune_full import get_config as full_config


def get_config():
    c = full_config()
    c.experiment_name = "finetune_state"
    c.architecture.learned_init_state = True
    c.train.trainable = "state"
    c.optimizer.schedule = "cosine"
    c.optimizer.lr = 1.0
    c.optimizer.lr_final = 1e-2
    return c
