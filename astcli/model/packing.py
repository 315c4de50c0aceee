"""Sequence packing: clips of any length become rows of tokens with positions and clip ids.

A clip's normalised features ``[frames, mel]`` are cut into patches (``patchify``); ``batch_clips``
splits many clips into batches under a token budget, and ``pack_clips`` lays one batch out as rows
(first-fit decreasing), each row holding whole clips. Attention is block-diagonal: a token sees only
tokens of its own clip, so packing never changes a clip's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from astcli.model.config import ModelConfig

PAD = -1  # clip id of padding tokens
PATCH, CLS, DIST = 0, 1, 2  # token kinds


@dataclass
class Clip:
    """The patch tokens of one clip: ``patches [n, patch*patch]``, positions ``[n]`` (frequency, time)."""

    patches: torch.Tensor
    freq_pos: torch.Tensor
    time_pos: torch.Tensor

    def __len__(self) -> int:
        return self.patches.shape[0]


@dataclass
class PackedBatch:
    """Rows of packed tokens; every tensor is ``[rows, row_length]`` except ``patches`` (``[..., p*p]``).

    ``token_kind`` is PATCH, CLS or DIST; ``clip_ids`` numbers the clips 0..num_clips-1 in the order
    they were given and is PAD for padding. Logits come back in clip-id order.
    """

    patches: torch.Tensor
    freq_pos: torch.Tensor
    time_pos: torch.Tensor
    token_kind: torch.Tensor
    clip_ids: torch.Tensor
    num_clips: int

    @property
    def one_clip_per_row(self) -> bool:
        """True when each row is exactly one clip with no padding: attention needs no mask."""
        ids = self.clip_ids
        return bool((ids[:, :1] == ids).all() and (ids[:, 0] >= 0).all())

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch on another device."""
        return PackedBatch(
            *(t.to(device) for t in (self.patches, self.freq_pos, self.time_pos, self.token_kind, self.clip_ids)),
            self.num_clips,
        )


