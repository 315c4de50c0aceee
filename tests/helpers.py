"""Builders of tiny checkpoints in every format astcli reads, for tests (no network, a few KB each).

* ``make_hf_ast`` / ``save_hf_ast``: a transformers ``ASTForAudioClassification`` with random, perturbed
  weights, written with ``save_pretrained`` (+ ``preprocessor_config.json`` holding mean/std).
* ``hf_logits``: the transformers oracle on already padded + normalised features.
* ``ast_window``: pad (zeros, before normalisation) or truncate a raw fbank window, then normalise, as AST does.
* ``hf_saved_state`` / ``hf_to_original_ast``: the same weights in the original YuanGongND/ast ``.pth`` key layout.
* ``make_elastic_state``: random weights in the original ElasticAST ``.pth`` key layout.
* ``write_labels_csv``: an AudioSet-style ``index,mid,display_name`` label file.
* ``build_hub_cache``: a standard Hugging Face cache entry (``models--owner--name``) for a model directory.

Every converter here is written independently of ``astcli.model.checkpoints`` so the two check each other.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

AST_MEAN, AST_STD = -4.2677393, 4.5689974


def tiny_ast_config(num_labels: int = 5, **overrides):
    """A transformers ``ASTConfig`` small enough for unit tests (hidden 64, 2 layers, 4 heads, 200 frames)."""
    from transformers import ASTConfig

    kwargs = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_length=200,
        num_mel_bins=128, patch_size=16, frequency_stride=10, time_stride=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=num_labels,
        id2label={i: f"class {i}" for i in range(num_labels)},
        label2id={f"class {i}": i for i in range(num_labels)},
    )
    kwargs.update(overrides)
    return ASTConfig(**kwargs)


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add seeded noise to every parameter in place (LayerNorms stop being identities, biases non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    return module


def make_hf_ast(config=None, seed: int = 0, **overrides):
    """A transformers ``ASTForAudioClassification`` in eval mode with seeded, perturbed random weights.

    ``config`` defaults to ``tiny_ast_config(**overrides)``. Eager attention, so the oracle takes the
    plainest code path.
    """
    from transformers import ASTForAudioClassification

    torch.manual_seed(seed)
    config = config if config is not None else tiny_ast_config(**overrides)
    config._attn_implementation = "eager"
    model = ASTForAudioClassification(config)
    return perturb_(model, seed).eval()


def save_hf_ast(model, directory: str | Path, mean: float = AST_MEAN, std: float = AST_STD) -> Path:
    """``save_pretrained`` plus an ``ASTFeatureExtractor``-style ``preprocessor_config.json``; returns the dir."""
    directory = Path(directory)
    model.save_pretrained(directory)
    prep = {
        "feature_extractor_type": "ASTFeatureExtractor", "do_normalize": True, "feature_size": 1,
        "max_length": model.config.max_length, "num_mel_bins": model.config.num_mel_bins,
        "mean": mean, "std": std, "padding_side": "right", "padding_value": 0.0,
        "return_attention_mask": False, "sampling_rate": 16000,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(prep, indent=2), encoding="utf-8")
    return directory


def ast_window(raw: torch.Tensor, max_length: int, mean: float = AST_MEAN, std: float = AST_STD) -> torch.Tensor:
    """Raw fbank ``[frames, mel]`` -> AST input ``[max_length, mel]``: zero-pad at the end (before
    normalisation) or truncate, then ``(x - mean) / (2 * std)``."""
    frames = raw.shape[0]
    if frames < max_length:
        raw = torch.cat([raw, raw.new_zeros(max_length - frames, raw.shape[1])])
    return (raw[:max_length] - mean) / (2 * std)


def hf_logits(model, inputs: torch.Tensor) -> torch.Tensor:
    """Logits of the transformers model on normalised features ``[batch, max_length, mel]``."""
    with torch.inference_mode():
        return model(input_values=inputs).logits


def hf_saved_state(model) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` writes, under the hub's key names (``encoder.layer.N.attention.attention.
    query``, ...): transformers 5 renames modules in memory (``layers.N.attention.q_proj``) but saves the
    legacy names, which is what checkpoints on the hub hold."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return load_file(str(Path(tmp) / "model.safetensors"))


def hf_to_original_ast(hf: dict[str, torch.Tensor], with_timm_heads: bool = True) -> dict[str, torch.Tensor]:
    """transformers AST weights as saved (see ``hf_saved_state``) -> the original YuanGongND/ast ``.pth``
    layout (``module.v.*``, ``module.mlp_head.*``).

    Released checkpoints also keep timm's unused ImageNet heads ``v.head`` / ``v.head_dist``
    (1000 classes); ``with_timm_heads`` adds such tensors so loaders must ignore them.
    """
    a, e = "audio_spectrogram_transformer.", "audio_spectrogram_transformer.embeddings."
    out = {
        "module.v.cls_token": hf[e + "cls_token"],
        "module.v.dist_token": hf[e + "distillation_token"],
        "module.v.pos_embed": hf[e + "position_embeddings"],
        "module.v.patch_embed.proj.weight": hf[e + "patch_embeddings.projection.weight"],
        "module.v.patch_embed.proj.bias": hf[e + "patch_embeddings.projection.bias"],
        "module.v.norm.weight": hf[a + "layernorm.weight"],
        "module.v.norm.bias": hf[a + "layernorm.bias"],
        "module.mlp_head.0.weight": hf["classifier.layernorm.weight"],
        "module.mlp_head.0.bias": hf["classifier.layernorm.bias"],
        "module.mlp_head.1.weight": hf["classifier.dense.weight"],
        "module.mlp_head.1.bias": hf["classifier.dense.bias"],
    }
    layers = sorted({int(k.split(".")[3]) for k in hf if k.startswith(a + "encoder.layer.")})
    for i in layers:
        src, dst = f"{a}encoder.layer.{i}.", f"module.v.blocks.{i}."
        for part in ("weight", "bias"):
            qkv = [hf[f"{src}attention.attention.{n}.{part}"] for n in ("query", "key", "value")]
            out[f"{dst}attn.qkv.{part}"] = torch.cat(qkv)
            for theirs, ours in (("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"),
                                 ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
                                 ("output.dense", "mlp.fc2")):
                out[f"{dst}{ours}.{part}"] = hf[f"{src}{theirs}.{part}"]
    if with_timm_heads:
        dim = out["module.v.cls_token"].shape[-1]
        gen = torch.Generator().manual_seed(123)
        for head in ("head", "head_dist"):
            out[f"module.v.{head}.weight"] = torch.randn(1000, dim, generator=gen)
            out[f"module.v.{head}.bias"] = torch.randn(1000, generator=gen)
    return {k: v.detach().clone() for k, v in out.items()}


def make_elastic_state(dim: int = 128, depth: int = 2, num_classes: int = 6, freq_patches: int = 8,
                       time_patches: int = 24, mlp_dim: int | None = None, seed: int = 0,
                       patch: int = 16) -> dict[str, torch.Tensor]:
    """Random weights in the original ElasticAST ``.pth`` layout (``module.`` prefix, ``blocks.modules_list``).

    ``freq_patches * patch`` mel bins, ``time_patches * patch`` frames at most; LayerNorm weights
    around 1, everything else small, so activations stay in a sane range.
    """
    gen = torch.Generator().manual_seed(seed)
    mlp_dim = mlp_dim or 4 * dim

    def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def linear(name: str, n_out: int, n_in: int, state: dict) -> None:
        state[name + ".weight"] = rand(n_out, n_in, scale=n_in**-0.5)
        state[name + ".bias"] = rand(n_out)

    def norm(name: str, state: dict) -> None:
        state[name + ".weight"] = 1.0 + rand(dim, scale=0.1)
        state[name + ".bias"] = rand(dim, scale=0.1)

    s: dict[str, torch.Tensor] = {}
    linear("patch_embed.0", dim, patch * patch, s)
    s["pos_embed_freq"] = rand(freq_patches, dim, scale=0.5)
    s["pos_embed_time"] = rand(time_patches, dim, scale=0.5)
    for i in range(depth):
        b = f"blocks.modules_list.{i}."
        norm(b + "norm1", s)
        linear(b + "attn.to_q", dim, dim, s)
        linear(b + "attn.to_kv", 2 * dim, dim, s)
        linear(b + "attn.proj", dim, dim, s)
        norm(b + "norm2", s)
        linear(b + "mlp.fc1", mlp_dim, dim, s)
        linear(b + "mlp.fc2", dim, mlp_dim, s)
    norm("norm", s)
    s["attn_pool_queries"] = rand(dim, scale=1.0)
    linear("attn_pool.to_q", dim, dim, s)
    linear("attn_pool.to_kv", 2 * dim, dim, s)
    linear("attn_pool.proj", dim, dim, s)
    norm("mlp_norm", s)
    linear("head", num_classes, dim, s)
    return {"module." + k: v for k, v in s.items()}


def write_labels_csv(path: str | Path, num_classes: int) -> list[str]:
    """Write an AudioSet-style ``index,mid,display_name`` CSV (names with commas, quoted); returns the names."""
    names = [f"Sound {i}, type {i % 3}" for i in range(num_classes)]
    lines = ["index,mid,display_name"] + [f'{i},/m/{i:04x},"{n}"' for i, n in enumerate(names)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return names


def build_hub_cache(cache: str | Path, repo_id: str, model_dir: str | Path,
                    commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Copy a model directory into a standard Hugging Face hub cache at ``cache`` (the ``HF_HUB_CACHE``):
    ``models--owner--name/snapshots/<commit>/...`` and ``refs/main`` -> ``commit``. Returns the snapshot dir."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        if (Path(model_dir) / name).is_file():
            shutil.copyfile(Path(model_dir) / name, snapshot / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    return snapshot
