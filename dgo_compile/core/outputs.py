"""Where outputs may go and how they get there: the one output policy every writer follows.

`check_output` runs before any expensive work. It refuses `.`, an ancestor of the working
directory, the input model (or a path inside or around it), a place that cannot be written, an
existing path without `overwrite`, and, with `overwrite`, an existing folder that is not this
tool's own output of the same kind.

Own outputs are recognised by the self-describing file each kind already writes (an artifact's
`manifest.json` with format `dgo-compile-artifact`, a pruner's `pruner.json`, a fine-tuning run's
`finetune.json`, a pruned model's `dgo_pruning.json`) rather than by a new marker file: folders
written by earlier versions stay replaceable, formats do not change, and a folder is only ever
called ours when its content says so.

Folders are built in a staging folder beside the target, `.<name>.dgo-staging.<pid>.<random>`,
and `publish` moves them in: without overwrite by a rename that cannot replace anything
(`renameat2(RENAME_NOREPLACE)`), so a folder that appeared meanwhile is kept; with overwrite by
an atomic exchange (`RENAME_EXCHANGE`) or, where the filesystem has none, by renaming the old
folder aside (`.<name>.dgo-aside.<pid>.<random>`) first. The old output stays until the new one is
in place. Leftovers of killed runs (their pid gone) are cleaned by the next run on the same target,
an aside folder whose target is missing is put back, each with a one-line notice. Folders and
files get the permissions the umask gives, as any other program's would.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from dgo_compile.core.errors import DgoError

log = logging.getLogger("dgo_compile.core.outputs")
STAGING, ASIDE = "dgo-staging", "dgo-aside"
LEFTOVER = re.compile(rf"^\.(?P<name>.+)\.(?P<what>{STAGING}|{ASIDE})\.(?P<pid>\d+)\.[^.]+$")
# kind -> (file, format) pairs; a folder holding any of them (with that format, when one is given) is ours.
KINDS: dict[str, tuple[tuple[str, str | int | None], ...]] = {
    "artifact": (("manifest.json", "dgo-compile-artifact"),),
    "pruner": (("pruner.json", "dgo-compile-pruner"),),
    "finetune": (("finetune.json", "dgo-compile-finetune"),),
    "model": (("dgo_pruning.json", None), ("unet/dgo_pruning.json", None), ("transformer/dgo_pruning.json", None),
              ("finetune.json", "dgo-compile-finetune"), ("unet/finetune.json", "dgo-compile-finetune")),
}
NAMES = {"artifact": "artifact", "pruner": "pruner folder", "finetune": "fine-tuning run", "model": "model folder"}
_NOREPLACE, _EXCHANGE = 1, 2
_AT_FDCWD = -100


class OutputError(DgoError):
    """An output path that may not or cannot be written, or one that appeared while the command ran."""


def umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def follow_umask(path: str | Path, folder: bool) -> None:
    """Give `path` the permissions a plain mkdir/open would have (mkdtemp/mkstemp make them private)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def _follow_umask_tree(root: Path) -> None:
    mask = umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, (0o777 if os.stat(path).st_mode & 0o100 else 0o666) & ~mask)


