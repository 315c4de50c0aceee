"""ONNX export of a tagger (``ast export --onnx``) and the ONNX Runtime backend (``OnnxTagger``).

Two graphs can be written (docs/export.md has the full contract):

* the packed graph (default): the model core on one ``PackedBatch``. Inputs ``patches``, ``freq_pos``,
  ``time_pos``, ``token_kind``, ``clip_ids`` ``[rows, length(, patch*patch)]`` and ``clip_index`` =
  ``arange(clips)``, whose length carries the number of clips as a graph dimension. ``OnnxTagger`` runs it
  with the same features, windows and packing as the PyTorch backend, so ``ast tag --model model.onnx`` works.
* the waveform graph (``with_features=True``): waveforms ``[clips, samples]`` at the model's sample rate in,
  scores out; Kaldi fbank, fitting to the window, normalisation and patching run inside the graph, so a
  plain onnxruntime user needs nothing else. Clips in one call share one length.

Both output ``logits`` and ``probabilities`` ``[clips, classes]`` (float32). Every export is run with ONNX
Runtime against the PyTorch model before it appears at its destination; the model's configuration travels in
the file's ``metadata_props``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from astcli import __version__, files
from astcli.errors import ModelError, UsageError
from astcli.features import PREEMPHASIS, mel_filters, normalize
from astcli.model.config import ModelConfig
from astcli.model.packing import CLS, DIST, Clip, PackedBatch, batch_clips, fit_frames, pack_clips, patchify
from astcli.tagger import AudioTagger, checked_hop

PACKED_INPUTS = ("patches", "freq_pos", "time_pos", "token_kind", "clip_ids", "clip_index")
WAVEFORM_INPUTS = ("waveform",)
OUTPUTS = ("logits", "probabilities")
PRECISIONS = ("float32", "float16", "int8")
QUANTIZE = ("int8",)
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 17, 25  # LayerNormalization needs 17; 26+ trips the exporter's Attention op (torch 2.13)
META = "astcli."  # prefix of every metadata_props key we write
# A float32 graph must reproduce PyTorch's logits; float16 and int8 graphs are compared with the float32
# PyTorch model on probabilities. Those two bounds catch broken graphs, not small accuracy losses: the
# measured deviation is printed with every export.
LOGIT_TOLERANCE = 1e-4
PROB_TOLERANCE = {"float16": 1e-2, "int8": 0.1}
FRAME_LENGTH_MS = 25.0  # Kaldi's frame, as astcli.features uses it


# -- the exported modules --------------------------------------------------------------------------------


def _scores(logits: torch.Tensor, multi_label: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    return logits, logits.sigmoid() if multi_label else logits.softmax(-1)


def _forward(model: nn.Module, batch: PackedBatch, mask: torch.Tensor | None):
    """``AudioTransformer.forward`` with the attention mask given: an additive float mask
    (0 / -inf) spares ONNX Runtime the per-layer Where/IsNaN that a boolean mask turns into; ``None``
    when every row is one clip. Verification compares the result with the real ``forward``."""
    return _scores(model.classify(batch, mask), model.config.multi_label)


class PackedGraph(nn.Module):
    """``AudioTransformer.forward`` with the batch spelled out as tensors, for export.

    Only the length of ``clip_index`` is used: the clip count becomes a graph dimension (a SymInt while
    tracing) instead of a Python int that tracing would freeze. The block-diagonal mask is always built,
    so one graph serves every packing.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, patches, freq_pos, time_pos, token_kind, clip_ids, clip_index):
        batch = PackedBatch(patches, freq_pos, time_pos, token_kind, clip_ids, clip_index.shape[0])
        mask = self.model.attention_mask(batch)  # always built while tracing
        if mask is not None:
            mask = torch.zeros(mask.shape, dtype=self.model.patch_embed.weight.dtype).masked_fill(~mask, float("-inf"))
        return _forward(self.model, batch, mask)


