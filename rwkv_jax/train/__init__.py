"""Training: a run prepared from its config (run.py), its starting point (init.py), the jitted
step (step.py), the loop (loop.py), with the optimizer (optim.py), shardings (sharding.py),
the memory plan (memory.py), metrics (metrics.py) and multi-process start-up (distributed.py).

    run = train.prepare(cfg); metrics = train.train(run)
"""

from rwkv_jax.train.init import (compile_step, freeze_base, init_train_state,
                                 load_initial_weights, make_optimizer, plan_shardings,
                                 read_initial_weights)
from rwkv_jax.train.loop import StepHook, train
from rwkv_jax.train.memory import MemoryPlanError, check_memory, peak_device_bytes, xla_step_bytes
from rwkv_jax.train.metrics import device_peak_flops, model_flops_per_token
from rwkv_jax.train.run import (ResumeError, Run, lock_run_dir, prepare, run_shape, run_summary,
                                unlock_run_dir)
from rwkv_jax.train.sharding import TrainShardings
from rwkv_jax.train.step import TrainingDiverged, TrainState, chunk_forward, make_train_step

__all__ = [
    "MemoryPlanError", "ResumeError", "Run", "StepHook", "TrainShardings", "TrainState",
    "TrainingDiverged", "check_memory", "chunk_forward", "compile_step", "device_peak_flops",
    "freeze_base",
    "init_train_state", "load_initial_weights", "lock_run_dir", "make_optimizer",
    "make_train_step", "model_flops_per_token", "peak_device_bytes", "plan_shardings", "prepare",
    "read_initial_weights", "run_shape", "run_summary", "train", "unlock_run_dir",
    "xla_step_bytes",
]
