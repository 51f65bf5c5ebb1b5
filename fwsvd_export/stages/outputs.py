"""Output folders the tool can prove it wrote, replaced all at once or not at all.

A command writes into a staging folder ``.NAME.partial-XXXX`` beside its output. The staging folder is
made before any compute, so an output that cannot be created fails in seconds, and it holds
``STAGE_MARKER`` with the owning process id, so a later run can tell a stale one (its process is gone,
e.g. after SIGKILL) and remove it. Staging folders are found by listing the folder and matching their exact
names, never through a pattern made from the output's name. On success the staging folder gets
``RUN_MARKER``: every file the run wrote, with its size. An existing output folder is replaced only when its
contents are exactly what its marker lists; a user's file added there, a changed file, a symbolic link
inside, or no marker at all make the command refuse. The swap moves the earlier run aside, moves the new one
in, then deletes the earlier one; signals are held during the two renames, and a failure restores the
earlier run. The new output folder gets the mode ``mkdir`` would give it (0o777 less the umask).

An existing output that cannot be moved (a mount point, such as a ``docker run -v host:/out`` volume, or a
folder whose parent this process may not change) is written in place: the staging folder is made inside
it, and at the end the earlier run's files (those its marker lists) are moved aside into
``.NAME.replaced-XXXX`` inside it, marker first, the new files are moved in, marker last, and the earlier
ones deleted. A failure, or the next run after a SIGKILL, puts the earlier run back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

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
        raise FwsvdError(
            f"output folder '{path}' is the current folder or one above it; name a new folder "
            "for the results (e.g. -o results)"
        )
    return folder


def _files(folder: Path, skip: Iterable[str] = ()) -> dict[str, list[int]] | None:
    """Every regular file below `folder` with its size and modification time (ns), or None when a link or
    special file is there: an edit that keeps a file's size still changes its time. `skip`: folders at the
    top to leave out (the staging folders of an output written in place)."""
    found: dict[str, list[int]] = {}
    for root, dirs, files in os.walk(folder):
        if root == str(folder):
            dirs[:] = [d for d in dirs if d not in skip or (folder / d).is_symlink()]
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                return None
        for name in files:
            path = Path(root) / name
            info = path.stat()
            found[path.relative_to(folder).as_posix()] = [info.st_size, info.st_mtime_ns]
    return found


def _listed(folder: Path) -> dict | None:
    """The files that the run marker in `folder` lists, or None when there is no marker of this tool."""
    try:
        marker = json.loads((folder / RUN_MARKER).read_text())
        listed = marker["files"] if marker.get("tool") == TOOL else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        listed = None
    return listed if isinstance(listed, dict) else None


def not_ours(folder: Path, skip: Iterable[str] = ()) -> str | None:
    """Why `folder` is not provably an earlier output of this tool, or None when it is one; `skip` as for
    `_files`."""
    listed = _listed(folder)
    if listed is None:
        return f"it has no {RUN_MARKER} that this tool writes into its outputs"
    present = _files(folder, skip)
    if present is None:
        return "it holds a symbolic link or special file, which this tool never writes"
    present.pop(RUN_MARKER, None)
    extra = sorted(set(present) - set(listed))
    missing = sorted(set(listed) - set(present))
    changed = sorted(f for f in set(present) & set(listed) if present[f] != listed[f])
    problems = [
        f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
        for what, names in (
            ("files the tool did not write", extra),
            ("files missing", missing),
            ("files changed since", changed),
        )
        if names
    ]
    return "; ".join(problems) or None


_SUFFIX = re.compile(r"[a-z0-9_]+")  # what tempfile.mkdtemp puts after its prefix: never a dot


def _staging(where: Path, name: str, kind: str) -> list[Path]:
    """The folders in `where` named like a staging (`kind` "partial") or set-aside ("replaced") folder of the
    output `name`: by exact prefix, never a pattern made from the name (output 'exp[1]' must not take exp1's),
    and a suffix without dots, so output 'a' never takes one of output 'a.replaced-b'."""
    prefix = f".{name}.{kind}-"
    try:
        names = os.listdir(where)
    except OSError:
        return []
    return [where / n for n in sorted(names) if n.startswith(prefix) and _SUFFIX.fullmatch(n[len(prefix) :])]


def _staging_names(folder: Path) -> set[str]:
    """The names of the staging and set-aside folders inside an output written in place."""
    return {p.name for kind in ("partial", "replaced") for p in _staging(folder, folder.name, kind)}


def check_replaceable(folder: Path, inside: bool = False) -> None:
    """Refuse, before any work, an output path whose current contents the tool did not write; `inside`: the
    output is written in place, and its own staging folders in it are not part of its contents."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise FwsvdError(f"output {folder} exists and is not a folder; choose another with -o")
    skip = _staging_names(folder) if inside else set()
    if inside and _files(folder, skip) == {}:
        return  # folders alone, such as a filesystem's lost+found, stay where they are and are not replaced
    if folder.is_dir() and any(p.name not in skip for p in folder.iterdir()):
        reason = not_ours(folder, skip)
        if reason:
            raise FwsvdError(
                f"output folder {folder} is not an earlier fwsvd-export output ({reason}); nothing was "
                "changed: choose another folder with -o, or move it away"
            )


def _mount_points() -> set[str]:
    """This process's mount points (Linux), bind mounts included: `os.path.ismount` misses a folder
    bind-mounted from its own filesystem, whose device is its parent's."""
    try:
        lines = Path("/proc/self/mountinfo").read_text(errors="surrogateescape").splitlines()
    except OSError:
        return set()
    return {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) for line in lines}


