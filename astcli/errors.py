"""Typed errors raised by the library; the CLI prints their one-line message."""


class AstcliError(Exception):
    """Base class: the message is one line, fit to show a user as it is."""


class AudioError(AstcliError):
    """An audio file cannot be read or holds no usable audio."""


class ModelError(AstcliError):
    """A model, checkpoint, preset or label file cannot be loaded or does not fit."""


class DatasetError(AstcliError):
    """A dataset layout or manifest is missing or malformed."""


class UsageError(AstcliError):
    """Options that do not fit together (exit code 2)."""
