"""The training loop behind ``ast train`` and ``ast finetune``.

Data flows one way: dataset examples -> an epoch *plan* (sampler order, per-clip hop and seed, batches
filled up to a token budget at native length) -> DataLoader workers (decode, mixup, noise, fbank,
SpecAugment, fit to the window, normalise, patchify, token dropout, pack) -> forward/backward ->
optimizer step. Every random choice is a function of ``(seed, fold, epoch, batch)``, so a run resumed from
a checkpoint repeats exactly what an uninterrupted run would have done, with any number of workers.

Entry points: :func:`finetune`, :func:`train` and :func:`resume` run a whole experiment (k-fold where the
dataset defines folds) into an output directory; :func:`fit` trains one model on given example indices.

Output directory (one ``foldK/`` per fold for folded datasets, the same files at the top otherwise)::

    run.json              what was run (dataset, model source, recipe): ``resume`` needs nothing else
    lengths.json          clip lengths from the audio headers (ElasticAST and data-derived windows)
    foldK/state.pt        resumable training state (weights_only torch file), removed when the fold is done
    foldK/epochs/         per-epoch weights inside the weight-averaging range (safetensors)
    foldK/log.jsonl/.csv  one record per epoch; foldK/curves.png when matplotlib is installed
    foldK/model/          the final model (config.json + model.safetensors), loadable by ``ast tag``
    foldK/result.json     final metrics; marks the fold as done
    model/                the final model (the first fold's, for folded datasets)
    summary.json          per-fold metrics, mean and standard deviation
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from astcli.audio import audio_info, load_audio
from astcli.errors import AudioError, DatasetError, UsageError
from astcli.features import fbank, frames_for_samples, normalize
from astcli.model.checkpoints import save_checkpoint
from astcli.model.config import DEFAULT_STATS, ModelConfig, ast_config, elastic_config
from astcli.model.packing import Clip, PackedBatch, batch_clips, drop_tokens, fit_frames, pack_clips, patchify
from astcli.model.transformer import AudioTransformer, resize_grid
from astcli.train.augment import (
    BalancedSampler,
    ShuffleSampler,
    add_noise,
    feature_noise,
    mixup,
    random_hop_ms,
    sample_mixup_lambda,
    spec_augment,
)
from astcli.train.datasets import Dataset, fold_split, load_dataset
from astcli.train.metrics import evaluate
from astcli.train.recipes import Recipe, recipe_for

STATE_VERSION = 1
AMP_MODES = ("auto", "bf16", "fp16", "off")
ARCHS = ("ast", "elastic")
SIZES = ("tiny", "small", "base")
INITS = ("imagenet", "none")
TIMING_KEYS = ("seconds", "clips_per_s", "tokens_per_s")


# -- small helpers -------------------------------------------------------------------------------------


def derive_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (no global state involved)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    _fsync_replace(tmp, path)


def _atomic_torch(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    _fsync_replace(tmp, path)


def _atomic_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}, str(tmp))
    _fsync_replace(tmp, path)


def _plain(value):
    """JSON-safe copy: non-finite floats become None, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def default_workers() -> int:
    """DataLoader workers by default: min(2, cores)."""
    return min(2, os.cpu_count() or 1)


# -- distributed ---------------------------------------------------------------------------------------


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this module initialised the process group (and tears it down)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    @classmethod
    def current(cls) -> Distributed:
        if tdist.is_available() and tdist.is_initialized():
            local = int(os.environ.get("LOCAL_RANK", tdist.get_rank()))
            return cls(tdist.get_rank(), tdist.get_world_size(), local)
        return cls()


def setup_distributed(device: str | None = None) -> tuple[Distributed, torch.device]:
    """Join the process group that ``torchrun`` describes in WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR /
    MASTER_PORT (nccl on CUDA, gloo on CPU); outside torchrun, a single process on ``device``."""
    from astcli.tagger import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Distributed(), resolve_device(device)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device not in ("cpu",)
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owned = False
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        owned = True
    return Distributed(tdist.get_rank(), tdist.get_world_size(), local, owned), dev


def _any_rank(flag: bool, dist: Distributed, device: torch.device) -> bool:
    if not dist.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


