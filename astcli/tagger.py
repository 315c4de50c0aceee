"""The Python API: ``load_model(...)`` gives a tagger that turns waveforms into class probabilities."""

from __future__ import annotations

from pathlib import Path

import torch

from astcli.errors import ModelError, UsageError
from astcli.features import fbank, normalize
from astcli.model.checkpoints import load_checkpoint, read_labels, save_checkpoint
from astcli.model.config import ModelConfig
from astcli.model.hub import hub_snapshot
from astcli.model.packing import Clip, batch_clips, fit_frames, pack_clips, patchify
from astcli.model.presets import DEFAULT_MODEL, get_preset
from astcli.model.transformer import AudioTransformer

# Tokens per packed forward pass: on CPU one AST window (1214 tokens) already makes large matrix products (bigger
# batches only cost memory, docs/benchmarks.md); a GPU wants more work per launch.
BATCH_TOKENS = {"cpu": 2048, "cuda": 16384}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is a usage error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A torch dtype from its name (float32, bfloat16, float16); None -> float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")
    return DTYPES[dtype]


def checked_hop(config: ModelConfig, hop_ms: float | None, name: str) -> float:
    """The feature hop to run at: the trained one by default; another only for ElasticAST models."""
    hop = float(hop_ms or config.hop_ms)
    if hop != config.hop_ms and config.family != "elastic":
        raise UsageError(f"{name} is an AST model trained at a {config.hop_ms:g} ms hop; "
                         "only ElasticAST models take --hop-ms")
    if not 1.0 <= hop <= 100.0:
        raise UsageError(f"--hop-ms must lie between 1 and 100 (got {hop:g})")
    return hop


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], origin: str = "checkpoint") -> AudioTransformer:
    """An ``AudioTransformer`` holding ``state``; any missing, unexpected or mis-shaped tensor is a ModelError."""
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


class AudioTagger:
    """One model ready to tag: features, packing, forward and probabilities.

    ``predict(waveforms)`` treats each waveform as one window, as the checkpoint's family expects
    (AST: padded or truncated to its trained length; ElasticAST: native length).
    """

    def __init__(self, model: AudioTransformer, *, device=None, dtype=None, hop_ms: float | None = None,
                 name: str = ""):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = model.to(self.device, self.dtype).eval()
        self.name = name
        self.hop_ms = checked_hop(model.config, hop_ms, name or "this model")

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def labels(self) -> list[str]:
        """Class names, index = class id (numbers as strings when the checkpoint has none)."""
        return list(self.config.labels) or [str(i) for i in range(self.config.num_classes)]

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def default_batch_tokens(self) -> int:
        """Tokens per forward pass when none are asked for (BATCH_TOKENS for this tagger's device)."""
        return BATCH_TOKENS["cuda" if self.device.type == "cuda" else "cpu"]

    @property
    def window_frames(self) -> int:
        """Feature frames in one full window: the trained length (AST) or the longest native clip."""
        return self.config.max_frames

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) fbank ``[frames, mel]`` of a waveform at the model's rate and hop."""
        return fbank(waveform, self.sample_rate, num_mel_bins=self.config.num_mel_bins, frame_shift_ms=self.hop_ms)

    def clip(self, frames: torch.Tensor) -> Clip:
        """Fit raw fbank frames to the family's rule, normalise, and cut into patches."""
        c = self.config
        return patchify(normalize(fit_frames(frames, c), c.mean, c.std), c)

    def logits(self, clips: list[Clip], batch_tokens: int | None = None) -> torch.Tensor:
        """Logits ``[len(clips), classes]`` (float32, CPU), packing clips into batches of ``batch_tokens``
        (default: BATCH_TOKENS for the device)."""
        prefix = self.config.prefix_tokens
        batch_tokens = batch_tokens or self.default_batch_tokens
        out = torch.empty(len(clips), self.config.num_classes)
        with torch.inference_mode():
            for idx in batch_clips([len(c) + prefix for c in clips], batch_tokens):
                batch = pack_clips([clips[i] for i in idx], prefix).to(self.device)
                out[idx] = self.model(batch).float().cpu()
        return out

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid for multi-label heads, softmax for single-label heads."""
        return logits.sigmoid() if self.config.multi_label else logits.softmax(-1)

    def score_windows(self, windows: list[torch.Tensor], batch_tokens: int | None = None) -> torch.Tensor:
        """Probabilities ``[windows, classes]`` for raw fbank windows ``[frames, mel]``."""
        if not windows:
            return torch.empty(0, self.config.num_classes)
        return self.probabilities(self.logits([self.clip(w) for w in windows], batch_tokens))

    def predict(self, waveforms: list[torch.Tensor], sample_rate: int = 16000,
                batch_tokens: int | None = None) -> torch.Tensor:
        """Probabilities ``[clips, classes]``, one row per waveform (1-D float tensors in [-1, 1])."""
        return self.score_windows(self.clip_features(waveforms, sample_rate), batch_tokens)

    def clip_features(self, waveforms: list[torch.Tensor], sample_rate: int = 16000) -> list[torch.Tensor]:
        """Raw fbank ``[frames, mel]`` of each waveform, resampled to the model's rate first if needed."""
        if sample_rate != self.sample_rate:
            from astcli.audio import resample

            waveforms = [resample(w, sample_rate, self.sample_rate) for w in waveforms]
        return [self.features(w) for w in waveforms]

    def save(self, directory: str | Path) -> Path:
        """Write this model in astcli's own format (config.json + model.safetensors)."""
        return save_checkpoint(directory, self.config, self.model.state_dict())


