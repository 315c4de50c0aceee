"""The `ast` command line: a thin Typer layer over the astcli library.

Commands parse options, call the library and map its typed errors to exit codes:
0 success, 1 some inputs failed (the rest were still processed), 2 usage or model error.
"""

from __future__ import annotations

import enum
import os
import sys
import traceback
from contextlib import closing

import typer

from astcli import __version__, keep_freed_memory
from astcli.console import route_audio_warnings, warn
from astcli.errors import AstcliError, DatasetError, ModelError, ParameterError, UsageError

app = typer.Typer(
    name="ast",
    help=(
        "Audio tagging with Audio Spectrogram Transformers (AST, ElasticAST): tag recordings, "
        "fine-tune on your own classes, train, and export to ONNX."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


def _choices(name: str, values: tuple[str, ...]) -> type[enum.Enum]:
    """An Enum whose members are ``values``: Typer offers them as the option's only choices."""
    return enum.Enum(name, {v: v for v in values}, type=str)


# The choices of options, as the library defines them (tests/test_console.py holds both lists equal); spelled
# out here so that `ast --help` does not import torch.
Device = _choices("Device", ("auto", "cpu", "cuda"))
DType = _choices("DType", ("float32", "bfloat16", "float16"))
Format = _choices("Format", ("table", "jsonl", "json", "csv", "tsv", "audacity", "vtt", "srt"))
Aggregate = _choices("Aggregate", ("mean", "max"))
Activity = _choices("Activity", ("mean", "centre"))
Quantize = _choices("Quantize", ("int8",))
Scores = _choices("Scores", ("multi-label", "single-label"))
Amp = _choices("Amp", ("auto", "bf16", "fp16", "off"))
Arch = _choices("Arch", ("ast", "elastic"))
Size = _choices("Size", ("tiny", "small", "base"))
Init = _choices("Init", ("imagenet", "none"))


def _value(choice: enum.Enum | None) -> str | None:
    return None if choice is None else choice.value

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ast (astcli) {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    _state["debug"] = debug


# Options that tag and export share (one OptionInfo each: typer only reads them)
_LABELS = typer.Option(None, "--labels", metavar="FILE",
                       help="Label file for bare checkpoints (CSV index,mid,display_name, JSON, "
                       "or one label per line).")
_REVISION = typer.Option(None, "--revision", metavar="REV", help="Hub revision (branch, tag or commit) to pin.")
_SCORES = typer.Option(None, "--scores", help="multi-label (a sigmoid per class) or single-label (softmax over "
                       "the classes), instead of the model's own convention (bare checkpoints: multi-label for "
                       "527 classes only). Stored with the model by export.")


@app.command(
    help="Tag audio files: print what is in each one.\n\n"
    "FILES are audio files, directories (their audio files; subfolders with --recursive) or '-' for paths "
    "read from stdin, one per line. Output is one record per input, in input order: a table on a terminal, "
    "JSON lines in a pipe. Exit code 0: all tagged; 1: some inputs failed (the others are still written); "
    "2: usage or model error.",
    epilog="Models: a preset name, a Hugging Face hub id, a model directory, a .pth/.safetensors checkpoint "
    "or an exported .onnx file.",
)
def tag(
    files: list[str] = typer.Argument(None, metavar="FILES", hidden=True,  # the command's help describes FILES
                                      help="Audio files, directories, or '-' for paths on stdin."),
    model: list[str] = typer.Option(
        None, "--model", "-m", metavar="MODEL",
        help="Model to use (repeat for an ensemble; probabilities are averaged). "
        "Default: ast-audioset. Presets: see `ast tag --list-models`."
    ),
    labels: str = _LABELS,
    revision: str = _REVISION,
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into subfolders of directories."),
    window: float = typer.Option(None, "--window", metavar="SECONDS",
                                 help="Window length in seconds (default: the model's; with --events 1 s for "
                                 "ElasticAST, the trained window for AST)."),
    hop: float = typer.Option(None, "--hop", metavar="SECONDS",
                              help="Seconds between window starts (default: the window; with --events a third of the "
                              "window for ElasticAST, 1/3 s, and a quarter for AST). Smaller values overlap "
                              "windows."),
    hop_ms: float = typer.Option(None, "--hop-ms", metavar="MS",
                                 help="Feature hop in ms (ElasticAST resolution: 20-40 ms means "
                                 "fewer tokens and faster tagging)."),
    aggregate: Aggregate = typer.Option(None, "--aggregate", help="Per-file score over windows: mean or max "
                                  "(default: max for multi-label models, mean otherwise)."),
    top_k: int = typer.Option(5, "--top-k", "-k", metavar="N", help="Tags per file/window; 0 = every class."),
    threshold: float = typer.Option(None, "--threshold", metavar="SCORE", help="Keep only tags scoring at least this."),
    fmt: Format = typer.Option(None, "--format", "-f", help="table, jsonl, json, csv or tsv; audacity, vtt or srt "
                               "for event tracks (imply --events; with several inputs -o names a folder for one "
                               "track per input). Default: table on a terminal, jsonl otherwise, or from -o's "
                               "extension."),
    output: str = typer.Option(None, "--output", "-o", metavar="FILE",
                               help="Write records to this file instead of stdout."),
    timeline: bool = typer.Option(False, "--timeline", help="Add per-window segments (rows in the table, CSV "
                                  "and TSV)."),
    events: bool = typer.Option(False, "--events", help="Detect sound events (class, start, end, score) from "
                                "overlapping windows; see docs/events.md."),
    onset_threshold: float = typer.Option(0.5, "--onset-threshold", metavar="SCORE",
                                          help="Activity at which an event starts."),
    offset_threshold: float = typer.Option(None, "--offset-threshold", metavar="SCORE",
                                           help="Activity below which an event ends (default: half the onset "
                                           "threshold)."),
    min_duration: float = typer.Option(0.0, "--min-duration", metavar="SECONDS",
                                       help="Drop events shorter than this."),
    max_gap: float = typer.Option(0.0, "--max-gap", metavar="SECONDS",
                                  help="Merge events of a class at most this far apart."),
    activity: Activity = typer.Option("mean", "--activity", help="A moment's activity from the windows over it: "
                                      "their mean, or the window centred on it (for models trained to score a "
                                      "window by the event at its centre; keeps short events)."),
    class_thresholds: str = typer.Option(None, "--class-thresholds", metavar="FILE", help="Per-class thresholds: "
                                         "CSV with header label,onset[,offset], or JSON {label: onset or [onset, "
                                         "offset]}."),
    plot: str = typer.Option(None, "--plot", metavar="DIR", help="Write one PNG per file into this folder: "
                             "spectrogram, top classes' activity, events (implies --events; needs the plot extra)."),
    device: Device = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    dtype: DType = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    batch_tokens: int = typer.Option(None, "--batch-tokens", metavar="N", help="Tokens per packed forward pass "
                                     "(default: 2048 on CPU, 16384 on CUDA)."),
    workers: int = typer.Option(1, "--workers", metavar="N", help="Threads decoding audio while the model runs."),
    progress: bool = typer.Option(False, "--progress", help="Show progress even when stderr is not a terminal "
                                  "(then a plain line every 5 s)."),
    scores: Scores = _SCORES,
    list_models: bool = typer.Option(False, "--list-models", is_eager=True, help="List the model presets and exit."),
) -> None:
    if list_models:
        _list_models()
        raise typer.Exit()
    if not files:
        raise UsageError("no inputs: give audio files, directories, or '-' to read paths from stdin")
    from astcli.events import EventOptions
    from astcli.pipeline import TagOptions, expand_inputs, tag_files
    from astcli.tagger import load_ensemble
    from astcli.writers import EVENT_FORMATS, check_folder, check_output, format_for

    if output and not fmt and format_for(output, False) != output.rsplit(".", 1)[-1].lower():
        warn(f"{output}: its extension names no format: writing JSON lines (--format chooses)")
    fmt = _value(fmt) or format_for(output, sys.stdout.isatty())
    _check_tag_options(TagOptions(window_seconds=window, hop_seconds=hop, aggregate=_value(aggregate), top_k=top_k,
                                  threshold=threshold, timeline=timeline, batch_tokens=batch_tokens, workers=workers))
    paths = expand_inputs(files, recursive, getattr(sys.stdin, "buffer", sys.stdin) if "-" in files else None)
    tracks = _track_folder(fmt, output, len(paths))
    if output:
        (check_folder if tracks else check_output)(output)
    event_options = None
    if events or plot is not None or fmt in EVENT_FORMATS:
        event_options = EventOptions(onset_threshold, offset_threshold, min_duration, max_gap,
                                     activity=_value(activity))
    if plot is not None:
        from astcli.plot import require_matplotlib

        require_matplotlib()
    tagger = load_ensemble(model or ["ast-audioset"], labels=labels, device=_value(device), dtype=_value(dtype),
                           revision=revision, hop_ms=hop_ms, scores=_value(scores))
    if event_options is not None and class_thresholds:
        from dataclasses import replace

        from astcli.events import read_class_thresholds

        event_options = replace(event_options, class_thresholds=read_class_thresholds(class_thresholds,
                                                                                         tagger.labels))
    options = TagOptions(window_seconds=window, hop_seconds=hop, aggregate=_value(aggregate), top_k=top_k,
                         threshold=threshold, timeline=timeline, batch_tokens=batch_tokens, workers=workers,
                         events=event_options, plot_dir=plot)
    bars: list = []  # the progress display, made once every check has passed
    records = tag_files(tagger, paths, options, lambda seconds: bars[0].audio(seconds))  # options that do not
    # fit the model fail here, before -o is opened
    if not tagger.config.labels:
        warn(f"{tagger.name} names no classes: they are numbered 0..{tagger.config.num_classes - 1}; "
             "give their names with --labels FILE (CSV index,mid,display_name, JSON, or one per line)")
    bars.append(bar := _TagProgress(paths, progress))
    stream = open(output, "w", encoding="utf-8", newline="") if output and not tracks else sys.stdout  # noqa: SIM115
    try:
        failed = _write_records(records, _writer(fmt, stream, paths, tracks,
                                                 _table_layout(stream, bar, tagger.labels, timeline)), bar)
    except BrokenPipeError:
        _quiet_broken_pipe()
    finally:
        if stream is not sys.stdout:
            stream.close()
    if output and sys.stderr.isatty():
        print(f"ast: {len(paths)} record{'s' * (len(paths) != 1)} written to {output} ({fmt})", file=sys.stderr)
    raise typer.Exit(EXIT_SOME_FAILED if failed else EXIT_OK)


def _table_layout(stream, bar, labels: list[str], timeline: bool) -> dict:
    """How the table fits where it goes: a terminal's width (none for a file or pipe), the model's labels,
    and rows printed through the live progress bar's console when the bar shares the table's terminal."""
    layout = {"labels": list(labels), "timeline": timeline, "width": None}
    if stream.isatty():
        layout["width"] = os.get_terminal_size(stream.fileno()).columns
        if bar.console is not None and os.path.samestat(os.fstat(stream.fileno()), os.fstat(sys.stderr.fileno())):
            layout["emit"] = lambda line: bar.console.print(line, markup=False, highlight=False, emoji=False,
                                                            soft_wrap=True)
    return layout


def _check_tag_options(options) -> None:
    """The checks of ``TagOptions`` that need no model (non-positive or non-finite lengths, counts), so that
    they fail before a model loads; the pipeline repeats them with the model's own limits."""
    import math

    for name in ("window_seconds", "hop_seconds", "threshold"):
        value = getattr(options, name)
        if value is not None and not math.isfinite(value):
            raise ParameterError(name, f"must be a finite number (got {value})")
    for name in ("window_seconds", "hop_seconds", "batch_tokens", "workers"):
        value = getattr(options, name)
        if value is not None and value <= 0:
            raise ParameterError(name, f"must be positive (got {value:g})")
    if options.top_k < 0:
        raise ParameterError("top_k", f"must be at least 0 (got {options.top_k})")


def _write_records(records, writer, bar: _TagProgress) -> int:
    """Write every record, saying failures and warnings on stderr (one line each); returns the failures."""
    from astcli.writers import printable

    failed = 0
    with bar, closing(records):
        for record in records:
            name = printable(record["file"])
            if record.get("error"):
                failed += 1
                bar.say(f"ast: {name}: {printable(record['error'])}")
            if record.get("warning"):
                bar.say(f"ast: warning: {name}: {printable(record['warning'])}")
            writer.write(record)
            bar.file_done(record)
        writer.close()
    return failed


def _list_models() -> None:
    """The presets, sorted: name (default marked), download size, whether the local cache holds it, then the
    hub id (or the ensemble's members) and the description, wrapped to the terminal. No torch import."""
    import shutil
    import textwrap

    from astcli.model.hub import is_cached
    from astcli.model.presets import DEFAULT_MODEL, download_mb, get_preset, list_presets

    width = shutil.get_terminal_size((80, 24)).columns
    presets = list_presets()
    names = [p.name + (" (default)" if p.name == DEFAULT_MODEL else "") for p in presets]
    column = max(map(len, names))
    for preset, name in zip(presets, names, strict=True):
        sources = [get_preset(m) or preset for m in preset.members] or [preset]
        cached = sum(is_cached(s.source, s.revision) for s in sources if s.source)
        state = "cached" if cached == len(sources) else f"{cached}/{len(sources)} cached" if cached else "not cached"
        typer.echo(f"{name:{column}}  {download_mb(preset):>5} MB  {state}")
        origin = preset.source or "ensemble of " + ", ".join(preset.members)
        typer.echo(textwrap.fill(f"{origin}: {preset.description}", width=max(width - 1, 40),
                                 initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False))


def _track_folder(fmt: str, output: str | None, inputs: int) -> str | None:
    """The folder for one event track per input (audacity, vtt, srt): ``-o`` when it is a folder or when
    there are several inputs; None when the one track goes to ``-o FILE`` or stdout."""
    from astcli.writers import EVENT_FORMATS

    if fmt not in EVENT_FORMATS:
        return None
    if output and (os.path.isdir(output) or inputs > 1):
        return output
    if inputs > 1:
        raise UsageError(f"--format {fmt} writes one track per input: give -o FOLDER for {inputs} inputs")
    return None


def _writer(fmt: str, stream, paths: list[str], tracks: str | None, layout: dict):
    """The record writer: one event track per input in ``tracks``, or a writer over ``stream``."""
    from astcli.writers import EventTrackFolderWriter, make_writer

    if tracks is not None:
        return EventTrackFolderWriter(tracks, fmt)
    return make_writer(fmt, stream, paths, **layout)


class _TagProgress:
    """Tagging progress on stderr when it is a terminal or forced: seconds of audio scored out of the inputs'
    total (from their headers, so one long file shows its own progress and an ETA), files done, speed."""

    def __init__(self, paths: list[str], force: bool):
        from astcli.console import Progress, progress_wanted

        enabled = progress_wanted(force or None)
        self.durations = [_header_seconds(p) for p in paths] if enabled else []
        self.total = sum(self.durations)
        self.bar = Progress(enabled, unit="seconds" if self.total else "items", transient=True)
        self.files = len(paths)
        self.done = 0
        self.scored = self.finished = 0.0

    @property
    def console(self):
        return self.bar.console

    def __enter__(self):
        import time

        self.start = time.monotonic()
        self.bar.start("tagging", self.total or self.files, status=self._status())
        return self

    def audio(self, seconds: float) -> None:
        self.scored += seconds
        if self.total:
            self.bar.update(min(self.scored, self.total), self._status())

    def file_done(self, record: dict) -> None:
        if self.total:
            self.finished += self.durations[self.done]
            self.scored = max(self.scored, self.finished)
        self.done += 1
        if self.total:
            self.bar.update(min(self.scored, self.total), self._status())
        else:
            self.bar.advance(1, self._status())

    def say(self, line: str) -> None:
        """A line on stderr, above the bar when one is drawn."""
        if self.bar.console is not None:
            self.bar.log(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def _status(self) -> str:
        import time

        speed = self.scored / max(time.monotonic() - getattr(self, "start", time.monotonic()), 1e-6)
        files = f"{self.done}/{self.files} files" if self.total else "files"
        return f"{files}, {speed:.1f}x real time" if self.scored else files

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _header_seconds(path: str) -> float:
    """A file's duration from its header; 0 when it cannot be read (the run reports the file's error) and for
    anything but a regular file: a pipe or FIFO must reach the decoder with no byte read before it."""
    from astcli.audio import audio_info
    from astcli.errors import AudioError

    if not os.path.isfile(path):
        return 0.0
    try:
        return audio_info(path).duration
    except AudioError:
        return 0.0


# -- train / finetune ----------------------------------------------------------------------------------

_RECIPE_OPTIONS = (
    # (recipe field, type, option flag(s), help)
    ("epochs", int, "--epochs", "Training epochs (default: the recipe's; from scratch 20, or more to reach 1200 "
     "optimizer steps on small data)."),
    ("lr", float, "--lr", "Peak learning rate."),
    ("batch_size", int, "--batch-size", "Clips per optimizer step (the token budget is this many clips of the "
     "training clips' mean length)."),
    ("batch_tokens", int, "--batch-tokens", "Token budget per batch (instead of --batch-size)."),
    ("window", int, "--window-frames", "Frames per clip (10 ms): the AST window, the ElasticAST length cap."),
    ("freqm", int, "--freqm", "SpecAugment frequency mask width (mel bins)."),
    ("timem", int, "--timem", "SpecAugment time mask width (frames at the recipe's reference length)."),
    ("mixup", float, "--mixup", "Share of training clips mixed with another (lambda ~ Beta(10, 10))."),
    ("loss", str, "--loss", "ce or bce."),
    ("optimizer", str, "--optimizer", "adam or adamw."),
    ("weight_decay", float, "--weight-decay", "Weight decay."),
    ("warmup_steps", int, "--warmup", "Linear warm-up steps."),
    ("lr_decay", float, "--lr-decay", "LR factor per epoch after --lr-decay-start."),
    ("lr_decay_start", int, "--lr-decay-start", "Last epoch at the full learning rate."),
    ("mean", float, "--mean", "Normalisation mean (with --std)."),
    ("std", float, "--std", "Normalisation standard deviation (with --mean)."),
    ("balanced", bool, "--balanced/--no-balanced", "Class-balanced sampling (default: on for multi-label data)."),
    ("noise", bool, "--noise/--no-noise", "AST feature noise: uniform noise and a random time roll (default: "
     "on from scratch)."),
    ("background_noise", float, "--background-noise", "Probability of adding a background-noise recording."),
    ("token_dropout", float, "--token-dropout", "ElasticAST token dropout rate."),
    ("random_hop", bool, "--random-hop/--no-random-hop", "ElasticAST resolution augmentation (10-40 ms hops)."),
    ("wa_start", int, "--wa-start", "First epoch of weight averaging."),
    ("wa_end", int, "--wa-end", "Last epoch of weight averaging."),
    ("wa_share", float, "--wa-share", "Without --wa-start/--wa-end: weight-average the last this share of the "
     "epochs (from scratch: 1/3; 0: none)."),
    ("select", str, "--select", "Final model: last, best (validation) or wa (weight average)."),
    ("grad_accum", int, "--grad-accum", "Batches per optimizer step."),
    ("clip_grad", float, "--clip-grad", "Clip the gradient norm to this value."),
    ("val_fraction", float, "--val-fraction", "Validation share of the training data (of the training folds with "
     "cross-validation) when the dataset has no validation split."),
)


_METAVARS = {int: "N", float: "NUMBER", str: "NAME"}  # placeholders in --help for the recipe options


def _training_command(func):
    """Append the options `train` and `finetune` share (``_TRAINING``) and one option per overridable recipe
    field to a command; they reach it as ``**options``."""
    import inspect

    signature = inspect.signature(func)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    recipe = [(name, kind | None, typer.Option(None, flag, help=text, metavar=_METAVARS.get(kind)))
              for name, kind, flag, text in _RECIPE_OPTIONS]
    for name, kind, option in [*_TRAINING, *recipe]:
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
    func.__signature__ = signature.replace(parameters=params)
    return func


def _parse_folds(folds: str | None) -> list[int] | None:
    if folds is None or folds.strip().lower() == "all":
        return None
    if folds.strip().lower() == "none":
        return []
    try:
        return [int(f) for f in folds.split(",") if f.strip()]
    except ValueError as exc:
        raise UsageError(f"--folds takes fold numbers like 1,2 (or all / none), not {folds!r}") from exc


def _parse_model_options(items: list[str] | None) -> dict:
    """``--model-option KEY=VALUE`` pairs; values are JSON where they parse as JSON, else strings."""
    import json

    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--model-option takes KEY=VALUE, not {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _run_training(command: str, options: dict, start, context: typer.Context) -> None:
    """The flow `train` and `finetune` share: resume a saved run, or start a new one with
    ``start(experiment, dataset, output, **common)``; then print the results table (or how to continue
    after an interruption). ``options`` are the shared and recipe options the command received."""
    from astcli.train import experiment

    shared = {name: options.pop(name) for name, _, _ in _TRAINING}
    runtime = {"device": _value(shared["device"]), "num_workers": shared["num_workers"],
               "progress": True if shared["progress"] else None}
    dataset, output = shared["dataset"], shared["output"]
    if shared["resume"]:
        _check_resume_options(context)
        result = experiment.resume(shared["resume"], **runtime)
    elif not dataset or not output:
        raise UsageError(f"ast {command} needs --dataset and --output (or --resume DIR)")
    else:
        result = start(experiment, dataset, output, data_dir=shared["data_dir"], folds=_parse_folds(shared["folds"]),
                       seed=shared["seed"], amp=_value(shared["amp"]), **runtime, **options)
    if result.interrupted:
        print(f"ast: interrupted: state saved in {result.out_dir}; continue with "
              f"`ast {command} --resume {result.out_dir}`", file=sys.stderr)
        raise typer.Exit(128 + (result.signum or 2))
    typer.echo(result.table())
    typer.echo(f"model: {result.model_dir}")


# What --resume may change: where and how the saved run goes on, never what it computes.
_RESUME_CHANGEABLE = ("resume", "device", "num_workers", "progress")


def _check_resume_options(context: typer.Context) -> None:
    """Refuse, in one line, options given with --resume that would change the saved run (its dataset, model,
    recipe, folds, seed, precision): it continues as saved in run.json."""
    sources = {name: context.get_parameter_source(name) for name in context.params}
    given = [name for name, source in sources.items() if name not in _RESUME_CHANGEABLE
             and source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")]
    if given:
        flags = ", ".join(flag_for(name) for name in given)
        raise UsageError(f"--resume continues the run as saved in its run.json, so {flags} cannot change it; "
                         "only --device, --num-workers and --progress can (start a new run in another directory "
                         "to change the rest)")


_TRAIN_DATASET_HELP = ("esc50, speechcommands, audioset, a folder of class folders, a .csv manifest "
                       "(path,labels[,fold]) or a .json datafile.")

# Options that `train` and `finetune` share: (name, type, option), added by ``_training_command``.
_TRAINING = (
    ("dataset", str, typer.Option(None, "--dataset", "-d", metavar="DATASET", help=_TRAIN_DATASET_HELP)),
    ("data_dir", str, typer.Option(None, "--data-dir", metavar="PATH",
                                   help="Where the dataset lies (esc50 without it: downloaded).")),
    ("output", str, typer.Option(None, "--output", "-o", metavar="DIR",
                                 help="Output directory (checkpoints, logs, model/).")),
    ("resume", str, typer.Option(None, "--resume", metavar="DIR", help="Continue the run saved in this directory.")),
    ("folds", str, typer.Option(None, "--folds", metavar="FOLDS",
                                help="Folds to run, e.g. 1,2 (default: all); none = no "
                                "cross-validation.")),
    ("seed", int, typer.Option(0, "--seed", metavar="N", help="Random seed.")),
    ("amp", Amp, typer.Option("auto", "--amp", help="Mixed precision: auto, bf16, fp16 or off.")),
    ("device", Device, typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda.")),
    ("num_workers", int, typer.Option(None, "--num-workers", metavar="N",
                                      help="Data loading processes (default: min(2, "
                                      "cores)).")),
    ("progress", bool, typer.Option(False, "--progress", help="Progress bar and epoch logs on stderr even when it "
                                    "is not a terminal.")),
)


@app.command(
    help="Fine-tune a pretrained tagger on a dataset: a new head for its classes, the dataset's recipe "
    "(every value can be overridden; unset options keep the recipe's value), k-fold cross-validation where "
    "the dataset has folds. Prints a per-fold table and writes OUTPUT/model, which `ast tag --model` loads.",
)
@_training_command
def finetune(
    ctx: typer.Context,
    model: str = typer.Option(None, "--model", "-m", metavar="MODEL",
                              help="Model to start from: preset, hub id, model directory "
                              "or checkpoint (default: ast-audioset)."),
    **options,
) -> None:
    def start(experiment, dataset, output, **common):
        return experiment.finetune(dataset, output, model=model, **common)

    _run_training("finetune", options, start, ctx)


@app.command(
    help="Train a new AST or ElasticAST from ImageNet weights (DeiT-B/16-384 for AST, ViT-B/16-224 for "
    "ElasticAST; base size only) or from scratch, with packed native-length batches and the dataset's "
    "recipe (unset options keep the recipe's value). Prints the results and writes OUTPUT/model.",
)
@_training_command
def train(
    ctx: typer.Context,
    arch: Arch = typer.Option("ast", "--arch", help="ast or elastic."),
    size: Size = typer.Option("base", "--size", help="tiny, small or base."),
    init: Init = typer.Option("imagenet", "--init", help="imagenet (base size only) or none."),
    model_option: list[str] = typer.Option(None, "--model-option", metavar="KEY=VALUE",
                                           help="Architecture override KEY=VALUE "
                                           "(e.g. depth=6), repeatable."),
    **options,
) -> None:
    def start(experiment, dataset, output, **common):
        return experiment.train(dataset, output, arch=_value(arch), size=_value(size), init=_value(init),
                                model_options=_parse_model_options(model_option), **common)

    _run_training("train", options, start, ctx)


@app.command(
    "export",
    help="Export a model to ONNX for ONNX Runtime on CPU or GPU, with dynamic length.\n\n"
    "The graph takes packed patch tokens (the default; `ast tag --model FILE.onnx` runs it) or, with "
    "--with-features, waveforms. It is checked against PyTorch with ONNX Runtime before the file is written; "
    "the model's labels and preprocessing travel in its metadata. See docs/export.md.",
)
def export(
    onnx: bool = typer.Option(False, "--onnx", help="Write an ONNX graph (the only export format)."),
    model: str = typer.Option(None, "--model", "-m", metavar="MODEL",
                              help="Model to export: a preset, hub id, model directory or "
                              "checkpoint file (default: ast-audioset)."),
    output: str = typer.Option(..., "--output", "-o", metavar="FILE", help="Destination file, ending in .onnx."),
    labels: str = _LABELS,
    revision: str = _REVISION,
    hop_ms: float = typer.Option(None, "--hop-ms", metavar="MS",
                                 help="ElasticAST feature hop in ms, stored as the model's "
                                 "default (and built into a --with-features graph)."),
    opset: int = typer.Option(None, "--opset", metavar="N", help="ONNX opset, 17 to 25 (default 18; 23+ uses the fused "
                              "Attention op, which needs a recent onnxruntime)."),
    fp16: bool = typer.Option(False, "--fp16", help="float16 weights and compute, for CUDAExecutionProvider "
                              "(inputs and outputs stay float32)."),
    quantize: Quantize = typer.Option(None, "--quantize", help="int8: dynamically quantized weights, for CPU."),
    scores: Scores = _SCORES,
    with_features: bool = typer.Option(False, "--with-features", help="Take waveforms [clips, samples] at the "
                                       "model's sample rate instead of patches: fbank and patching in the graph."),
) -> None:
    if not onnx:
        raise UsageError("choose an export format: --onnx (the only one so far)")
    from astcli.export import export_model

    report = export_model(model, output, labels=labels, revision=revision, hop_ms=hop_ms, opset=opset, fp16=fp16,
                          quantize=_value(quantize), with_features=with_features, scores=_value(scores))
    for line in report.lines():
        typer.echo(line)


# -- commands end --


def _fail(message: str, code: int) -> None:
    if _state["debug"]:
        traceback.print_exc()
    print(f"ast: error: {message}", file=sys.stderr)
    sys.exit(code)


# Parameters whose flag is not ``--`` + the name with ``_`` -> ``-``
_FLAGS = {"warmup_steps": "--warmup", "fmt": "--format", "out_dir": "--output", "model_options": "--model-option",
          "window_seconds": "--window", "hop_seconds": "--hop", "window": "--window-frames", "plot_dir": "--plot"}


def flag_for(parameter: str) -> str:
    """The command-line flag of a library parameter (``lr`` -> ``--lr``, ``batch_tokens`` -> ``--batch-tokens``)."""
    return _FLAGS.get(parameter) or "--" + parameter.replace("_", "-")


def _message(exc: AstcliError) -> str:
    """The one-line message of a library error, with a ParameterError's parameter spelled as its flag."""
    if isinstance(exc, ParameterError):
        return f"{flag_for(exc.parameter)} {exc.problem}"
    return str(exc)


# The usage-error class of the option parser Typer runs (its own copy of click's): BadParameter's base
_PARSE_ERROR = typer.BadParameter.__mro__[1]


def main() -> None:
    """Console-script entry point: run the app and turn library errors into one line + exit code.

    Errors of the option parser (an unknown option, a value outside an option's choices) get the same one line;
    ``ast`` alone prints the help."""
    keep_freed_memory()
    route_audio_warnings()
    try:
        code = app(prog_name="ast", standalone_mode=False)
    except _PARSE_ERROR as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()
            sys.exit(EXIT_USAGE)
        _fail(exc.format_message(), EXIT_USAGE)
    except typer.Abort:  # Ctrl-C, as the parser reports it
        print("ast: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ModelError, UsageError, DatasetError) as exc:
        _fail(_message(exc), EXIT_USAGE)
    except AstcliError as exc:
        _fail(str(exc), EXIT_SOME_FAILED)
    except KeyboardInterrupt:
        print("ast: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        _quiet_broken_pipe()
    else:
        sys.exit(code if isinstance(code, int) else EXIT_OK)


def _quiet_broken_pipe() -> None:
    """The reader went away (`ast tag ... | head -1`): end quietly with 128 + SIGPIPE, as Unix tools do."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    sys.exit(141)