# -- signals -------------------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes the current step, saves its state and returns."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag | None = None):
    """Install SIGINT/SIGTERM handlers that set a :class:`StopFlag` (a second SIGINT interrupts at once);
    the previous handlers come back on exit. Outside the main thread nothing is installed."""
    flag = flag or StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.request(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- data ----------------------------------------------------------------------------------------------


@dataclass
class BatchPlan:
    """One batch: example indices, the hop (ms) of each clip and a seed per clip; ``train`` augments."""

    indices: list[int]
    hops: list[float]
    seeds: list[int]
    train: bool


@dataclass
class LoadedBatch:
    """What a data worker hands back: the packed batch (None when every clip failed), soft targets
    ``[clips, classes]`` in batch order, the example indices kept, tokens, and ``(index, reason)`` failures."""

    batch: PackedBatch | None
    targets: torch.Tensor
    indices: list[int]
    tokens: int
    bad: list[tuple[int, str]]


class ClipMaker:
    """Example index -> features, in the data workers: decode, mixup (on waveforms, as AST), background
    noise, fbank at the clip's hop, truncation to the cap, fit to the window (AST pads raw zeros, as the
    reference), normalisation, SpecAugment on the clip's own frames (masks set to 0 = the dataset mean, with
    the time mask scaled to the clip's length), feature noise, patches, token dropout; then packing."""

    def __init__(self, dataset: Dataset, config: ModelConfig, recipe: Recipe, *, cap_frames: int,
                 token_dropout: float, mix_pool: list[int]):
        self.paths = [e.path for e in dataset.examples]
        self.labels = [list(e.labels) for e in dataset.examples]
        self.num_classes = len(dataset.classes)
        self.noise_files = list(dataset.noise_files)
        self.config = config
        self.recipe = recipe
        self.cap = cap_frames
        self.token_dropout = token_dropout
        self.mix_pool = mix_pool
        self._noise_cache: dict[str, torch.Tensor] = {}

    def target(self, index: int) -> torch.Tensor:
        t = torch.zeros(self.num_classes)
        t[self.labels[index]] = 1.0
        return t

    def _noise(self, path: str) -> torch.Tensor:
        if path not in self._noise_cache:
            self._noise_cache[path] = load_audio(path, self.config.sample_rate)
        return self._noise_cache[path]

    def clip(self, index: int, hop_ms: float, seed: int, train: bool) -> tuple[Clip, torch.Tensor]:
        c, r = self.config, self.recipe
        gen = torch.Generator().manual_seed(seed)
        wave = load_audio(self.paths[index], c.sample_rate)
        target = self.target(index)
        if train and r.mixup > 0 and self.mix_pool and float(torch.rand((), generator=gen)) < r.mixup:
            other = self.mix_pool[int(torch.randint(len(self.mix_pool), (1,), generator=gen))]
            lam = sample_mixup_lambda(gen, r.mixup_alpha)
            with contextlib.suppress(AudioError):
                wave, target = mixup(wave, load_audio(self.paths[other], c.sample_rate), target,
                                     self.target(other), lam)
        noisy = train and r.background_noise > 0 and self.noise_files
        if noisy and float(torch.rand((), generator=gen)) < r.background_noise:
            path = self.noise_files[int(torch.randint(len(self.noise_files), (1,), generator=gen))]
            low, high = r.noise_snr
            snr = low + (high - low) * float(torch.rand((), generator=gen))
            with contextlib.suppress(AudioError):
                wave = add_noise(wave, self._noise(path), snr, gen)
        feats = fbank(wave, c.sample_rate, num_mel_bins=c.num_mel_bins, frame_shift_ms=hop_ms)[: self.cap]
        x = normalize(fit_frames(feats, c), c.mean, c.std)
        native = min(feats.shape[0], x.shape[0])
        if train and (r.freqm or r.timem) and native:
            x = torch.cat([spec_augment(x[:native], r.freqm, r.timem, gen, r.reference_frames), x[native:]])
        if train and r.noise:
            x = feature_noise(x, gen)
        clip = patchify(x, c)
        if train and self.token_dropout > 0:
            clip = drop_tokens(clip, self.token_dropout, gen)
        return clip, target

    def __call__(self, plan: BatchPlan) -> LoadedBatch:
        clips, targets, kept, bad = [], [], [], []
        for index, hop, seed in zip(plan.indices, plan.hops, plan.seeds, strict=True):
            try:
                clip, target = self.clip(index, hop, seed, plan.train)
            except AudioError as exc:
                bad.append((index, str(exc)))
                continue
            clips.append(clip)
            targets.append(target)
            kept.append(index)
        prefix = self.config.prefix_tokens
        batch = pack_clips(clips, prefix) if clips else None
        stacked = torch.stack(targets) if targets else torch.zeros(0, self.num_classes)
        tokens = sum(len(c) + prefix for c in clips)
        return LoadedBatch(batch, stacked, kept, tokens, bad)


class _PlanDataset(torch.utils.data.Dataset):
    def __init__(self, maker: ClipMaker, plans: list[BatchPlan]):
        self.maker, self.plans = maker, plans

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i: int) -> LoadedBatch:
        return self.maker(self.plans[i])


def _identity(item):
    return item


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def _loader(maker: ClipMaker, plans: list[BatchPlan], num_workers: int) -> DataLoader:
    """Batches computed in ``num_workers`` processes (in order), so decoding overlaps training."""
    workers = min(num_workers, len(plans))
    return DataLoader(
        _PlanDataset(maker, plans), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_identity, worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None, generator=torch.Generator(),
    )


def scan_lengths(paths: list[str], sample_rate: int = 16000, threads: int = 8) -> tuple[list[int | None], dict]:
    """Samples per clip at ``sample_rate`` from the audio headers (no decoding); None and a reason where a
    file cannot be opened."""

    def one(path: str):
        try:
            info = audio_info(path)
        except AudioError as exc:
            return None, str(exc)
        return round(info.frames * sample_rate / info.sample_rate), None

    with ThreadPoolExecutor(threads) as pool:
        found = list(pool.map(one, paths))
    samples = [s for s, _ in found]
    errors = {i: why for i, (_, why) in enumerate(found) if why}
    return samples, errors


def _cached_lengths(out_dir: Path, dataset: Dataset, sample_rate: int, dist: Distributed):
    """``scan_lengths`` of the dataset, cached in ``out_dir/lengths.json`` (rank 0 writes it)."""
    paths = [e.path for e in dataset.examples]
    key = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    cache = out_dir / "lengths.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data["key"] == key and data["sample_rate"] == sample_rate:
            return data["samples"], {int(k): v for k, v in data["errors"].items()}
    samples, errors = scan_lengths(paths, sample_rate)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        payload = {"key": key, "sample_rate": sample_rate, "samples": samples, "errors": errors}
        _atomic_text(cache, json.dumps(payload) + "\n")
    return samples, errors


# -- optimisation --------------------------------------------------------------------------------------


def learning_rate(recipe: Recipe, epoch: int, step: int, warmup: int) -> float:
    """LR of optimizer step ``step`` (1-based) in epoch ``epoch`` (1-based): linear warm-up over the first
    ``warmup`` steps, and ``lr_decay`` once for every epoch after ``lr_decay_start`` (AST's MultiStepLR
    stepped per epoch: with start 5, epochs 1-5 use lr, epoch 6 lr x 0.85, epoch 7 lr x 0.85^2, ...)."""
    lr = recipe.lr * recipe.lr_decay ** max(0, epoch - recipe.lr_decay_start)
    if warmup > 0 and step < warmup:
        lr *= step / warmup
    return lr


def make_optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    """Adam (AST: betas (0.95, 0.999), weight decay 5e-7) or AdamW."""
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=recipe.lr, betas=tuple(recipe.betas), weight_decay=recipe.weight_decay)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``--amp``: auto = bf16 on CUDA GPUs that support it, fp16 on older ones, off on
    CPU (bf16 autocast works on CPU but is rarely faster there; ask for it with ``bf16``)."""
    if amp not in AMP_MODES:
        raise UsageError(f"--amp must be one of {', '.join(AMP_MODES)}")
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU (use bf16 on CPU)")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _loss(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.cross_entropy(logits, targets)  # soft targets: mixup's label mixing


def _scores(logits: torch.Tensor, kind: str) -> torch.Tensor:
    return logits.sigmoid() if kind == "bce" else logits.softmax(-1)


def _metric_value(metrics: dict, name: str) -> float:
    value = metrics.get(name)
    return -math.inf if value is None or not math.isfinite(value) else float(value)


# -- RNG state (stored as tensors and primitives, loadable with weights_only=True) ---------------------


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- logs ----------------------------------------------------------------------------------------------


def write_logs(directory: Path, history: list[dict]) -> None:
    """``log.jsonl`` and ``log.csv`` (one row per epoch) and ``curves.png`` when matplotlib is installed."""
    _atomic_text(directory / "log.jsonl", "".join(json.dumps(_plain(r)) + "\n" for r in history))
    columns: list[str] = []
    for record in history:
        columns += [k for k in record if k not in columns]
    tmp = directory / "log.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in _plain(r).items()} for r in history)
    _fsync_replace(tmp, directory / "log.csv")
    plot_curves(history, directory / "curves.png")


def plot_curves(history: list[dict], path: Path) -> bool:
    """Loss and metric curves as a PNG (the optional ``plot`` extra); False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    if not history:
        return False
    epochs = [r["epoch"] for r in history]
    skip = {"fold", "epoch", "lr", "train_loss", "val_loss", "steps", "bad", *TIMING_KEYS}
    metrics = [k for k in history[-1] if k not in skip and isinstance(history[-1][k], (int, float))]
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for key in ("train_loss", "val_loss"):
        values = [r.get(key) for r in history]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("loss")
    ax_loss.legend()
    for key in metrics:
        values = [r.get(key) for r in history]
        ax_metric.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=key)
    ax_metric.set_xlabel("epoch")
    ax_metric.set_title("validation")
    if metrics:
        ax_metric.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


