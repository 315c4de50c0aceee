"""Batch plans -> packed batches, in DataLoader worker processes: decode, mixup, background noise, fbank,
SpecAugment, fit to the window, normalise, patchify, token dropout, pack."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from astcli.audio import load_audio, require_frame
from astcli.errors import AudioError
from astcli.features import fbank, normalize
from astcli.model.config import ModelConfig
from astcli.model.packing import Clip, PackedBatch, drop_tokens, fit_frames, pack_clips, patchify
from astcli.train.augment import add_noise, feature_noise, mixup, sample_mixup_lambda, spec_augment
from astcli.train.batches import BatchPlan, clip_cap
from astcli.train.datasets import Split
from astcli.train.recipes import Recipe


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
    """Example index -> features, in the data workers: decode, mixup (on waveforms, as AST; partners drawn from
    the training examples), background noise, fbank at the clip's hop, truncation to the cap, fit to the window
    (AST pads raw zeros, as the reference), normalisation, SpecAugment on the clip's own frames (masks set to
    0 = the dataset mean, with the time mask scaled to the clip's length), feature noise, patches, token
    dropout; then packing. ``recipe`` must be resolved (no ``None`` window or token dropout)."""

    def __init__(self, split: Split, config: ModelConfig, recipe: Recipe):
        dataset = split.dataset
        self.paths = [e.path for e in dataset.examples]
        self.labels = [list(e.labels) for e in dataset.examples]
        self.num_classes = len(dataset.classes)
        self.noise_files = list(dataset.noise_files)
        self.config = config
        self.recipe = recipe
        self.cap = clip_cap(config, recipe.window)
        self.mix_pool = list(split.train)
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
        require_frame(len(wave), c.sample_rate, self.paths[index])  # no training on padding alone
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
            x = feature_noise(x, gen, r.reference_frames)
        clip = patchify(x, c)
        if train and r.token_dropout > 0:
            clip = drop_tokens(clip, r.token_dropout, gen)
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


def load_batches(maker: ClipMaker, plans: list[BatchPlan], num_workers: int) -> DataLoader:
    """An iterable of the :class:`LoadedBatch` of each plan, in order, computed in ``num_workers`` processes
    (0: in this one) so that decoding overlaps training."""
    workers = min(num_workers, len(plans))
    return DataLoader(
        _PlanDataset(maker, plans), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_identity, worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None, generator=torch.Generator(),
    )
