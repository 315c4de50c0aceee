"""Whole experiments behind ``ast train`` and ``ast finetune``: a :class:`RunSpec` becomes a dataset, a recipe
and one model per fold, each trained by :func:`astcli.train.loop.fit`, then a summary over the folds.

Entry points: :func:`finetune`, :func:`train` and :func:`resume` run a whole experiment (k-fold where the
dataset defines folds) into an output directory; :func:`run` runs a saved :class:`RunSpec`.

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
import dataclasses
import hashlib
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from astcli import files
from astcli.console import warn
from astcli.errors import UsageError
from astcli.model.config import DEFAULT_STATS, ast_config, elastic_config
from astcli.model.transformer import AudioTransformer
from astcli.train.data import _data_window, scan_lengths
from astcli.train.datasets import Dataset, fold_split, load_dataset
from astcli.train.loop import (
    FitResult,
    _generator,
    _plain,
    adapt_window,
    amp_dtype,
    derive_seed,
    fit,
    unreadable_reporter,
)
from astcli.train.recipes import Recipe, recipe_for
from astcli.train.runtime import Distributed, setup_distributed, stop_on_signals

ARCHS = ("ast", "elastic")
SIZES = ("tiny", "small", "base")
INITS = ("imagenet", "none")


# -- clip lengths --------------------------------------------------------------------------------------


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
        files.write_text(cache, json.dumps(payload) + "\n")
    return samples, errors


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
        self.report = unreadable_reporter(quiet=bool(self.scan_bad))  # one warning for the whole run
        if self.scan_bad and dist.main:
            first = next(iter(self.scan_bad.values()))
            warn(f"{len(self.scan_bad)} unreadable clip(s) skipped ({first})")
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
            raise UsageError(f"model options: {exc}") from exc
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
        mean, std = c.mean, c.std
        if r.mean is not None:
            mean, std = float(r.mean), float(r.std)
        elif self.spec.kind == "train" and "mean" not in self.spec.model_options:
            mean, std = DEFAULT_STATS[c.family]
        loss = r.loss or ("bce" if ds.multi_label else "ce")
        model.config = dataclasses.replace(c, mean=mean, std=std, multi_label=loss == "bce")
        return model

    def model_for(self, fold: int | None) -> AudioTransformer:
        """A fresh copy of the base model with a new head for the dataset's classes (seeded per fold)."""
        torch.manual_seed(derive_seed(self.spec.seed, fold, "head"))
        ds = self.dataset
        return self.base.with_head(len(ds.classes), ds.classes, self.base.config.multi_label)

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
            files.write_text(self.out / "summary.json", json.dumps(result.summary(), indent=2) + "\n")
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
                files.write_text(meta, json.dumps(_plain(payload), indent=2) + "\n")
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
    except FileNotFoundError as exc:
        raise UsageError(f"{out_dir}: no run.json, so nothing to resume") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"{meta}: unreadable run description ({exc})") from exc
    return run(spec, out_dir, resume=True, device=device, num_workers=num_workers, progress=progress,
               on_epoch_end=on_epoch_end, on_step=on_step)


def _str(value) -> str | None:
    return None if value is None else str(value)


def _overrides(values: dict) -> dict:
    """Recipe overrides without Nones, checked against the Recipe fields now (not at the first epoch)."""
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items() if v is not None}
    Recipe().replace(**{k: v for k, v in clean.items() if k not in ("wa_start", "wa_end", "select")})
    return clean
