"""ImageNet initialisation: DeiT / ViT weights (Hugging Face transformers layout) -> an audio transformer.

AST (Gong et al. 2021) starts from DeiT-B/16-384 distilled; ElasticAST (Feng et al. 2024) from ViT-B/16-224.
The transfer, written here against the transformers key names:

* patch projection: the RGB conv kernel ``[dim, 3, 16, 16]`` summed over colour -> ``[dim, 256]``;
* position grid (24 x 24 for DeiT-384, 14 x 14 for ViT-224): cut from the centre along an axis where the
  audio grid is smaller, bilinearly interpolated where it is larger, time first then frequency
  (``resize_grid``); AST keeps the grid, ElasticAST's factorised tables are the adapted grid averaged
  over the other axis;
* CLS / distillation tokens and their positions -> AST's two prefix tokens (dropped for ElasticAST);
* blocks: q|k|v fused, attention output, MLP, both LayerNorms, and the final LayerNorm;
* ElasticAST's attention pooling starts from the mean of the blocks' attention weights;
* the ImageNet classifier heads are dropped: head and head LayerNorm stay freshly initialised.

Only ``model.safetensors`` (``pytorch_model.bin`` if a repository has no safetensors file, read with
``weights_only=True``) and ``config.json`` are fetched, by ``astcli.model.hub.fetch`` (``HF_HUB_OFFLINE=1`` and
the standard cache honoured).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from astcli.errors import ModelError
from astcli.model.checkpoints import convert_hf_vit_blocks, read_weights
from astcli.model.config import ModelConfig
from astcli.model.hub import fetch
from astcli.model.transformer import AudioTransformer, resize_grid

DEIT_REPO = "facebook/deit-base-distilled-patch16-384"
VIT_REPO = "google/vit-base-patch16-224"
IMAGENET_SOURCES = {"ast": DEIT_REPO, "elastic": VIT_REPO}


def fetch_imagenet(repo_id: str, *, revision: str | None = None,
                   cache_dir: str | Path | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json as a dict, state dict)`` of a transformers DeiT / ViT checkpoint on the hub or in the cache."""
    files = fetch(repo_id, [("config.json",), ("model.safetensors", "pytorch_model.bin")], revision=revision,
                  cache_dir=cache_dir, instead="train from scratch (init none)")
    config_file = files["config.json"]
    weights_file = files.get("model.safetensors") or files["pytorch_model.bin"]
    try:
        meta = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{repo_id}: config.json is not valid JSON") from exc
    return meta, read_weights(weights_file)


def _prefix(state: dict[str, torch.Tensor]) -> str:
    """The key prefix in front of ``embeddings.cls_token`` ("deit.", "vit." or "" for a bare model)."""
    for key in state:
        if key.endswith("embeddings.cls_token"):
            return key[: -len("embeddings.cls_token")]
    raise ModelError("not a DeiT/ViT checkpoint: no embeddings.cls_token")


def _check(meta: dict, config: ModelConfig, repo: str) -> None:
    pairs = (("hidden_size", config.dim), ("num_hidden_layers", config.depth),
             ("num_attention_heads", config.heads), ("intermediate_size", config.mlp_dim),
             ("patch_size", config.patch_size))
    for key, want in pairs:
        have = meta.get(key)
        if have != want:
            raise ModelError(f"{repo}: {key} is {have}, the model needs {want} (ImageNet weights fit the base size)")
    channels = meta.get("num_channels", 3)
    if channels not in (1, 3):
        raise ModelError(f"{repo}: {channels} input channels")


