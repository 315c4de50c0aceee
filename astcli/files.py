"""Atomic file writes: a reader (or a crash) sees the old file or the complete new one, never a torn one.

Each writer fills a temporary file in the destination's own directory (so the final rename stays on one
file system), flushes it to disk with ``fsync`` and renames it over the destination with ``os.replace``
(atomic on POSIX and Windows). On any failure the temporary file is removed and the destination is
left as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; after the block, fsync it and move it to ``path``.

    The block writes the file by name (for libraries that take a path: ``torch.save``, safetensors, onnx).
    Raises whatever the block or the file system raises (``OSError``); the temporary file never survives.
    """
    path = Path(path)
    # A fresh name the block creates itself, so the file gets the usual permissions (mkstemp's are 0600)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, UTF-8 encoded, newlines as given."""
    write_bytes(path, text.encode("utf-8"))


def save_torch(obj: object, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_tensors(tensors: dict, path: str | os.PathLike) -> None:
    """A safetensors file of ``tensors`` (name -> tensor) at ``path``, written atomically.

    Tensors are stored as float32, contiguous, on the CPU (safetensors' requirement; our formats are float32).
    """
    import torch
    from safetensors.torch import save_file

    plain = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp))


def unique_name(file: str, suffix: str, taken: set[str]) -> str:
    """A file name for an output made from input ``file``: its stem plus ``suffix`` (``rain.wav`` ->
    ``rain.vtt``), with ``-2``, ``-3``, ... when an earlier input of the run took it; recorded in ``taken``."""
    stem = Path(file).stem or "audio"
    name, n = stem + suffix, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}{suffix}"
    taken.add(name)
    return name
