"""Evaluation with EleutherAI's lm-evaluation-harness (the `eval` extra): RwkvLM, an lm-eval
model over a Generator. The command line that registers it is rwkv_jax.cli.lm_eval."""

from rwkv_jax.harness.lm_eval_model import RwkvLM

__all__ = ["RwkvLM"]
