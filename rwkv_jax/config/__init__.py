"""The configuration: the run config's schema (schema.py), the ModelConfig built from it
(model.py), its checks (validate.py) and the layer patterns of hybrids (layer_pattern.py)."""

from rwkv_jax.config.layer_pattern import LayerKind, resolve_layer_pattern
from rwkv_jax.config.model import ModelConfig, config_path, model_config_from, model_differences
from rwkv_jax.config.schema import (ATTN_IMPLS, DTYPES, MOVED, ON_DAMAGE, POS_EMBS, REMAT_POLICIES,
                                    SCHEMA, STATE_COMPRESSIONS, VERSIONS, ConfigError,
                                    default_config, describe_schema, official_lora_dim,
                                    resolve_moved, schema_default)
from rwkv_jax.config.validate import check_chunking, data_entries, optimizer_config_from, validate

__all__ = [
    "ATTN_IMPLS", "DTYPES", "MOVED", "ON_DAMAGE", "POS_EMBS", "REMAT_POLICIES", "SCHEMA",
    "STATE_COMPRESSIONS", "VERSIONS", "ConfigError", "LayerKind", "ModelConfig", "check_chunking",
    "config_path", "data_entries", "default_config", "describe_schema", "model_config_from", "model_differences",
    "official_lora_dim", "optimizer_config_from", "resolve_layer_pattern", "resolve_moved",
    "schema_default", "validate",
]
