"""Helpers of the reliability suite (tests/test_reliability*.py): run the CLI as a user does, and check
what it printed and what it left on disk."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path


def run(*args, cwd=None):
    """The CLI in a fresh process (for kills, torchrun and anything that needs a real process)."""
    return subprocess.run([sys.executable, "-m", "dgo_compile.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600, check=False)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli(*args) -> Result:
    """The CLI in this process (no 7 s of imports per call): the same entry point, `main`, with its
    error rendering; an exception that escapes it becomes exit code 99 with its traceback on stderr.
    The library logger is left as it was (`main` adds its notice handler and stops propagation, which
    would hide later tests' log records from caplog)."""
    import logging

    from dgo_compile.cli.app import main

    stdout, stderr = io.StringIO(), io.StringIO()
    argv = sys.argv
    library = logging.getLogger("dgo_compile")
    handlers, propagate = list(library.handlers), library.propagate
    sys.argv = ["dgo-compile", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - reported as what a user would see
                stderr.write(traceback.format_exc())
                code = 99
    finally:
        sys.argv = argv
        library.handlers[:], library.propagate = handlers, propagate
    return Result(code, stdout.getvalue(), stderr.getvalue())


def assert_one_line_error(result, *fragments):
    """Exit code 1 and exactly one line on stderr, `error: ...`, holding every fragment."""
    message = result.stderr.strip()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(message.splitlines()) == 1, message
    assert message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def assert_nothing_left(output: Path):
    """Neither the output nor a staging folder/file named after it (`.<name>.*`) exists beside it."""
    assert not output.exists()
    stray = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert stray == []


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its content: compare before and after to prove nothing was touched."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
