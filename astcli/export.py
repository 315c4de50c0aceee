"""ONNX export of a PyTorch model (``ast export --onnx``) and its verification against PyTorch.

Two graphs can be written (docs/export.md has the full contract):

* the packed graph (default): the model core on one ``PackedBatch``. Inputs ``patches``, ``freq_pos``,
  ``time_pos``, ``token_kind``, ``clip_ids`` ``[rows, length(, patch*patch)]`` and ``clip_index`` =
  ``arange(clips)``, whose length carries the number of clips as a graph dimension. ``backends.OnnxBackend`` runs it
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
from astcli.backends import META, OUTPUTS, PACKED_INPUTS, TorchBackend, session_options
from astcli.errors import ModelError, ParameterError, UsageError
from astcli.features import KaldiFbank, normalize, samples_for_frames
from astcli.model.config import ModelConfig
from astcli.model.packing import Clip, PackedBatch, fit_batch, fit_frames, pack_clips, pack_rows, patchify
from astcli.model.presets import DEFAULT_MODEL
from astcli.model.transformer import probabilities
from astcli.tagger import Tagger, load_model

WAVEFORM_INPUTS = ("waveform",)
PRECISIONS = ("float32", "float16", "int8")
QUANTIZE = ("int8",)
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 17, 25  # LayerNormalization needs 17; 26+ trips the exporter's Attention op (torch 2.13)
# A float32 graph must reproduce PyTorch's logits; float16 and int8 graphs are compared with the float32
# PyTorch model on probabilities. Those two bounds catch broken graphs, not small accuracy losses: the
# measured deviation is printed with every export.
LOGIT_TOLERANCE = 1e-4
PROB_TOLERANCE = {"float16": 1e-2, "int8": 0.1}


# -- the exported modules --------------------------------------------------------------------------------


def _scores(logits: torch.Tensor, multi_label: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    return logits, probabilities(logits, multi_label)


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
        frames = fit_batch(self.fbank(waveform[:, : self.fbank.samples_for(c.max_frames)]), c)
        return _forward(self.model, pack_rows(normalize(frames, c.mean, c.std), c), None)  # one clip per row


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
    """The graph precision that ``fp16`` / ``quantize`` name: float16, int8 or float32."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ParameterError("quantize", f"{quantize!r} is not supported (choose {', '.join(QUANTIZE)})")
    if fp16 and quantize:
        raise UsageError("fp16 and quantize exclude each other: float16 is for GPUs, int8 for CPUs")
    return "float16" if fp16 else quantize or "float32"


def _check_options(opset: int, precision: str) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ParameterError("opset", f"must lie between {MIN_OPSET} and {MAX_OPSET} (got {opset})")
    if precision not in PRECISIONS:
        raise ParameterError("precision", f"{precision!r} is unknown (choose {', '.join(PRECISIONS)})")


def _check_destination(output: Path) -> None:
    """Fail before the slow part when ``output`` cannot be written (by trying to create a file beside it)."""
    if output.suffix != ".onnx":
        raise UsageError(f"{output}: the output file must end in .onnx (that is how tagging recognises an ONNX model)")
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
                 quantize: str | None = None, with_features: bool = False,
                 scores: str | None = None) -> ExportReport:
    """``ast export --onnx``: load ``source`` as ``load_model`` does (on CPU) and export it; ``scores``
    (``"multi-label"`` / ``"single-label"``) replaces the model's score convention, stored in the metadata.

    Options are checked before the model is loaded, so mistakes fail fast.
    """
    precision = precision_for(fp16, quantize)
    opset = DEFAULT_OPSET if opset is None else opset
    _check_options(opset, precision)
    output = Path(output).expanduser()
    _check_destination(output)
    source = source or DEFAULT_MODEL
    tagger = load_model(source, labels=labels, device="cpu", revision=revision, hop_ms=hop_ms, scores=scores)
    return export_onnx(tagger, output, opset=opset, precision=precision, with_features=with_features)


def export_onnx(tagger: Tagger, output: str | Path, *, opset: int = DEFAULT_OPSET,
                precision: str = "float32", with_features: bool = False) -> ExportReport:
    """Write ``tagger``'s model to ``output`` as ONNX, verified against PyTorch with ONNX Runtime.

    ``precision``: float32; float16 (weights and compute, for CUDA; inputs and outputs stay float32); int8
    (dynamic quantization of the weights, for CPU). The file appears only after verification passed;
    otherwise a ModelError says by how much it missed and nothing is left behind.
    """
    _check_options(opset, precision)
    if len(tagger.backends) != 1:
        raise UsageError("only a single model can be exported (an ensemble is several graphs: export each member)")
    if not isinstance(tagger.backends[0], TorchBackend):
        raise UsageError(f"{tagger.name} is already an ONNX model")
    output = Path(output).expanduser()
    _check_destination(output)
    model = copy.deepcopy(tagger.backends[0].model).to("cpu", torch.float32).eval()
    model.config = dataclasses.replace(model.config, hop_ms=tagger.feature_hop_ms)  # this run's hop: the default
    graph = "waveform" if with_features else "packed"
    cases = _waveform_cases(tagger) if with_features else _packed_cases(tagger)
    with torch.inference_mode():
        references = [_scores(model(_reference_batch(tagger, model, case, with_features)), model.config.multi_label)
                      for case in cases]
    with tempfile.TemporaryDirectory(prefix=".astcli-export-", dir=output.parent) as work:
        work = Path(work)
        traced = copy.deepcopy(model).half() if precision == "float16" else model
        module = WaveformGraph(traced, tagger.feature_hop_ms) if with_features else PackedGraph(traced)
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
        raise ModelError(f"ONNX export failed ({reason})") from exc
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


def _packed_cases(tagger: Tagger) -> list[dict]:
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


def _samples(tagger: Tagger, frames: int) -> int:
    return samples_for_frames(frames, tagger.feature_hop_ms, tagger.sample_rate)


def _waveform_cases(tagger: Tagger) -> list[dict]:
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


def _reference_batch(tagger: Tagger, model: nn.Module, case: dict, with_features: bool) -> PackedBatch:
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
