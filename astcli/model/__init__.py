"""The shared model core: configuration, sequence packing, the packed transformer, checkpoint formats."""

from astcli.model.checkpoints import load_checkpoint, read_labels, save_checkpoint
from astcli.model.config import ModelConfig, ast_config, elastic_config
from astcli.model.packing import Clip, PackedBatch, batch_clips, drop_tokens, fit_frames, pack_clips, patchify
from astcli.model.transformer import AudioTransformer, resize_grid

__all__ = [
    "AudioTransformer",
    "Clip",
    "ModelConfig",
    "PackedBatch",
    "ast_config",
    "batch_clips",
    "drop_tokens",
    "elastic_config",
    "fit_frames",
    "load_checkpoint",
    "pack_clips",
    "patchify",
    "read_labels",
    "resize_grid",
    "save_checkpoint",
]