class EnsembleTagger:
    """Several taggers over the same labels; probabilities are averaged (AST's Ensemble-S / -M)."""

    def __init__(self, members: list[AudioTagger], name: str = "ensemble"):
        first = members[0]
        for m in members[1:]:
            if m.labels != first.labels:
                raise ModelError(f"ensemble members {first.name} and {m.name} have different labels")
            if (m.sample_rate, m.hop_ms, m.config.num_mel_bins) != (first.sample_rate, first.hop_ms,
                                                                   first.config.num_mel_bins):
                raise ModelError(f"ensemble members {first.name} and {m.name} need different features")
        self.members = members
        self.name = name

    def __getattr__(self, name):
        # Shared read-only properties (labels, config, sample_rate, hop_ms, features, ...) of the first member.
        if name == "members":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.members[0], name)

    def score_windows(self, windows: list[torch.Tensor], batch_tokens: int | None = None) -> torch.Tensor:
        """Mean of the members' probabilities."""
        return torch.stack([m.score_windows(windows, batch_tokens) for m in self.members]).mean(0)

    def predict(self, waveforms: list[torch.Tensor], sample_rate: int = 16000,
                batch_tokens: int | None = None) -> torch.Tensor:
        """Mean of the members' probabilities, one row per waveform (features computed once: members share them)."""
        return self.score_windows(self.members[0].clip_features(waveforms, sample_rate), batch_tokens)


def load_model(source: str | Path = DEFAULT_MODEL, *, labels=None, device=None, dtype=None,
               revision: str | None = None, hop_ms: float | None = None):
    """Load a tagger from a preset name, hub id, model directory or checkpoint file.

    ``labels`` is a list of names or a label file (``index,mid,display_name`` CSV, JSON, one per line),
    needed for bare checkpoints. Returns an ``AudioTagger``, or an ``EnsembleTagger`` for ensemble presets.
    """
    source = str(source)
    names = read_labels(labels) if isinstance(labels, (str, Path)) else labels
    kwargs = dict(device=device, dtype=dtype, hop_ms=hop_ms)
    preset = get_preset(source)
    if preset is not None and preset.members:
        members = [load_model(m, labels=names, device=device, dtype=dtype, hop_ms=hop_ms) for m in preset.members]
        return EnsembleTagger(members, name=source)
    if preset is not None:
        source, revision = preset.source, revision or preset.revision
    path = Path(source).expanduser()
    if path.suffix == ".onnx":
        from astcli.export import OnnxTagger

        return OnnxTagger(path, labels=names, device=device, hop_ms=hop_ms)
    if not path.exists():
        if source.count("/") != 1 or source.startswith((".", "/")):
            raise ModelError(f"{source}: no such file, directory or preset (list presets with `ast tag --list-models`)")
        path = hub_snapshot(source, revision)
    config, state = load_checkpoint(path, names)
    return AudioTagger(build_model(config, state, origin=str(source)), name=str(source), **kwargs)


def load_ensemble(sources: list[str], **kwargs):
    """One tagger for one source, an averaging ensemble for several (``--model`` given repeatedly)."""
    taggers = [load_model(s, **kwargs) for s in sources]
    flat = [m for t in taggers for m in (t.members if isinstance(t, EnsembleTagger) else [t])]
    return flat[0] if len(flat) == 1 else EnsembleTagger(flat, name="+".join(sources))
