"""astcli: tag, fine-tune and export Audio Spectrogram Transformer models.

Python use mirrors the command line::

    import astcli
    tagger = astcli.load_model("ast-audioset")
    probs = tagger.predict([astcli.load_audio("dog.wav")])
    events = astcli.find_events(tagger, "walk.wav")   # [{"label", "index", "start", "end", "score"}, ...]
"""

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "DatasetError",
    "EventOptions",
    "ModelError",
    "Tagger",
    "__version__",
    "find_events",
    "keep_freed_memory",
    "load_audio",
    "load_model",
]

import ctypes

from astcli.errors import AudioError, DatasetError, ModelError


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in its heap instead of unmapping every large block.

    By default each activation tensor above glibc's mmap threshold is mapped afresh and unmapped when
    freed, so every forward pass page-faults its activations in again: about 15 % of an AST-Base forward
    on CPU (docs/benchmarks.md). Process-wide: the CLI calls it at start-up; Python users may too.
    Returns False where this is not Linux with glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**30))


def __getattr__(name):
    # Heavy modules (torch) load on first use, so `ast --help` stays instant.
    if name == "load_audio":
        from astcli.audio import load_audio

        return load_audio
    if name in ("load_model", "Tagger"):
        from astcli import tagger

        return getattr(tagger, name)
    if name == "find_events":
        from astcli.pipeline import find_events

        return find_events
    if name == "EventOptions":
        from astcli.events import EventOptions

        return EventOptions
    raise AttributeError(f"module 'astcli' has no attribute {name!r}")