class _Progress:
    """A rich progress bar on stderr (loss, clips/s), or nothing."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} clips/s"),
                TimeElapsedColumn(), console=Console(stderr=True),
            )
            self.bar.start()
        self.task = None

    def start(self, description: str, total: int, completed: int) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task(description, total=total, completed=completed, loss=0.0, rate=0.0)

    def update(self, loss: float, rate: float) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, loss=loss, rate=rate)

    def done(self) -> None:
        """Drop the finished epoch's bar (its summary line follows)."""
        if self.bar is not None and self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message, highlight=False, markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _warn(message: str) -> None:
    print(f"ast: warning: {message}", file=sys.stderr, flush=True)


def _once(quiet: bool = False) -> Callable[[str], None]:
    """A reporter of unreadable clips that warns at the first one only (never when ``quiet``)."""
    done = [quiet]

    def report(reason: str) -> None:
        if not done[0]:
            _warn(f"skipping unreadable audio ({reason}); further failures are counted in the logs, not shown")
            done[0] = True

    return report


# -- fitting one model ---------------------------------------------------------------------------------


@dataclass
class FitResult:
    """One trained model (one fold). ``metrics``: validation metrics of the final model; ``history``: one
    record per epoch; ``selected``: how the final model was chosen (last / best / wa) and ``epoch`` the
    epoch it stands for (the last averaged epoch for wa)."""

    out_dir: Path
    history: list[dict]
    metrics: dict
    test_metrics: dict
    selected: str
    epoch: int
    bad_clips: int
    fold: int | None = None
    model: AudioTransformer | None = None
    interrupted: bool = False

    @property
    def model_dir(self) -> Path:
        return self.out_dir / "model"

    def to_dict(self) -> dict:
        return _plain({"fold": self.fold, "selected": self.selected, "epoch": self.epoch, "metrics": self.metrics,
                       "test_metrics": self.test_metrics, "bad_clips": self.bad_clips, "history": self.history})

    @classmethod
    def from_dict(cls, out_dir: Path, data: dict) -> FitResult:
        return cls(out_dir, data["history"], data["metrics"], data.get("test_metrics") or {}, data["selected"],
                   data["epoch"], data.get("bad_clips", 0), data.get("fold"))


