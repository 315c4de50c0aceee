"""Warnings and progress on stderr; library parameter errors become one line naming the CLI flag."""

import sys

import pytest

from astcli import console
from astcli.cli import flag_for, main
from astcli.errors import ParameterError
from astcli.model.config import ModelConfig


def test_warn_and_warn_once(capsys):
    console.warn("look out")
    report = console.warn_once(lambda detail: f"skipping {detail}")
    report("a.wav")
    report("b.wav")
    console.warn_once(lambda detail: detail, quiet=True)("never")
    assert capsys.readouterr().err == "ast: warning: look out\nast: warning: skipping a.wav\n"


def test_disabled_progress_prints_nothing(capsys):
    with console.Progress(False) as bar:
        bar.start("epoch 1", 3)
        bar.advance(1, "loss 0.5")
        bar.log("epoch 1 done")
        bar.finish()
    assert not bar.enabled and capsys.readouterr() == ("", "")


def test_forced_progress_draws_on_stderr_only(capsys):
    with console.Progress(console.progress_wanted(True)) as bar:
        bar.start("tagging", 2)
        bar.advance(2, "3 s audio")
        bar.log("a line above")
    out, err = capsys.readouterr()
    assert out == "" and "a line above" in err and "2/2" in err


def test_config_errors_name_the_field():
    with pytest.raises(ParameterError) as info:
        ModelConfig(dim=64, heads=5)
    assert info.value.parameter == "heads" and str(info.value) == "heads 5 does not divide dim 64"
    with pytest.raises(ValueError, match="labels has 2 names for a head of 3 classes"):
        ModelConfig(num_classes=3, labels=["a", "b"])


def test_config_is_immutable():
    config = ModelConfig(num_classes=2, labels=["a", "b"])
    assert config.labels == ("a", "b") and config.to_dict()["labels"] == ["a", "b"]
    with pytest.raises(AttributeError):
        config.mean = 0.0


@pytest.mark.parametrize(("parameter", "flag"), [("lr", "--lr"), ("batch_tokens", "--batch-tokens"),
                                                 ("warmup_steps", "--warmup"), ("fmt", "--format")])
def test_flag_for(parameter, flag):
    assert flag_for(parameter) == flag


def test_parameter_error_prints_the_flag(capsys, monkeypatch):
    def failing(*args, **kwargs):
        raise ParameterError("batch_tokens", "must be at least 1")

    monkeypatch.setattr("astcli.cli.app", failing)
    monkeypatch.setattr(sys, "argv", ["ast"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    assert capsys.readouterr().err == "ast: error: --batch-tokens must be at least 1\n"


def test_cli_choices_are_the_library_choices():
    from astcli import cli
    from astcli.backends import DEVICES, DTYPES
    from astcli.export import QUANTIZE
    from astcli.model.config import SCORE_CONVENTIONS
    from astcli.pipeline import AGGREGATES
    from astcli.train.models import ARCHS, INITS, SIZES
    from astcli.train.optimization import AMP_MODES
    from astcli.writers import EVENT_FORMATS, FORMATS

    pairs = [(cli.Device, DEVICES), (cli.DType, tuple(DTYPES)), (cli.Format, FORMATS + EVENT_FORMATS),
             (cli.Aggregate, AGGREGATES), (cli.Quantize, QUANTIZE), (cli.Amp, AMP_MODES), (cli.Arch, ARCHS),
             (cli.Size, SIZES), (cli.Init, INITS), (cli.Scores, tuple(SCORE_CONVENTIONS))]
    for choice, values in pairs:
        assert tuple(c.value for c in choice) == tuple(values), choice


@pytest.mark.parametrize(("args", "message"), [
    (["tag", "--format", "xml", "x.wav"], "ast: error: Invalid value for '--format'"),
    (["tag", "--nope"], "ast: error: No such option: --nope"),
    (["export", "--onnx"], "ast: error: Missing option '--output'"),
])
def test_parser_errors_are_one_line(args, message, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ast", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    assert info.value.code == 2 and out == ""
    assert err.startswith(message) and len(err.splitlines()) == 1


def test_audio_warnings_become_one_line_once(capsys):
    import warnings

    from astcli.console import route_audio_warnings
    from astcli.errors import AudioWarning

    before = warnings.showwarning
    try:
        route_audio_warnings()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            for _ in range(2):
                warnings.warn("cut.wav: decoding stopped after 0.5 s of the 2.000 s the header declares", AudioWarning,
                              stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    finally:
        warnings.showwarning = before
    err = capsys.readouterr().err
    assert err.count("ast: warning: cut.wav: decoding stopped after 0.5 s") == 1
    assert "AudioWarning" not in err and "ast: warning: something else" not in err  # others: Python's display
