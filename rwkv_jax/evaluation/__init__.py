"""Evaluation: a token stream's loss through the recurrent state, and bits per byte."""

from rwkv_jax.evaluation.score import bits_per_byte, evaluate, jitted_apply, score_stream

__all__ = ["bits_per_byte", "evaluate", "jitted_apply", "score_stream"]