class _Trainer:
    """State and steps of one ``fit`` call."""

    def __init__(self, model, dataset, recipe, out_dir, *, train_idx, val_idx, test_idx, fold, seed, amp, device,
                 num_workers, progress, stop, on_epoch_end, on_step, lengths, bad_known, report):
        self.dist = Distributed.current()
        from astcli.tagger import resolve_device

        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.model = model.to(self.device, torch.float32)
        self.config: ModelConfig = model.config
        self.dataset, self.recipe, self.out = dataset, recipe, Path(out_dir)
        self.train_idx, self.val_idx, self.test_idx = list(train_idx), list(val_idx), list(test_idx)
        if not self.train_idx:
            raise DatasetError(f"{dataset.name}: no training examples")
        self.fold, self.seed = fold, seed
        self.amp = amp_dtype(amp, self.device)
        self.num_workers = default_workers() if num_workers is None else max(0, int(num_workers))
        self.stop = stop or StopFlag()
        self.on_epoch_end, self.on_step = on_epoch_end, on_step
        self.loss_kind = recipe.loss or ("bce" if dataset.multi_label else "ce")
        self.metric = "mAP" if dataset.multi_label else "top1"
        c = self.config
        if c.family != "elastic" and recipe.random_hop:
            raise UsageError("--random-hop is for ElasticAST models (AST was trained at a 10 ms hop)")
        self.token_dropout = recipe.token_dropout or 0.0
        if c.family != "elastic":
            self.token_dropout = 0.0
        self.cap = c.max_frames if c.pads_to_window else min(recipe.window or c.max_frames, c.max_frames)
        self.lengths = lengths
        self.bad: dict[int, str] = dict(bad_known or {})
        self.report = report
        self.maker = ClipMaker(dataset, c, recipe, cap_frames=self.cap, token_dropout=self.token_dropout,
                               mix_pool=self.train_idx)
        self.budget = recipe.batch_tokens or recipe.batch_size * self._frame_tokens(self.cap)
        balanced = dataset.multi_label if recipe.balanced is None else recipe.balanced
        sampler_seed = derive_seed(seed, fold, "sampler")
        if balanced:
            labels = [dataset.examples[i].labels for i in self.train_idx]
            self.sampler = BalancedSampler.from_labels(labels, seed=sampler_seed)
        else:
            self.sampler = ShuffleSampler(len(self.train_idx), seed=sampler_seed)
        if self.dist.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.net = self.model
        self.optimizer = make_optimizer(self.model.parameters(), recipe)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.progress = _Progress(bool(progress) and self.dist.main)
        self.epoch, self.batch, self.step = 0, 0, 0
        self.partial = {"loss_sum": 0.0, "clips": 0, "tokens": 0, "seconds": 0.0}
        self.history: list[dict] = []
        self.best = {"epoch": 0, "value": -math.inf}
        self.warmup = recipe.warmup_steps

    # -- plans

    def _frame_tokens(self, frames: int) -> int:
        """Tokens of a clip of ``frames`` frames once fitted (AST: always the full window)."""
        c = self.config
        if c.pads_to_window:
            return c.tokens(c.max_frames)
        frames = min(frames, self.cap)
        return c.tokens(max(c.patch_size, frames // c.patch_size * c.patch_size))

    def _clip_tokens(self, index: int, hop_ms: float) -> int:
        """Tokens of example ``index`` at ``hop_ms`` from its header length (full length when unknown)."""
        samples = self.lengths[index] if self.lengths else None
        if samples is None:
            return self._frame_tokens(self.cap)
        return self._frame_tokens(frames_for_samples(int(samples), hop_ms, self.config.sample_rate))

    def plans(self, epoch: int) -> list[BatchPlan]:
        """This rank's batches of ``epoch``: sampler order, hops and seeds, token-budget batches in random
        order, sharded round-robin over ranks (padded by repetition to a multiple of the world size)."""
        gen = _generator(self.seed, self.fold, epoch, "plan")
        order = [self.train_idx[k] for k in self.sampler.indices(epoch)]
        r, c = self.recipe, self.config
        hops = [random_hop_ms(gen, r.hop_choices) if r.random_hop else c.hop_ms for _ in order]
        seeds = torch.randint(0, 2**62, (len(order),), generator=gen).tolist()
        lengths = [self._clip_tokens(i, h) for i, h in zip(order, hops, strict=True)]
        groups = batch_clips(lengths, self.budget)
        groups = [groups[k] for k in torch.randperm(len(groups), generator=gen).tolist()]
        plans = [BatchPlan([order[k] for k in g], [hops[k] for k in g], [seeds[k] for k in g], True) for g in groups]
        world = self.dist.world
        if world > 1 and plans:
            plans += plans[: (-len(plans)) % world]
            plans = plans[self.dist.rank :: world]
        return plans

    def eval_plans(self, indices: list[int], shard: bool) -> list[BatchPlan]:
        c = self.config
        idx = list(indices)
        lengths = [self._clip_tokens(i, c.hop_ms) for i in idx]
        groups = batch_clips(lengths, 2 * self.budget)
        plans = [BatchPlan([idx[k] for k in g], [c.hop_ms] * len(g), [0] * len(g), False) for g in groups]
        if shard and self.dist.active:
            plans = plans[self.dist.rank :: self.dist.world]
        return plans

    # -- state

    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"

    def save_state(self) -> None:
        if not self.dist.main:
            return
        state = {
            "version": STATE_VERSION, "epoch": self.epoch, "batch": self.batch, "step": self.step,
            "warmup": self.warmup, "partial": dict(self.partial), "history": self.history, "best": dict(self.best),
            "bad": {int(k): v for k, v in self.bad.items()}, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {},
            "sampler": self.sampler.state_dict(), "rng": _rng_state(),
            "data": {"train": len(self.train_idx), "val": len(self.val_idx), "classes": len(self.dataset.classes)},
        }
        _atomic_torch(state, self.state_path)

    def load_state(self) -> bool:
        if not self.state_path.is_file():
            return False
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file: say so in one line
            raise UsageError(f"{self.state_path}: cannot read the training state ({type(exc).__name__})") from None
        if state.get("version") != STATE_VERSION:
            raise UsageError(f"{self.state_path}: training state version {state.get('version')} is not supported")
        data = state["data"]
        if (data["train"], data["val"], data["classes"]) != (len(self.train_idx), len(self.val_idx),
                                                            len(self.dataset.classes)):
            raise UsageError(f"{self.state_path}: saved for a different dataset split; resume with the same data")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.epoch, self.batch, self.step, self.warmup = state["epoch"], state["batch"], state["step"], state["warmup"]
        self.partial, self.history, self.best = dict(state["partial"]), list(state["history"]), dict(state["best"])
        self.bad = {int(k): v for k, v in state["bad"].items()}
        _set_rng_state(state["rng"])
        return True

    # -- steps

    def _record_bad(self, bad: list[tuple[int, str]]) -> None:
        for index, reason in bad:
            if index not in self.bad:
                self.bad[index] = reason
                if self.dist.main and self.report is not None:
                    self.report(reason)

    def _set_lr(self, epoch: int) -> float:
        lr = learning_rate(self.recipe, epoch, self.step + 1, self.warmup or 0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _dummy(self) -> PackedBatch:
        c = self.config
        frames = c.max_frames if c.pads_to_window else c.patch_size
        clip = patchify(torch.zeros(frames, c.num_mel_bins), c)
        return pack_clips([clip], c.prefix_tokens)

    def _forward_backward(self, loaded: LoadedBatch, scale: float, sync: bool) -> float:
        empty = loaded.batch is None
        batch = self._dummy() if empty else loaded.batch
        targets = torch.zeros(1, self.config.num_classes) if empty else loaded.targets
        ctx = contextlib.nullcontext() if sync or not self.dist.active else self.net.no_sync()
        with ctx:
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                logits = self.net(batch.to(self.device))
            loss = _loss(logits.float(), targets.to(self.device), self.loss_kind)
            value = float(loss.detach())
            if empty:
                loss = loss * 0.0  # keeps every rank in step; contributes no gradient
            loss = loss * scale
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        return value

    def _optimizer_step(self, epoch: int) -> float:
        lr = self._set_lr(epoch)
        if self.scaler is not None:
            if self.recipe.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.recipe.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip_grad)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lr

    def train_epoch(self, epoch: int) -> bool:
        """Train one epoch from ``self.batch``; False when stopped by a signal (state saved mid-epoch)."""
        plans = self.plans(epoch)
        accum = self.recipe.grad_accum
        if self.warmup is None:
            total = math.ceil(len(plans) / accum) * self.recipe.epochs
            self.warmup = min(1000, round(0.05 * total))
        self.model.train()
        start = self.batch
        label = f"fold {self.fold} " if self.fold is not None else ""
        self.progress.start(f"{label}epoch {epoch}/{self.recipe.epochs}", len(plans), start)
        t0 = time.perf_counter() - self.partial["seconds"]
        p = self.partial
        lr = learning_rate(self.recipe, epoch, max(1, self.step), self.warmup or 0)
        for k, loaded in enumerate(_loader(self.maker, plans[start:], self.num_workers), start=start):
            self._record_bad(loaded.bad)
            group_start = k - k % accum
            group = min(accum, len(plans) - group_start)
            last_micro = (k + 1) % accum == 0 or k == len(plans) - 1
            value = self._forward_backward(loaded, 1.0 / group, sync=last_micro)
            n = len(loaded.indices)
            p["loss_sum"] += value * n
            p["clips"] += n
            p["tokens"] += loaded.tokens
            p["seconds"] = time.perf_counter() - t0
            self.progress.update(p["loss_sum"] / max(1, p["clips"]), p["clips"] / max(1e-9, p["seconds"]))
            if not last_micro:
                continue
            lr = self._optimizer_step(epoch)
            self.batch = k + 1
            if self.on_step is not None:
                self.on_step(epoch, self.step)
            if _any_rank(self.stop.requested, self.dist, self.device) and self.batch < len(plans):
                self.save_state()
                return False
        p["lr"] = lr
        self.progress.done()
        return True

    def evaluate(self, indices: list[int], shard: bool = True) -> tuple[dict, float | None]:
        """Metrics and mean loss of the current model on ``indices`` (no augmentation)."""
        if not indices:
            return {}, None
        self.model.eval()
        kept, logits, targets = [], [], []
        with torch.no_grad():
            for loaded in _loader(self.maker, self.eval_plans(indices, shard), self.num_workers):
                self._record_bad(loaded.bad)
                if loaded.batch is None:
                    continue
                with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    out = self.model(loaded.batch.to(self.device))
                kept += loaded.indices
                logits.append(out.float().cpu())
                targets.append(loaded.targets)
        if shard and self.dist.active:
            gathered = [None] * self.dist.world
            tdist.all_gather_object(gathered, (kept, logits, targets))
            kept = [i for part in gathered for i in part[0]]
            logits = [t for part in gathered for t in part[1]]
            targets = [t for part in gathered for t in part[2]]
        self.model.train()
        if not kept:
            return {}, None
        order = sorted(range(len(kept)), key=kept.__getitem__)
        all_logits, all_targets = torch.cat(logits)[order], torch.cat(targets)[order]
        loss = float(_loss(all_logits, all_targets, self.loss_kind))
        scores = _scores(all_logits, self.loss_kind)
        return evaluate(scores.numpy(), all_targets.numpy(), self.dataset.multi_label), loss

    def end_epoch(self, epoch: int) -> dict:
        p = self.partial
        metrics, val_loss = self.evaluate(self.val_idx)
        seconds = max(p["seconds"], 1e-9)
        record = {
            "fold": self.fold, "epoch": epoch, "lr": p.get("lr", self.recipe.lr),
            "train_loss": p["loss_sum"] / max(1, p["clips"]), "val_loss": val_loss, **metrics,
            "steps": self.step, "bad": len(self.bad), "seconds": round(p["seconds"], 3),
            "clips_per_s": p["clips"] / seconds, "tokens_per_s": p["tokens"] / seconds,
        }
        self.history.append(record)
        r = self.recipe
        value = _metric_value(metrics, self.metric)
        improved = bool(metrics) and value > self.best["value"]
        if self.dist.main:
            if r.wa_start is not None and r.wa_start <= epoch <= r.wa_end:
                (self.out / "epochs").mkdir(exist_ok=True)
                _atomic_weights(self.model.state_dict(), self.out / "epochs" / f"epoch_{epoch:03d}.safetensors")
            if improved:
                _atomic_weights(self.model.state_dict(), self.out / "best.safetensors")
        if improved:
            self.best = {"epoch": epoch, "value": value}
        self.epoch, self.batch = epoch, 0
        self.partial = {"loss_sum": 0.0, "clips": 0, "tokens": 0, "seconds": 0.0}
        self.save_state()
        if self.dist.main:
            write_logs(self.out, self.history)
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None and math.isfinite(v))
            label = f"fold {self.fold} " if self.fold is not None else ""
            self.progress.log(f"{label}epoch {epoch}: loss {record['train_loss']:.4f}  {shown}  "
                              f"({record['seconds']:.1f} s, {record['clips_per_s']:.1f} clips/s)")
        if self.on_epoch_end is not None:
            self.on_epoch_end(record)
        return record

    def finish(self) -> FitResult:
        """Pick the final model (last / best / weight average), evaluate it, save ``model/`` and ``result.json``."""
        r = self.recipe
        select = r.select or ("wa" if r.wa_start is not None else ("best" if self.val_idx else "last"))
        if select == "best" and (not self.val_idx or not self.best["epoch"]):
            select = "last"
        metrics = {k: self.history[-1][k] for k in _metric_keys(self.history[-1])}
        epoch = self.epoch
        test: dict = {}
        if self.dist.main:
            if select == "wa":
                files = [self.out / "epochs" / f"epoch_{e:03d}.safetensors" for e in range(r.wa_start, r.wa_end + 1)]
                self.model.load_state_dict(average_weights(files))
                metrics, _ = self.evaluate(self.val_idx, shard=False)
                epoch = r.wa_end
            elif select == "best":
                self.model.load_state_dict(load_file(str(self.out / "best.safetensors")))
                epoch = self.best["epoch"]
                chosen = self.history[epoch - 1]
                metrics = {k: chosen[k] for k in _metric_keys(chosen)}
            test, _ = self.evaluate(self.test_idx, shard=False)
            save_checkpoint(self.out / "model", self.config, self.model.state_dict())
            result = FitResult(self.out, self.history, metrics, test, select, epoch, len(self.bad), self.fold)
            _atomic_text(self.out / "result.json", json.dumps(result.to_dict(), indent=2) + "\n")
            for leftover in (self.state_path, self.out / "best.safetensors"):
                leftover.unlink(missing_ok=True)
        self.dist.barrier()
        self.model.eval()
        return FitResult(self.out, self.history, metrics, test, select, epoch, len(self.bad), self.fold,
                         model=self.model)

    def run(self, resume: bool) -> FitResult:
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_state()
        try:
            for epoch in range(self.epoch + 1, self.recipe.epochs + 1):
                if not self.train_epoch(epoch):
                    return self._interrupted()
                self.end_epoch(epoch)
                if _any_rank(self.stop.requested, self.dist, self.device) and epoch < self.recipe.epochs:
                    return self._interrupted()
        finally:
            self.progress.close()
        return self.finish()

    def _interrupted(self) -> FitResult:
        last = self.history[-1] if self.history else {}
        return FitResult(self.out, self.history, {k: last[k] for k in _metric_keys(last)}, {}, "last", self.epoch,
                         len(self.bad), self.fold, model=self.model, interrupted=True)


def _metric_keys(record: dict) -> list[str]:
    return [k for k in ("top1", "top5", "mAP", "mAUC", "d_prime") if k in record]


def average_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of saved state dicts (AST's weight averaging), accumulated in float64."""
    if not files:
        raise UsageError("weight averaging found no saved epoch weights")
    total: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.is_file():
            raise UsageError(f"weight averaging needs {path}, which is missing")
        for key, value in load_file(str(path)).items():
            total[key] = total[key] + value.double() if key in total else value.double()
    return {k: (v / len(files)).float() for k, v in total.items()}


def fit(model: AudioTransformer, dataset: Dataset, recipe: Recipe, out_dir: str | Path, *,
        train_idx: list[int], val_idx: list[int] = (), test_idx: list[int] = (), fold: int | None = None,
        seed: int = 0, amp: str = "auto", device=None, num_workers: int | None = None, progress: bool = False,
        resume: bool = True, stop: StopFlag | None = None, on_epoch_end: Callable[[dict], None] | None = None,
        on_step: Callable[[int, int], None] | None = None, lengths: list[int | None] | None = None,
        bad: dict[int, str] | None = None, report: Callable[[str], None] | None = None) -> FitResult:
    """Train ``model`` (head, window and statistics already set for ``dataset``) on ``train_idx``,
    validating on ``val_idx`` after every epoch, into ``out_dir``.

    ``lengths`` (samples per example, from the headers) lets ElasticAST batches be filled by their native
    length; without it every clip is counted at full length. ``resume`` continues from ``out_dir/state.pt``
    when present. A set ``stop`` flag (see :func:`stop_on_signals`) ends the run after the current step with
    the state saved: the result then has ``interrupted=True``. Clips that fail to decode are skipped, counted
    (``bad`` in the logs, ``bad_clips``) and passed to ``report`` (default: one warning on stderr).
    """
    trainer = _Trainer(model, dataset, recipe, out_dir, train_idx=train_idx, val_idx=val_idx, test_idx=test_idx,
                       fold=fold, seed=seed, amp=amp, device=device, num_workers=num_workers, progress=progress,
                       stop=stop, on_epoch_end=on_epoch_end, on_step=on_step, lengths=lengths, bad_known=bad,
                       report=report or _once())
    return trainer.run(resume)


# -- models for a dataset ------------------------------------------------------------------------------


def adapt_window(model: AudioTransformer, frames: int) -> AudioTransformer:
    """An AST model whose padded window is ``frames`` frames: the position grid cut from the centre or
    interpolated along time as AST did (``resize_grid``). ElasticAST models are returned unchanged."""
    c = model.config
    if c.family != "ast" or frames == c.max_frames:
        return model
    config = ModelConfig.from_dict({**c.to_dict(), "max_frames": int(frames)})
    state = model.state_dict()
    state["pos_grid"] = resize_grid(state["pos_grid"], config.grid_freq, config.grid_time).contiguous()
    adapted = AudioTransformer(config)
    adapted.load_state_dict(state)
    return adapted


def _data_window(samples: list[int | None], indices: list[int], hop_ms: float, sample_rate: int) -> int:
    """Frames of the longest clip among ``indices`` (at least 16, at most 1024)."""
    frames = [frames_for_samples(samples[i], hop_ms, sample_rate) for i in indices if samples[i]]
    return int(min(1024, max(16, max(frames, default=1024))))


# -- experiments ---------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """Everything that defines an experiment; saved as ``run.json`` so ``resume`` needs nothing else."""

    kind: str  # "finetune" | "train"
    dataset: str
    data_dir: str | None = None
    model: str | None = None  # finetune: what load_model accepts
    arch: str = "ast"  # train
    size: str = "base"
    init: str = "imagenet"
    model_options: dict = field(default_factory=dict)  # train: ModelConfig overrides (depth, dim, ...)
    overrides: dict = field(default_factory=dict)  # Recipe overrides
    folds: list[int] | None = None  # None: all folds of the dataset; []: no cross-validation
    seed: int = 0
    amp: str = "auto"

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainResult:
    """A whole experiment: one FitResult per fold (or one), the metric name, and the final model dir."""

    out_dir: Path
    runs: list[FitResult]
    metric: str
    folded: bool
    interrupted: bool = False
    signum: int | None = None

    @property
    def model_dir(self) -> Path:
        return self.out_dir / "model"

    @property
    def bad_clips(self) -> int:
        return max((r.bad_clips for r in self.runs), default=0)

    def mean_std(self, key: str | None = None) -> tuple[float, float]:
        """Mean and standard deviation (ddof 0) of a final metric over the runs."""
        values = [r.metrics.get(key or self.metric) for r in self.runs]
        values = [v for v in values if v is not None]
        if not values:
            return math.nan, math.nan
        return float(np.mean(values)), float(np.std(values))

    def ast_protocol(self) -> tuple[int, float] | None:
        """AST's ESC-50 summary: the one epoch with the best metric averaged over folds, and that average."""
        if len(self.runs) < 2:
            return None
        histories = [r.history for r in self.runs]
        epochs = min(len(h) for h in histories)
        if not epochs:
            return None
        means = []
        for e in range(epochs):
            values = [h[e].get(self.metric) for h in histories]
            means.append(math.nan if any(v is None for v in values) else float(np.mean(values)))
        best = int(np.nanargmax(means)) if not all(math.isnan(m) for m in means) else epochs - 1
        return best + 1, means[best]

    def table(self) -> str:
        """Plain-text results: one row per fold, then mean ± std (and AST's fold-averaged best epoch)."""
        names = ("top1", "top5", "mAP", "mAUC", "d_prime")
        keys = [k for k in names if any(k in r.metrics for r in self.runs)]
        tests = [k for k in names if any(k in r.test_metrics for r in self.runs)]
        head = ["fold" if self.folded else "run", *keys, *(f"test_{k}" for k in tests), "model", "epoch"]
        rows = []
        for r in self.runs:
            cells = [str(r.fold) if r.fold is not None else "-"]
            cells += [_fmt(r.metrics.get(k)) for k in keys] + [_fmt(r.test_metrics.get(k)) for k in tests]
            rows.append([*cells, r.selected, str(r.epoch)])
        if len(self.runs) > 1:
            stats = [self.mean_std(k) for k in keys]
            rows.append(["mean", *[f"{_fmt(m)} ± {_fmt(s)}" for m, s in stats], *([""] * len(tests)), "", ""])
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [head, *rows]]
        protocol = self.ast_protocol()
        if protocol is not None and self.folded:
            lines.append(f"AST protocol (one epoch for every fold, best mean {self.metric}): "
                         f"epoch {protocol[0]}, {self.metric} {_fmt(protocol[1])}")
        return "\n".join(lines)

    def summary(self) -> dict:
        mean, std = self.mean_std()
        protocol = self.ast_protocol() if self.folded else None
        return _plain({
            "metric": self.metric, "mean": mean, "std": std, "runs": [r.to_dict() for r in self.runs],
            "ast_protocol": {"epoch": protocol[0], "mean": protocol[1]} if protocol else None,
            "model": str(self.model_dir),
        })


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4f}"


