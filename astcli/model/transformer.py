"""The packed audio transformer shared by every command: AST and ElasticAST in one module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from astcli.model.config import ModelConfig
from astcli.model.packing import CLS, DIST, PAD, PATCH, PackedBatch


class Attention(nn.Module):
    """Multi-head self-attention with a fused q|k|v projection; ``scale=False`` drops 1/sqrt(d_head)."""

    def __init__(self, dim: int, heads: int, bias: bool, scale: bool):
        super().__init__()
        self.heads = heads
        self.scale = None if scale else 1.0
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        rows, length, dim = x.shape
        qkv = self.qkv(x).view(rows, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(rows, length, dim))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (ViT / DeiT)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, eps = config.dim, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, config.heads, config.qkv_bias, config.attn_scale)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class AttentionPool(nn.Module):
    """ElasticAST pooling: one learned query per clip attends to that clip's tokens (no residual)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.dim
        self.heads = config.heads
        self.scale = 1.0 if not config.attn_scale else (dim // config.heads) ** -0.5
        self.query = nn.Parameter(torch.zeros(dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
        """``tokens [n, dim]``, ``member [clips, n]`` (True where token belongs to clip) -> ``[clips, dim]``."""
        n, dim = tokens.shape
        dh = dim // self.heads
        q = self.q(self.query).view(self.heads, 1, dh)
        k, v = self.kv(tokens).view(n, 2, self.heads, dh).permute(1, 2, 0, 3)  # [heads, n, dh] each
        scores = (q @ k.transpose(1, 2)) * self.scale  # [heads, 1, n]: the query is the same for every clip
        scores = scores.masked_fill(~member.unsqueeze(0), float("-inf"))  # [heads, clips, n]
        out = scores.softmax(-1) @ v  # [heads, clips, dh]
        return self.proj(out.permute(1, 0, 2).reshape(-1, dim))


class AudioTransformer(nn.Module):
    """Packed (Elastic)AST: patch embedding, positions, block-diagonal encoder, per-clip pooling, head.

    ``forward(batch)`` takes a ``PackedBatch`` and returns logits ``[num_clips, num_classes]``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dim, p = config.dim, config.patch_size
        self.patch_embed = nn.Linear(p * p, dim)
        if config.family == "ast":
            self.pos_grid = nn.Parameter(torch.zeros(config.grid_freq, config.grid_time, dim))
        else:
            self.pos_freq = nn.Parameter(torch.zeros(config.grid_freq, dim))
            self.pos_time = nn.Parameter(torch.zeros(config.grid_time, dim))
        if config.prefix_tokens:
            self.prefix = nn.Parameter(torch.zeros(config.prefix_tokens, dim))
            self.prefix_pos = nn.Parameter(torch.zeros(config.prefix_tokens, dim))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        if config.pooling == "attention":
            self.pool = AttentionPool(config)
        self.head_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.head = nn.Linear(dim, config.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as ViT does: truncated normal (std 0.02) weights, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for param in self.parameters(recurse=False):
            nn.init.trunc_normal_(param, std=0.02)
        if self.config.pooling == "attention":
            nn.init.trunc_normal_(self.pool.query, std=0.02)

    def reset_head(self, num_classes: int, labels: list[str] | None = None, multi_label: bool | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` classes (fine-tuning)."""
        c = self.config
        c.num_classes, c.labels = num_classes, list(labels or [])
        if multi_label is not None:
            c.multi_label = multi_label
        weight = self.head.weight
        self.head = nn.Linear(c.dim, num_classes, device=weight.device, dtype=weight.dtype)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def positions(self, freq_pos: torch.Tensor, time_pos: torch.Tensor) -> torch.Tensor:
        """Position embedding of each patch token.

        AST: the learned grid indexed by (frequency, time): a shorter window uses the first columns; a
        window longer than the grid gets the grid bilinearly interpolated to its length (AST's rule).
        ElasticAST: frequency table + time table.
        """
        if self.config.family == "elastic":
            return self.pos_freq[freq_pos] + self.pos_time[time_pos]
        grid = self.pos_grid
        if not _tracing():
            extent = int(time_pos.max()) + 1
            if extent > grid.shape[1]:
                grid = interpolate_grid(grid, grid.shape[0], extent)
        return grid[freq_pos, time_pos]

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """Token embeddings ``[rows, length, dim]``: patches + positions, prefix tokens, zero padding."""
        dtype = self.patch_embed.weight.dtype
        x = self.patch_embed(batch.patches.to(dtype))
        x = x + self.positions(batch.freq_pos, batch.time_pos).to(dtype)
        kind = batch.token_kind
        if self.config.prefix_tokens:
            prefix = (self.prefix + self.prefix_pos).to(dtype)
            x = torch.where((kind == PATCH).unsqueeze(-1), x, prefix[(kind - 1).clamp(min=0)])
        return x

    def encode(self, batch: PackedBatch) -> torch.Tensor:
        """Final-norm token states ``[rows, length, dim]`` under block-diagonal attention."""
        x = self.embed(batch)
        ids = batch.clip_ids
        mask = None
        if _tracing() or not batch.one_clip_per_row:
            mask = (ids.unsqueeze(2) == ids.unsqueeze(1)).unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def pool_clips(self, states: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """One vector per clip ``[num_clips, dim]``, in clip-id order."""
        tokens = states.reshape(-1, states.shape[-1])
        ids, kind = batch.clip_ids.reshape(-1), batch.token_kind.reshape(-1)
        member = ids.unsqueeze(0) == torch.arange(batch.num_clips, device=ids.device).unsqueeze(1)
        pooling = self.config.pooling
        if pooling == "attention":
            return self.pool(tokens, member & (ids != PAD).unsqueeze(0))
        chosen = {"cls_dist": (kind == CLS) | (kind == DIST), "cls": kind == CLS, "mean": kind == PATCH}[pooling]
        weights = (member & chosen.unsqueeze(0)).to(tokens.dtype)
        return (weights @ tokens) / weights.sum(1, keepdim=True)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        pooled = self.pool_clips(self.encode(batch), batch)
        return self.head(self.head_norm(pooled))


def _tracing() -> bool:
    """True while torch.export / ONNX export traces the model: no data-dependent Python branches then."""
    return torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def interpolate_grid(grid: torch.Tensor, freq: int, time: int) -> torch.Tensor:
    """Bilinearly resize a ``[F, T, dim]`` position grid to ``[freq, time, dim]``."""
    image = grid.permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(image, size=(freq, time), mode="bilinear").squeeze(0).permute(1, 2, 0)


def resize_grid(grid: torch.Tensor, freq: int, time: int) -> torch.Tensor:
    """Adapt a ``[F, T, dim]`` position grid to a new size as AST does when it changes input size:
    cut from the centre along an axis that shrinks, bilinear interpolation along one that grows
    (time first, then frequency)."""

    def fit(g: torch.Tensor, axis: int, size: int) -> torch.Tensor:
        have = g.shape[axis]
        if size <= have:
            start = have // 2 - size // 2
            return g.narrow(axis, start, size)
        shape = (size, g.shape[1]) if axis == 0 else (g.shape[0], size)
        return interpolate_grid(g, *shape)

    return fit(fit(grid, 1, time), 0, freq)
