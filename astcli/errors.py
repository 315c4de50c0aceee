"""The one error hierarchy for everything a user can cause; the CLI prints the one-line message.

Library messages name things as the Python API does (``lr``, ``window_seconds``); a ``ParameterError``
carries the parameter's name so that ``cli.py`` can say ``--lr`` instead. Every wrap keeps its cause
(``raise ... from exc``) so that ``ast --debug`` shows where a failure began.
"""


class AstcliError(Exception):
    """Base class: the message is one line, fit to show a user as it is."""


class AudioError(AstcliError):
    """An audio file cannot be read or holds no usable audio."""


class AudioWarning(UserWarning):
    """Something about an audio file that was still decoded is doubtful (e.g. it ends before its header says)."""


class ModelError(AstcliError):
    """A model, checkpoint, preset or label file cannot be loaded or does not fit."""


class DatasetError(AstcliError):
    """A dataset layout or manifest is missing or malformed."""


class UsageError(AstcliError):
    """Options that do not fit together (exit code 2)."""


class ParameterError(UsageError, ValueError):
    """One parameter has a value it cannot take (exit code 2).

    ``str(err)`` reads ``"<parameter> <problem>"`` with the Python name; ``err.parameter`` and ``err.problem``
    let a front end put its own name for the parameter (a CLI flag) in front of the same problem.
    """

    def __init__(self, parameter: str, problem: str):
        super().__init__(f"{parameter} {problem}")
        self.parameter = parameter
        self.problem = problem
