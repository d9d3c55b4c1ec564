"""LoRA fine-tuning of a released RWKV model (.pth) on a chat jsonl: adapters r=32, alpha=32 on
the time-mix and channel-mix projections, the layer norms trained whole, over a frozen bf16
base (RWKV-PEFT's scripts/run_lora.sh and its default train_parts). Export with
`infer.py --run_dir runs/finetune_lora --export_official merged.pth` or `--export_adapter`.
    python train.py --config=finetune_lora --config.train.init_from=RWKV-x070-World-1.5B.pth \\
        --config.data.train_file=chat.jsonl --config.data.val_file=chat_val.jsonl
PiSSA: add --config.train.trainable=pissa.
"""

from rwkv_jax.configs.finetune_full import get_config as full_config


def get_config():
    c = full_config()
    c.experiment_name = "finetune_lora"
    c.train.trainable = "lora"
    c.train.lora.rank = 32
    c.train.lora.alpha = 32.0
    c.train.lora.dropout = 0.0
    c.train.lora.targets = "att,ffn,ln"
    return c