def _in_place(folder: Path) -> bool:
    """Whether an existing output folder cannot be moved aside, so that it has to be written in place: a
    mount point (rename fails with EBUSY, e.g. a `docker run -v host:/out` volume), or a parent this process
    may not change (not writable, or sticky and another user's)."""
    if not folder.is_dir():
        return False
    if os.path.ismount(folder) or str(folder) in _mount_points():
        return True
    parent, uid = folder.parent.stat(), os.geteuid()
    sticky = parent.st_mode & stat.S_ISVTX and uid not in (0, parent.st_uid, folder.stat().st_uid)
    return bool(sticky) or not os.access(folder.parent, os.W_OK | os.X_OK)


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


def clean_stale(folder: Path, inside: bool = False) -> list[str]:
    """Remove what interrupted runs of this output left beside it (`inside`: in it, for an output written in
    place): staging folders whose process is gone, and an earlier run set aside by a replacement that never
    finished (restored when the output is missing, or holds no run)."""
    notes: list[str] = []
    where = folder if inside else folder.parent
    if not where.is_dir():
        return notes
    for path in _staging(where, folder.name, "partial"):
        if not path.is_dir() or path.is_symlink():
            continue
        # a staging folder holds the stage marker while the run works, the run marker once it is complete
        marker = next((m for m in (path / STAGE_MARKER, path / RUN_MARKER) if m.is_file()), None)
        if marker is None:
            notes.append(f"left {path.name} alone: it holds no marker of this tool")
        elif _alive(marker):
            notes.append(f"left {path.name} alone: the run that made it may still be going")
        else:
            if inside:
                _take_back(path, folder)  # what an interrupted commit had moved in
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"removed {path.name}, left by an interrupted run")
    for path in _staging(where, folder.name, "replaced"):
        notes += _settle_aside(path, folder, inside)
    return notes


def _settle_aside(aside: Path, folder: Path, inside: bool) -> list[str]:
    """Restore or delete an earlier run that an interrupted replacement had set aside: restored where the
    output is missing (or, written in place, holds no run), deleted where the new run is in place."""
    if not aside.is_dir() or aside.is_symlink():
        return []
    if inside:  # moved out entry by entry, marker first: ours when it is empty or holds our marker
        if any(aside.iterdir()) and _listed(aside) is None:
            return [f"left {aside.name} alone: it holds no marker of this tool"]
        if _listed(folder) is None:
            _put_back(aside, folder)
            return [f"restored the earlier output from {aside.name}, left by an interrupted replacement"]
    elif not_ours(aside):
        return []
    elif not folder.exists():
        aside.rename(folder)
        return [f"restored the earlier output from {aside.name}, left by an interrupted swap"]
    shutil.rmtree(aside, ignore_errors=True)
    return [f"removed {aside.name}, an earlier output an interrupted swap had set aside"]


_HELD = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name))


