"""astcli: tag, fine-tune and export Audio Spectrogram Transformer models.

Python use mirrors the command line::

    import astcli
    tagger = astcli.load_model("ast-audioset")
    probs = tagger.predict([astcli.load_audio("dog.wav")])
"""

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "AudioTagger",
    "DatasetError",
    "ModelError",
    "__version__",
    "load_audio",
    "load_model",
]

from astcli.errors import AudioError, DatasetError, ModelError


def __getattr__(name):
    # Heavy modules (torch) load on first use, so `ast --help` stays instant.
    if name == "load_audio":
        from astcli.audio import load_audio

        return load_audio
    if name in ("load_model", "AudioTagger"):
        from astcli import tagger

        return getattr(tagger, name)
    raise AttributeError(f"module 'astcli' has no attribute {name!r}")
