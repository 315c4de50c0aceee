"""Whole experiments behind ``ast train`` and ``ast finetune``: a :class:`RunSpec` becomes a dataset, a recipe
and one model per fold, each trained by :func:`astcli.train.trainer.fit`, then a summary over the folds.

Entry points: :func:`finetune`, :func:`train` and :func:`resume` run a whole experiment (k-fold where the
dataset defines folds) into an output directory; :func:`run` runs a saved :class:`RunSpec`.

Output directory (one ``foldK/`` per fold for folded datasets, the same files at the top otherwise)::

    run.json              what was run (dataset, model source, recipe): ``resume`` needs nothing else
    lengths.json          clip lengths from the audio headers (ElasticAST and data-derived windows)
    statistics.json       normalisation statistics fitted to the training clips (a new model without given ones)
    foldK/state.pt        resumable training state (weights_only torch file, with the weight average so far),
                          removed when the fold is done
    foldK/log.jsonl/.csv  one record per epoch; foldK/curves.png when matplotlib is installed
    foldK/model/          the final model (config.json + model.safetensors), loadable by ``ast tag``
    foldK/result.json     final validation and test metrics, the linear probe's; marks the fold as done
    model/                the final model (the first fold's, for folded datasets)
    summary.json          per-fold metrics, mean and standard deviation
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.distributed as tdist

from astcli import files
from astcli.console import note, warn
from astcli.errors import ParameterError, UsageError
from astcli.train.batches import batches_per_epoch, cached_lengths, save_lengths
from astcli.train.datasets import Split, load_dataset, run_splits
from astcli.train.distributed import Distributed, setup_distributed
from astcli.train.logs import json_safe
from astcli.train.models import (
    ARCHS,
    INITS,
    SIZES,
    architecture,
    fit_to_recipe,
    new_model,
    pretrained_model,
    with_new_head,
)
from astcli.train.optimization import AMP_MODES, amp_dtype
from astcli.train.probe import PROBE_CLIPS, clip_features, probe_split
from astcli.train.recipes import Recipe, check_averaging, recipe_for, resolve_recipe, with_overrides
from astcli.train.signals import stop_on_signals
from astcli.train.statistics import cached_statistics, sample_indices, save_statistics
from astcli.train.trainer import FitResult, RunOptions, fit, unreadable_reporter

KINDS = ("finetune", "train")
FINAL_MODEL = {"wa": "weight average of epochs {r.wa_start}-{r.wa_end}", "best": "the best epoch on validation",
               "last": "the last epoch"}  # the plan line's words for each selection


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

    def validate(self) -> None:
        """Raise ParameterError for a kind, arch, size, init or amp that does not exist or fit together."""
        choices = [("kind", self.kind, KINDS), ("amp", self.amp, AMP_MODES)]
        if self.kind == "train":
            choices += [("arch", self.arch, ARCHS), ("size", self.size, SIZES), ("init", self.init, INITS)]
        for name, value, allowed in choices:
            if value not in allowed:
                raise ParameterError(name, f"must be one of {', '.join(allowed)} (got {value!r})")
        if self.kind == "train" and self.init == "imagenet" and self.size != "base":
            raise ParameterError("init", f"imagenet needs the base size (ImageNet weights exist only for DeiT-B / "
                                 f"ViT-B): use size base, or init none for size {self.size}")

    def to_dict(self) -> dict:
        """The fields of this kind of run (a finetune has no arch, size, init or model options; a train no
        model); a finetune adds ``source_model``: where its starting weights come from."""
        unused = ("arch", "size", "init", "model_options") if self.kind == "finetune" else ("model",)
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in unused}
        if self.kind == "finetune":
            data["source_model"] = _provenance(str(self.model))
        return json_safe(data)

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
    eval_clips: list[tuple[int, int]] = field(default_factory=list)  # (validation, test) clips of each run

    @property
    def model_dir(self) -> Path:
        return self.out_dir / "model"

    @property
    def bad_clips(self) -> int:
        return max((r.bad_clips for r in self.runs), default=0)

    def mean_std(self, key: str | None = None) -> tuple[float, float]:
        """Mean and standard deviation (ddof 0) over the runs of a final validation metric, a test metric
        (``test_<name>``) or the linear probe's metric (``probe``)."""
        key = key or self.metric
        if key == "probe":
            values = [((r.baseline or {}).get("metrics") or {}).get(self.metric) for r in self.runs]
        elif key.startswith("test_"):
            values = [r.test_metrics.get(key[5:]) for r in self.runs]
        else:
            values = [r.metrics.get(key) for r in self.runs]
        values = [v for v in values if v is not None]
        if not values:
            return math.nan, math.nan
        return float(np.mean(values)), float(np.std(values))

    def ast_protocol(self) -> tuple[int, float] | None:
        """AST's ESC-50 summary: the one epoch whose held-out-fold metric, averaged over the folds, is best, and
        that average. It picks the epoch on the test folds themselves, so it is optimistic; the test metrics of
        the selected models are the unbiased figures."""
        if len(self.runs) < 2:
            return None
        histories = [r.history for r in self.runs]
        epochs = min(len(h) for h in histories)
        if not epochs:
            return None
        means = []
        for e in range(epochs):
            values = [h[e].get(f"test_{self.metric}") for h in histories]
            means.append(math.nan if any(v is None for v in values) else float(np.mean(values)))
        best = int(np.nanargmax(means)) if not all(math.isnan(m) for m in means) else epochs - 1
        return best + 1, means[best]

    def table(self) -> str:
        """Plain-text results: one row per fold, then mean ± std (and AST's fold-averaged best epoch)."""
        names = ("top1", "top5", "mAP", "mAUC", "d_prime")
        keys = [k for k in names if any(k in r.metrics for r in self.runs)]
        tests = [k for k in names if any(k in r.test_metrics for r in self.runs)]
        counts = self.eval_clips or [(0, 0)] * len(self.runs)
        sizes = ["clips", *(["test_clips"] if tests else [])]  # how many clips each row's metrics stand on
        probe = any(r.baseline for r in self.runs)
        head = ["fold" if self.folded else "run", *keys, *(f"test_{k}" for k in tests),
                *([f"probe_{self.metric}"] if probe else []), *sizes, "model", "epoch"]
        rows = []
        for r, (val, test) in zip(self.runs, counts, strict=True):
            cells = [str(r.fold) if r.fold is not None else "-"]
            cells += [_fmt(r.metrics.get(k)) for k in keys] + [_fmt(r.test_metrics.get(k)) for k in tests]
            if probe:
                cells.append(_fmt(((r.baseline or {}).get("metrics") or {}).get(self.metric)))
            rows.append([*cells, str(val), *([str(test)] if tests else []), r.selected, str(r.epoch)])
        if len(self.runs) > 1:
            columns = [*keys, *(f"test_{k}" for k in tests), *(["probe"] if probe else [])]
            stats = [self.mean_std(k) for k in columns]
            rows.append(["mean", *[f"{_fmt(m)} ± {_fmt(s)}" for m, s in stats], *([""] * len(sizes)), "", ""])
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [head, *rows]]
        protocol = self.ast_protocol()
        if probe:
            on = {(r.baseline or {}).get("on") for r in self.runs} - {None}
            lines.append(f"probe: logistic regression on pooled log-mel, fitted on the training clips and scored on "
                         f"the {' / '.join(sorted(on))} clips")
        if protocol is not None and self.folded:
            lines.append(f"AST protocol (one epoch for every fold, chosen by the best mean held-out {self.metric}, so "
                         f"optimistic): epoch {protocol[0]}, {self.metric} {_fmt(protocol[1])}")
        return "\n".join(lines)

    def summary(self) -> dict:
        mean, std = self.mean_std()
        test_mean, test_std = self.mean_std(f"test_{self.metric}")
        probe_mean, probe_std = self.mean_std("probe")
        protocol = self.ast_protocol() if self.folded else None
        return json_safe({
            "metric": self.metric, "mean": mean, "std": std, "test_mean": test_mean, "test_std": test_std,
            "probe_mean": probe_mean, "probe_std": probe_std, "runs": [r.to_dict() for r in self.runs],
            "ast_protocol": {"epoch": protocol[0], "mean": protocol[1]} if protocol else None,
            "model": str(self.model_dir),
        })


