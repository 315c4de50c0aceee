"""The packed audio transformer shared by every command: AST and ElasticAST in one module."""

from __future__ import annotations

import copy
import dataclasses
import platform

import torch
import torch.nn.functional as F
from torch import nn

from astcli.model.config import ModelConfig
from astcli.model.packing import CLS, DIST, PAD, PATCH, PackedBatch

# oneDNN's linear runs about 1.2x faster than the default (MKL) float32 GEMM on AST's layer shapes on the
# x86-64 CPU measured (docs/benchmarks.md) and gives the same float32 results to rounding; inference only.
_ONEDNN = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
# oneDNN takes bf16 on AVX-512 CPUs (at the bf16 rate with AVX-512 BF16 / AMX); elsewhere torch's ops serve it
_BF16_UNITS = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
_ONEDNN_DTYPES = tuple(dtype for dtype, ok in ((torch.float32, _ONEDNN), (torch.bfloat16, _BF16_UNITS)) if ok)


def _cpu_inference(x: torch.Tensor, *dtypes: torch.dtype) -> bool:
    """Whether ``x`` is a CPU tensor of one of ``dtypes`` in eager inference (no autograd, autocast or
    tracing: those keep the standard ops)."""
    return (x.device.type == "cpu" and x.dtype in dtypes and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not _tracing())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``; on CPU without autograd (inference) through oneDNN where it is available."""
    if _cpu_inference(x, *_ONEDNN_DTYPES) and weight.dtype == x.dtype:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_gelu(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``F.gelu(layer(x))`` (exact erf GELU); on CPU without autograd, one oneDNN matrix product with the GELU
    fused into it: the same values, without a second pass over the ``[..., mlp_dim]`` activations."""
    if _cpu_inference(x, *_ONEDNN_DTYPES) and layer.weight.dtype == x.dtype:
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu", [], "none")
    return F.gelu(layer(x))


def attention_by_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Unmasked attention ``[rows, heads, length, d_head]`` one (row, head) at a time, as three 2-D ops.

    For bfloat16 on CPU: the flash kernel runs its products at float32 speed there, while plain
    bfloat16 matrix products run at the bfloat16 rate; per head the score matrix stays small enough
    to live in cache. 1.7x the flash kernel for AST windows (docs/benchmarks.md). The scores are
    rounded to bfloat16 (the flash kernel keeps them in float32), so the keys are centred first: that
    shifts each query's scores by a constant, which softmax ignores, and keeps them small.
    """
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)
    k = k - k.mean(-2, keepdim=True, dtype=torch.float32).to(k.dtype)  # any shared shift leaves softmax exact
    rows, heads, length, _ = q.shape
    out = q.new_empty(rows, length, heads, q.shape[-1])  # the layout the output projection reads
    for row in range(rows):
        for head in range(heads):
            scores = torch.mm(q[row, head], k[row, head].t())
            torch.mm(scores.softmax(-1), v[row, head], out=out[row, :, head])
    return out.transpose(1, 2)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose inference takes ``linear``'s fast path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


Readout = int | torch.Tensor | None
"""Which tokens a block must output: all (``None``), the first ``n`` of every row (an int), or
``[rows, n]`` positions. Only pooled tokens leave the last block, so it computes just their queries
and MLP; keys and values still come from every token, so their values are the full computation's."""