def is_own(path: str | Path, kind: str) -> bool:
    """Whether the folder `path` holds this tool's own output of `kind`."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    for name, fmt in KINDS[kind]:
        file = path / name
        try:
            if not file.is_file() or file.stat().st_size > 64 << 20:
                continue
            if fmt is None:
                return True
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == fmt:
            return True
    return False


def check_output(path: str | Path, kind: str | None, *, overwrite: bool = False, resume: bool = False,
                 protected: Iterable[str | Path | None] = (), field: str = "output",
                 exists_hint: str = "pass `overwrite` or choose another `output`",
                 error: type[DgoError] | None = None) -> Path:
    """Refuse an output before any work is done (see the module docstring). `kind` None is a file
    output, which is replaced as any file is; "into" a folder that files are added to; `resume`
    accepts an existing folder of `kind`. Refusals
    raise `error` (default OutputError), so each command keeps its own error type."""
    error_type = error or OutputError
    error = _naming_fields(error_type)
    option = f"`{field}`"
    path = Path(path)
    where = path.absolute()
    resolved = Path(os.path.realpath(where))
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise error(f"{option} {path} is the working directory or one of its parents; writing there would "
                          "replace what it holds: choose a new folder")
    for source in protected:
        if source is None:
            continue
        source_path = Path(os.path.realpath(Path(source).absolute()))
        if resolved == source_path or source_path in resolved.parents or resolved in source_path.parents:
            relation = "is" if resolved == source_path else "is inside" if source_path in resolved.parents \
                else "contains"
            raise error(f"{option} {path} {relation} the input {source}; choose another {option}")
    clean_leftovers(path)
    if kind is None:
        if path.is_dir():
            raise error(f"{option} {path} is a folder; give a file path")
    elif kind == "into":  # a folder that files are added to (--dump-dir)
        if (path.exists() or path.is_symlink()) and not path.is_dir():
            raise error(f"{option} {path} is not a folder; give a folder path")
    elif path.exists() or path.is_symlink():
        if resume:
            if not is_own(path, kind):
                raise error(f"{path} is not a dgo-compile {NAMES[kind]} to resume; choose another {option}")
        elif not overwrite:
            raise error(f"{path} already exists; {exists_hint}")
        elif not is_own(path, kind):
            raise error(f"{path} is not a dgo-compile {NAMES[kind]}; `overwrite` only replaces one: "
                              f"choose another {option}")
    check_writable(path.parent, field, path, error_type)
    return path


def check_writable(folder: Path, field: str, target: Path, error: type[DgoError] | None = None) -> None:
    """Create (and remove) a file in `folder`, or in its nearest existing ancestor when it is still to be made."""
    error = _naming_fields(error or OutputError)
    option = f"`{field}`"
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise error(f"cannot write {option} {target}: {probe} is not a folder; choose another "
                                     f"{option}")
    try:
        fd, name = tempfile.mkstemp(prefix=".dgo-write-check.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise error(f"cannot write {option} {target}: {probe} is not writable "
                                     f"({exc.strerror or exc}); "
                          f"choose another {option}") from exc


def _naming_fields(error: type[DgoError]) -> Callable[[str], DgoError]:
    """`error` raised with the config fields its message names in backticks (`output`, `overwrite`),
    which the command line renders as its options (-o, --overwrite)."""
    return lambda message: error(message, field=tuple(dict.fromkeys(re.findall(r"`(\w+)`", message))))


def make_staging(target: str | Path) -> Path:
    """A fresh folder beside `target` (same filesystem, so the final rename is atomic), umask permissions."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{STAGING}.{os.getpid()}.", dir=target.parent))
    follow_umask(folder, folder=True)
    return folder


@contextlib.contextmanager
def staged(target: str | Path, kind: str, *, overwrite: bool = False, fresh_path: bool = False) -> Iterator[Path]:
    """`with staged(target, kind) as folder:` fill `folder`; it is published at `target` on success and
    removed on any failure. The one temp-then-rename helper of the writers that publish a folder.
    `fresh_path` yields a path inside the staging folder that does not exist yet, for writers that
    create their output themselves and refuse an existing one (`compile_artifact`, `save_denoiser`)."""
    target = Path(target)
    try:
        folder = make_staging(target)
    except OSError as exc:
        raise write_error(target, exc) from exc
    try:
        built = folder / target.name if fresh_path else folder
        yield built
        publish(built, target, kind, overwrite=overwrite)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def exclusive(folder: str | Path, field: str = "output") -> Iterator[Path]:
    """Hold `folder` (created if missing) for this process: a second run using it fails at once in one
    line rather than mixing its files in. The lock goes with the process, even a killed one."""
    import fcntl

    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".dgo-lock"
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise OutputError(f"another dgo-compile run is using {folder}; wait for it to finish or choose another "
                              f"`{field}`", field=field) from exc
        try:
            yield folder
        finally:
            if created and [p.name for p in folder.iterdir()] == [lock.name]:
                shutil.rmtree(folder, ignore_errors=True)  # nothing was made in it: leave no trace


