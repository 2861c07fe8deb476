"""The ``retrieval`` command line: train, embed, index, search, serve, evaluate, demo, export.

Each command parses its options, calls one library function (:mod:`retrieval.workflows`,
:mod:`retrieval.training`, :mod:`retrieval.serving`, ...) and renders the result. Heavy modules
(torch, FAISS, the web stack) are imported inside the commands that need them, so ``retrieval
--help`` answers at once.

User errors (missing files, corrupt images, mismatched index and model, bad options) print one
line ``error: ...`` on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys

import typer

try:  # newer typer carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer, on click itself
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

# isort: off
from retrieval.cli import train, gallery, search, evaluate, decisions, other  # noqa: F401

# isort: on
from retrieval.cli._common import app, err_console
from retrieval.errors import USER_ERRORS

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``retrieval`` command."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_time=False, show_path=False)],
    )
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="retrieval", standalone_mode=False)
    except USER_ERRORS as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except NoArgsIsHelpError as exc:  # `retrieval index`: its help, as typer would
        typer.echo(exc.ctx.get_help() if exc.ctx is not None else "", err=False)
        sys.exit(2)
    except UsageError as exc:  # a bad option or argument: the same one line
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        err_console.print(
            f"[red]error:[/red] {exc.format_message()}{where}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
    except ClickException as exc:
        err_console.print(f"[red]error:[/red] {exc.format_message()}", highlight=False)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted")
        sys.exit(130)
    if isinstance(code, int) and code != 0:
        sys.exit(code)
