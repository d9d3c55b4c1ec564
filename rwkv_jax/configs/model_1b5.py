"""RWKV-4 1.5B (24 layers x 2048), pure RWKV, bf16.

    python train.py --config=model_1b5
"""

from rwkv_jax.configs import model_169m


def get_config():
    c = model_169m.get_config()
    c.experiment_name = "rwkv4_1b5"
    c.model.n_layer = 24
    c.model.n_embd = 2048
    c.train.batch_size = 8
    c.efficiency.remat = True
    c.optimizer.lr = 3e-4
    return c
