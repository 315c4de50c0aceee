"""Checkpoint formats: our own directory, Hugging Face transformers AST, original AST and ElasticAST files.

Every loader returns ``(ModelConfig, state_dict)`` in our key names; weights are read with safetensors
or ``torch.load(weights_only=True)``, never unpickled unsafely. Problems raise one-line ``ModelError``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from astcli import files
from astcli.errors import ModelError, UsageError
from astcli.model.config import DEFAULT_STATS, ModelConfig, with_scores
from astcli.model.hub import hub_snapshot
from astcli.model.presets import get_preset
from astcli.model.transformer import AudioTransformer

OWN_FORMAT = "astcli-model"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
AUDIOSET_CLASSES = 527


# -- reading files -------------------------------------------------------------------------------------


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch pickle file, loaded safely, ``module.`` prefixes removed."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise ModelError(f"{path}: is a directory, not a checkpoint file") from exc
    except pickle.UnpicklingError as exc:  # torch's own message is many lines, with terminal escapes
        raise ModelError(f"{path}: refused by the weights-only loader (corrupt, or pickled objects "
                         "other than tensors)") from exc
    except Exception as exc:  # torch and safetensors raise many types for bad files
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a readable checkpoint ({reason})") from exc
    for wrapper in ("state_dict", "model_state", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: does not hold a dictionary of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


_LABEL_DELIMITERS = (",", ";", "\t")
_NAME_COLUMNS = ("display_name", "name", "label")


def read_labels(path: str | Path) -> list[str]:
    """Class names from a label file; raises ModelError naming what is wrong.

    * CSV (AudioSet's ``index,mid,display_name``; ``,``, ``;`` or tab delimited; a UTF-8 byte-order mark is
      ignored): the header names an ``index`` column and a ``display_name`` (or ``name`` / ``label``) column;
      the index column must number the classes exactly 0..N-1 (a duplicate or a gap is an error).
    * JSON: a list of names, or an ``{index: name}`` mapping (optionally under ``id2label``) over 0..N-1.
    * Anything else: one label per line (a ``.csv`` / ``.tsv`` file must have the header).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read labels ({exc.__class__.__name__})") from exc
    if path.suffix.lower() == ".json":
        return _json_labels(path, text)
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    header = _label_header(first)
    if header is not None:
        return _csv_labels(path, lines, *header)
    if path.suffix.lower() in (".csv", ".tsv") or "index" in first.lower():
        raise ModelError(f"{path}: a CSV label file needs a header naming the columns index and display_name "
                         f"(as index,mid,display_name; separated by commas, semicolons or tabs), not {first[:60]!r}")
    labels = [line.strip() for line in lines if line.strip()]
    if not labels:
        raise ModelError(f"{path}: no labels in file")
    return labels


def _label_header(line: str) -> tuple[str, int, int] | None:
    """(delimiter, index column, name column) when ``line`` is a label CSV header, else None."""
    for delimiter in _LABEL_DELIMITERS:
        columns = [c.strip().strip('"').lower() for c in next(csv.reader([line], delimiter=delimiter), [])]
        names = [columns.index(n) for n in _NAME_COLUMNS if n in columns]
        if "index" in columns and names:
            return delimiter, columns.index("index"), names[0]
    return None


def _csv_labels(path: Path, lines: list[str], delimiter: str, index_col: int, name_col: int) -> list[str]:
    rows = [(number, row) for number, row in enumerate(csv.reader(lines, delimiter=delimiter), 1) if row]
    entries = []  # (index, name, line)
    for number, row in rows[1:]:
        if len(row) <= max(index_col, name_col):
            raise ModelError(f"{path}: line {number} has {len(row)} fields, the header names more "
                             f"(separated by {delimiter!r})")
        try:
            entries.append((int(row[index_col]), row[name_col].strip(), f"line {number}"))
        except ValueError as exc:
            raise ModelError(f"{path}: line {number}: index {row[index_col]!r} is not a whole number") from exc
    return _numbered(path, entries)


def _numbered(path: Path, entries: list[tuple[int, str, str]]) -> list[str]:
    """The names of ``(index, name, where)`` entries, whose indices must be exactly 0..N-1; a duplicate and a
    gap are named (with where the duplicate stands)."""
    if not entries:
        raise ModelError(f"{path}: no labels in file")
    where: dict[int, list[str]] = {}
    for index, _, place in entries:
        where.setdefault(index, []).append(place)
    problems = [f"index {i} appears {len(p)} times ({', '.join(p)})" for i, p in where.items() if len(p) > 1]
    missing = sorted(set(range(len(entries))) - set(where))
    if missing:
        problems.append(f"{'index' if len(missing) == 1 else 'indices'} {', '.join(map(str, missing[:5]))}"
                        f"{' ...' if len(missing) > 5 else ''} missing")
    if problems:
        raise ModelError(f"{path}: {'; '.join(problems)}: the indices must number the classes 0..{len(entries) - 1}")
    return [name for _, name, _ in sorted(entries)]


