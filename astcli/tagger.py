"""The Python API: ``load_model(...)`` gives a ``Tagger`` that turns waveforms into class probabilities.

A ``Tagger`` owns the front end every backend shares (Kaldi fbank at the model's rate and hop, the family's
window rule, normalisation, patches, batches under a token budget, packing) and holds one or more backends
(backends.py) that turn packed batches into logits. Several backends make an ensemble: their probabilities
are averaged (AST's Ensemble-S / -M).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from astcli.backends import BATCH_TOKENS, Backend, OnnxBackend, TorchBackend, resolve_dtype
from astcli.errors import ModelError, ParameterError
from astcli.features import fbank, normalize
from astcli.model.checkpoints import load_transformer, preset_source, read_labels
from astcli.model.config import ModelConfig
from astcli.model.packing import Clip, batch_clips, fit_frames, pack_clips, patchify
from astcli.model.presets import DEFAULT_MODEL, get_preset
from astcli.model.transformer import probabilities

HOP_RANGE_MS = (1.0, 100.0)


def feature_hop(config: ModelConfig, hop_ms: float | None, name: str) -> float:
    """The feature hop (ms) to run ``config``'s model at: the trained one by default; another only for
    ElasticAST models (their "resolution"), within HOP_RANGE_MS. Raises ``ParameterError("hop_ms", ...)``."""
    hop = float(hop_ms or config.hop_ms)
    if hop != config.hop_ms and config.family != "elastic":
        raise ParameterError("hop_ms", f"is for ElasticAST models only; {name} is an AST model trained at a "
                             f"{config.hop_ms:g} ms hop")
    low, high = HOP_RANGE_MS
    if not low <= hop <= high:
        raise ParameterError("hop_ms", f"must lie between {low:g} and {high:g} (got {hop:g})")
    return hop


def run_packed(backend: Backend, clips: list[Clip], batch_tokens: int) -> torch.Tensor:
    """Logits ``[len(clips), classes]`` (float32, CPU) of ``backend``, the clips split into batches of at most
    ``batch_tokens`` tokens (a longer clip goes alone) and each batch packed into rows of whole clips."""
    prefix = backend.config.prefix_tokens
    out = torch.empty(len(clips), backend.config.num_classes)
    for idx in batch_clips([len(c) + prefix for c in clips], batch_tokens):
        out[idx] = backend.logits(pack_clips([clips[i] for i in idx], prefix))
    return out


class Tagger:
    """One or more backends behind one front end: waveforms or fbank windows in, probabilities out.

    ``predict(waveforms)`` treats each waveform as one window, as the model family expects (AST: padded or
    truncated to its trained length; ElasticAST: native length). ``feature_hop_ms`` is the hop features are
    computed at in this run (default: the trained ``config.hop_ms``; another only for ElasticAST). Members of
    an ensemble must share labels and features; ``config`` (window, multi-label, token count) is the first's.
    """

    def __init__(self, backends: Backend | Sequence[Backend], *, hop_ms: float | None = None, name: str = ""):
        self.backends = [backends] if not isinstance(backends, Sequence) else list(backends)
        if not self.backends:
            raise ModelError("a tagger needs at least one model")
        first = self.backends[0]
        self.name = name or "+".join(b.name for b in self.backends)
        self.feature_hop_ms = feature_hop(first.config, hop_ms, first.name or "this model")
        for other in self.backends[1:]:
            feature_hop(other.config, hop_ms, other.name or "this model")
            if other.config.labels != first.config.labels or other.config.num_classes != first.config.num_classes:
                raise ModelError(f"ensemble members {first.name} and {other.name} have different labels")
            c, o = first.config, other.config
            if (o.sample_rate, o.num_mel_bins, o.hop_ms) != (c.sample_rate, c.num_mel_bins, c.hop_ms):
                raise ModelError(f"ensemble members {first.name} and {other.name} need different features")

    @property
    def config(self) -> ModelConfig:
        """The (first) model's configuration: window, statistics, labels, head type."""
        return self.backends[0].config

    @property
    def labels(self) -> list[str]:
        """Class names, index = class id (numbers as strings when the checkpoint has none)."""
        return list(self.config.labels) or [str(i) for i in range(self.config.num_classes)]

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def window_frames(self) -> int:
        """Feature frames in one full window: the trained length (AST) or the longest native clip."""
        return self.config.max_frames

    @property
    def default_batch_tokens(self) -> int:
        """Tokens per forward pass when none are asked for: BATCH_TOKENS for the backends' device."""
        on_gpu = any(b.device.type == "cuda" for b in self.backends)
        return BATCH_TOKENS["cuda" if on_gpu else "cpu"]

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) fbank ``[frames, mel]`` of a 1-D waveform at the model's rate and this run's hop."""
        return fbank(waveform, self.sample_rate, num_mel_bins=self.config.num_mel_bins,
                     frame_shift_ms=self.feature_hop_ms)

    def clip(self, frames: torch.Tensor, config: ModelConfig | None = None) -> Clip:
        """Raw fbank frames ``[frames, mel]`` fitted to the family's window rule, normalised and cut into
        patches, for ``config`` (default: the first model's)."""
        c = config or self.config
        return patchify(normalize(fit_frames(frames, c), c.mean, c.std), c)

    def logits(self, clips: list[Clip], batch_tokens: int | None = None, member: int = 0) -> torch.Tensor:
        """Logits ``[len(clips), classes]`` (float32, CPU) of backend ``member``, in batches of ``batch_tokens``
        (default: ``default_batch_tokens``)."""
        return run_packed(self.backends[member], clips, batch_tokens or self.default_batch_tokens)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Sigmoid for multi-label heads, softmax for single-label heads (the first model's head type)."""
        return probabilities(logits, self.config.multi_label)

    def score_windows(self, windows: list[torch.Tensor], batch_tokens: int | None = None) -> torch.Tensor:
        """Probabilities ``[windows, classes]`` for raw fbank windows ``[frames, mel]``: the mean over the
        backends of each one's probabilities."""
        if not windows:
            return torch.empty(0, self.config.num_classes)
        budget = batch_tokens or self.default_batch_tokens
        scores = []
        for backend in self.backends:
            clips = [self.clip(w, backend.config) for w in windows]
            scores.append(probabilities(run_packed(backend, clips, budget), backend.config.multi_label))
        return torch.stack(scores).mean(0)

    def clip_features(self, waveforms: list[torch.Tensor], sample_rate: int = 16000) -> list[torch.Tensor]:
        """Raw fbank ``[frames, mel]`` of each waveform, resampled to the model's rate first if needed.

        The rules of ``ast tag`` hold: ``AudioError`` naming the clip (``clip 2: ...``) for a sample that is
        not finite or lies beyond +-MAX_SAMPLE, or for audio shorter than one 25 ms frame at the model's rate."""
        from astcli.audio import check_samples, require_frame, resample

        for i, w in enumerate(waveforms):
            check_samples(w, f"clip {i}")
        if sample_rate != self.sample_rate:
            waveforms = [resample(w, sample_rate, self.sample_rate) for w in waveforms]
        for i, w in enumerate(waveforms):
            require_frame(w.shape[-1], self.sample_rate, f"clip {i}")
        return [self.features(w) for w in waveforms]

    def predict(self, waveforms: list[torch.Tensor], sample_rate: int = 16000,
                batch_tokens: int | None = None) -> torch.Tensor:
        """Probabilities ``[clips, classes]``, one row per waveform (1-D float tensors in [-1, 1])."""
        return self.score_windows(self.clip_features(waveforms, sample_rate), batch_tokens)

    def save(self, directory: str | Path) -> Path:
        """Write the one PyTorch model in astcli's own format (config.json + model.safetensors).

        ``ModelError`` for an ensemble or an ONNX graph."""
        if len(self.backends) != 1:
            raise ModelError(f"{self.name} is an ensemble of {len(self.backends)} models; save each one")
        return self.backends[0].save(directory)


def _backends(source: str, labels, device, dtype, revision: str | None, scores: str | None) -> list[Backend]:
    """The backends ``source`` names: each member of an ensemble preset, else one."""
    preset = get_preset(source)
    if preset is not None and preset.members:
        return [b for m in preset.members for b in _backends(m, labels, device, dtype, None, scores)]
    source, revision = preset_source(source, revision)
    if Path(source).suffix == ".onnx":
        if dtype is not None and resolve_dtype(dtype) != torch.float32:
            raise ParameterError("dtype", f"{dtype} applies to PyTorch models: {source} is an ONNX graph and runs in "
                                 "the precision it was exported in (export it with fp16 for a float16 graph)")
        return [OnnxBackend(source, labels=labels, device=device, scores=scores)]
    model = load_transformer(source, labels, revision, scores=scores)
    return [TorchBackend(model, device=device, dtype=dtype, name=source)]


def load_model(source: str | Path = DEFAULT_MODEL, *, labels=None, device=None, dtype=None,
               revision: str | None = None, hop_ms: float | None = None, scores: str | None = None) -> Tagger:
    """A ``Tagger`` for a preset name (an ensemble preset gives several backends), hub id, model directory,
    checkpoint file or exported ``.onnx`` file.

    ``labels`` is a list of names or a label file (``index,mid,display_name`` CSV, JSON, one per line), needed
    for bare checkpoints. ``device``: ``"auto"``/None (CUDA when available), ``"cpu"``, ``"cuda"``; ``dtype``:
    float32, bfloat16 or float16 (PyTorch models); ``hop_ms``: the feature hop (ElasticAST only); ``scores``:
    ``"multi-label"`` (sigmoid per class) or ``"single-label"`` (softmax over classes) instead of the model's
    own convention (SCORE_CONVENTIONS; a bare checkpoint's default is multi-label for 527 classes only).
    """
    return load_ensemble([str(source)], labels=labels, device=device, dtype=dtype, revision=revision, hop_ms=hop_ms,
                         scores=scores)


def load_ensemble(sources: list[str], *, labels=None, device=None, dtype=None, revision: str | None = None,
                  hop_ms: float | None = None, scores: str | None = None) -> Tagger:
    """One ``Tagger`` over every model that ``sources`` name (``--model`` given repeatedly); probabilities are
    averaged when there are several."""
    names = read_labels(labels) if isinstance(labels, (str, Path)) else labels
    backends = [b for s in sources for b in _backends(str(s), names, device, dtype, revision, scores)]
    return Tagger(backends, hop_ms=hop_ms, name="+".join(str(s) for s in sources))