class KaldiFbank(nn.Module):
    """``astcli.features.fbank`` of equal-length waveforms ``[clips, samples]`` -> ``[clips, frames, mel]``,
    in ops every ONNX runtime has.

    Pre-emphasis and the Hann window are linear maps of a frame, so they fold with the real DFT into one
    ``[frame_length, 2 * bins]`` matrix: framing (a gather), DC removal, one matmul, power, mel matmul, log.
    It runs in float64, so that it matches Kaldi's fbank to float32 rounding (in float32 the log energy of
    near-empty bins is ~1e-3 off); its cost is small next to the transformer's. The output is float32.
    """

    def __init__(self, sample_rate: int, num_mel_bins: int, hop_ms: float):
        super().__init__()
        self.length = int(sample_rate * FRAME_LENGTH_MS * 0.001)
        self.shift = int(sample_rate * hop_ms * 0.001)
        n_fft = 1 << (self.length - 1).bit_length()
        bins = n_fft // 2  # the Nyquist bin carries no mel weight
        f64 = dict(dtype=torch.float64)
        window = torch.hann_window(self.length, periodic=False, **f64)
        eye = torch.eye(self.length, **f64)
        emphasis = eye - PREEMPHASIS * torch.diag(torch.ones(self.length - 1, **f64), 1)
        emphasis[0, 0] = 1.0 - PREEMPHASIS
        angle = 2 * math.pi * torch.outer(torch.arange(self.length, **f64), torch.arange(bins, **f64)) / n_fft
        dft = torch.cat([angle.cos(), angle.sin()], 1)
        self.register_buffer("frontend", emphasis @ torch.diag(window) @ dft)
        self.register_buffer("filters", mel_filters(sample_rate, n_fft, num_mel_bins))
        self.eps = torch.finfo(torch.float32).eps

    def samples_for(self, frames: int) -> int:
        """Samples that make ``frames`` whole frames."""
        return (frames - 1) * self.shift + self.length

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        count = (waveform.shape[1] - self.length) // self.shift + 1
        index = torch.arange(count).unsqueeze(1) * self.shift + torch.arange(self.length)
        frames = waveform.double()[:, index]  # [clips, frames, frame_length]
        spectrum = (frames - frames.mean(-1, keepdim=True)) @ self.frontend  # [clips, frames, 2 * bins]
        real, imag = spectrum.chunk(2, dim=-1)
        power = real * real + imag * imag
        return (power @ self.filters).clamp_min(self.eps).log().float()


