"""The 3B model: 32 layers x 2560, alternating RWKV-4 and attention layers, 16k context
trained in chunks of 1024 with the recurrent state (and the attention KV window) passed
between chunks, bf16 compute, remat on.

    python train.py --config=model_3b_rwkv [--config.train.steps=20]
"""

from rwkv_jax.configs import model_169m


def get_config():
    c = model_169m.get_config()
    c.experiment_name = "rwkv_3b"

    # model: sizes
    c.model.n_layer = 32
    c.model.n_embd = 2560
    c.model.dim_ffn = 4 * 2560
    c.model.attn_head_size = 128  # 20 heads
    c.model.attn_window = 1024  # each attention layer sees the current and the previous chunk

    # architecture: which layer is what, positions, initial state
    c.architecture.layer_pattern = "alternating"  # even RWKV, odd attention ("auto": by length)
    c.architecture.pos_emb = "rotary"  # attention layers only; RWKV layers need none
    c.architecture.learned_init_state = False

    # memory: long context by chunks with state passing
    c.train.max_seq_length = 16384
    c.memory.use_rwkv_chunking = True
    c.memory.rwkv_chunk_size = 1024
    c.memory.chunk_overlap = 0
    c.memory.state_compression = "none"

    # training efficiency
    c.efficiency.precision = "bfloat16"
    c.efficiency.wkv_chunk_size = 128
    c.efficiency.remat = True
    # Keep matrix-product outputs, recompute the rest: well above nothing_saveable's MFU and
    # still within an H100's memory (figures in docs/performance.md; bench/train_step.py).
    c.efficiency.remat_policy = "dots_with_no_batch_dims_saveable"
    c.efficiency.donate = True

    # optimizer: RWKV-LM's settings for its 3B models
    c.train.batch_size = 8
    c.train.steps = 20000
    c.optimizer.lr = 1.5e-4
    c.optimizer.lr_final = 1e-5
    c.optimizer.warmup_steps = 500
    c.optimizer.rwkv_lr_multiplier = 1.0
    c.optimizer.rwkv_att_weight_decay = 0.1
    c.optimizer.rwkv_ffn_weight_decay = 0.1

    # checkpointing and logging
    c.checkpoint.every = 1000
    c.checkpoint.keep = 2
    c.logging.every = 10
    c.logging.eval_every = 1000
    c.logging.eval_tokens = 65536
    return c
