"""Optimisation of one model: Adam/AdamW, the learning-rate schedule, the loss, and mixed precision."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from astcli.errors import ParameterError
from astcli.train.recipes import Recipe

AMP_MODES = ("auto", "bf16", "fp16", "off")


def learning_rate(recipe: Recipe, epoch: int, step: int) -> float:
    """LR of optimizer step ``step`` (1-based) in epoch ``epoch`` (1-based): linear warm-up over the first
    ``recipe.warmup_steps`` steps, and ``lr_decay`` once for every epoch after ``lr_decay_start`` (AST's
    MultiStepLR stepped per epoch: with start 5, epochs 1-5 use lr, epoch 6 lr x 0.85, epoch 7 lr x 0.85^2, ...).
    ``recipe`` must be resolved (``warmup_steps`` set)."""
    lr = recipe.lr * recipe.lr_decay ** max(0, epoch - recipe.lr_decay_start)
    warmup = recipe.warmup_steps or 0
    if warmup > 0 and step < warmup:
        lr *= step / warmup
    return lr


def make_optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    """Adam (AST: betas (0.95, 0.999), weight decay 5e-7) or AdamW, at the recipe's peak learning rate.

    On CPU and CUDA the update runs as torch's fused kernel, one call per step (same update rule; for tiny
    ElasticAST on 2 CPU cores 5 ms instead of the per-tensor default's 16 ms, ~5 % of a training step)."""
    params = list(params)
    cls = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return cls(params, lr=recipe.lr, betas=tuple(recipe.betas), weight_decay=recipe.weight_decay, fused=fused)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp``: "auto" = bf16 on CUDA GPUs that support it, fp16 on older ones, none on CPU
    (bf16 autocast works on CPU but is rarely faster there; ask for it with "bf16"); "off" = none.

    Raises ParameterError for another value, or "fp16" without a CUDA device."""
    if amp not in AMP_MODES:
        raise ParameterError("amp", f"must be one of {', '.join(AMP_MODES)} (got {amp!r})")
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ParameterError("amp", "fp16 needs a CUDA GPU (use bf16 on CPU)")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def loss(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean loss of ``logits [clips, classes]`` against soft ``targets`` of the same shape: "bce" = binary
    cross-entropy per class (multi-label), "ce" = cross-entropy with probability targets (mixup mixes labels)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.cross_entropy(logits, targets)
