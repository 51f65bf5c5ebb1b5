"""Output folders the tool can prove it wrote, replaced all at once or not at all.

A command writes into a staging folder ``.NAME.partial-XXXX`` beside its output. The staging folder is
made before any compute, so an output that cannot be created fails in seconds, and it holds
``STAGE_MARKER`` with the owning process id, so a later run can tell a stale one (its process is gone,
e.g. after SIGKILL) and remove it. On success the staging folder gets ``RUN_MARKER``: every file the run
wrote, with its size. An existing output folder is replaced only when its contents are exactly what its
marker lists; a user's file added there, a changed file, a symbolic link inside, or no marker at all
make the command refuse. The swap moves the earlier run aside, moves the new one in, then deletes the
earlier one; signals are held during the two renames, and a failure restores the earlier run.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ..errors import FwsvdError

RUN_MARKER = ".fwsvd-export-run.json"
STAGE_MARKER = ".fwsvd-export-partial.json"
TOOL = "fwsvd-export"
log = logging.getLogger("fwsvd_export")


def resolve_output(path: str | Path) -> Path:
    """The absolute, link-free output folder; refuses the filesystem root and the current folder or
    any folder above it (replacing those would pull the ground from under the shell that ran us)."""
    folder = Path(os.path.abspath(Path(path).expanduser())).resolve()
    if not folder.name:
        raise FwsvdError(f"output folder '{path}' is the filesystem root; name a folder for the results")
    cwd = Path.cwd().resolve()
    if cwd == folder or folder in cwd.parents:
        raise FwsvdError(f"output folder '{path}' is the current folder or one above it; name a new folder "
                         "for the results (e.g. -o results)")
    return folder


def _files(folder: Path) -> Optional[dict[str, list[int]]]:
    """Every regular file below `folder` with its size and modification time (ns), or None when a link or
    special file is there: an edit that keeps a file's size still changes its time."""
    found: dict[str, list[int]] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                return None
        for name in files:
            path = Path(root) / name
            stat = path.stat()
            found[path.relative_to(folder).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return found


def not_ours(folder: Path) -> Optional[str]:
    """Why `folder` is not provably an earlier output of this tool, or None when it is one."""
    try:
        marker = json.loads((folder / RUN_MARKER).read_text())
        listed = marker["files"] if marker.get("tool") == TOOL else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        listed = None
    if not isinstance(listed, dict):
        return f"it has no {RUN_MARKER} that this tool writes into its outputs"
    present = _files(folder)
    if present is None:
        return "it holds a symbolic link or special file, which this tool never writes"
    present.pop(RUN_MARKER, None)
    extra = sorted(set(present) - set(listed))
    missing = sorted(set(listed) - set(present))
    changed = sorted(f for f in set(present) & set(listed) if present[f] != listed[f])
    problems = [f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                for what, names in (("files the tool did not write", extra), ("files missing", missing),
                                    ("files changed since", changed)) if names]
    return "; ".join(problems) or None


def check_replaceable(folder: Path) -> None:
    """Refuse, before any work, an output path whose current contents the tool did not write."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise FwsvdError(f"output {folder} exists and is not a folder; choose another with -o")
    if folder.is_dir() and any(folder.iterdir()):
        reason = not_ours(folder)
        if reason:
            raise FwsvdError(f"output folder {folder} is not an earlier fwsvd-export output ({reason}); nothing was "
                             "changed: choose another folder with -o, or move it away")


def _alive(marker: Path) -> bool:
    """Whether the process that wrote a staging marker may still be running (unknown counts as alive)."""
    try:
        owner = json.loads(marker.read_text())
        pid, host = int(owner["pid"]), owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def clean_stale(folder: Path) -> list[str]:
    """Remove what interrupted runs of this output left beside it: staging folders whose process is gone,
    and an earlier run set aside by a swap that never finished (restored when the output is missing)."""
    notes = []
    if not folder.parent.is_dir():
        return notes
    for path in sorted(folder.parent.glob(f".{folder.name}.partial-*")):
        if not path.is_dir() or path.is_symlink():
            continue
        # a staging folder holds the stage marker while the run works, the run marker once it is complete
        marker = next((m for m in (path / STAGE_MARKER, path / RUN_MARKER) if m.is_file()), None)
        if marker is None:
            notes.append(f"left {path.name} alone: it holds no marker of this tool")
        elif _alive(marker):
            notes.append(f"left {path.name} alone: the run that made it may still be going")
        else:
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"removed {path.name}, left by an interrupted run")
    for path in sorted(folder.parent.glob(f".{folder.name}.replaced-*")):
        if not path.is_dir() or path.is_symlink() or not_ours(path):
            continue
        if not folder.exists():
            path.rename(folder)
            notes.append(f"restored the earlier output from {path.name}, left by an interrupted swap")
        else:
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"removed {path.name}, an earlier output an interrupted swap had set aside")
    return notes


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done, then reach their own handlers. Held at the Python
    level: a thread mask would not do, the process's other threads (ONNX Runtime's, torch's) would take them."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread handles signals
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in caught:
            signal.raise_signal(s)


def _swap(stage: Path, folder: Path) -> None:
    """Put `stage` where `folder` is; the earlier contents are deleted only once the new ones are in.
    The caller holds signals (`_signals_held`), so the two renames are not torn apart."""
    if not folder.exists():
        stage.rename(folder)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.replaced-", dir=folder.parent))
    aside.rmdir()
    folder.rename(aside)
    try:
        stage.rename(folder)
    except BaseException:
        aside.rename(folder)
        raise
    try:
        shutil.rmtree(aside)
    except OSError as exc:
        log.warning("the new output is in place, but the earlier one, moved to %s, could not be fully deleted: %s",
                    aside, exc)


def _make_parents(folder: Path) -> list[Path]:
    """Create the missing parents of `folder`; returns those created, deepest first."""
    created = []
    parent = folder.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for path in reversed(created):
        path.mkdir()
    return created


class Staged:
    """A staging folder (`path`) and what was found and cleaned before it was made (`notes`)."""

    def __init__(self, path: Path, notes: list[str]) -> None:
        self.path, self.notes = path, notes


def check_apart(folder: Path, inputs: Iterable[Path]) -> None:
    """Refuses an output folder that is, or holds, one of the inputs the run reads: replacing it would
    delete them (a checkpoint exported into itself, a run over the earlier run its model comes from)."""
    for item in inputs:
        source = Path(os.path.abspath(Path(item).expanduser())).resolve()
        if source == folder or folder in source.parents:
            raise FwsvdError(f"output folder {folder} holds {item}, which this command reads; write the results to "
                             "another folder")


@contextmanager
def staged_output(output: str | Path, inputs: Iterable[Path] = ()) -> Iterator[Staged]:
    """A staging folder that replaces `output` when the block completes and vanishes when it fails;
    `inputs` (what the command reads) must lie outside `output`."""
    folder = resolve_output(output)
    check_apart(folder, inputs)
    check_replaceable(folder)
    created: list[Path] = []
    try:
        created = _make_parents(folder)
        notes = clean_stale(folder)
        stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    except OSError as exc:
        _remove_empty(created)
        raise FwsvdError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from None
    owner, swapped = {"tool": TOOL, "pid": os.getpid(), "host": socket.gethostname()}, False
    try:
        (stage / STAGE_MARKER).write_text(json.dumps(owner))
        yield Staged(stage, notes)
        (stage / STAGE_MARKER).unlink()
        files = _files(stage)
        (stage / RUN_MARKER).write_text(json.dumps({**owner, "files": files}, indent=1, sort_keys=True))
        check_replaceable(folder)  # it may have changed during the run
        with _signals_held():  # a signal during the swap arrives once it is done, and is told so
            _swap(stage, folder)
            swapped = True
    except BaseException as exc:
        if swapped:
            exc.output_in_place = folder  # type: ignore[attr-defined]
            raise
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_empty(created: list[Path]) -> None:
    for path in created:
        try:
            path.rmdir()
        except OSError:
            return
