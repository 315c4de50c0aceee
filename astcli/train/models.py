"""The models a run trains: a pretrained tagger's transformer or a new architecture (seeded, optionally from
ImageNet weights), fitted to the resolved recipe (window, statistics, head type), with a new head per fold.

Every function returns a new model and leaves its argument as it was.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from astcli.errors import ParameterError
from astcli.model.checkpoints import load_transformer
from astcli.model.config import ModelConfig, ast_config, elastic_config
from astcli.model.transformer import AudioTransformer, resize_grid
from astcli.train.recipes import Recipe, window_config
from astcli.train.seeds import derive_seed

ARCHS = ("ast", "elastic")
SIZES = ("tiny", "small", "base")
INITS = ("imagenet", "none")
ELASTIC_MIN_FRAMES = 1024  # a new ElasticAST learns time positions for at least 1024 frames (10.24 s at 10 ms)


def pretrained_model(source: str) -> AudioTransformer:
    """The PyTorch model at ``source`` (a single-model preset, hub id, model directory or checkpoint), loaded
    through the checkpoint layer, in float32 and training mode.

    Raises UsageError for an ensemble preset or an ONNX file (there are no PyTorch weights to train)."""
    return load_transformer(source).train()


def architecture(arch: str, size: str, classes: list[str], window: int | None, options: dict) -> ModelConfig:
    """The configuration of a new ``arch`` model of ``size`` for ``classes``: AST with a ``window``-frame
    padded window, ElasticAST with time positions for max(1024, ``window``) frames and the standard 1/sqrt(d)
    attention scale; ``options`` override any field. ``window`` None: the family's default.

    Raises ParameterError for an unknown arch or size, or options that do not fit together."""
    if arch not in ARCHS:
        raise ParameterError("arch", f"must be one of {', '.join(ARCHS)} (got {arch!r})")
    if size not in SIZES:
        raise ParameterError("size", f"must be one of {', '.join(SIZES)} (got {size!r})")
    fields: dict = {"num_classes": len(classes), "labels": list(classes)}
    if arch == "ast":
        if window is not None:
            fields["max_frames"] = window
        make = ast_config
    else:
        fields["attn_scale"] = True
        fields["max_frames"] = max(ELASTIC_MIN_FRAMES, -(-(window or 0) // 16) * 16)
        make = elastic_config
    known = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ParameterError("model_options", f"has unknown key {unknown[0]!r} (valid keys: {', '.join(known)})")
    try:
        return make(size, **{**fields, **options})
    except ParameterError as exc:
        if exc.parameter not in options:
            raise
        raise ParameterError("model_options", f"{exc.parameter}={options[exc.parameter]!r}: {exc.problem}") from exc
    except (TypeError, ValueError) as exc:
        raise ParameterError("model_options", f"do not make a model: {exc}") from exc


def new_model(config: ModelConfig, *, init: str, seed: int) -> AudioTransformer:
    """A new model for ``config``, initialised from ``seed`` and, with ``init="imagenet"``, from ImageNet
    weights (DeiT-B/16-384 for AST, ViT-B/16-224 for ElasticAST; base size only)."""
    if init not in INITS:
        raise ParameterError("init", f"must be one of {', '.join(INITS)} (got {init!r})")
    torch.manual_seed(derive_seed(seed, "architecture"))
    model = AudioTransformer(config)
    if init == "imagenet":
        from astcli.train.imagenet import init_from_imagenet

        init_from_imagenet(model)
    return model


def adapt_window(model: AudioTransformer, frames: int) -> AudioTransformer:
    """An AST model whose padded window is ``frames`` frames: the position grid cut from the centre or
    interpolated along time as AST did (``resize_grid``). ElasticAST models are returned unchanged."""
    config = window_config(model.config, frames)
    if config is model.config:
        return model
    state = model.state_dict()
    state["pos_grid"] = resize_grid(state["pos_grid"], config.grid_freq, config.grid_time).contiguous()
    adapted = AudioTransformer(config)
    adapted.load_state_dict(state)
    return adapted


def fit_to_recipe(model: AudioTransformer, recipe: Recipe) -> AudioTransformer:
    """A copy of ``model`` at the resolved recipe's window, normalisation statistics and head type (sigmoid
    for a BCE loss, softmax for CE); its head is replaced per fold by :func:`with_new_head`."""
    adapted = adapt_window(model, recipe.window)
    if adapted is model:
        adapted = copy.deepcopy(model)
    adapted.config = dataclasses.replace(adapted.config, mean=float(recipe.mean), std=float(recipe.std),
                                         multi_label=recipe.loss == "bce")
    return adapted


def with_new_head(model: AudioTransformer, classes: list[str], seed: int, fold: int | None) -> AudioTransformer:
    """A copy of ``model`` with a fresh classifier for ``classes``, initialised from ``(seed, fold)``."""
    torch.manual_seed(derive_seed(seed, fold, "head"))
    return model.with_head(len(classes), classes, model.config.multi_label)
