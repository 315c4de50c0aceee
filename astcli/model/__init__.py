"""The shared model core: configuration, sequence packing, the packed transformer, checkpoint formats.

Names load on first use, so that torch-free parts (``presets``, ``hub``) stay quick to import.
"""

_HOMES = {
    "load_checkpoint": "checkpoints", "read_labels": "checkpoints", "save_checkpoint": "checkpoints",
    "ModelConfig": "config", "ast_config": "config", "elastic_config": "config",
    "Clip": "packing", "PackedBatch": "packing", "batch_clips": "packing", "drop_tokens": "packing",
    "fit_frames": "packing", "pack_clips": "packing", "patchify": "packing",
    "AudioTransformer": "transformer", "resize_grid": "transformer",
}

__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'astcli.model' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"astcli.model.{_HOMES[name]}"), name)
