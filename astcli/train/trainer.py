"""Training one model: :func:`fit` trains a model on one split of a dataset with a resolved recipe (optimizer
and schedule, mixed precision, validation every epoch, resumable state, weight averaging, logs).

Data flows one way: the split's examples -> an epoch's batch plans (:mod:`astcli.train.batches`) -> DataLoader
workers that decode, augment and pack them (:mod:`astcli.train.loader`) -> forward/backward -> optimizer step.
Every random choice is a function of ``(seed, fold, epoch, batch)``, so a run resumed from its state file repeats
exactly what an uninterrupted run would have done, with any number of workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist
from safetensors.torch import load_file

from astcli import files
from astcli.console import Progress, warn_once
from astcli.errors import DatasetError, ParameterError
from astcli.model.checkpoints import save_checkpoint
from astcli.model.packing import PackedBatch, pack_clips, patchify
from astcli.model.transformer import AudioTransformer, probabilities
from astcli.train.batches import BatchPlanner
from astcli.train.datasets import Split
from astcli.train.distributed import Distributed, any_rank
from astcli.train.loader import ClipMaker, LoadedBatch, load_batches
from astcli.train.logs import epoch_line, json_safe, metrics_of, write_logs
from astcli.train.metrics import evaluate
from astcli.train.optimization import amp_dtype, learning_rate, loss, make_optimizer
from astcli.train.recipes import Recipe
from astcli.train.signals import StopFlag
from astcli.train.state import TrainingState, WeightAverage, load_state, save_state


def _speed(loss_value: float, clips_per_s: float) -> str:
    return f"loss {loss_value:.4f}  {clips_per_s:.1f} clips/s"


def unreadable_reporter(quiet: bool = False) -> Callable[[str], None]:
    """Reporter of clips that fail to decode: one warning at the first (none when ``quiet``); the rest are
    counted in the logs."""
    return warn_once(lambda reason: f"skipping unreadable audio ({reason}); further failures are counted in "
                     "the logs, not shown", quiet)


def default_workers() -> int:
    """DataLoader workers by default: min(2, cores)."""
    return min(2, os.cpu_count() or 1)


@dataclass
class RunOptions:
    """Where and how a fit runs: ``out_dir`` for its files, ``seed`` for every random choice, ``amp`` (auto,
    bf16, fp16, off), ``device`` (None: CUDA when available), data ``num_workers`` (None: :func:`default_workers`),
    a ``progress`` bar on stderr, ``resume`` from ``out_dir/state.pt``, a ``stop`` flag (see
    :func:`~astcli.train.signals.stop_on_signals`), callbacks after every epoch (its record) and optimizer step
    (epoch, step), and ``report`` for unreadable clips (default: one warning on stderr)."""

    out_dir: Path
    seed: int = 0
    amp: str = "auto"
    device: str | torch.device | None = None
    num_workers: int | None = None
    progress: bool = False
    resume: bool = True
    stop: StopFlag | None = None
    on_epoch_end: Callable[[dict], None] | None = None
    on_step: Callable[[int, int], None] | None = None
    report: Callable[[str], None] | None = None
    baseline: dict | None = None  # the linear probe's result on this split, stored with the fit's result


@dataclass
class FitResult:
    """One trained model (one fold). ``metrics``: validation metrics of the final model; ``history``: one
    record per epoch; ``selected``: how the final model was chosen (last / best / wa) and ``epoch`` the
    epoch it stands for (the last averaged epoch for wa); ``baseline``: the linear probe's result on the same
    split (:class:`~astcli.train.probe.ProbeResult` as a dict), when one was fitted."""

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
    baseline: dict | None = None

    @property
    def model_dir(self) -> Path:
        return self.out_dir / "model"

    def to_dict(self) -> dict:
        return json_safe({"fold": self.fold, "selected": self.selected, "epoch": self.epoch, "metrics": self.metrics,
                          "test_metrics": self.test_metrics, "baseline": self.baseline, "bad_clips": self.bad_clips,
                          "history": self.history})

    @classmethod
    def from_dict(cls, out_dir: Path, data: dict) -> FitResult:
        return cls(out_dir, data["history"], data["metrics"], data.get("test_metrics") or {}, data["selected"],
                   data["epoch"], data.get("bad_clips", 0), data.get("fold"), baseline=data.get("baseline"))


class Trainer:
    """State and steps of one :func:`fit` call."""

    def __init__(self, model: AudioTransformer, split: Split, recipe: Recipe, run: RunOptions):
        from astcli.backends import resolve_device

        if not split.train:
            raise DatasetError(f"{split.dataset.name}: no training examples")
        missing = recipe.unresolved()
        if missing:
            raise ParameterError("recipe", f"has {', '.join(missing)} left to derive: resolve it first")
        self.dist, self.device = Distributed.current(), resolve_device(run.device)
        self.model = model.to(self.device, torch.float32)
        self.config, self.split, self.recipe, self.run, self.out = model.config, split, recipe, run, Path(run.out_dir)
        self.amp = amp_dtype(run.amp, self.device)
        self.num_workers = default_workers() if run.num_workers is None else max(0, int(run.num_workers))
        self.stop, self.report = run.stop or StopFlag(), run.report or unreadable_reporter()
        self.metric = "mAP" if split.dataset.multi_label else "top1"
        self.maker = ClipMaker(split, self.config, recipe)
        self.planner = BatchPlanner(self.config, split, window=recipe.window, budget=recipe.batch_tokens,
                                    hop_choices=recipe.hop_choices if recipe.random_hop else None,
                                    balanced=recipe.balanced, seed=run.seed, dist=self.dist)
        self.net = self.model
        if self.dist.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = make_optimizer(self.model.parameters(), recipe)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.progress = Progress(bool(run.progress) and self.dist.main)
        self.state = TrainingState()
        self.average = WeightAverage() if recipe.select == "wa" and self.dist.main else None

    # -- state file

    @property
    def state_path(self) -> Path:
        return self.out / "state.pt"

    def _parts(self) -> tuple[dict, dict]:
        parts = {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler,
                 "sampler": self.planner.sampler, "average": self.average}
        s, r = self.split, self.recipe
        return parts, {"train": len(s.train), "val": len(s.validation), "classes": len(s.dataset.classes),
                       "epochs": r.epochs, "averaged": [r.wa_start, r.wa_end]}

    def save_state(self) -> None:
        if self.dist.main:
            save_state(self.state_path, self.state, *self._parts())

    # -- steps

    def _record_bad(self, bad: list[tuple[int, str]]) -> None:
        for index, reason in bad:
            if index not in self.state.bad:
                self.state.bad[index] = reason
                if self.dist.main:
                    self.report(reason)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def _dummy(self) -> PackedBatch:
        c = self.config
        frames = c.max_frames if c.pads_to_window else c.patch_size
        return pack_clips([patchify(torch.zeros(frames, c.num_mel_bins), c)], c.prefix_tokens)

    def _forward_backward(self, loaded: LoadedBatch, scale: float, sync: bool) -> float:
        """Loss of one batch, gradients accumulated (scaled by ``scale``); gradients are all-reduced only when
        ``sync``. A batch whose clips all failed runs a dummy clip with zero weight, to keep ranks in step."""
        empty = loaded.batch is None
        batch = self._dummy() if empty else loaded.batch
        targets = torch.zeros(1, self.config.num_classes) if empty else loaded.targets
        with contextlib.nullcontext() if sync or not self.dist.active else self.net.no_sync():
            with self._autocast():
                logits = self.net(batch.to(self.device))
            value = loss(logits.float(), targets.to(self.device), self.recipe.loss)
            scaled = value * (0.0 if empty else scale)
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return float(value.detach())

    def _optimizer_step(self, epoch: int) -> float:
        lr = learning_rate(self.recipe, epoch, self.state.step + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        clip = self.recipe.clip_grad
        if self.scaler is not None and clip:
            self.scaler.unscale_(self.optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return lr

    def train_epoch(self, epoch: int) -> bool:
        """Train one epoch from batch ``state.batch``; False when stopped by a signal (state saved mid-epoch)."""
        plans, accum, s = self.planner.plans(epoch), self.recipe.grad_accum, self.state
        self.model.train()
        label = f"fold {self.split.fold} " if self.split.fold is not None else ""
        self.progress.start(f"{label}epoch {epoch}/{self.recipe.epochs}", len(plans), s.batch, _speed(0.0, 0.0))
        p = s.partial
        t0 = time.perf_counter() - p["seconds"]
        lr = learning_rate(self.recipe, epoch, max(1, s.step))
        for k, loaded in enumerate(load_batches(self.maker, plans[s.batch:], self.num_workers), start=s.batch):
            self._record_bad(loaded.bad)
            group = min(accum, len(plans) - (k - k % accum))
            last_micro = (k + 1) % accum == 0 or k == len(plans) - 1
            value = self._forward_backward(loaded, 1.0 / group, sync=last_micro)
            p["loss_sum"] += value * len(loaded.indices)
            p["clips"] += len(loaded.indices)
            p["tokens"] += loaded.tokens
            p["seconds"] = time.perf_counter() - t0
            self.progress.advance(1, _speed(p["loss_sum"] / max(1, p["clips"]), p["clips"] / max(1e-9, p["seconds"])))
            if not last_micro:
                continue
            lr = self._optimizer_step(epoch)
            s.batch = k + 1
            if self.run.on_step is not None:
                self.run.on_step(epoch, s.step)
            if any_rank(self.stop.requested, self.dist, self.device) and s.batch < len(plans):
                self.save_state()
                return False
        p["lr"] = lr
        self.progress.finish()
        return True

    def evaluate(self, indices, shard: bool = True) -> tuple[dict, float | None]:
        """Metrics and mean loss of the current model on ``indices`` (no augmentation); with ``shard``, every
        rank evaluates its share and the results are gathered."""
        if not indices:
            return {}, None
        self.model.eval()
        kept, logits, targets = [], [], []
        with torch.no_grad():
            for loaded in load_batches(self.maker, self.planner.eval_plans(indices, shard), self.num_workers):
                self._record_bad(loaded.bad)
                if loaded.batch is not None:
                    with self._autocast():
                        logits.append(self.model(loaded.batch.to(self.device)).float().cpu())
                    kept += loaded.indices
                    targets.append(loaded.targets)
        if shard and self.dist.active:
            gathered = [None] * self.dist.world
            tdist.all_gather_object(gathered, (kept, logits, targets))
            kept, logits, targets = ([x for part in gathered for x in part[i]] for i in range(3))
        self.model.train()
        if not kept:
            return {}, None
        order = sorted(range(len(kept)), key=kept.__getitem__)
        all_logits, all_targets = torch.cat(logits)[order], torch.cat(targets)[order]
        kind = self.recipe.loss
        probs = probabilities(all_logits, multi_label=kind == "bce")
        metrics = evaluate(probs.numpy(), all_targets.numpy(), self.split.dataset.multi_label)
        return metrics, float(loss(all_logits, all_targets, kind))

    def end_epoch(self, epoch: int) -> dict:
        """Validate, log, keep the weights weight averaging or best-epoch selection need, save the state."""
        s, r = self.state, self.recipe
        p = s.partial
        metrics, val_loss = self.evaluate(self.split.validation)
        held_out = {}
        if self.split.fold is not None:  # the held-out fold every epoch: for AST's cross-validation summary only
            held_out = {f"test_{k}": v for k, v in self.evaluate(self.split.test)[0].items()}
        seconds = max(p["seconds"], 1e-9)
        record = {
            "fold": self.split.fold, "epoch": epoch, "lr": p.get("lr", r.lr),
            "train_loss": p["loss_sum"] / max(1, p["clips"]), "val_loss": val_loss, **metrics, **held_out,
            "steps": s.step, "bad": len(s.bad), "seconds": round(p["seconds"], 3),
            "clips_per_s": p["clips"] / seconds, "tokens_per_s": p["tokens"] / seconds,
        }
        s.history.append(record)
        value = metrics.get(self.metric)
        value = -math.inf if value is None or not math.isfinite(value) else float(value)
        improved = bool(metrics) and value > s.best["value"]
        if self.average is not None and r.wa_start <= epoch <= r.wa_end:
            self.average.add(self.model.state_dict())
        if self.dist.main and improved:
            files.save_tensors(self.model.state_dict(), self.out / "best.safetensors")
        if improved:
            s.best = {"epoch": epoch, "value": value}
        s.next_epoch(epoch)
        self.save_state()
        if self.dist.main:
            write_logs(self.out, s.history)
            self.progress.log(epoch_line(record))
        if self.run.on_epoch_end is not None:
            self.run.on_epoch_end(record)
        return record

    def _final_weights(self, select: str) -> tuple[dict, int]:
        """Load the selected weights into the model; the validation metrics they stand for and their epoch."""
        s, r = self.state, self.recipe
        if select == "wa":
            self.model.load_state_dict(self.average.mean())
            return self.evaluate(self.split.validation, shard=False)[0], r.wa_end
        if select == "best":
            self.model.load_state_dict(load_file(str(self.out / "best.safetensors")))
            return metrics_of(s.history[s.best["epoch"] - 1]), s.best["epoch"]
        return metrics_of(s.history[-1]), s.epoch

    def finish(self) -> FitResult:
        """Pick the final model (the recipe's selection; "best" without any validated epoch falls back to the
        last), evaluate it on the test examples, save ``model/`` and ``result.json``."""
        s = self.state
        select = "last" if self.recipe.select == "best" and not s.best["epoch"] else self.recipe.select
        metrics, epoch, test = metrics_of(s.history[-1]), s.epoch, {}
        if self.dist.main:
            metrics, epoch = self._final_weights(select)
            test, _ = self.evaluate(self.split.test, shard=False)
            save_checkpoint(self.out / "model", self.config, self.model.state_dict())
            result = FitResult(self.out, s.history, metrics, test, select, epoch, len(s.bad), self.split.fold,
                               baseline=self.run.baseline)
            files.write_text(self.out / "result.json", json.dumps(result.to_dict(), indent=2) + "\n")
            for leftover in (self.state_path, self.out / "best.safetensors"):
                leftover.unlink(missing_ok=True)
        self.dist.barrier()
        self.model.eval()
        return FitResult(self.out, s.history, metrics, test, select, epoch, len(s.bad), self.split.fold,
                         model=self.model, baseline=self.run.baseline)

    def fit(self) -> FitResult:
        """Train every remaining epoch (after the saved state when resuming), then :meth:`finish`."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.run.resume:
            self.state = load_state(self.state_path, *self._parts()) or self.state
        try:
            for epoch in range(self.state.epoch + 1, self.recipe.epochs + 1):
                if not self.train_epoch(epoch):
                    return self._interrupted()
                self.end_epoch(epoch)
                if any_rank(self.stop.requested, self.dist, self.device) and epoch < self.recipe.epochs:
                    return self._interrupted()
        finally:
            self.progress.close()
        return self.finish()

    def _interrupted(self) -> FitResult:
        s = self.state
        last = metrics_of(s.history[-1]) if s.history else {}
        return FitResult(self.out, s.history, last, {}, "last", s.epoch, len(s.bad), self.split.fold,
                         model=self.model, interrupted=True)


def fit(model: AudioTransformer, split: Split, recipe: Recipe, run: RunOptions) -> FitResult:
    """Train ``model`` (window, statistics and head already set for the data, see :mod:`astcli.train.models`)
    on ``split.train`` with the resolved ``recipe`` (:func:`~astcli.train.recipes.resolve_recipe`), validating
    on ``split.validation`` after every epoch, into ``run.out_dir``.

    Clips that fail to decode are skipped, counted (``bad`` in the logs, ``bad_clips``) and passed to
    ``run.report``. A set ``run.stop`` flag ends the run after the current step with the state saved: the
    result then has ``interrupted=True`` and a later call with ``run.resume`` continues exactly.
    Raises DatasetError without training examples, ParameterError for an unresolved recipe."""
    return Trainer(model, split, recipe, run).fit()