class WaveformGraph(nn.Module):
    """Waveforms ``[clips, samples]`` -> scores: fbank, the family's window rule, normalisation, patches.

    Each clip becomes one row of the packed batch; longer input than one window is cut to it (as
    ``fit_frames`` does), so an AST graph pads short clips and an ElasticAST graph keeps native length.
    """

    def __init__(self, model: nn.Module, hop_ms: float):
        super().__init__()
        c = model.config
        self.fbank = KaldiFbank(c.sample_rate, c.num_mel_bins, hop_ms)
        self.model = model

    def forward(self, waveform: torch.Tensor):
        c = self.model.config
        p, clips = c.patch_size, waveform.shape[0]
        x = self.fbank(waveform[:, : self.fbank.samples_for(c.max_frames)])
        if c.pads_to_window:  # zero frames up to the trained window (before normalisation, as fit_frames)
            pad, keep = c.max_frames, c.max_frames
        else:  # whole patches, at least one (short clips are zero-padded to one patch)
            pad, keep = p, torch.sym_max(p, x.shape[1] // p * p)
        x = torch.cat([x, x.new_zeros(clips, pad, c.num_mel_bins)], 1)[:, :keep]
        image = normalize(x, c.mean, c.std).transpose(1, 2)  # [clips, mel, frames]
        nf, nt = c.grid_freq, (image.shape[2] - p) // c.time_stride + 1
        within = torch.arange(p)
        f_index = torch.arange(nf).unsqueeze(1) * c.freq_stride + within  # [nf, p]
        t_index = torch.arange(nt).unsqueeze(1) * c.time_stride + within  # [nt, p]
        grid = image[:, f_index[:, None, :, None], t_index[None, :, None, :]]  # [clips, nf, nt, p, p]
        patches = grid.reshape(clips, nf * nt, p * p)
        freq_pos = torch.arange(nf).unsqueeze(1).expand(nf, nt).reshape(-1)
        time_pos = torch.arange(nt).unsqueeze(0).expand(nf, nt).reshape(-1)
        k = c.prefix_tokens
        lead = torch.zeros(k, dtype=torch.long)
        patches = torch.cat([patches.new_zeros(clips, k, p * p), patches], 1)
        kinds = torch.cat([torch.tensor([CLS, DIST][:k], dtype=torch.long), torch.zeros_like(freq_pos)])
        width = kinds.shape[0]
        batch = PackedBatch(
            patches,
            torch.cat([lead, freq_pos]).expand(clips, width),
            torch.cat([lead, time_pos]).expand(clips, width),
            kinds.expand(clips, width),
            torch.arange(clips).unsqueeze(1).expand(clips, width),
            clips,
        )
        return _forward(self.model, batch, None)  # one clip per row: no mask


# -- export ---------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One verification case: ONNX Runtime against the float32 PyTorch model."""

    name: str
    logit_diff: float
    prob_diff: float


@dataclass
class Verification:
    """All cases of one graph precision, with the bound it had to meet."""

    precision: str
    checks: list[Check]
    measure: str  # "logit" or "prob": what the tolerance bounds
    tolerance: float

    @property
    def max_logit_diff(self) -> float:
        return max(c.logit_diff for c in self.checks)

    @property
    def max_prob_diff(self) -> float:
        return max(c.prob_diff for c in self.checks)

    @property
    def score(self) -> float:
        return self.max_logit_diff if self.measure == "logit" else self.max_prob_diff

    @property
    def passed(self) -> bool:
        return self.score <= self.tolerance

    def summary(self) -> dict:
        return {"max_logit_diff": self.max_logit_diff, "max_prob_diff": self.max_prob_diff,
                "bound": f"{self.measure} <= {self.tolerance:g}", "cases": len(self.checks)}


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how it verified."""

    path: Path
    source: str
    graph: str
    precision: str
    opset: int
    size_bytes: int
    verifications: list[Verification] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary, one line per verification case."""
        out = [f"exported {self.source} -> {self.path} ({self.graph} graph, opset {self.opset}, "
               f"{self.precision}, {self.size_bytes / 1e6:.1f} MB)"]
        for v in self.verifications:
            for c in v.checks:
                out.append(f"  {v.precision:8} {c.name:34} max |logit diff| {c.logit_diff:.2e}  "
                           f"max |prob diff| {c.prob_diff:.2e}")
            out.append(f"verified {v.precision} graph against PyTorch float32 on {len(v.checks)} cases: "
                       f"max |{v.measure} diff| {v.score:.2e} <= {v.tolerance:g}")
        return out


def precision_for(fp16: bool = False, quantize: str | None = None) -> str:
    """The graph precision named by the CLI's ``--fp16`` / ``--quantize`` options."""
    if quantize is not None and quantize not in QUANTIZE:
        raise UsageError(f"--quantize {quantize!r} is not supported (choose {', '.join(QUANTIZE)})")
    if fp16 and quantize:
        raise UsageError("--fp16 and --quantize exclude each other: float16 is for GPUs, int8 for CPUs")
    return "float16" if fp16 else quantize or "float32"


def _check_options(opset: int, precision: str) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(f"--opset must lie between {MIN_OPSET} and {MAX_OPSET} (got {opset})")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r} (choose {', '.join(PRECISIONS)})")