def fit_frames(features: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Bring raw (unnormalised) fbank frames to the length the model family expects.

    AST: zero-pad or truncate to ``max_frames`` (zeros before normalisation, as the reference does).
    ElasticAST: native length, truncated to a multiple of the patch size and to ``max_frames``;
    a clip shorter than one patch is zero-padded to one patch.
    """
    frames = features.shape[0]
    if config.pads_to_window:
        target = config.max_frames
    else:
        p = config.patch_size
        target = max(p, min(frames, config.max_frames) // p * p)
    if frames >= target:
        return features[:target]
    return F.pad(features, (0, 0, 0, target - frames))


def patchify(features: torch.Tensor, config: ModelConfig) -> Clip:
    """Cut normalised features ``[frames, mel]`` into patches, frequency-major.

    A patch is flattened (frequency-in-patch, time-in-patch), matching a ``Conv2d(1, dim, p)`` over the
    ``[mel, time]`` image and ElasticAST's linear patch embedding.
    """
    p, fs, ts = config.patch_size, config.freq_stride, config.time_stride
    if features.shape[1] != config.num_mel_bins:
        raise ValueError(f"features have {features.shape[1]} mel bins, the model expects {config.num_mel_bins}")
    image = features.transpose(0, 1)  # [mel, frames]
    grid = image.unfold(0, p, fs).unfold(1, p, ts)  # [F, T, p(freq), p(time)]
    nf, nt = grid.shape[0], grid.shape[1]
    patches = grid.reshape(nf * nt, p * p)
    freq_pos = torch.arange(nf).repeat_interleave(nt)
    time_pos = torch.arange(nt).repeat(nf)
    return Clip(patches, freq_pos, time_pos)


def drop_tokens(clip: Clip, rate: float, generator: torch.Generator | None = None) -> Clip:
    """Keep a random ``1 - rate`` share of a clip's patches (at least one): ElasticAST's token dropout."""
    n = len(clip)
    keep = max(1, int(n * (1.0 - rate)))
    if keep >= n:
        return clip
    order = torch.randperm(n, generator=generator)[:keep].sort().values
    return Clip(clip.patches[order], clip.freq_pos[order], clip.time_pos[order])


def batch_clips(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Split clip indices into batches of at most ``batch_tokens`` tokens (a longer clip goes alone).

    Clips are taken longest first so that batches hold clips of similar length and pack densely.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        if current and used + lengths[i] > batch_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        batches.append(current)
    return batches


def _rows_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def pack_clips(clips: list[Clip], prefix_tokens: int, row_tokens: int | None = None) -> PackedBatch:
    """Lay clips out as rows of whole clips (first-fit decreasing), each clip led by its prefix tokens.

    ``row_tokens`` is a row's capacity; by default the longest clip's length, so equal-length clips
    get a row each (no attention mask needed) and short clips share rows.
    """
    if not clips:
        raise ValueError("pack_clips needs at least one clip")
    lengths = [len(c) + prefix_tokens for c in clips]
    capacity = max(max(lengths), row_tokens or 0)
    rows = _rows_first_fit(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    patch_dim = clips[0].patches.shape[1]
    n_rows = len(rows)
    patches = clips[0].patches.new_zeros(n_rows, width, patch_dim)
    freq_pos = torch.zeros(n_rows, width, dtype=torch.long)
    time_pos = torch.zeros(n_rows, width, dtype=torch.long)
    token_kind = torch.zeros(n_rows, width, dtype=torch.long)
    clip_ids = torch.full((n_rows, width), PAD, dtype=torch.long)
    prefix_kinds = torch.tensor([CLS, DIST][:prefix_tokens], dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            clip, n = clips[i], len(clips[i])
            token_kind[r, at : at + prefix_tokens] = prefix_kinds
            start = at + prefix_tokens
            patches[r, start : start + n] = clip.patches
            freq_pos[r, start : start + n] = clip.freq_pos
            time_pos[r, start : start + n] = clip.time_pos
            clip_ids[r, at : start + n] = i
            at = start + n
    return PackedBatch(patches, freq_pos, time_pos, token_kind, clip_ids, len(clips))


# -- traceable twins (for ONNX export): equal-length clips as one tensor, no data-dependent Python ---------


def fit_batch(features: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """``fit_frames`` of equal-length clips ``[clips, frames, mel]`` at once, in traceable ops: AST zero-pads
    or truncates to ``max_frames``; ElasticAST keeps whole patches (at least one) up to ``max_frames``."""
    clips, frames, mel = features.shape
    p = config.patch_size
    if config.pads_to_window:
        pad, keep = config.max_frames, config.max_frames
    else:  # whole patches, at least one (short clips are zero-padded to one patch)
        pad, keep = p, torch.sym_max(p, torch.sym_min(frames, config.max_frames) // p * p)
    return torch.cat([features, features.new_zeros(clips, pad, mel)], 1)[:, :keep]


def pack_rows(features: torch.Tensor, config: ModelConfig) -> PackedBatch:
    """``pack_clips([patchify(f) for f in features])`` for equal-length normalised clips ``[clips, frames, mel]``
    in traceable ops: one clip per row, led by its prefix tokens, so no attention mask is needed."""
    clips, p, k = features.shape[0], config.patch_size, config.prefix_tokens
    image = features.transpose(1, 2)  # [clips, mel, frames]
    nf, nt = config.grid_freq, (image.shape[2] - p) // config.time_stride + 1
    within = torch.arange(p)
    f_index = torch.arange(nf).unsqueeze(1) * config.freq_stride + within  # [nf, p]
    t_index = torch.arange(nt).unsqueeze(1) * config.time_stride + within  # [nt, p]
    grid = image[:, f_index[:, None, :, None], t_index[None, :, None, :]]  # [clips, nf, nt, p, p]
    patches = torch.cat([grid.new_zeros(clips, k, p * p), grid.reshape(clips, nf * nt, p * p)], 1)
    lead = torch.zeros(k, dtype=torch.long)
    freq_pos = torch.cat([lead, torch.arange(nf).unsqueeze(1).expand(nf, nt).reshape(-1)])
    time_pos = torch.cat([lead, torch.arange(nt).unsqueeze(0).expand(nf, nt).reshape(-1)])
    kinds = torch.cat([torch.tensor([CLS, DIST][:k], dtype=torch.long), torch.zeros(nf * nt, dtype=torch.long)])
    width = kinds.shape[0]
    rows = torch.arange(clips).unsqueeze(1).expand(clips, width)
    return PackedBatch(patches, freq_pos.expand(clips, width), time_pos.expand(clips, width),
                       kinds.expand(clips, width), rows, clips)