def publish(staging: str | Path, target: str | Path, kind: str, *, overwrite: bool = False) -> Path:
    """Move the finished folder `staging` to `target`. Without `overwrite` nothing at `target` is ever
    replaced; with it only this tool's own output of `kind`, and only once the new one is in place."""
    staging, target = Path(staging), Path(target)
    _follow_umask_tree(staging)  # some writers (safetensors, mkstemp) make files private
    exists = target.exists() or target.is_symlink()
    if exists and overwrite and not is_own(target, kind):
        raise OutputError(f"{target} changed while this command ran and is no longer a dgo-compile {NAMES[kind]}; "
                          "kept it: choose another `output`", field="output")
    try:
        if not exists or not overwrite:
            try:
                _rename(staging, target, _NOREPLACE)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise OutputError(f"{target} appeared while this command ran; kept it and wrote nothing: "
                                      "choose another `output`" + ("" if overwrite else ", or pass `overwrite`"),
                                      field=("output", "overwrite")) from exc
                raise
            return target
        try:
            _rename(staging, target, _EXCHANGE)  # staging now holds the old output
            shutil.rmtree(staging, ignore_errors=True)
            return target
        except _Unsupported:
            pass
        aside = target.with_name(f".{target.name}.{ASIDE}.{os.getpid()}.{secrets.token_hex(4)}")
        os.rename(target, aside)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return target
    except OutputError:
        raise
    except OSError as exc:
        raise write_error(target, exc) from exc


def write_error(target: Path, exc: OSError, error: type[DgoError] | None = None, what: str = "",
                then: str = "") -> DgoError:
    """A failed write as one line naming the reason and what to do (`error`: the caller's error type,
    `what` names the target: "the artifact ")."""
    reason = exc.strerror or str(exc)
    hint = "free some disk space or choose another `output`" if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
        else "check the folder is writable or choose another `output`"
    return (error or OutputError)(f"could not write {what}{target}: {reason}; {hint}{then}", field="output")


def clean_leftovers(target: str | Path) -> list[str]:
    """Remove staging and aside folders of `target` left by runs that were killed (their pid is gone);
    put an aside folder back when `target` itself is missing. Returns (and logs) one notice per folder."""
    target = Path(target)
    notices = []
    try:
        entries = list(target.parent.iterdir()) if target.parent.is_dir() else []
    except OSError:
        return notices
    for entry in sorted(entries):
        match = LEFTOVER.match(entry.name)
        if not match or match["name"] != target.name or _alive(int(match["pid"])):
            continue
        try:
            if match["what"] == ASIDE and not (target.exists() or target.is_symlink()):
                os.rename(entry, target)
                notices.append(f"restored {target} from {entry.name}, left by a killed run (pid {match['pid']})")
            else:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                notices.append(f"removed {entry}, left by a killed run (pid {match['pid']})")
        except OSError as exc:
            notices.append(f"could not remove {entry}, left by a killed run: {exc.strerror or exc}")
    for notice in notices:
        log.warning(notice)
    return notices


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


class _Unsupported(OSError):
    """renameat2 or its flag is not available here (old libc or kernel, or the filesystem)."""


def _rename(source: Path, target: Path, flags: int) -> None:
    """renameat2(source, target, flags); without it: no-replace by a checked rename, exchange unsupported."""
    function = _renameat2()
    if function is not None:
        if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(target))
    if flags == _EXCHANGE:
        raise _Unsupported(errno.ENOSYS, "renameat2 exchange is not supported")
    # No renameat2: rename(2) onto a non-empty folder fails, so only an empty folder that appears between
    # this check and the rename could be replaced.
    if target.exists() or target.is_symlink():
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


_LIBC: list = []


def _renameat2():
    if not _LIBC:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            function = libc.renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            function.restype = ctypes.c_int
        except (OSError, AttributeError):
            function = None
        _LIBC.append(function)
    return _LIBC[0]
