"""Backends: what turns one packed batch into logits. A ``Tagger`` (tagger.py) holds one or more of them.

The interface is narrow: ``config`` (the ``ModelConfig`` the backend serves: architecture, preprocessing,
labels), ``name``, ``device`` and ``logits(batch) -> [clips, classes]``. ``TorchBackend`` runs an
``AudioTransformer``; ``OnnxBackend`` runs a packed graph written by ``ast export --onnx`` in ONNX Runtime,
its configuration read from the file's metadata. The graph's contract (input and output names, metadata
prefix) is defined here, where it is read; export.py writes to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from astcli.errors import ModelError, ParameterError
from astcli.model.checkpoints import save_checkpoint
from astcli.model.config import ModelConfig, with_scores
from astcli.model.packing import PackedBatch
from astcli.model.transformer import AudioTransformer

# Tokens per packed forward pass: on CPU one AST window (1214 tokens) already makes large matrix products (bigger
# batches only cost memory, docs/benchmarks.md); a GPU wants more work per launch.
BATCH_TOKENS = {"cpu": 2048, "cuda": 16384}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")

# The exported packed graph's contract
PACKED_INPUTS = ("patches", "freq_pos", "time_pos", "token_kind", "clip_ids", "clip_index")
OUTPUTS = ("logits", "probabilities")
META = "astcli."  # prefix of every metadata_props key an export writes


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is a ``ParameterError``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ParameterError("device", f"{device!r} is not a device (choose {', '.join(DEVICES)})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device", f"'{device}' was asked for, but torch sees no CUDA GPU")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A torch dtype from its name (float32, bfloat16, float16); None -> float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ParameterError("dtype", f"{dtype!r} is unknown (choose {', '.join(DTYPES)})")
    return DTYPES[dtype]


class Backend(Protocol):
    """Packed batch -> logits, for the model described by ``config``."""

    name: str
    device: torch.device

    @property
    def config(self) -> ModelConfig: ...

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """Logits ``[batch.num_clips, config.num_classes]``, float32 on the CPU, in clip-id order."""
        ...


class TorchBackend:
    """An ``AudioTransformer`` in inference mode on ``device`` (default: CUDA when available) in ``dtype``."""

    def __init__(self, model: AudioTransformer, *, device=None, dtype=None, name: str = ""):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = model.to(self.device, self.dtype).eval()
        self.name = name

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()

    def save(self, directory: str | Path) -> Path:
        """Write the model in astcli's own format (config.json + model.safetensors); returns the directory."""
        return save_checkpoint(directory, self.config, self.model.state_dict())


def session_options():
    """ONNX Runtime options: every core for intra-op work, all graph optimisations, warnings off."""
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
    else CPU; "cuda[:N]" without CUDAExecutionProvider is a ``ParameterError``."""
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
            raise ParameterError("device", f"'{kind}' with an ONNX model needs onnxruntime-gpu "
                                 f"(CUDAExecutionProvider); this onnxruntime has {', '.join(available)}")
        index = kind.partition(":")[2]
        if index and not index.isdigit():
            raise ParameterError("device", f"{device!r} is not a device")
        return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]
    raise ParameterError("device", f"{device!r} is not available for ONNX models (choose cpu or cuda)")


class OnnxBackend:
    """A packed graph from ``ast export --onnx`` run by ONNX Runtime.

    The configuration (labels, statistics, window, hop) comes from the file's metadata; ``labels`` replaces
    the stored class names and ``scores`` the stored score convention (``with_scores``). Raises ``ModelError``
    for a missing or foreign file or a waveform graph.
    """

    def __init__(self, path: str | Path, labels: list[str] | None = None, device=None, scores: str | None = None):
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
        on_gpu = "CUDAExecutionProvider" in self.session.get_providers()
        if device not in (None, "auto", "cpu") and not on_gpu:
            raise ParameterError("device", f"'{device}': ONNX Runtime could not use a CUDA GPU")
        self.metadata = {k.removeprefix(META): v for k, v in self.session.get_modelmeta().custom_metadata_map.items()
                         if k.startswith(META)}
        self._config = config_from_metadata(self.metadata, path)
        if self.metadata.get("graph") != "packed":
            raise ModelError(f"{path}: holds a {self.metadata.get('graph')} graph; tagging needs the packed graph "
                             "(exported without with_features)")
        if labels is not None:
            if len(labels) != self._config.num_classes:
                raise ModelError(f"{len(labels)} labels given for a model with {self._config.num_classes} classes")
            self._config = dataclasses.replace(self._config, labels=tuple(labels))
        self._config = with_scores(self._config, scores)
        self.name = str(path)
        self.precision = self.metadata.get("precision", "float32")
        self.device = torch.device("cuda" if on_gpu else "cpu")

    @property
    def config(self) -> ModelConfig:
        return self._config

    def run(self, batch: PackedBatch) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, probabilities)`` of one packed batch, as numpy arrays ``[clips, classes]``."""
        feeds = {
            "patches": np.ascontiguousarray(batch.patches.numpy(), dtype=np.float32),
            "freq_pos": batch.freq_pos.numpy(), "time_pos": batch.time_pos.numpy(),
            "token_kind": batch.token_kind.numpy(), "clip_ids": batch.clip_ids.numpy(),
            "clip_index": np.arange(batch.num_clips, dtype=np.int64),
        }
        logits, probs = self.session.run(list(OUTPUTS), feeds)
        return logits, probs

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        return torch.from_numpy(self.run(batch)[0]).float()

    def save(self, directory: str | Path) -> Path:
        raise ModelError(f"{self.name} is an ONNX graph; it cannot be saved as a PyTorch checkpoint")


def config_from_metadata(metadata: dict[str, str], path: Path) -> ModelConfig:
    """The ``ModelConfig`` an export stored under ``astcli.config``; ``ModelError`` when absent or unreadable."""
    if "config" not in metadata:
        raise ModelError(f"{path}: not an astcli export (no {META}config in its metadata)")
    try:
        return ModelConfig.from_dict(json.loads(metadata["config"]))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable {META}config metadata ({exc})") from exc
