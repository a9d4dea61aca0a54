"""The ``pneumo`` command-line app.

Each command parses its options, calls one library function and renders the result. Errors cross
this boundary in one place (:func:`error_boundary`): a :class:`~pneumo_cli.errors.PneumoError`
becomes one red line on stderr and exit code 1; usage errors exit 2 (Typer); anything else is a
bug and keeps its traceback. This module imports no TensorFlow, so ``pneumo --help`` is instant.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from pneumo_cli import __version__
from pneumo_cli.cli.console import print_error
from pneumo_cli.core.errors import ClusterLostError, PneumoError, UsageError

_ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
EXIT_CODES_HELP = "Exit codes: 0 success, 1 bad input or data, 2 usage error."

app = typer.Typer(
    name="pneumo",
    help=(
        "Pneumothorax segmentation on chest X-rays: SIIM RLE masks, DICOM preprocessing, "
        "ResNet-U-Net training, prediction, evaluation and overlays.\n\n" + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode=None,
)


def error_boundary(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn :class:`PneumoError` into one red stderr line and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ClusterLostError as exc:
            # The run's state is on disk; normal exit would run TensorFlow's teardown, which
            # can wait forever for the dead peer (seen: the chief printed this and hung).
            print_error(str(exc))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        except PneumoError as exc:
            print_error(str(exc))
            raise typer.Exit(code=2 if isinstance(exc, UsageError) else 1) from None
        except OSError as exc:
            # Safety net for the machine's own failures (disk full, read-only or forbidden
            # folder) at a write that library code did not wrap; other OS errors stay bugs.
            if exc.errno not in _ENVIRONMENT_ERRNOS:
                raise
            from pneumo_cli.core.files import describe_os_error

            where = f"{exc.filename}: " if exc.filename else ""
            print_error(f"{where}{describe_os_error(exc)}")
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            print_error("interrupted; completed outputs are kept, run the command again to resume")
            raise typer.Exit(code=130) from None

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"pneumo {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Show the version and exit.",
        ),
    ] = False,
) -> None:
    """Pneumothorax segmentation toolkit."""


def register(name: str, command: Callable[..., Any]) -> None:
    """Add ``command`` to the app under ``name``, wrapped in the error boundary."""
    app.command(name, help=command.__doc__, epilog=EXIT_CODES_HELP)(error_boundary(command))


def _register_all() -> None:
    # Command modules import only typer at import time; heavy dependencies (TensorFlow, pydicom,
    # OpenCV, pandas) are imported inside the command functions, so --help stays instant.
    from pneumo_cli.cli.demo import demo_data_command
    from pneumo_cli.cli.evaluate import evaluate_command
    from pneumo_cli.cli.export import export_command
    from pneumo_cli.cli.overlay import overlay_command
    from pneumo_cli.cli.predict import merge_predictions_command, predict_command
    from pneumo_cli.cli.preprocess import preprocess_command
    from pneumo_cli.cli.rle import rle_decode_command, rle_encode_command
    from pneumo_cli.cli.serve import serve_command
    from pneumo_cli.cli.train import train_command

    register("rle-decode", rle_decode_command)
    register("rle-encode", rle_encode_command)
    register("preprocess", preprocess_command)
    register("train", train_command)
    register("predict", predict_command)
    register("merge-predictions", merge_predictions_command)
    register("evaluate", evaluate_command)
    register("export", export_command)
    register("overlay", overlay_command)
    register("serve", serve_command)
    register("demo-data", demo_data_command)


_register_all()