@contextmanager
def _signals_held() -> Iterator[None]:
    """The terminating signals (Ctrl-C, SIGTERM, a closed terminal's SIGHUP, SIGQUIT) wait until the block is
    done, then reach their own handlers. Held at the Python level: a thread mask would not do, the process's
    other threads (ONNX Runtime's, torch's) would take them."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread handles signals
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in _HELD}
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
    _discard(aside)


def _entries(folder: Path) -> list[str]:
    """The names at the top of `folder` that hold the files its run marker lists, the marker first; none
    when it has no marker."""
    listed = _listed(folder)
    if listed is None:
        return []
    names = {f.split("/")[0] for f in listed} - {RUN_MARKER, "", ".", ".."}
    return [RUN_MARKER, *sorted(names)]


def _commit_in_place(stage: Path, folder: Path) -> None:
    """Replace the earlier run in `folder` by the complete one in `stage`, inside it: the earlier run's
    entries go aside, its marker first, then the new ones come in, their marker last, so that the output
    holds a marker only while one whole run is there. A failure puts the earlier run back, and so does the
    next run after a SIGKILL (`clean_stale`). The caller holds signals."""
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.replaced-", dir=folder))
    try:
        for name in _entries(folder):
            (folder / name).rename(aside / name)
        new = _entries(stage)
        for name in new[1:] + new[:1]:
            (stage / name).rename(folder / name)
    except BaseException:
        _take_back(stage, folder)
        _put_back(aside, folder)
        raise
    shutil.rmtree(stage, ignore_errors=True)
    _discard(aside)


def _take_back(stage: Path, folder: Path) -> None:
    """Move back into `stage` what an interrupted commit had moved from it into `folder`: the entries its
    marker lists that it lacks (once the marker has gone too, the commit was complete: nothing to take)."""
    for name in _entries(stage):
        if not os.path.lexists(stage / name) and os.path.lexists(folder / name):
            (folder / name).rename(stage / name)


def _put_back(aside: Path, folder: Path) -> None:
    """Move the earlier run's entries back from `aside` into `folder`, its marker last, and remove `aside`."""
    for name in sorted(os.listdir(aside), key=lambda n: n == RUN_MARKER):
        (aside / name).rename(folder / name)
    aside.rmdir()


def _discard(aside: Path) -> None:
    """Delete the earlier run once the new one is in place; failing to only leaves it behind, said so."""
    try:
        shutil.rmtree(aside)
    except OSError as exc:
        log.warning(
            "the new output is in place, but the earlier one, moved to %s, could not be fully deleted: %s", aside, exc
        )


_umask_lock = threading.Lock()


def _umask() -> int:
    """This process's umask: read from /proc (Linux), else set and restored under a lock, as os.umask cannot
    only read it (0o077 meanwhile, so that a file another thread makes then is private, never open to all)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        old = os.umask(0o077)
        os.umask(old)
    return old


def _as_mkdir_would(stage: Path) -> None:
    """Give the staging folder, private as mkdtemp makes it, the mode a plain mkdir would give the output:
    0o777 less the umask (and the setgid bit it inherited from its parent, as mkdir keeps it)."""
    stage.chmod((0o777 & ~_umask()) | (stage.stat().st_mode & stat.S_ISGID))


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
            raise FwsvdError(
                f"output folder {folder} holds {item}, which this command reads; write the results to another folder"
            )


def _open_stage(folder: Path, inside: bool) -> tuple[Path, list[Path], list[str]]:
    """Clean what interrupted runs of the output left, check that it may be replaced, and make its staging
    folder (and its missing parents); returns the staging folder, the parents made and notes on the cleaning.
    Written in place, an interrupted replacement is undone before the check, as it leaves no marker there."""
    if not inside:
        check_replaceable(folder)
    created: list[Path] = []
    try:
        created = _make_parents(folder)
        notes = clean_stale(folder, inside)
        if inside:
            check_replaceable(folder, inside)
        stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder if inside else folder.parent))
    except OSError as exc:
        _remove_empty(created)
        raise FwsvdError(
            f"cannot {'write into' if inside else 'create'} the output folder {folder}: {exc.strerror or exc}"
        ) from None
    return stage, created, notes


@contextmanager
def staged_output(output: str | Path, inputs: Iterable[Path] = ()) -> Iterator[Staged]:
    """A staging folder that replaces `output` when the block completes and vanishes when it fails;
    `inputs` (what the command reads) must lie outside `output`."""
    folder = resolve_output(output)
    check_apart(folder, inputs)
    inside = _in_place(folder)
    stage, created, notes = _open_stage(folder, inside)
    owner, swapped = {"tool": TOOL, "pid": os.getpid(), "host": socket.gethostname()}, False
    try:
        (stage / STAGE_MARKER).write_text(json.dumps(owner))
        yield Staged(stage, notes)
        (stage / STAGE_MARKER).unlink()
        files = _files(stage)
        (stage / RUN_MARKER).write_text(json.dumps({**owner, "files": files}, indent=1, sort_keys=True))
        check_replaceable(folder, inside)  # it may have changed during the run
        with _signals_held():  # a signal during the swap arrives once it is done, and is told so
            if inside:
                _commit_in_place(stage, folder)
            else:
                _as_mkdir_would(stage)
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
