"""`dgo-compile`: each command parses options, calls one library function, renders the result.

The commands live in one module per group (`model_commands`, `compile_commands`, `schedule_commands`,
`channel_commands`); this module registers them and turns every error into one line (`main`).
Only light modules are imported here: every command checks its options and outputs before it imports
torch, diffusers or onnxruntime (inside its body), so `--help` and a bad argument answer at once. Help
text is plain (no rich markup), so `[prune]` and the like print as written."""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.markup import escape

from dgo_compile.core.errors import DgoError

from .channel_commands import finetune, prune
from .common import MAIN_PROCESS, app, err
from .compile_commands import bench, compile, sample
from .flags import render
from .model_commands import encode_prompts_command, inspect
from .schedule_commands import optimize, schedule, search_steps

for command in (inspect, compile, sample, bench, optimize, schedule, finetune, prune):  # the order of --help
    app.command()(command)
app.command("encode-prompts")(encode_prompts_command)
app.command("search-steps")(search_steps)

# The config table whose renamed fields (dgo_compile.core.configs.RENAMED) each command's options follow.
RENAMED_TABLE = {"prune": "prune", "optimize": "optimize", "schedule": "optimize", "finetune": "finetune"}


class _Notices(logging.Handler):
    """The library's notices (e.g. a leftover of a killed run cleaned up): one `note:` line each."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"[yellow]note:[/yellow] {escape(record.getMessage())}", soft_wrap=True, highlight=False)


def _renamed_option(exc, no_such_option) -> str | None:
    """The message for an unknown option that is a renamed one (`prune --ratio`), naming the new option."""
    from dgo_compile.core.configs import renamed_problem

    table = RENAMED_TABLE.get(getattr(getattr(exc, "ctx", None), "info_name", None))
    if not isinstance(exc, no_such_option) or table is None or not exc.option_name.startswith("--"):
        return None
    problem = renamed_problem(table, [exc.option_name[2:].replace("-", "_")], "--")
    return problem and problem.replace("_", "-")


def main() -> None:
    """Entry point: library errors become one line on stderr and exit code 1. So do errors of the
    system (a disk that fills up, a folder that vanishes) that no library check turned into one."""
    library = logging.getLogger("dgo_compile")
    if not any(isinstance(h, _Notices) for h in library.handlers):
        library.addHandler(_Notices())
        library.propagate = False
    try:  # typer vendors click as typer._click from 0.2x on
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    try:
        code = app(standalone_mode=False)  # click's usage errors come here too, to be rendered in one line
        if isinstance(code, int) and code:
            sys.exit(code)
    except click_errors.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else exc.format_message())
        sys.exit(2)
    except click_errors.ClickException as exc:  # a bad option value, an unknown option, a missing argument
        command = f"dgo-compile {exc.ctx.info_name} --help" if getattr(exc, "ctx", None) else "dgo-compile --help"
        renamed = _renamed_option(exc, click_errors.NoSuchOption)
        if renamed:
            err.print(f"[red]error:[/red] {escape(renamed)} (see `{command}`)", soft_wrap=True, highlight=False)
            sys.exit(exc.exit_code)
        err.print(f"[red]error:[/red] {escape(' '.join(exc.format_message().split()))} (see `{command}`)",
                  soft_wrap=True, highlight=False)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("[red]error:[/red] aborted", highlight=False)
        sys.exit(1)
    except (DgoError, OSError) as exc:
        if os.environ.get("DGO_DEBUG"):
            raise
        message = render(exc) if isinstance(exc, DgoError) else \
            f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        where = "" if MAIN_PROCESS else f"(process {os.environ['RANK']}) "
        err.print(f"[red]error:[/red] {where}{escape(' '.join(message.split()))}", soft_wrap=True, highlight=False)
        sys.exit(1)
