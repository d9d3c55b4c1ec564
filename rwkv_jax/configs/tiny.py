"""The built-in default: a tiny RWKV-4 on the bundled Shakespeare sample, bytes as tokens.

Trains on a 2-core CPU in about six minutes and writes a checkpoint infer.py can use:
    python train.py --config=tiny
"""

from rwkv_jax.config import default_config
from rwkv_jax.data.text import sample_path


def get_config():
    c = default_config()
    c.experiment_name = "tiny"
    c.model.n_layer = 4
    c.model.n_embd = 128
    c.data.tokenizer = "byte"
    c.data.train_file = sample_path("train")
    c.data.val_file = sample_path("val")
    c.train.batch_size = 16
    c.train.max_seq_length = 256
    c.train.steps = 1500
    # The schedule's horizon belongs to the recipe: a shorter trial (train.steps=20) runs the
    # first steps of this same schedule.
    c.optimizer.total_steps = 1500
    c.memory.rwkv_chunk_size = 128
    c.optimizer.lr = 2e-3
    c.optimizer.lr_final = 2e-4
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.0
    c.optimizer.rwkv_att_weight_decay = 0.0
    c.optimizer.rwkv_ffn_weight_decay = 0.0
    c.logging.every = 25
    c.logging.eval_every = 500
    c.logging.eval_tokens = 32768
    c.checkpoint.every = 250
    return c
