"""Weights and checkpoints on disk: orbax training checkpoints (checkpoint.py) and what keeps them
honest (integrity.py); official RWKV-LM .pth weights in and out (official.py); Hugging Face
folders in and out (hf.py); learned initial states as state files (state_file.py)."""

from rwkv_jax.io.checkpoint import (TrainCheckpointer, find_checkpoint_dir, model_config_of,
                                    restore_params)
from rwkv_jax.io.hf import export_hf, hf_model_type, import_hf
from rwkv_jax.io.integrity import (CheckpointWriteError, DamagedCheckpointError,
                                   check_finite_params, tree_checksums, tree_dtypes)
from rwkv_jax.io.official import (check_export_path, export_official, import_official,
                                  load_official_state_dict, official_layout, official_version)
from rwkv_jax.io.state_file import export_state, load_state, state_tree

__all__ = [
    "CheckpointWriteError", "DamagedCheckpointError", "TrainCheckpointer", "check_export_path",
    "check_finite_params", "export_hf", "export_official", "export_state", "find_checkpoint_dir",
    "hf_model_type", "import_hf", "import_official", "load_official_state_dict", "load_state", "model_config_of",
    "official_layout", "official_version", "restore_params", "state_tree", "tree_checksums",
    "tree_dtypes",
]
