"""The model on the official parameter layout: shared pieces (common.py), RWKV-4 (rwkv4.py),
RWKV-7 (rwkv7.py), attention blocks of hybrids (attention.py), the model (model.py), its
recurrent state (state.py) and the state's compression (state_codec.py)."""

from rwkv_jax.nn.model import RWKV, count_params, init_params, initial_state, param_shapes
from rwkv_jax.nn.state import FlatLayout, state_shapes, zero_state

__all__ = ["RWKV", "FlatLayout", "count_params", "init_params", "initial_state", "param_shapes",
           "state_shapes", "zero_state"]