class _Experiment:
    """Builds the dataset, recipe and per-fold models of a RunSpec, and runs its folds."""

    def __init__(self, spec: RunSpec, out_dir: Path, dist: Distributed, device: torch.device):
        self.spec, self.out, self.dist, self.device = spec, out_dir, dist, device
        if spec.kind not in ("finetune", "train"):
            raise UsageError(f"unknown run kind {spec.kind!r}")
        if spec.kind == "train":
            if spec.arch not in ARCHS:
                raise UsageError(f"--arch must be one of {', '.join(ARCHS)}")
            if spec.size not in SIZES:
                raise UsageError(f"--size must be one of {', '.join(SIZES)}")
            if spec.init not in INITS:
                raise UsageError(f"--init must be one of {', '.join(INITS)}")
            if spec.init == "imagenet" and spec.size != "base":
                raise UsageError(f"ImageNet weights exist only for the base size (DeiT-B / ViT-B); "
                                 f"use --size base or --init none for --size {spec.size}")
        amp_dtype(spec.amp, device)
        if not dist.main:
            dist.barrier()  # let rank 0 download / check the data first
        self.dataset = load_dataset(spec.dataset, spec.data_dir)
        if dist.main:
            dist.barrier()
        ds = self.dataset
        pretrained = "audioset" if spec.kind == "finetune" else spec.init
        self.recipe = recipe_for(ds.name, pretrained=pretrained, multi_label=ds.multi_label).replace(**spec.overrides)
        if self.recipe.token_dropout is None:
            drop = 0.1 if spec.kind == "train" and spec.arch == "elastic" else 0.0
            self.recipe = self.recipe.replace(token_dropout=drop)
        self.recipe = self.recipe.replace(loss=self.recipe.loss or ("bce" if ds.multi_label else "ce"),
                                          balanced=ds.multi_label if self.recipe.balanced is None else None)
        if spec.kind == "finetune":
            self.base = self._pretrained()
            family, sample_rate, hop = self.base.config.family, self.base.config.sample_rate, self.base.config.hop_ms
        else:
            self.base = None
            family = spec.arch
            sample_rate = int(spec.model_options.get("sample_rate", 16000))
            hop = float(spec.model_options.get("hop_ms", 10.0))
        self.samples, errors = None, {}
        if family == "elastic" or self.recipe.window is None:
            self.samples, errors = _cached_lengths(self.out, ds, sample_rate, dist)
        self.scan_bad = {int(i): why for i, why in errors.items()}
        self.report = _once(quiet=bool(self.scan_bad))  # one warning for the whole run
        if self.scan_bad and dist.main:
            first = next(iter(self.scan_bad.values()))
            _warn(f"{len(self.scan_bad)} unreadable clip(s) skipped ({first})")
        if self.recipe.window is None:
            usable = [i for i in range(len(ds.examples)) if i not in self.scan_bad]
            self.recipe = self.recipe.replace(window=_data_window(self.samples, usable, hop, sample_rate))
        if self.base is None:
            self.base = self._new_model()
        self.base = self._fit_to_data(self.base)

    # -- models

    def _pretrained(self) -> AudioTransformer:
        """The tagger to fine-tune, as loaded (its head is replaced per fold)."""
        from astcli.tagger import AudioTagger, load_model

        tagger = load_model(self.spec.model, device="cpu")
        if not isinstance(tagger, AudioTagger):
            raise UsageError(f"{self.spec.model}: fine-tuning needs one PyTorch model (not an ensemble or ONNX file)")
        return tagger.model.float().train()

    def _new_model(self) -> AudioTransformer:
        """A new architecture for the dataset, from ImageNet weights or random (seeded) initialisation."""
        spec, ds, window = self.spec, self.dataset, self.recipe.window
        family = ast_config if spec.arch == "ast" else elastic_config
        options = dict(num_classes=len(ds.classes), labels=list(ds.classes))
        if spec.arch == "ast":
            options["max_frames"] = window
        else:
            options["attn_scale"] = True  # new models use the standard 1/sqrt(d) attention scale
            options["max_frames"] = max(1024, -(-window // 16) * 16)
        try:
            config = family(spec.size, **{**options, **spec.model_options})
        except (TypeError, ValueError) as exc:
            raise UsageError(f"model options: {exc}") from None
        torch.manual_seed(derive_seed(spec.seed, "architecture"))
        model = AudioTransformer(config)
        if spec.init == "imagenet":
            from astcli.train.init import init_from_imagenet

            init_from_imagenet(model)
        return model

    def _fit_to_data(self, model: AudioTransformer) -> AudioTransformer:
        """Window, statistics and head type for the dataset (the head itself is replaced per fold)."""
        r, ds = self.recipe, self.dataset
        if model.config.family == "ast" and r.window != model.config.max_frames:
            model = adapt_window(model, r.window)
        c = model.config
        if r.mean is not None:
            c.mean, c.std = float(r.mean), float(r.std)
        elif self.spec.kind == "train" and "mean" not in self.spec.model_options:
            c.mean, c.std = DEFAULT_STATS[c.family]
        loss = r.loss or ("bce" if ds.multi_label else "ce")
        c.multi_label = loss == "bce"
        return model

    def model_for(self, fold: int | None) -> AudioTransformer:
        """A fresh copy of the base model with a new head for the dataset's classes (seeded per fold)."""
        model = copy.deepcopy(self.base)
        torch.manual_seed(derive_seed(self.spec.seed, fold, "head"))
        ds = self.dataset
        model.reset_head(len(ds.classes), list(ds.classes), model.config.multi_label)
        return model

    # -- splits

    def splits(self) -> list[tuple[int | None, list[int], list[int], list[int]]]:
        """(fold, train, validation, test) index lists of every run."""
        ds, spec = self.dataset, self.spec
        if ds.folds and spec.folds != []:
            folds = spec.folds or ds.folds
            missing = [f for f in folds if f not in ds.folds]
            if missing:
                raise UsageError(f"{ds.name} has folds {ds.folds}; no fold {missing[0]}")
            return [(k, *fold_split(ds, k), []) for k in folds]
        if spec.folds:
            raise UsageError(f"{ds.name} defines no folds; leave out --folds")
        if ds.splits and ds.splits.get("train"):
            val = list(ds.splits.get("validation") or [])
            test = list(ds.splits.get("test") or [])
            if not val:
                val, test = test, []
            return [(None, list(ds.splits["train"]), val, test)]
        return [(None, *holdout_split(ds, self.recipe.val_fraction, self.spec.seed), [])]

    # -- running

    def run(self, *, num_workers, progress, stop, on_epoch_end, on_step) -> TrainResult:
        spec, ds = self.spec, self.dataset
        runs: list[FitResult] = []
        folded = bool(ds.folds) and spec.folds != []
        metric = "mAP" if ds.multi_label else "top1"
        splits = self.splits()
        for fold, train_idx, val_idx, test_idx in splits:
            out = self.out / f"fold{fold}" if folded else self.out
            done = out / "result.json"
            if done.is_file():
                runs.append(FitResult.from_dict(out, json.loads(done.read_text(encoding="utf-8"))))
                continue
            bad = self.scan_bad
            result = fit(self.model_for(fold), ds, self.recipe, out, train_idx=[i for i in train_idx if i not in bad],
                         val_idx=[i for i in val_idx if i not in bad], test_idx=[i for i in test_idx if i not in bad],
                         fold=fold, seed=spec.seed, amp=spec.amp, device=self.device, num_workers=num_workers,
                         progress=progress, resume=True, stop=stop, on_epoch_end=on_epoch_end, on_step=on_step,
                         lengths=self.samples, report=self.report)
            result.bad_clips += len(bad)
            runs.append(result)
            if result.interrupted:
                return TrainResult(self.out, runs, metric, folded, interrupted=True, signum=stop.signum)
        result = TrainResult(self.out, runs, metric, folded)
        if self.dist.main:
            if folded:
                first = runs[0].out_dir / "model"
                if self.model_dir_missing(first):
                    raise UsageError(f"{first}: the first fold's model is missing")
                shutil.copytree(first, self.out / "model", dirs_exist_ok=True)
            _atomic_text(self.out / "summary.json", json.dumps(result.summary(), indent=2) + "\n")
        return result

    @staticmethod
    def model_dir_missing(path: Path) -> bool:
        return not (path / "model.safetensors").is_file()


def holdout_split(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, validation) indices: ``fraction`` of each class (by first label, at least one where a class has
    two or more examples) held out at random, reproducibly from ``seed``."""
    if fraction <= 0:
        return list(range(len(dataset.examples))), []
    by_class: dict[int, list[int]] = {}
    for i, e in enumerate(dataset.examples):
        by_class.setdefault(e.labels[0] if e.labels else -1, []).append(i)
    gen = _generator(seed, "holdout")
    val: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        take = round(len(members) * fraction)
        if len(members) >= 2:
            take = max(1, min(take, len(members) - 1))
        order = torch.randperm(len(members), generator=gen).tolist()
        val += [members[k] for k in order[:take]]
    held = set(val)
    return [i for i in range(len(dataset.examples)) if i not in held], sorted(val)


def run(spec: RunSpec, out_dir: str | Path, *, resume: bool = False, device=None, num_workers: int | None = None,
        progress: bool | None = None, on_epoch_end=None, on_step=None) -> TrainResult:
    """Run (or, with ``resume``, continue) the experiment ``spec`` in ``out_dir``.

    Joins a ``torchrun`` process group when WORLD_SIZE > 1. SIGINT/SIGTERM end the run after the current step
    with everything saved (``TrainResult.interrupted``); ``resume(out_dir)`` continues it.
    """
    out = Path(out_dir)
    dist, dev = setup_distributed(device)
    try:
        meta = out / "run.json"
        if not resume and meta.is_file():
            raise UsageError(f"{out} already holds a training run: continue it with --resume {out}, "
                             "or choose another output directory")
        if progress is None:
            progress = sys.stderr.isatty()
        with stop_on_signals() as stop:
            experiment = _Experiment(spec, out, dist, dev)
            if dist.main:
                out.mkdir(parents=True, exist_ok=True)
                payload = {**spec.to_dict(), "resolved_recipe": experiment.recipe.to_dict(),
                           "dataset_name": experiment.dataset.name, "classes": experiment.dataset.classes}
                _atomic_text(meta, json.dumps(_plain(payload), indent=2) + "\n")
            dist.barrier()
            return experiment.run(num_workers=num_workers, progress=progress, stop=stop,
                                  on_epoch_end=on_epoch_end, on_step=on_step)
    finally:
        if dist.owned and tdist.is_initialized():
            tdist.destroy_process_group()


def finetune(dataset: str, out_dir: str | Path, *, model: str | None = None, data_dir: str | None = None,
             folds: list[int] | None = None, seed: int = 0, amp: str = "auto", device=None,
             num_workers: int | None = None, progress: bool | None = None, on_epoch_end=None, on_step=None,
             **overrides) -> TrainResult:
    """Adapt a pretrained tagger (default: the AudioSet AST preset) to ``dataset``: new head, the dataset's
    recipe (``overrides`` replace any of its fields), k-fold cross-validation where the dataset has folds."""
    from astcli.model.presets import DEFAULT_MODEL

    spec = RunSpec("finetune", str(dataset), _str(data_dir), model=str(model or DEFAULT_MODEL),
                   overrides=_overrides(overrides), folds=folds, seed=seed, amp=amp)
    return run(spec, out_dir, device=device, num_workers=num_workers, progress=progress,
               on_epoch_end=on_epoch_end, on_step=on_step)


def train(dataset: str, out_dir: str | Path, *, arch: str = "ast", size: str = "base", init: str = "imagenet",
          model_options: dict | None = None, data_dir: str | None = None, folds: list[int] | None = None,
          seed: int = 0, amp: str = "auto", device=None, num_workers: int | None = None,
          progress: bool | None = None, on_epoch_end=None, on_step=None, **overrides) -> TrainResult:
    """Train a new AST / ElasticAST (``size`` tiny/small/base, ``init`` imagenet/none; ``model_options``
    override architecture fields) on ``dataset`` with its recipe (``overrides`` replace recipe fields)."""
    spec = RunSpec("train", str(dataset), _str(data_dir), arch=arch, size=size, init=init,
                   model_options=dict(model_options or {}), overrides=_overrides(overrides), folds=folds, seed=seed,
                   amp=amp)
    return run(spec, out_dir, device=device, num_workers=num_workers, progress=progress,
               on_epoch_end=on_epoch_end, on_step=on_step)


def resume(out_dir: str | Path, *, device=None, num_workers: int | None = None, progress: bool | None = None,
           on_epoch_end=None, on_step=None) -> TrainResult:
    """Continue the run saved in ``out_dir`` (after a crash, SIGKILL, SIGINT or SIGTERM) where it stopped."""
    meta = Path(out_dir) / "run.json"
    try:
        spec = RunSpec.from_dict(json.loads(meta.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise UsageError(f"{out_dir}: no run.json, so nothing to resume") from None
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"{meta}: unreadable run description ({exc})") from None
    return run(spec, out_dir, resume=True, device=device, num_workers=num_workers, progress=progress,
               on_epoch_end=on_epoch_end, on_step=on_step)


def _str(value) -> str | None:
    return None if value is None else str(value)


def _overrides(values: dict) -> dict:
    """Recipe overrides without Nones, checked against the Recipe fields now (not at the first epoch)."""
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items() if v is not None}
    Recipe().replace(**{k: v for k, v in clean.items() if k not in ("wa_start", "wa_end", "select")})
    return clean
