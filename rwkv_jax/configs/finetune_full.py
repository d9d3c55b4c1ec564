"""Full fine-tuning of a released RWKV model (.pth) on a chat jsonl, with RWKV-PEFT's settings
(scripts/run_sft.sh: lr 2e-5 constant, no warm-up, betas 0.9 / 0.99, eps 1e-8, ctx 512, bf16,
gradient checkpointing). The model's shape comes from the base file:
    python train.py --config=finetune_full --config.train.init_from=RWKV-x070-World-1.5B.pth \\
        --config.data.train_file=chat.jsonl --config.data.val_file=chat_val.jsonl
"""

from rwkv_jax.config import default_config


def get_config():
    c = default_config()
    c.experiment_name = "finetune_full"
    c.data.tokenizer = "world"  # the released models' vocabulary
    c.train.trainable = "all"
    c.train.batch_size = 16
    c.train.max_seq_length = 512
    c.memory.rwkv_chunk_size = 512
    c.train.steps = 1000
    c.optimizer.total_steps = 1000
    c.optimizer.schedule = "constant"
    c.optimizer.lr = 2e-5
    c.optimizer.warmup_steps = 0
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.99, 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.rwkv_att_weight_decay = 0.0
    c.optimizer.rwkv_ffn_weight_decay = 0.0
    c.efficiency.precision = "bfloat16"
    c.efficiency.remat = True
    c.logging.every = 10
    c.logging.eval_every = 200
    c.checkpoint.every = 200
    return c
