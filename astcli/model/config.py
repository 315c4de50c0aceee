"""One configuration for both model families: AST (Gong et al. 2021) and ElasticAST (Feng et al. 2024)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from astcli.errors import ParameterError

FAMILIES = ("ast", "elastic")
POOLINGS = ("cls_dist", "cls", "attention", "mean")

# The score conventions a caller may choose (``scores=``): sigmoid per class, or softmax over the classes.
SCORE_CONVENTIONS = {"multi-label": True, "single-label": False}


def with_scores(config: ModelConfig, scores: str | None) -> ModelConfig:
    """``config`` with the score convention ``scores`` (a SCORE_CONVENTIONS key; None keeps the model's own,
    stored as ``multi_label``); ParameterError ``scores`` for another value."""
    if scores is None:
        return config
    if scores not in SCORE_CONVENTIONS:
        raise ParameterError("scores", f"must be one of {', '.join(SCORE_CONVENTIONS)} (got {scores!r})")
    return dataclasses.replace(config, multi_label=SCORE_CONVENTIONS[scores])


# Fields that must be above zero (every size, count, rate and scale)
_POSITIVE = ("dim", "depth", "heads", "mlp_dim", "patch_size", "freq_stride", "time_stride", "num_mel_bins",
             "max_frames", "num_classes", "sample_rate", "hop_ms", "layer_norm_eps", "std")

# Per-family normalisation statistics (mean, std of the fbank) for checkpoints that carry none of their own:
# AST's AudioSet values (Gong et al. 2021, released code) and ElasticAST's (Feng et al. 2024).
DEFAULT_STATS = {"ast": (-4.2677393, 4.5689974), "elastic": (-4.414, 4.905)}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, preprocessing and labels of a tagger; saved as config.json next to the weights.

    ``family="ast"``: overlapping patches (strides < patch size), a learned 2-D position grid
    ``grid_freq x grid_time``, CLS + distillation tokens, windows padded to ``max_frames``.
    ``family="elastic"``: non-overlapping patches, factorised position tables (frequency + time),
    attention pooling, clips at native length up to ``max_frames``.
    ``pooling``: ``cls_dist`` (mean of the CLS and distillation outputs, AST), ``cls`` (the CLS output),
    ``attention`` (one learned query per clip, ElasticAST) or ``mean`` (mean of the clip's patch outputs, for
    models trained from scratch with ``prefix_tokens=0``).

    Immutable: derive a changed copy with ``dataclasses.replace(config, ...)``. ``labels`` is a tuple (a list
    given to the constructor is converted). A value outside what the architecture allows raises
    ``ParameterError`` naming the field.
    """

    family: str = "ast"
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 16
    freq_stride: int = 10
    time_stride: int = 10
    num_mel_bins: int = 128
    max_frames: int = 1024
    prefix_tokens: int = 2
    pooling: str = "cls_dist"
    attn_scale: bool = True
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    num_classes: int = 527
    multi_label: bool = True
    sample_rate: int = 16000
    hop_ms: float = 10.0
    mean: float = DEFAULT_STATS["ast"][0]
    std: float = DEFAULT_STATS["ast"][1]
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        self._check_values()
        if self.family not in FAMILIES:
            raise ParameterError("family", f"{self.family!r} is unknown (expected one of {', '.join(FAMILIES)})")
        if self.pooling not in POOLINGS:
            raise ParameterError("pooling", f"{self.pooling!r} is unknown (expected one of {', '.join(POOLINGS)})")
        if self.heads < 1 or self.dim % self.heads:
            raise ParameterError("heads", f"{self.heads} does not divide dim {self.dim}")
        if self.labels and len(self.labels) != self.num_classes:
            raise ParameterError("labels", f"has {len(self.labels)} names for a head of {self.num_classes} classes")
        if self.pooling == "cls_dist" and self.prefix_tokens != 2:
            raise ParameterError("prefix_tokens", "must be 2 for cls_dist pooling")
        if self.pooling == "cls" and self.prefix_tokens < 1:
            raise ParameterError("prefix_tokens", "must be at least 1 for cls pooling")

    def _check_values(self) -> None:
        """Every field of its type (a whole number where one is needed: JSON and ``--model-option`` give any)
        and in its range."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ParameterError(f.name, f"must be a whole number (got {value!r})")
            if f.type == "float":
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise ParameterError(f.name, f"must be a finite number (got {value!r})")
                object.__setattr__(self, f.name, float(value))
            if f.type in ("bool", "str") and type(value).__name__ != f.type:
                raise ParameterError(f.name, f"must be {'true or false' if f.type == 'bool' else 'text'} "
                                             f"(got {value!r})")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ParameterError(name, f"must be positive (got {getattr(self, name)!r})")
        if self.prefix_tokens < 0:
            raise ParameterError("prefix_tokens", f"must be 0 or more (got {self.prefix_tokens})")
        if self.patch_size > self.num_mel_bins:
            raise ParameterError("patch_size", f"{self.patch_size} is larger than num_mel_bins {self.num_mel_bins}")

    @property
    def grid_freq(self) -> int:
        """Patches along frequency."""
        return (self.num_mel_bins - self.patch_size) // self.freq_stride + 1

    @property
    def grid_time(self) -> int:
        """Patches along time at ``max_frames`` (size of the learned time positions)."""
        return self.time_patches(self.max_frames)

    @property
    def pads_to_window(self) -> bool:
        """AST checkpoints were trained at one length: every window is padded/truncated to it."""
        return self.family == "ast"

    @property
    def window_seconds(self) -> float:
        """Audio seconds in one full-length window."""
        return self.max_frames * self.hop_ms / 1000.0

    def time_patches(self, frames: int) -> int:
        """Patches along time for a clip of ``frames`` feature frames (0 when shorter than a patch)."""
        if frames < self.patch_size:
            return 0
        return (frames - self.patch_size) // self.time_stride + 1

    def tokens(self, frames: int) -> int:
        """Sequence length of one clip of ``frames`` frames, prefix tokens included."""
        return self.grid_freq * self.time_patches(frames) + self.prefix_tokens

    def to_dict(self) -> dict:
        """Plain JSON-ready dictionary (``labels`` as a list)."""
        return {**dataclasses.asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys are an error so typos do not pass silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)


def ast_config(size: str = "base", **overrides) -> ModelConfig:
    """An AST architecture of a named size (tiny/small/base), stride 10, 1024 frames."""
    dims = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
    dim, depth, heads = dims[size]
    base = dict(family="ast", dim=dim, depth=depth, heads=heads, mlp_dim=4 * dim)
    return ModelConfig(**{**base, **overrides})


def elastic_config(size: str = "base", **overrides) -> ModelConfig:
    """An ElasticAST architecture of a named size: 16x16 patches without overlap, attention pooling."""
    dims = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
    dim, depth, heads = dims[size]
    mean, std = DEFAULT_STATS["elastic"]
    base = dict(
        family="elastic", dim=dim, depth=depth, heads=heads, mlp_dim=4 * dim, freq_stride=16,
        time_stride=16, max_frames=1024, prefix_tokens=0, pooling="attention", attn_scale=False,
        mean=mean, std=std,
    )
    return ModelConfig(**{**base, **overrides})
