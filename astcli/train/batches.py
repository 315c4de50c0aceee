"""Batch planning and token counting: which clips go into each batch, at which hop and with which seed.

A plan is drawn before any audio is decoded: the sampler's order of the training examples, a hop and a seed per
clip, then batches filled up to a token budget with the clips' token counts (from their header lengths, so
ElasticAST batches hold clips at native length). Every draw is a function of ``(seed, fold, epoch)``, so a
resumed run plans exactly the batches an uninterrupted run would have planned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from astcli.audio import audio_info
from astcli.errors import AudioError
from astcli.features import frames_for_samples
from astcli.files import write_text
from astcli.model.config import ModelConfig
from astcli.model.packing import batch_clips
from astcli.train.augment import BalancedSampler, ShuffleSampler, random_hop_ms
from astcli.train.datasets import Dataset, Split
from astcli.train.distributed import Distributed
from astcli.train.seeds import derive_seed, seeded_generator

MAX_DATA_WINDOW = 1024  # frames: the longest window derived from the data (AST's AudioSet window)


@dataclass
class BatchPlan:
    """One batch: example indices, the hop (ms) of each clip and a seed per clip; ``train`` augments."""

    indices: list[int]
    hops: list[float]
    seeds: list[int]
    train: bool


def clip_cap(config: ModelConfig, window: int) -> int:
    """Most frames a clip keeps: AST's padded window (``max_frames``), or ``window`` frames for ElasticAST
    (at most its ``max_frames``)."""
    return config.max_frames if config.pads_to_window else min(window, config.max_frames)


def clip_tokens(config: ModelConfig, window: int, frames: int) -> int:
    """Tokens (prefix included) of a clip of ``frames`` feature frames once fitted to the model: AST always
    counts its full window; ElasticAST its frames up to the cap, cut to whole patches (at least one)."""
    if config.pads_to_window:
        return config.tokens(config.max_frames)
    frames = min(frames, clip_cap(config, window))
    return config.tokens(max(config.patch_size, frames // config.patch_size * config.patch_size))


def window_tokens(config: ModelConfig, window: int) -> int:
    """Tokens of a clip that fills the whole window (what ``Recipe.batch_size`` counts in)."""
    return clip_tokens(config, window, clip_cap(config, window))


class BatchPlanner:
    """The batches of every epoch of one :class:`~astcli.train.datasets.Split` for this rank.

    ``window``: frames per clip (see :func:`clip_cap`); ``budget``: tokens per training batch (evaluation
    batches take twice as many); ``hop_choices``: hops (ms) drawn per training clip (ElasticAST's resolution
    augmentation), or None for the model's own hop; ``balanced``: class-balanced sampling with replacement
    instead of a permutation per epoch.
    """

    def __init__(self, config: ModelConfig, split: Split, *, window: int, budget: int,
                 hop_choices: tuple[float, ...] | None, balanced: bool, seed: int, dist: Distributed):
        self.config, self.split, self.window, self.budget = config, split, window, budget
        self.hop_choices, self.seed, self.dist = hop_choices, seed, dist
        sampler_seed = derive_seed(seed, split.fold, "sampler")
        if balanced:
            labels = [split.dataset.examples[i].labels for i in split.train]
            self.sampler = BalancedSampler.from_labels(labels, seed=sampler_seed)
        else:
            self.sampler = ShuffleSampler(len(split.train), seed=sampler_seed)

    def tokens(self, index: int, hop_ms: float) -> int:
        """Tokens of example ``index`` at ``hop_ms`` from its header length (a full window when unknown)."""
        lengths = self.split.lengths
        samples = lengths[index] if lengths else None
        if samples is None:
            return window_tokens(self.config, self.window)
        frames = frames_for_samples(int(samples), hop_ms, self.config.sample_rate)
        return clip_tokens(self.config, self.window, frames)

    def plans(self, epoch: int) -> list[BatchPlan]:
        """This rank's batches of ``epoch``: sampler order, hops and seeds, token-budget batches in random
        order, sharded round-robin over ranks (padded by repetition to a multiple of the world size)."""
        gen = seeded_generator(self.seed, self.split.fold, epoch, "plan")
        order = [self.split.train[k] for k in self.sampler.indices(epoch)]
        if self.hop_choices:
            hops = [random_hop_ms(gen, self.hop_choices) for _ in order]
        else:
            hops = [self.config.hop_ms] * len(order)
        seeds = torch.randint(0, 2**62, (len(order),), generator=gen).tolist()
        groups = batch_clips([self.tokens(i, h) for i, h in zip(order, hops, strict=True)], self.budget)
        groups = [groups[k] for k in torch.randperm(len(groups), generator=gen).tolist()]
        plans = [BatchPlan([order[k] for k in g], [hops[k] for k in g], [seeds[k] for k in g], True) for g in groups]
        world = self.dist.world
        if world > 1 and plans:
            plans += plans[: (-len(plans)) % world]
            plans = plans[self.dist.rank :: world]
        return plans

    def eval_plans(self, indices: list[int] | tuple[int, ...], shard: bool) -> list[BatchPlan]:
        """Batches of ``indices`` at the model's hop, without augmentation; this rank's share when ``shard``."""
        hop, idx = self.config.hop_ms, list(indices)
        groups = batch_clips([self.tokens(i, hop) for i in idx], 2 * self.budget)
        plans = [BatchPlan([idx[k] for k in g], [hop] * len(g), [0] * len(g), False) for g in groups]
        if shard and self.dist.active:
            plans = plans[self.dist.rank :: self.dist.world]
        return plans


def batches_per_epoch(config: ModelConfig, split: Split, *, window: int, budget: int, world: int = 1) -> int:
    """Training batches one rank takes per epoch at the model's hop. Batches are filled longest clip first,
    so the count does not depend on the sampler's order (only class-balanced sampling, which draws with
    replacement, and random hops make an epoch's count differ from it)."""
    planner = BatchPlanner(config, split, window=window, budget=budget, hop_choices=None, balanced=False, seed=0,
                           dist=Distributed())
    groups = batch_clips([planner.tokens(i, config.hop_ms) for i in split.train], budget)
    return -(-len(groups) // world)


def mean_clip_tokens(config: ModelConfig, split: Split, *, window: int) -> float:
    """Mean tokens of the split's training clips at the model's hop (a full window where a length is unknown):
    what one clip adds to a batch on average, so ``batch_size`` clips per step is ``batch_size`` times it."""
    planner = BatchPlanner(config, split, window=window, budget=1, hop_choices=None, balanced=False, seed=0,
                           dist=Distributed())
    return sum(planner.tokens(i, config.hop_ms) for i in split.train) / max(1, len(split.train))


# -- clip lengths from the audio headers ---------------------------------------------------------------


def scan_lengths(paths: list[str], sample_rate: int = 16000, threads: int = 8) -> tuple[list[int | None], dict]:
    """Samples per clip at ``sample_rate`` from the audio headers (no decoding), and ``{index: reason}`` for the
    files that cannot be opened (their length is None)."""

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


def _lengths_key(dataset: Dataset) -> str:
    return hashlib.sha256("\n".join(e.path for e in dataset.examples).encode()).hexdigest()


def cached_lengths(cache: Path, dataset: Dataset, sample_rate: int) -> tuple[list[int | None], dict[int, str]]:
    """:func:`scan_lengths` of ``dataset``, read from the JSON file ``cache`` when :func:`save_lengths` wrote it
    for the same file list and sample rate, scanned otherwise."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data["key"] == _lengths_key(dataset) and data["sample_rate"] == sample_rate:
            return data["samples"], {int(k): v for k, v in data["errors"].items()}
    return scan_lengths([e.path for e in dataset.examples], sample_rate)


def save_lengths(cache: Path, dataset: Dataset, sample_rate: int, samples: list[int | None],
                 errors: dict[int, str]) -> None:
    """Write what :func:`cached_lengths` returned to ``cache`` (atomically) for the next run on the same files."""
    payload = {"key": _lengths_key(dataset), "sample_rate": sample_rate, "samples": samples, "errors": errors}
    write_text(cache, json.dumps(payload) + "\n")


def data_window(samples: list[int | None], indices: list[int], hop_ms: float, sample_rate: int) -> int:
    """Frames of the longest clip among ``indices`` with a known length, between 16 and ``MAX_DATA_WINDOW``
    (``MAX_DATA_WINDOW`` when no length is known)."""
    frames = [frames_for_samples(samples[i], hop_ms, sample_rate) for i in indices if samples[i]]
    return int(min(MAX_DATA_WINDOW, max(16, max(frames, default=MAX_DATA_WINDOW))))
