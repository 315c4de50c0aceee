"""Seeds for every random choice of a training run, derived from a path of names instead of global state.

A seed is a pure function of its parts (e.g. ``(seed, fold, epoch, "plan")``), so a run resumed from a checkpoint
draws exactly what an uninterrupted run would have drawn, whatever the number of processes or data workers.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed: the first 8 bytes (little-endian) of SHA-256 over ``":".join(str(p) for p in parts)``,
    shifted right by one bit so that it fits a signed 64-bit integer (``torch.Generator.manual_seed``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_generator(*parts) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