def _check_destination(output: Path) -> None:
    """Fail before the slow part when ``output`` cannot be written (by trying to create a file beside it)."""
    if output.suffix != ".onnx":
        raise UsageError(f"{output}: the output file must end in .onnx (that is how `ast tag --model` knows it)")
    if output.is_dir():
        raise UsageError(f"{output}: is a directory; give a file name ending in .onnx")
    parent = output.parent
    if not parent.is_dir():
        raise UsageError(f"{output}: cannot write there ({parent} is not an existing directory)")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise UsageError(f"{output}: cannot write to {parent} ({exc.strerror or type(exc).__name__})") from exc
    os.close(fd)
    os.unlink(probe)


def export_model(source: str | None, output: str | Path, *, labels=None, revision: str | None = None,
                 hop_ms: float | None = None, opset: int | None = None, fp16: bool = False,
                 quantize: str | None = None, with_features: bool = False) -> ExportReport:
    """``ast export --onnx``: load ``source`` as ``load_model`` does (on CPU) and export it.

    Options are checked before the model is loaded, so mistakes fail fast.
    """
    from astcli.model.presets import DEFAULT_MODEL
    from astcli.tagger import load_model

    precision = precision_for(fp16, quantize)
    opset = DEFAULT_OPSET if opset is None else opset
    _check_options(opset, precision)
    output = Path(output).expanduser()
    _check_destination(output)
    source = source or DEFAULT_MODEL
    tagger = load_model(source, labels=labels, device="cpu", revision=revision, hop_ms=hop_ms)
    return export_onnx(tagger, output, opset=opset, precision=precision, with_features=with_features)


def export_onnx(tagger: AudioTagger, output: str | Path, *, opset: int = DEFAULT_OPSET,
                precision: str = "float32", with_features: bool = False) -> ExportReport:
    """Write ``tagger``'s model to ``output`` as ONNX, verified against PyTorch with ONNX Runtime.

    ``precision``: float32; float16 (weights and compute, for CUDA; inputs and outputs stay float32); int8
    (dynamic quantization of the weights, for CPU). The file appears only after verification passed;
    otherwise a ModelError says by how much it missed and nothing is left behind.
    """
    _check_options(opset, precision)
    if isinstance(tagger, OnnxTagger):
        raise UsageError(f"{tagger.name} is already an ONNX model")
    if not isinstance(tagger, AudioTagger):
        raise UsageError("only a single model can be exported (an ensemble is several graphs: export each member)")
    output = Path(output).expanduser()
    _check_destination(output)
    model = copy.deepcopy(tagger.model).to("cpu", torch.float32).eval()
    model.config = dataclasses.replace(model.config, hop_ms=tagger.hop_ms)  # the tagger's hop: the graph's default
    graph = "waveform" if with_features else "packed"
    cases = _waveform_cases(tagger) if with_features else _packed_cases(tagger)
    with torch.inference_mode():
        references = [_scores(model(_reference_batch(tagger, model, case, with_features)), model.config.multi_label)
                      for case in cases]
    with tempfile.TemporaryDirectory(prefix=".astcli-export-", dir=output.parent) as work:
        work = Path(work)
        traced = copy.deepcopy(model).half() if precision == "float16" else model
        module = WaveformGraph(traced, tagger.hop_ms) if with_features else PackedGraph(traced)
        path = _to_onnx(module, cases[-1], work / "graph.onnx", opset, with_features)
        first = "float16" if precision == "float16" else "float32"
        verifications = [_verify(path, first, cases, references)]
        if precision == "int8":
            path = _quantize(path, work / "int8.onnx")
            verifications.append(_verify(path, "int8", cases, references))
        for v in verifications:
            if not v.passed:
                raise ModelError(f"ONNX verification failed: the {v.precision} graph differs from PyTorch by "
                                 f"{v.score:.2e} in {v.measure}s (tolerance {v.tolerance:g}); nothing written")
        inputs = WAVEFORM_INPUTS if with_features else PACKED_INPUTS
        meta = {
            "version": __version__, "config": json.dumps(model.config.to_dict()), "graph": graph,
            "inputs": json.dumps(list(inputs)), "outputs": json.dumps(list(OUTPUTS)), "precision": precision,
            "source": str(tagger.name or ""), "opset": str(opset),
            "verification": json.dumps({v.precision: v.summary() for v in verifications}),
        }
        with files.atomic_path(output) as final:
            _write_metadata(path, final, meta)
    return ExportReport(output, str(tagger.name or "model"), graph, precision, opset, output.stat().st_size,
                        verifications)