def _json_labels(path: Path, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: invalid JSON labels (line {exc.lineno})") from exc
    data = data.get("id2label", data) if isinstance(data, dict) else data
    if isinstance(data, list) and data:
        return [str(x) for x in data]
    if isinstance(data, dict):
        try:
            entries = [(int(k), str(v), f"key {k!r}") for k, v in data.items()]
        except ValueError as exc:
            raise ModelError(f"{path}: label JSON keys must be class indices 0..N-1") from exc
        return _numbered(path, entries)
    raise ModelError(f"{path}: labels JSON must be a non-empty list or an index->name mapping")


# -- our own format ------------------------------------------------------------------------------------


def save_checkpoint(directory: str | Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``directory`` (created); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files.save_tensors(state, directory / "model.safetensors")
    payload = {"format": OWN_FORMAT, **config.to_dict()}
    files.write_text(directory / "config.json", json.dumps(payload, indent=2) + "\n")
    return directory


def _load_own(directory: Path, meta: dict) -> tuple[ModelConfig, dict]:
    meta = {k: v for k, v in meta.items() if k != "format"}
    try:
        config = ModelConfig.from_dict(meta)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{directory}/config.json: {exc}") from exc
    return config, read_weights(_weights_file(directory, ("model.safetensors",)))


def _weights_file(directory: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise ModelError(f"{directory}: no weights file ({' or '.join(names)})")


# -- Hugging Face transformers AST ---------------------------------------------------------------------


def _load_hf(directory: Path, meta: dict) -> tuple[ModelConfig, dict]:
    """A transformers ``ASTForAudioClassification`` directory (config.json + weights + preprocessor)."""
    id2label = meta.get("id2label") or {}
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    try:
        num_classes = len(labels)
        problem = meta.get("problem_type")
        multi = problem == "multi_label_classification" or (problem is None and num_classes == AUDIOSET_CLASSES)
        mel, frames = meta.get("num_mel_bins", 128), meta.get("max_length", 1024)
        config = ModelConfig(
            family="ast", dim=meta["hidden_size"], depth=meta["num_hidden_layers"],
            heads=meta["num_attention_heads"], mlp_dim=meta["intermediate_size"],
            patch_size=meta.get("patch_size", 16), freq_stride=meta.get("frequency_stride", 10),
            time_stride=meta.get("time_stride", 10), num_mel_bins=mel, max_frames=frames,
            layer_norm_eps=meta.get("layer_norm_eps", 1e-12), qkv_bias=meta.get("qkv_bias", True),
            num_classes=num_classes, multi_label=multi, labels=labels,
            **_hf_features(directory / "preprocessor_config.json", mel, frames),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{directory}/config.json: not a usable AST config ({exc})") from exc
    hf = read_weights(_weights_file(directory, HF_WEIGHTS))
    return config, convert_hf_ast(hf, config)


def _hf_features(prep_file: Path, num_mel_bins: int, max_length: int) -> dict:
    """Normalisation (``mean``, ``std``) from transformers' ``ASTFeatureExtractor`` settings, honouring every
    field of ``preprocessor_config.json`` that changes the features; a value astcli cannot reproduce exactly
    is a ModelError naming the field. ``do_normalize: false`` becomes mean 0, std 0.5: ``(x - 0) / (2 * 0.5)``
    is ``x`` exactly. The extractor's padding fields only pad waveform batches and leave AST features alone."""
    try:
        prep = json.loads(prep_file.read_text(encoding="utf-8")) if prep_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{prep_file}: not valid JSON") from exc
    if not isinstance(prep, dict):
        raise ModelError(f"{prep_file}: not a JSON object")

    def refuse(field: str, why: str) -> ModelError:
        return ModelError(f"{prep_file}: {field} {prep[field]!r} {why}")

    kind = prep.get("feature_extractor_type", "ASTFeatureExtractor")
    if kind != "ASTFeatureExtractor":
        raise refuse("feature_extractor_type", "is not AST's Kaldi fbank extractor")
    for field, want, why in (("sampling_rate", 16000, "is not supported: AST features are Kaldi fbank at "
                              "16000 Hz (transformers' own extractors disagree at other rates)"),
                             ("feature_size", 1, "is not supported: AST takes mono audio"),
                             ("num_mel_bins", num_mel_bins, f"differs from the model's num_mel_bins {num_mel_bins}"),
                             ("max_length", max_length, f"differs from the model's max_length {max_length}")):
        if field in prep and prep[field] != want:
            raise refuse(field, why)
    if not isinstance(prep.get("do_normalize", True), bool):
        raise refuse("do_normalize", "is not true or false")
    if not prep.get("do_normalize", True):
        return {"mean": 0.0, "std": 0.5}
    mean, std = DEFAULT_STATS["ast"]
    stats = {"mean": prep.get("mean", mean), "std": prep.get("std", std)}
    for field, value in stats.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise refuse(field, "is not a finite number")
    if stats["std"] <= 0:
        raise refuse("std", "is not positive")
    return {k: float(v) for k, v in stats.items()}


def convert_hf_ast(hf: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers AST keys -> ours."""
    a = "audio_spectrogram_transformer."
    e = a + "embeddings."
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise ModelError(f"AST checkpoint lacks {key}")
        return hf[key]

    pos = take(e + "position_embeddings")[0]
    out["prefix"] = torch.cat([take(e + "cls_token")[0], take(e + "distillation_token")[0]])
    out["prefix_pos"] = pos[:2]
    out["pos_grid"] = _grid(pos[2:], config)
    weight = take(e + "patch_embeddings.projection.weight")
    out["patch_embed.weight"] = weight.reshape(weight.shape[0], -1)
    out["patch_embed.bias"] = take(e + "patch_embeddings.projection.bias")
    out.update(convert_hf_vit_blocks(take, a, config.depth, config.qkv_bias))
    finals = (("norm", a + "layernorm"), ("head_norm", "classifier.layernorm"), ("head", "classifier.dense"))
    for ours, theirs in finals:
        out[ours + ".weight"], out[ours + ".bias"] = take(theirs + ".weight"), take(theirs + ".bias")
    return out


def convert_hf_vit_blocks(take, prefix: str, depth: int, qkv_bias: bool) -> dict[str, torch.Tensor]:
    """Encoder blocks in transformers' ViT layout (shared by AST, DeiT and ViT: ``{prefix}encoder.layer.N.*``)
    -> ours; ``take(key)`` returns a tensor or raises ModelError."""
    out = {}
    for i in range(depth):
        src, dst = f"{prefix}encoder.layer.{i}.", f"blocks.{i}."
        qkv = [src + f"attention.attention.{n}" for n in ("query", "key", "value")]
        out[dst + "attn.qkv.weight"] = torch.cat([take(k + ".weight") for k in qkv])
        if qkv_bias:
            out[dst + "attn.qkv.bias"] = torch.cat([take(k + ".bias") for k in qkv])
        for ours, theirs in (("attn.proj", "attention.output.dense"), ("fc1", "intermediate.dense"),
                             ("fc2", "output.dense"), ("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            out[f"{dst}{ours}.weight"] = take(f"{src}{theirs}.weight")
            out[f"{dst}{ours}.bias"] = take(f"{src}{theirs}.bias")
    return out


def _grid(flat: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    f, t = config.grid_freq, config.grid_time
    if flat.shape[0] != f * t:
        raise ModelError(f"position table has {flat.shape[0]} entries, the config implies {f}x{t}")
    return flat.reshape(f, t, -1)


# -- original AST (.pth) -------------------------------------------------------------------------------

COMMON_FRAMES = (1024, 512, 128, 100)


def convert_original_ast(state: dict[str, torch.Tensor], labels: list[str]) -> tuple[ModelConfig, dict]:
    """YuanGongND/ast checkpoint (``v.*`` + ``mlp_head.*``): strides from the position table's size."""
    pos, weight = state["v.pos_embed"][0], state["v.patch_embed.proj.weight"]
    dim, patch = weight.shape[0], weight.shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("v.blocks."))
    n_prefix = 2 if "v.dist_token" in state else 1
    stride, frames = _ast_geometry(pos.shape[0] - n_prefix, patch)
    num_classes = state["mlp_head.1.weight"].shape[0]
    mean, std = DEFAULT_STATS["ast"]
    config = ModelConfig(
        family="ast", dim=dim, depth=depth, heads=max(1, dim // 64),
        mlp_dim=state["v.blocks.0.mlp.fc1.weight"].shape[0], patch_size=patch, freq_stride=stride,
        time_stride=stride, max_frames=frames, prefix_tokens=n_prefix, pooling="cls_dist" if n_prefix == 2 else "cls",
        layer_norm_eps=1e-6, qkv_bias="v.blocks.0.attn.qkv.bias" in state, num_classes=num_classes,
        multi_label=num_classes == AUDIOSET_CLASSES, mean=mean, std=std, labels=labels,
    )
    prefix = [state["v.cls_token"][0]] + ([state["v.dist_token"][0]] if n_prefix == 2 else [])
    out = {
        "prefix": torch.cat(prefix), "prefix_pos": pos[:n_prefix], "pos_grid": _grid(pos[n_prefix:], config),
        "patch_embed.weight": weight.reshape(dim, -1), "patch_embed.bias": state["v.patch_embed.proj.bias"],
        "norm.weight": state["v.norm.weight"], "norm.bias": state["v.norm.bias"],
        "head_norm.weight": state["mlp_head.0.weight"], "head_norm.bias": state["mlp_head.0.bias"],
        "head.weight": state["mlp_head.1.weight"], "head.bias": state["mlp_head.1.bias"],
    }
    for key, value in state.items():
        if key.startswith("v.blocks."):
            out[key[2:].replace("mlp.", "")] = value
    return config, out


def _ast_geometry(n_patches: int, patch: int, mel: int = 128) -> tuple[int, int]:
    """(stride, frames) of an AST position table with ``n_patches`` entries (equal strides, as released)."""
    candidates = []  # (stride, time patches) whose frequency count divides the table, largest stride first
    for stride in range(patch, 0, -1):
        f = (mel - patch) // stride + 1
        if n_patches >= f and not n_patches % f and (f > 1 or stride == patch):
            candidates.append((stride, n_patches // f))
    for stride, t in candidates:  # a stride that fits a common trained length wins over a bare fit
        for frames in COMMON_FRAMES:
            if (frames - patch) // stride + 1 == t:
                return stride, frames
    if candidates:
        stride, t = candidates[0]
        return stride, (t - 1) * stride + patch
    raise ModelError(f"cannot infer patch strides from a position table of {n_patches} patches")


# -- original ElasticAST (.pth) ------------------------------------------------------------------------


def convert_elastic(state: dict[str, torch.Tensor], labels: list[str]) -> tuple[ModelConfig, dict]:
    """JiuFengSC/ElasticAST checkpoint: factorised positions, attention pooling, no attention scale."""
    weight = state["patch_embed.0.weight"]
    dim, patch = weight.shape[0], math.isqrt(weight.shape[1])
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("blocks.modules_list."))
    num_classes = state["head.weight"].shape[0]
    mean, std = DEFAULT_STATS["elastic"]
    config = ModelConfig(
        family="elastic", dim=dim, depth=depth, heads=max(1, dim // 64),
        mlp_dim=state["blocks.modules_list.0.mlp.fc1.weight"].shape[0], patch_size=patch, freq_stride=patch,
        time_stride=patch, num_mel_bins=state["pos_embed_freq"].shape[0] * patch,
        max_frames=state["pos_embed_time"].shape[0] * patch, prefix_tokens=0, pooling="attention",
        attn_scale=False, qkv_bias="blocks.modules_list.0.attn.to_q.bias" in state, num_classes=num_classes,
        multi_label=num_classes == AUDIOSET_CLASSES, mean=mean, std=std, labels=labels,
    )
    out = {
        "patch_embed.weight": weight, "patch_embed.bias": state["patch_embed.0.bias"],
        "pos_freq": state["pos_embed_freq"], "pos_time": state["pos_embed_time"],
        "pool.query": state["attn_pool_queries"],
    }
    renames = {"norm.": "norm.", "mlp_norm.": "head_norm.", "head.": "head.", "attn_pool.to_q.": "pool.q.",
               "attn_pool.to_kv.": "pool.kv.", "attn_pool.proj.": "pool.proj."}
    for key, value in state.items():
        for theirs, ours in renames.items():
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
        if key.startswith("blocks.modules_list."):
            rest = key[len("blocks.modules_list."):].replace("mlp.", "")
            if ".attn.to_q." in rest:
                kv = state[key.replace("to_q", "to_kv")]
                out["blocks." + rest.replace("to_q", "qkv")] = torch.cat([value, kv])
            elif ".attn.to_kv." not in rest:
                out["blocks." + rest] = value
    return config, out


# -- dispatch ------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, labels: list[str] | None = None) -> tuple[ModelConfig, dict]:
    """Read a local checkpoint of any supported format into ``(config, state_dict)``."""
    path = Path(path)
    if path.is_dir():
        meta_file = path / "config.json"
        if not meta_file.is_file():
            raise ModelError(f"{path}: no config.json in model directory")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{meta_file}: not valid JSON") from exc
        if not isinstance(meta, dict):
            raise ModelError(f"{meta_file}: not a JSON object")
        if meta.get("format") == OWN_FORMAT:
            config, state = _load_own(path, meta)
        elif meta.get("model_type") == "audio-spectrogram-transformer":
            config, state = _load_hf(path, meta)
        else:
            raise ModelError(f"{path}: config.json is neither an astcli nor a transformers AST model")
    elif path.is_file():
        state = read_weights(path)
        try:
            if "v.pos_embed" in state:
                config, state = convert_original_ast(state, [])
            elif "pos_embed_freq" in state:
                config, state = convert_elastic(state, [])
            else:
                raise ModelError(f"{path}: not an AST or ElasticAST checkpoint (unknown keys)")
        except KeyError as exc:
            raise ModelError(f"{path}: checkpoint lacks {exc.args[0]}") from exc
        except (ValueError, IndexError, RuntimeError) as exc:  # mis-shaped or inconsistent tensors
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{path}: malformed checkpoint ({reason})") from exc
    else:
        raise ModelError(f"{path}: no such file or directory")
    if labels is not None:
        if len(labels) != config.num_classes:
            raise ModelError(f"{len(labels)} labels given for a model with {config.num_classes} classes")
        config = dataclasses.replace(config, labels=tuple(labels))
    return config, state


# -- from a source to a model ---------------------------------------------------------------------------


def preset_source(source: str, revision: str | None = None) -> tuple[str, str | None]:
    """``(source, revision)`` with a single-model preset replaced by its checkpoint and pinned revision (an
    explicit ``revision`` wins); other sources come back unchanged. An ensemble preset is a ``UsageError``."""
    preset = get_preset(source)
    if preset is None:
        return source, revision
    if preset.members:
        raise UsageError(f"{source} is an ensemble of {len(preset.members)} models; name one of them "
                         f"({', '.join(preset.members)})")
    return preset.source, revision or preset.revision


def model_path(source: str, revision: str | None = None) -> Path:
    """Where the model ``source`` lies: a local file or directory, else the snapshot of a hub id (fetched into
    the Hugging Face cache, or found there). ``ModelError`` when it is neither."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise ModelError(f"{source}: no such file, directory or preset (the presets: ast tag --list-models)")
    return hub_snapshot(source, revision)


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], origin: str = "checkpoint") -> AudioTransformer:
    """An ``AudioTransformer`` (float32, eval mode) holding ``state``; any missing, unexpected or mis-shaped
    tensor is a ModelError naming ``origin``."""
    with torch.device("meta"):  # no storage and no random initialisation: ``state`` replaces every tensor
        model = AudioTransformer(config)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    shapes = [k for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    for problem, keys in (("lacks", missing), ("has unexpected", unexpected), ("has mis-shaped", shapes)):
        if keys:
            more = f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""
            detail = ""
            if problem == "has mis-shaped":
                detail = f" {tuple(state[keys[0]].shape)} vs {tuple(ours[keys[0]].shape)}"
            raise ModelError(f"{origin} {problem} tensor {keys[0]}{detail}{more}")
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, assign=True)
    return model.eval()


def load_transformer(source: str | Path, labels=None, revision: str | None = None,
                     scores: str | None = None) -> AudioTransformer:
    """The PyTorch model behind ``source`` (single-model preset, hub id, model directory or checkpoint file),
    on the CPU in float32 and eval mode: what training and export start from.

    ``labels`` (names, or a label file as ``read_labels`` reads it) names the classes of a bare checkpoint;
    ``scores`` (``"multi-label"`` / ``"single-label"``) replaces the model's score convention (``with_scores``).
    An ``.onnx`` file is a ``UsageError`` (a graph holds no trainable model); unreadable or unknown sources
    are ``ModelError``.
    """
    source, revision = preset_source(str(source), revision)
    if Path(source).suffix == ".onnx":
        raise UsageError(f"{source}: an ONNX model cannot be fine-tuned; give the PyTorch model it was exported from")
    names = read_labels(labels) if isinstance(labels, (str, Path)) else labels
    config, state = load_checkpoint(model_path(source, revision), names)
    return build_model(with_scores(config, scores), state, origin=source)
