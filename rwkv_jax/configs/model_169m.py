"""RWKV-4 169M (12 layers x 768, the size of RWKV-4-Pile-169M): a real GPU run.

    python train.py --config=model_169m
"""

from rwkv_jax.config import default_config
from rwkv_jax.data.text import sample_path


def get_config():
    c = default_config()
    c.experiment_name = "rwkv4_169m"
    # model
    c.model.n_layer = 12
    c.model.n_embd = 768
    # data: the RWKV World tokenizer (vocabulary 65536) on the Shakespeare sample
    c.data.tokenizer = "world"
    c.data.train_file = sample_path("train")
    c.data.val_file = sample_path("val")
    # memory: 4096-token sequences in chunks of 1024, state passed between chunks
    c.train.max_seq_length = 4096
    c.memory.rwkv_chunk_size = 1024
    # training efficiency
    c.efficiency.wkv_chunk_size = 128
    c.efficiency.precision = "bfloat16"
    c.efficiency.remat = False
    c.train.batch_size = 16
    c.train.steps = 2000
    # optimizer: RWKV-LM's 169M recipe
    c.optimizer.lr = 6e-4
    c.optimizer.lr_final = 1e-5
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "exponential"
    c.logging.eval_every = 500
    c.logging.eval_tokens = 65536
    c.checkpoint.every = 500
    return c