def imagenet_state(meta: dict, state: dict[str, torch.Tensor], config: ModelConfig,
                   repo: str = "ImageNet checkpoint") -> dict[str, torch.Tensor]:
    """Map transformers DeiT/ViT tensors onto our keys for ``config``; head keys (and ElasticAST's pooling
    query) are left out, to keep their fresh initialisation."""
    _check(meta, config, repo)
    p = _prefix(state)
    e = p + "embeddings."

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ModelError(f"{repo}: lacks tensor {key}")
        return state[key].float()

    dim = config.dim
    conv = take(e + "patch_embeddings.projection.weight")  # [dim, channels, p, p]
    out = {"patch_embed.weight": conv.sum(1).reshape(dim, -1),
           "patch_embed.bias": take(e + "patch_embeddings.projection.bias")}
    pos = take(e + "position_embeddings")[0]  # [prefix + g*g, dim]
    has_dist = e + "distillation_token" in state
    n_prefix = 2 if has_dist else 1
    side = math.isqrt(pos.shape[0] - n_prefix)
    if side * side != pos.shape[0] - n_prefix:
        raise ModelError(f"{repo}: position table of {pos.shape[0]} entries is not a square grid")
    grid = resize_grid(pos[n_prefix:].reshape(side, side, dim), config.grid_freq, config.grid_time)
    if config.family == "ast":
        cls = take(e + "cls_token")[0]
        dist = take(e + "distillation_token")[0] if has_dist else cls
        tokens, token_pos = torch.cat([cls, dist]), torch.stack([pos[0], pos[n_prefix - 1]])
        out["prefix"] = tokens[: config.prefix_tokens]
        out["prefix_pos"] = token_pos[: config.prefix_tokens]
        out["pos_grid"] = grid.contiguous()
    else:
        out["pos_freq"] = grid.mean(1)
        out["pos_time"] = grid.mean(0)
    out.update(convert_hf_vit_blocks(take, p, config.depth, config.qkv_bias))
    out["norm.weight"], out["norm.bias"] = take(p + "layernorm.weight"), take(p + "layernorm.bias")
    if config.pooling == "attention":
        qkv_w = torch.stack([out[f"blocks.{i}.attn.qkv.weight"] for i in range(config.depth)]).mean(0)
        proj_w = torch.stack([out[f"blocks.{i}.attn.proj.weight"] for i in range(config.depth)]).mean(0)
        proj_b = torch.stack([out[f"blocks.{i}.attn.proj.bias"] for i in range(config.depth)]).mean(0)
        out["pool.q.weight"], out["pool.kv.weight"] = qkv_w[:dim], qkv_w[dim:]
        out["pool.proj.weight"], out["pool.proj.bias"] = proj_w, proj_b
        if config.qkv_bias:
            qkv_b = torch.stack([out[f"blocks.{i}.attn.qkv.bias"] for i in range(config.depth)]).mean(0)
            out["pool.q.bias"], out["pool.kv.bias"] = qkv_b[:dim], qkv_b[dim:]
        else:
            out["pool.q.bias"] = torch.zeros(dim)
            out["pool.kv.bias"] = torch.zeros(2 * dim)
    return out


def init_from_imagenet(model: AudioTransformer, repo_id: str | None = None, *, revision: str | None = None,
                       cache_dir: str | Path | None = None) -> list[str]:
    """Load ImageNet weights into ``model`` in place (DeiT-B/16-384 for AST, ViT-B/16-224 for ElasticAST
    unless ``repo_id`` is given). Returns the keys left at their fresh initialisation (the head)."""
    config = model.config
    repo = repo_id or IMAGENET_SOURCES[config.family]
    meta, state = fetch_imagenet(repo, revision=revision, cache_dir=cache_dir)
    mapped = imagenet_state(meta, state, config, repo)
    ours = model.state_dict()
    for key, value in mapped.items():
        if key not in ours:
            raise ModelError(f"{repo}: mapped tensor {key} has no place in the model")
        if tuple(value.shape) != tuple(ours[key].shape):
            raise ModelError(f"{repo}: {key} is {tuple(value.shape)}, the model needs {tuple(ours[key].shape)}")
    model.load_state_dict(mapped, strict=False)
    return sorted(set(ours) - set(mapped))