def _to_onnx(module: nn.Module, example: dict, path: Path, opset: int, with_features: bool) -> Path:
    """torch.export + the dynamo ONNX exporter with dynamic rows / length / clips (or clips / samples)."""
    dim = torch.export.Dim
    if with_features:
        names = WAVEFORM_INPUTS
        shapes = {"waveform": {0: dim("clips"), 1: dim("samples", min=module.fbank.length)}}
    else:
        names = PACKED_INPUTS
        rows, length = dim("rows"), dim("length")
        shapes = {name: {0: rows, 1: length} for name in names[:-1]}
        shapes["clip_index"] = {0: dim("clips")}
    args = tuple(example[n] for n in names)
    try:
        with _quiet():
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=shapes, input_names=list(names),
                                        output_names=list(OUTPUTS), opset_version=opset, verbose=False)
            program.save(str(path), external_data=False)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"ONNX export failed ({reason}); run with --debug for the trace") from exc
    return path


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints, warnings and log lines (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _quantize(source: Path, target: Path) -> Path:
    """Dynamic int8 quantization of the weights of every MatMul/Gemm, except the fbank front end's."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source)).graph
    frontend = {"fbank.frontend", "fbank.filters"}
    exclude = [n.name for n in graph.node if frontend & set(n.input)]
    with _quiet():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=exclude)
    return target


def _write_metadata(source: Path, target: Path, meta: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(source))
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=META + key, value=value)
    proto.producer_name, proto.producer_version = "astcli", __version__
    onnx.save(proto, str(target))
    onnx.checker.check_model(str(target))


# -- verification ---------------------------------------------------------------------------------------


def _test_signal(samples: int, sample_rate: int, seed: int = 0) -> torch.Tensor:
    """A deterministic test waveform: a chirp over tones and noise, in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(samples, dtype=torch.float64) / sample_rate
    seconds = max(samples / sample_rate, 1e-3)
    top = 0.45 * sample_rate
    x = 0.3 * torch.sin(2 * math.pi * (50 * t + (top - 50) * t * t / (2 * seconds)))
    x += 0.2 * torch.sin(2 * math.pi * 440 * t) + 0.05 * torch.randn(samples, generator=gen, dtype=torch.float64)
    return x.float()


def _lengths(config: ModelConfig) -> list[int]:
    """Three clip lengths in frames: a full window and two shorter ones (whole patches, distinct)."""
    p, full = config.patch_size, config.max_frames
    return sorted({full, max(p, full // 2), max(p, full // 5)}, reverse=True)


def _packed_cases(tagger: AudioTagger) -> list[dict]:
    """Each length as a batch of its own, then all of them (plus one more) packed into two rows."""
    c = tagger.config
    frames = tagger.features(_test_signal(_samples(tagger, c.max_frames), c.sample_rate))
    raws = [frames[:n] if c.pads_to_window else fit_frames(frames[:n], c) for n in _lengths(c)]
    clips = [patchify(normalize(raw, c.mean, c.std), c) for raw in raws]
    extra = Clip(clips[-1].patches.flip(0), clips[-1].freq_pos, clips[-1].time_pos)
    cases = [_packed_case(f"1 clip, {len(raw)} frames", [clip], c) for raw, clip in zip(raws, clips, strict=True)]
    group = [*clips, extra]
    cases.append(_packed_case(f"packed: {len(group)} clips", group, c, row_tokens=len(clips[0]) + c.prefix_tokens))
    return cases


def _packed_case(name: str, clips: list[Clip], config: ModelConfig, row_tokens: int | None = None) -> dict:
    batch = pack_clips(clips, config.prefix_tokens, row_tokens)
    rows = batch.patches.shape[0]
    label = f"{name} in {rows} row{'s' if rows > 1 else ''}" if len(clips) > 1 else name
    return {"name": label, "batch": batch, "patches": batch.patches, "freq_pos": batch.freq_pos,
            "time_pos": batch.time_pos, "token_kind": batch.token_kind, "clip_ids": batch.clip_ids,
            "clip_index": torch.arange(batch.num_clips)}


def _samples(tagger: AudioTagger, frames: int) -> int:
    shift = int(tagger.sample_rate * tagger.hop_ms * 0.001)
    return (frames - 1) * shift + int(tagger.sample_rate * FRAME_LENGTH_MS * 0.001)


def _waveform_cases(tagger: AudioTagger) -> list[dict]:
    """Single waveforms shorter than, equal to and longer than a window, then three equal-length ones."""
    c = tagger.config
    full = _samples(tagger, c.max_frames)
    cases = []
    for samples in (full // 3, full, full * 3 // 2):
        wave = _test_signal(samples, c.sample_rate, seed=samples).unsqueeze(0)
        cases.append({"name": f"1 waveform, {samples} samples", "waveform": wave})
    waves = torch.stack([_test_signal(full * 2 // 3, c.sample_rate, seed=s) for s in range(3)])
    cases.append({"name": f"3 waveforms, {waves.shape[1]} samples", "waveform": waves})
    return cases


def _reference_batch(tagger: AudioTagger, model: nn.Module, case: dict, with_features: bool) -> PackedBatch:
    """The PyTorch pipeline's batch for a case: the library's fbank (in float64, the exact reference the
    graph's float64 front end is held to), fit, normalise and patchify."""
    if not with_features:
        return case["batch"]
    clips = [tagger.clip(tagger.features(w.double()).float()) for w in case["waveform"]]  # exact fbank
    return pack_clips(clips, model.config.prefix_tokens)


def _verify(path: Path, precision: str, cases: list[dict], references) -> Verification:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise ModelError(f"ONNX Runtime cannot load the exported {precision} graph ({reason})") from exc
    names = [i.name for i in session.get_inputs()]
    checks = []
    for case, (ref_logits, ref_probs) in zip(cases, references, strict=True):
        feeds = {n: np.ascontiguousarray(case[n].numpy()) for n in names}
        logits, probs = session.run(list(OUTPUTS), feeds)
        checks.append(Check(case["name"], float(np.abs(logits - ref_logits.numpy()).max()),
                            float(np.abs(probs - ref_probs.numpy()).max())))
    if precision == "float32":
        return Verification(precision, checks, "logit", LOGIT_TOLERANCE)
    return Verification(precision, checks, "prob", PROB_TOLERANCE[precision])


# -- ONNX Runtime backend -------------------------------------------------------------------------------


def session_options():
    """Every core for intra-op work, all graph optimisations, warnings off (errors still raise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    options.log_severity_level = 3
    return options


def _gpu_present() -> bool:
    return torch.cuda.is_available() or any(Path("/proc/driver/nvidia/gpus").glob("*"))


def execution_providers(device=None) -> list:
    """ONNX Runtime providers for ``device``: None/"auto" -> CUDA when onnxruntime-gpu and a GPU are there,
    else CPU; "cuda[:N]" without CUDAExecutionProvider is a usage error."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    kind = "auto" if device is None else str(device)
    if kind == "auto":
        return (["CUDAExecutionProvider"] if has_cuda and _gpu_present() else []) + ["CPUExecutionProvider"]
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda" or kind.startswith("cuda:"):
        if not has_cuda:
            raise UsageError("--device cuda with an ONNX model needs onnxruntime-gpu (CUDAExecutionProvider); "
                             f"this onnxruntime has {', '.join(available)}")
        index = kind.partition(":")[2]
        if index and not index.isdigit():
            raise UsageError(f"unknown device {device!r}")
        return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]
    raise UsageError(f"device {device!r} is not available for ONNX models (choose cpu or cuda)")


class OnnxTagger(AudioTagger):
    """An exported packed graph run by ONNX Runtime, with ``AudioTagger``'s features, windows and packing.

    The configuration (labels, statistics, window, hop) comes from the file's metadata; ``labels`` replaces
    the stored class names, ``hop_ms`` the feature hop (ElasticAST only, as for PyTorch models).
    """

    def __init__(self, path: str | Path, labels: list[str] | None = None, device=None,
                 hop_ms: float | None = None):
        import onnxruntime as ort

        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelError(f"{path}: no such file")
        providers = execution_providers(device)
        try:
            self.session = ort.InferenceSession(str(path), session_options(), providers=providers)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{path}: not a loadable ONNX model ({reason})") from exc
        if device not in (None, "auto", "cpu") and "CUDAExecutionProvider" not in self.session.get_providers():
            raise UsageError(f"--device {device}: ONNX Runtime could not use a CUDA GPU")
        self.metadata = {k.removeprefix(META): v for k, v in self.session.get_modelmeta().custom_metadata_map.items()
                         if k.startswith(META)}
        self._config = _config_from(self.metadata, path)
        graph = self.metadata.get("graph")
        if graph != "packed":
            raise ModelError(f"{path}: holds a {graph} graph; `ast tag` needs the packed graph "
                             "(export without --with-features)")
        if labels is not None:
            if len(labels) != self._config.num_classes:
                raise ModelError(f"{len(labels)} labels given for a model with {self._config.num_classes} classes")
            self._config = dataclasses.replace(self._config, labels=tuple(labels))
        self.name = str(path)
        self.precision = self.metadata.get("precision", "float32")
        self.device = torch.device("cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu")
        self.dtype = torch.float32
        self.hop_ms = checked_hop(self._config, hop_ms, str(path))

    @property
    def config(self) -> ModelConfig:
        return self._config

    def run(self, batch: PackedBatch) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, probabilities)`` of one packed batch, as numpy arrays."""
        feeds = {
            "patches": np.ascontiguousarray(batch.patches.numpy(), dtype=np.float32),
            "freq_pos": batch.freq_pos.numpy(), "time_pos": batch.time_pos.numpy(),
            "token_kind": batch.token_kind.numpy(), "clip_ids": batch.clip_ids.numpy(),
            "clip_index": np.arange(batch.num_clips, dtype=np.int64),
        }
        logits, probs = self.session.run(list(OUTPUTS), feeds)
        return logits, probs

    def logits(self, clips: list[Clip], batch_tokens: int | None = None) -> torch.Tensor:
        """Logits ``[len(clips), classes]`` (float32, CPU), packing clips into batches of ``batch_tokens``."""
        prefix = self.config.prefix_tokens
        out = torch.empty(len(clips), self.config.num_classes)
        for idx in batch_clips([len(c) + prefix for c in clips], batch_tokens or self.default_batch_tokens):
            out[idx] = torch.from_numpy(self.run(pack_clips([clips[i] for i in idx], prefix))[0]).float()
        return out

    def save(self, directory: str | Path) -> Path:
        raise ModelError(f"{self.name} is an ONNX graph; it cannot be saved as a PyTorch checkpoint")


def _config_from(metadata: dict[str, str], path: Path) -> ModelConfig:
    if "config" not in metadata:
        raise ModelError(f"{path}: not an astcli export (no {META}config in its metadata)")
    try:
        return ModelConfig.from_dict(json.loads(metadata["config"]))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable {META}config metadata ({exc})") from exc