def take(x: torch.Tensor, readout: Readout) -> torch.Tensor:
    """The rows' tokens named by ``readout`` (``[rows, n, ...]``), or ``x`` itself for ``None``."""
    if readout is None:
        return x
    if isinstance(readout, int):
        return x[:, :readout].contiguous()
    index = readout.view(*readout.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q|k|v projection; ``scale=False`` drops 1/sqrt(d_head)."""

    def __init__(self, dim: int, heads: int, bias: bool, scale: bool):
        super().__init__()
        self.heads = heads
        self.scale = None if scale else 1.0
        self.qkv = Linear(dim, 3 * dim, bias=bias)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, readout: Readout = None) -> torch.Tensor:
        rows, length, dim = x.shape
        heads = (self.heads, dim // self.heads)
        if readout is None:
            q, k, v = self.qkv(x).view(rows, length, 3, *heads).permute(2, 0, 3, 1, 4)
        else:  # queries of the read-out tokens only; keys and values of all
            w, b = self.qkv.weight, self.qkv.bias
            queries = take(x, readout)
            q = linear(queries, w[:dim], None if b is None else b[:dim]).view(rows, -1, *heads).transpose(1, 2)
            kv = linear(x, w[dim:], None if b is None else b[dim:])
            k, v = kv.view(rows, length, 2, *heads).permute(2, 0, 3, 1, 4)
            if mask is not None:
                mask = take(mask.transpose(1, 2), readout).transpose(1, 2)
        if mask is None and _BF16_UNITS and _cpu_inference(q, torch.bfloat16):
            out = attention_by_head(q, k, v, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(rows, -1, dim))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (ViT / DeiT)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, eps = config.dim, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, config.heads, config.qkv_bias, config.attn_scale)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = Linear(dim, config.mlp_dim)
        self.fc2 = Linear(config.mlp_dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, readout: Readout = None) -> torch.Tensor:
        """Token states ``[rows, length, dim]``, or ``[rows, n, dim]`` for the ``readout`` tokens."""
        x = take(x, readout) + self.attn(self.norm1(x), mask, readout)
        return x + self.fc2(linear_gelu(self.norm2(x), self.fc1))


class AttentionPool(nn.Module):
    """ElasticAST pooling: one learned query per clip attends to that clip's tokens (no residual)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.dim
        self.heads = config.heads
        self.scale = 1.0 if not config.attn_scale else (dim // config.heads) ** -0.5
        self.query = nn.Parameter(torch.zeros(dim))
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)

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
        self.patch_embed = Linear(p * p, dim)
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
        self.head = Linear(dim, config.num_classes)
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

    def with_head(self, num_classes: int, labels: tuple[str, ...] | list[str] | None = None,
                  multi_label: bool | None = None) -> AudioTransformer:
        """A copy of this model with a fresh classifier for ``num_classes`` classes (fine-tuning).

        The body's weights are copied, the head is drawn anew (truncated normal, std 0.02, from torch's global
        generator); ``self`` is left unchanged.
        """
        c = self.config
        config = dataclasses.replace(c, num_classes=num_classes, labels=tuple(labels or ()),
                                     multi_label=c.multi_label if multi_label is None else multi_label)
        model = copy.deepcopy(self)
        model.config = config
        weight = self.head.weight
        model.head = Linear(c.dim, num_classes, device=weight.device, dtype=weight.dtype)
        nn.init.trunc_normal_(model.head.weight, std=0.02)
        nn.init.zeros_(model.head.bias)
        return model

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

    def attention_mask(self, batch: PackedBatch) -> torch.Tensor | None:
        """Block-diagonal boolean mask ``[rows, 1, length, length]``; ``None`` when every row is one clip."""
        if not _tracing() and batch.one_clip_per_row:
            return None
        ids = batch.clip_ids
        return (ids.unsqueeze(2) == ids.unsqueeze(1)).unsqueeze(1)

    def classify(self, batch: PackedBatch, mask: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[num_clips, num_classes]`` under ``mask`` (boolean or additive; ``None``: one clip per row)."""
        x = self.embed(batch)
        readout, ids = self._readout(batch, mask)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, readout if i == len(self.blocks) - 1 else None)
        tokens, ids = x.reshape(-1, x.shape[-1]), ids.reshape(-1)
        member = ids.unsqueeze(0) == torch.arange(batch.num_clips, device=ids.device).unsqueeze(1)
        tokens = self.norm(tokens)
        if self.config.pooling == "attention":
            pooled = self.pool(tokens, member)
        else:
            weights = member.to(tokens.dtype)
            pooled = (weights @ tokens) / weights.sum(1, keepdim=True)
        return self.head(self.head_norm(pooled))

    def _readout(self, batch: PackedBatch, mask: torch.Tensor | None) -> tuple[Readout, torch.Tensor]:
        """The tokens the pooling reads, and their clip ids as the last block outputs them (``PAD``: skip).

        Attention pooling reads every token of a clip, mean pooling every patch; CLS pooling reads the
        prefix tokens, which lead every row when each row is one clip, and are gathered otherwise (padded
        with a skipped slot).
        """
        ids, kind = batch.clip_ids, batch.token_kind
        pooling = self.config.pooling
        if pooling == "attention":
            return None, ids
        if pooling == "mean":
            return None, torch.where(kind == PATCH, ids, PAD)
        read = kind == CLS if pooling == "cls" else (kind == CLS) | (kind == DIST)
        ids = torch.where(read, ids, PAD)
        if mask is None:
            readout = 1 if pooling == "cls" else self.config.prefix_tokens
            return readout, take(ids, readout)
        if _tracing():
            return None, ids
        counts = read.sum(1)
        positions = torch.sort((~read).to(torch.uint8), dim=1, stable=True).indices[:, : int(counts.max())]
        used = torch.arange(positions.shape[1], device=ids.device) < counts.unsqueeze(1)
        readout = torch.where(used, positions, 0)
        return readout, torch.where(used, ids.gather(1, readout), PAD)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.classify(batch, self.attention_mask(batch))


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Class probabilities from logits ``[..., classes]``: an independent sigmoid per class for multi-label
    heads (AST's AudioSet models, trained with BCE), a softmax over classes for single-label heads (CE)."""
    return logits.sigmoid() if multi_label else logits.softmax(-1)


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
