"""The `ast` command line: a thin Typer layer over the astcli library.

Commands parse options, call the library and map its typed errors to exit codes:
0 success, 1 some inputs failed (the rest were still processed), 2 usage or model error.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from astcli import __version__
from astcli.errors import AstcliError, DatasetError, ModelError, UsageError

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


# -- commands end --


def _fail(message: str, code: int) -> None:
    if _state["debug"]:
        traceback.print_exc()
    print(f"ast: error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Console-script entry point: run the app and turn library errors into one line + exit code."""
    try:
        app(prog_name="ast")
    except (ModelError, UsageError, DatasetError) as exc:
        _fail(str(exc), EXIT_USAGE)
    except AstcliError as exc:
        _fail(str(exc), EXIT_SOME_FAILED)
    except KeyboardInterrupt:
        print("ast: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`ast tag ... | head -1`): end quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)