def below_baseline(result: FitResult, metric: str) -> str | None:
    """A one-line warning when the model does not beat the linear probe on the clips the probe was scored on
    (test, else validation), comparing ``metric``; None when it does or there is nothing to compare."""
    baseline = result.baseline or {}
    on = baseline.get("on")
    ours = (result.test_metrics if on == "test" else result.metrics).get(metric)
    theirs = (baseline.get("metrics") or {}).get(metric)
    if ours is None or theirs is None or not (math.isfinite(ours) and math.isfinite(theirs)) or ours > theirs:
        return None
    fold = f"fold {result.fold}: " if result.fold is not None else ""
    return (f"{fold}the model's {on} {metric} {ours:.4f} does not beat the linear probe's {theirs:.4f} (logistic "
            "regression on pooled log-mel): train longer or with another recipe, or start from a pretrained model")


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4f}"


class _Experiment:
    """The dataset, resolved recipe, splits and base model of a RunSpec, and the run of its folds."""

    def __init__(self, spec: RunSpec, out_dir: Path, dist: Distributed):
        self.spec, self.out, self.dist = spec, out_dir, dist
        if not dist.main:
            dist.barrier()  # let rank 0 download / check the data first
        self.dataset = ds = load_dataset(spec.dataset, spec.data_dir)
        if dist.main:
            dist.barrier()
        pretrained = "audioset" if spec.kind == "finetune" else spec.init
        recipe = with_overrides(recipe_for(ds.name, pretrained=pretrained, multi_label=ds.multi_label,
                                           size=spec.size), spec.overrides)
        model = pretrained_model(spec.model) if spec.kind == "finetune" else None
        config = model.config if model is not None else architecture(
            spec.arch, spec.size, ds.classes, recipe.window, spec.model_options)
        splits = run_splits(ds, spec.folds, recipe.val_fraction, spec.seed)
        self.lengths, self.scan_bad = None, {}
        if config.family == "elastic" or recipe.window is None:
            self.lengths, self.scan_bad = cached_lengths(out_dir / "lengths.json", ds, config.sample_rate)
        self.splits = [dataclasses.replace(s, lengths=self.lengths).without(self.scan_bad) for s in splits]
        fitted = self._statistics(recipe, config)
        self.recipe = resolve_recipe(recipe, command=spec.kind, config=config, split=self.splits[0],
                                     world=dist.world, statistics=fitted and (fitted.mean, fitted.std))
        if model is None:
            config = architecture(spec.arch, spec.size, ds.classes, self.recipe.window, spec.model_options)
            model = new_model(config, init=spec.init, seed=spec.seed)
        self.base = fit_to_recipe(model, self.recipe)
        self.report = unreadable_reporter(quiet=bool(self.scan_bad))  # one warning for the whole run
        self.probe_rows: dict = {}  # example index -> pooled log-mel features, shared by the folds' probes

    def _statistics(self, recipe: Recipe, config):
        """Normalisation statistics fitted to the first run's training clips (cached in ``statistics.json``)
        for a new model whose recipe and options name none; else None. Sets ``self.statistics`` to what was
        chosen and why (recorded in ``run.json``)."""
        spec = self.spec
        self.stats_record = None
        if "mean" in spec.overrides or "mean" in spec.model_options:
            self.statistics = {"source": "given"}
        elif recipe.mean is not None:
            self.statistics = {"source": f"the {recipe.name} recipe (published for the dataset)"}
        elif spec.kind != "train":
            self.statistics = {"source": "the pretrained model"}
        else:
            paths = [e.path for e in self.dataset.examples]
            fitted, self.stats_record = cached_statistics(
                self.out / "statistics.json", paths, self.splits[0].train, sample_rate=config.sample_rate,
                num_mel_bins=config.num_mel_bins, hop_ms=config.hop_ms, seed=spec.seed)
            self.statistics = {"source": "training clips", "clips": fitted.clips, "frames": fitted.frames}
            return fitted
        return None

    def plan(self, device) -> str:
        """One line on what the run will do: classes, device, data, clips and optimizer steps per epoch, schedule,
        statistics, how the final model is chosen."""
        r, split, c = self.recipe, self.splits[0], self.base.config
        batches = batches_per_epoch(c, split, window=r.window, budget=r.batch_tokens, world=self.dist.world)
        steps = -(-batches // r.grad_accum)
        per_fold = " per fold" if split.fold is not None else ""
        return (f"{r.name} recipe: {len(self.dataset.classes)} classes on {device}; "
                f"{len(split.train)} training, {len(split.validation)} validation, "
                f"{len(split.test)} test clips{per_fold}; ~{len(split.train) / max(1, steps):.0f} clips per step "
                f"({r.batch_tokens} tokens), {steps} steps per epoch, {r.epochs} epochs"
                f"{f' (at least {r.min_steps} steps)' if r.min_steps else ''}; {r.optimizer} lr {r.lr:g}, "
                f"warm-up {r.warmup_steps} steps, x{r.lr_decay:g} per epoch after epoch {r.lr_decay_start}; "
                f"statistics mean {r.mean:.4f} std {r.std:.4f} from {self.statistics['source']}; "
                f"final model: {FINAL_MODEL[r.select].format(r=r)}")

    def baseline(self, split: Split) -> dict:
        """The linear probe fitted on (up to ``PROBE_CLIPS`` of) the split's training clips and scored on its test
        clips (its validation clips when it has no test part), as stored in ``result.json``."""
        on = "test" if split.test else "validation"
        train = sample_indices(list(split.train), PROBE_CLIPS, self.spec.seed)
        scored = sample_indices(list(split.test or split.validation), PROBE_CLIPS, self.spec.seed)
        needed = sorted({*train, *scored} - set(self.probe_rows))
        c = self.base.config
        rows, bad = clip_features([self.dataset.examples[i].path for i in needed], sample_rate=c.sample_rate,
                                  num_mel_bins=c.num_mel_bins, hop_ms=c.hop_ms)
        self.probe_rows.update({i: rows[k] for k, i in enumerate(needed) if k not in bad})
        usable = [i for i in train if i in self.probe_rows], [i for i in scored if i in self.probe_rows]
        result = probe_split(self.dataset, self.probe_rows, *usable)
        return {"kind": "linear probe: logistic regression on pooled log-mel", "on": on, **result.to_dict()}

    def save(self) -> None:
        """Write ``run.json`` (the spec and what it resolved to) and ``lengths.json`` (rank 0 only), and warn
        about the clips the header scan found unreadable."""
        if not self.dist.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        ds = self.dataset
        statistics = {"mean": self.recipe.mean, "std": self.recipe.std, **self.statistics}
        payload = {**self.spec.to_dict(), "resolved_recipe": self.recipe.to_dict(), "statistics": statistics,
                   "dataset_name": ds.name, "classes": ds.classes}
        files.write_text(self.out / "run.json", json.dumps(json_safe(payload), indent=2) + "\n")
        if self.stats_record is not None:
            save_statistics(self.out / "statistics.json", self.stats_record)
        if self.lengths is not None:
            save_lengths(self.out / "lengths.json", ds, self.base.config.sample_rate, self.lengths, self.scan_bad)
        if self.scan_bad:
            warn(f"{len(self.scan_bad)} unreadable clip(s) skipped ({next(iter(self.scan_bad.values()))})")

    def run(self, options: RunOptions) -> TrainResult:
        """Train every fold not done yet (a fold with ``result.json`` is read back), then copy the first fold's
        model to ``model/`` and write ``summary.json``; stop early when a fold is interrupted."""
        ds = self.dataset
        runs: list[FitResult] = []
        folded = any(s.fold is not None for s in self.splits)
        metric = "mAP" if ds.multi_label else "top1"
        for split in self.splits:
            out = self.out / f"fold{split.fold}" if folded else self.out
            done = out / "result.json"
            if done.is_file():
                runs.append(FitResult.from_dict(out, json.loads(done.read_text(encoding="utf-8"))))
                continue
            model = with_new_head(self.base, ds.classes, self.spec.seed, split.fold)
            baseline = self.baseline(split) if self.dist.main else None
            result = fit(model, split, self.recipe, dataclasses.replace(options, out_dir=out, report=self.report,
                                                                        baseline=baseline))
            result.bad_clips += len(self.scan_bad)
            shortfall = below_baseline(result, metric)
            if shortfall and self.dist.main:
                warn(shortfall)
            runs.append(result)
            if result.interrupted:
                stop = options.stop
                return TrainResult(self.out, runs, metric, folded, interrupted=True, signum=stop and stop.signum)
        clips = [(len(split.validation), len(split.test)) for split in self.splits]
        result = TrainResult(self.out, runs, metric, folded, eval_clips=clips)
        if self.dist.main:
            if folded:
                first = runs[0].out_dir / "model"
                if not (first / "model.safetensors").is_file():
                    raise UsageError(f"{first}: the first fold's model is missing")
                shutil.copytree(first, self.out / "model", dirs_exist_ok=True)
            files.write_text(self.out / "summary.json", json.dumps(result.summary(), indent=2) + "\n")
        return result


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
            raise ParameterError("out_dir", f"already holds a training run ({out}): resume it, or choose another "
                                 "output directory")
        spec.validate()
        amp_dtype(spec.amp, dev)  # fp16 without a GPU fails before any file is written
        with stop_on_signals() as stop:
            experiment = _Experiment(spec, out, dist)
            experiment.save()
            if dist.main:
                note(experiment.plan(dev))
            dist.barrier()
            options = RunOptions(out, seed=spec.seed, amp=spec.amp, device=dev, num_workers=num_workers,
                                 progress=sys.stderr.isatty() if progress is None else progress, stop=stop,
                                 on_epoch_end=on_epoch_end, on_step=on_step)
            return experiment.run(options)
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


def _provenance(source: str) -> dict:
    """A starting model's origin: a preset (its hub id and revision), a local path (absolute) or a hub id."""
    from astcli.model.presets import get_preset

    preset = get_preset(source)
    if preset is not None:
        return {"preset": source, "hub_id": preset.source, "revision": preset.revision}
    path = Path(source).expanduser()
    if path.exists():
        return {"path": str(path.resolve())}
    return {"hub_id": source}


def _str(value) -> str | None:
    return None if value is None else str(value)


def _overrides(values: dict) -> dict:
    """Recipe overrides without Nones, checked against the Recipe fields now (not at the first epoch)."""
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items() if v is not None}
    Recipe().replace(**{k: v for k, v in clean.items() if k not in ("wa_start", "wa_end", "select")})
    check_averaging(clean)
    return clean
