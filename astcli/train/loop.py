"""Training one model: :func:`fit` trains a model on given example indices into an output directory
(optimizer and schedule, mixed precision, validation every epoch, resumable state, weight averaging, logs).

Data flows one way: dataset examples -> an epoch *plan* (sampler order, per-clip hop and seed, batches
filled up to a token budget at native length) -> DataLoader workers (decode, mixup, noise, fbank,
SpecAugment, fit to the window, normalise, patchify, token dropout, pack) -> forward/backward ->
optimizer step. Every random choice is a function of ``(seed, fold, epoch, batch)``, so a run resumed from
a checkpoint repeats exactly what an uninterrupted run would have done, with any number of workers.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from safetensors.torch import load_file

from astcli import files
from astcli.console import Progress, warn_once
from astcli.errors import DatasetError, UsageError
from astcli.features import frames_for_samples
from astcli.model.checkpoints import save_checkpoint
from astcli.model.config import ModelConfig
from astcli.model.packing import PackedBatch, batch_clips, pack_clips, patchify
from astcli.model.transformer import AudioTransformer, resize_grid
from astcli.train.augment import BalancedSampler, ShuffleSampler, random_hop_ms
from astcli.train.data import BatchPlan, ClipMaker, LoadedBatch, _loader
from astcli.train.datasets import Dataset
from astcli.train.metrics import evaluate
from astcli.train.recipes import Recipe
from astcli.train.runtime import Distributed, StopFlag, _any_rank

STATE_VERSION = 1
AMP_MODES = ("auto", "bf16", "fp16", "off")
TIMING_KEYS = ("seconds", "clips_per_s", "tokens_per_s")


# -- small helpers -------------------------------------------------------------------------------------


def derive_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (no global state involved)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


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
    files.write_text(directory / "log.jsonl", "".join(json.dumps(_plain(r)) + "\n" for r in history))
    columns: list[str] = []
    for record in history:
        columns += [k for k in record if k not in columns]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns)
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in _plain(r).items()} for r in history)
    files.write_text(directory / "log.csv", table.getvalue())
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


def _speed(loss: float, clips_per_s: float) -> str:
    return f"loss {loss:.4f}  {clips_per_s:.1f} clips/s"


def unreadable_reporter(quiet: bool = False) -> Callable[[str], None]:
    """Reporter of clips that fail to decode: one warning at the first (none when ``quiet``); the rest are
    counted in the logs."""
    return warn_once(lambda reason: f"skipping unreadable audio ({reason}); further failures are counted in "
                     "the logs, not shown", quiet)


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
        self.progress = Progress(bool(progress) and self.dist.main)
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
        files.save_torch(state, self.state_path)

    def load_state(self) -> bool:
        if not self.state_path.is_file():
            return False
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file: say so in one line
            raise UsageError(f"{self.state_path}: cannot read the training state ({type(exc).__name__})") from exc
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
        self.progress.start(f"{label}epoch {epoch}/{self.recipe.epochs}", len(plans), start, _speed(0.0, 0.0))
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
            self.progress.advance(1, _speed(p["loss_sum"] / max(1, p["clips"]), p["clips"] / max(1e-9, p["seconds"])))
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
        self.progress.finish()
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
                files.save_tensors(self.model.state_dict(), self.out / "epochs" / f"epoch_{epoch:03d}.safetensors")
            if improved:
                files.save_tensors(self.model.state_dict(), self.out / "best.safetensors")
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
                paths = [self.out / "epochs" / f"epoch_{e:03d}.safetensors" for e in range(r.wa_start, r.wa_end + 1)]
                self.model.load_state_dict(average_weights(paths))
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
            files.write_text(self.out / "result.json", json.dumps(result.to_dict(), indent=2) + "\n")
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
    when present. A set ``stop`` flag (see :func:`~astcli.train.runtime.stop_on_signals`) ends the run after the
    current step with the state saved: the result then has ``interrupted=True``. Clips that fail to decode are
    skipped, counted (``bad`` in the logs, ``bad_clips``) and passed to ``report`` (default: one warning on stderr).
    """
    trainer = _Trainer(model, dataset, recipe, out_dir, train_idx=train_idx, val_idx=val_idx, test_idx=test_idx,
                       fold=fold, seed=seed, amp=amp, device=device, num_workers=num_workers, progress=progress,
                       stop=stop, on_epoch_end=on_epoch_end, on_step=on_step, lengths=lengths, bad_known=bad,
                       report=report or unreadable_reporter())
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
