"""Output folders with awkward names, mount points and modes: the cases where the output's place cannot be
treated as a plain name beside its staging folder. Each case checks the exit code, that nothing partial is
left, and that what was there before (another output's run included) is intact, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_faults import cli, leftovers, snapshot

from fwsvd_export.stages.outputs import RUN_MARKER, STAGE_MARKER, not_ours

from conftest import write_recipe

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out


def ratio(folder: Path) -> float:
    """The compression ratio the checkpoint in `folder` was made with."""
    return json.loads((folder / "fwsvd_manifest.json").read_text())["recipe"]["compression"]["ratio"]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def stale_partial(path: Path) -> Path:
    """A staging folder left by a run that was killed (its process is gone)."""
    path.mkdir()
    (path / STAGE_MARKER).write_text(
        json.dumps({"tool": "fwsvd-export", "pid": dead_pid(), "host": os.uname().nodename})
    )
    (path / "model.safetensors").write_bytes(b"half")
    return path


# --- names: staging folders are matched by exact name, never by a pattern -------------------------------


@pytest.mark.parametrize("name", ["exp[1]", "[e]xp1", "exp*", "ex?1"])
def test_glob_characters_in_the_output_name_leave_another_outputs_set_aside_run_alone(
    tmp_path, classifier_recipe, name
):
    """exp1's earlier run, set aside by a swap that kill -9 cut between its two renames, is exp1's alone: a
    run into 'exp[1]' neither restores it as its own nor deletes it."""
    recipe = write_recipe(tmp_path, classifier_recipe)
    assert cli("compress", str(recipe), "-o", str(tmp_path / "exp1")).exit_code == 0
    aside = tmp_path / ".exp1.replaced-k2j4x9ab"
    (tmp_path / "exp1").rename(aside)
    before = snapshot(aside)
    result = cli("compress", str(recipe), "-o", str(tmp_path / name), "--set", "compression.ratio=0.3")
    assert result.exit_code == 0, result.output
    assert snapshot(aside) == before and not (tmp_path / "exp1").exists()
    assert ratio(tmp_path / name) == 0.3 and leftovers(tmp_path) == [aside.name]


def test_a_stale_partial_folder_is_removed_by_its_own_outputs_run_only(tmp_path, classifier_recipe):
    own, other = stale_partial(tmp_path / ".exp[1].partial-stale"), stale_partial(tmp_path / ".exp1.partial-stale")
    before = snapshot(other)
    result = cli("compress", str(write_recipe(tmp_path, classifier_recipe)), "-o", str(tmp_path / "exp[1]"))
    assert result.exit_code == 0, result.output
    assert not own.exists() and snapshot(other) == before and leftovers(tmp_path) == [other.name]


def test_an_output_never_takes_the_set_aside_run_of_an_output_whose_name_begins_with_its_own(
    tmp_path, classifier_recipe
):
    """Output 'a' and output 'a.replaced-b': the set-aside run '.a.replaced-b.replaced-XXXX' is the second's."""
    recipe = write_recipe(tmp_path, classifier_recipe)
    assert cli("compress", str(recipe), "-o", str(tmp_path / "a.replaced-b")).exit_code == 0
    aside = tmp_path / ".a.replaced-b.replaced-x1y2z3ab"
    (tmp_path / "a.replaced-b").rename(aside)
    before = snapshot(aside)
    result = cli("compress", str(recipe), "-o", str(tmp_path / "a"), "--set", "compression.ratio=0.3")
    assert result.exit_code == 0, result.output
    assert snapshot(aside) == before and ratio(tmp_path / "a") == 0.3


# --- modes: the output folder is made as mkdir would make it -----------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_the_output_folder_gets_the_mode_mkdir_would_give_it(tmp_path, classifier_recipe, umask):
    recipe = write_recipe(tmp_path, classifier_recipe)
    old = os.umask(umask)
    try:
        (tmp_path / "plain").mkdir()
        first = cli("compress", str(recipe), "-o", str(tmp_path / "out"))
        made = stat.S_IMODE((tmp_path / "out").stat().st_mode)
        again = cli("compress", str(recipe), "-o", str(tmp_path / "out"), "--set", "compression.ratio=0.3")
    finally:
        os.umask(old)
    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    expected = 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == expected
    assert made == expected and stat.S_IMODE((tmp_path / "out").stat().st_mode) == expected  # made, then replaced


# --- an output that cannot be moved: written in place ------------------------------------------------


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here (needs root or CAP_SYS_ADMIN): {done.stderr.strip() or done.returncode}")


@pytest.fixture
def mount_point(tmp_path) -> Iterator[Path]:
    """An empty tmpfs mounted at tmp_path/out, as `docker run -v host:/out` gives a container its output."""
    out = tmp_path / "out"
    out.mkdir()
    _mount("-t", "tmpfs", "-o", "size=64m", "fwsvd-test", str(out))
    yield out
    subprocess.run(["umount", "-l", str(out)], check=True)


def only_the_run(folder: Path) -> bool:
    """`folder` holds exactly what its run marker lists: no staging folder, nothing set aside."""
    return not_ours(folder) is None and not any(
        ".partial-" in p.name or ".replaced-" in p.name for p in folder.iterdir()
    )


def test_an_empty_mount_point_is_written_in_place_and_its_earlier_run_replaced(
    tmp_path, classifier_recipe, mount_point
):
    recipe = write_recipe(tmp_path, classifier_recipe)
    result = cli("run", str(recipe), "-o", str(mount_point))
    assert result.exit_code == 0, result.output
    assert os.path.ismount(mount_point) and only_the_run(mount_point) and leftovers(tmp_path) == []
    assert json.loads((mount_point / "report.json").read_text())["recipe"]["compression"]["ratio"] == 0.5
    result = cli("run", str(recipe), "-o", str(mount_point), "--set", "compression.ratio=0.3")
    assert result.exit_code == 0, result.output
    assert os.path.ismount(mount_point) and only_the_run(mount_point) and leftovers(tmp_path) == []
    assert json.loads((mount_point / "report.json").read_text())["recipe"]["compression"]["ratio"] == 0.3


def test_a_bind_mount_from_the_same_filesystem_is_written_in_place(tmp_path, classifier_recipe):
    """os.path.ismount cannot see this one (its device is its parent's); the mount table can."""
    source, out = tmp_path / "host", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    _mount("--bind", str(source), str(out))
    try:
        result = cli("compress", str(write_recipe(tmp_path, classifier_recipe)), "-o", str(out))
        assert result.exit_code == 0, result.output
        assert only_the_run(out) and ratio(source) == 0.5 and leftovers(tmp_path) == []
    finally:
        subprocess.run(["umount", "-l", str(out)], check=True)


def test_a_mount_point_holding_only_an_empty_lost_and_found_is_written_and_keeps_it(
    tmp_path, classifier_recipe, mount_point
):
    """A whole filesystem mounted as the output (ext4 has lost+found): folders alone are not contents to refuse,
    and the run leaves them where they are."""
    (mount_point / "lost+found").mkdir()
    result = cli("compress", str(write_recipe(tmp_path, classifier_recipe)), "-o", str(mount_point))
    assert result.exit_code == 0, result.output
    assert (mount_point / "lost+found").is_dir() and ratio(mount_point) == 0.5 and only_the_run(mount_point)


def test_a_mount_point_with_files_the_tool_did_not_write_is_refused(tmp_path, classifier_recipe, mount_point):
    (mount_point / "notes.txt").write_text("mine")
    result = cli("compress", str(write_recipe(tmp_path, classifier_recipe)), "-o", str(mount_point))
    assert result.exit_code == 2 and "not an earlier fwsvd-export output" in result.output, result.output
    assert snapshot(mount_point) == {"notes.txt": b"mine"} and [p.name for p in mount_point.iterdir()] == ["notes.txt"]


def test_a_failed_run_into_a_mount_point_leaves_its_earlier_run_as_it_was(
    tmp_path, classifier_recipe, mount_point, monkeypatch
):
    recipe = write_recipe(tmp_path, classifier_recipe)
    assert cli("compress", str(recipe), "-o", str(mount_point)).exit_code == 0
    before = snapshot(mount_point)
    real, moved = Path.rename, []

    def rename(self, target):  # the second entry moved into the output fails, as on a full disk
        if Path(target).parent == mount_point.resolve() and ".partial-" in self.parent.name:
            moved.append(self)
            if len(moved) == 2:
                raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    result = cli("compress", str(recipe), "-o", str(mount_point), "--set", "compression.ratio=0.3")
    assert result.exit_code == 3 and len(moved) == 2, result.output
    monkeypatch.undo()
    assert snapshot(mount_point) == before and only_the_run(mount_point)
    classifier_recipe["model"]["path"] = str(tmp_path / "no-such-model")  # fails after the staging folder is made
    result = cli("compress", str(write_recipe(tmp_path, classifier_recipe, "bad.yaml")), "-o", str(mount_point))
    assert result.exit_code == 2 and "no-such-model" in result.output, result.output
    assert snapshot(mount_point) == before and only_the_run(mount_point)


def test_after_sigkill_mid_replacement_in_place_the_next_run_puts_the_earlier_run_back(
    tmp_path, classifier_recipe, mount_point
):
    """SIGKILL after the earlier run was moved aside and one new entry moved in: the output holds no
    marker, and the next run undoes that before anything else (here it then fails on a missing model)."""
    recipe = write_recipe(tmp_path, classifier_recipe)
    assert cli("compress", str(recipe), "-o", str(mount_point)).exit_code == 0
    before = snapshot(mount_point)
    killed = (
        "import os, runpy, sys; from pathlib import Path; real, moved = Path.rename, []\n"
        "def rename(self, target):\n"
        "    if Path(target).parent == Path(sys.argv[-2]).resolve() and '.partial-' in self.parent.name:\n"
        "        moved.append(self)\n"
        "        if len(moved) == 2: os.kill(os.getpid(), 9)\n"
        "    return real(self, target)\n"
        "Path.rename = rename; sys.argv = ['fwsvd-export'] + sys.argv[1:]\n"
        "runpy.run_module('fwsvd_export', run_name='__main__')"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            killed,
            "compress",
            str(recipe),
            "--set",
            "compression.ratio=0.3",
            "-o",
            str(mount_point),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not_ours(mount_point) is not None  # half replaced: no marker
    classifier_recipe["model"]["path"] = str(tmp_path / "no-such-model")
    result = cli("compress", str(write_recipe(tmp_path, classifier_recipe, "bad.yaml")), "-o", str(mount_point))
    assert result.exit_code == 2 and "no-such-model" in result.output, result.output
    assert snapshot(mount_point) == before and only_the_run(mount_point)
    result = cli("compress", str(recipe), "-o", str(mount_point), "--set", "compression.ratio=0.3")
    assert result.exit_code == 0 and ratio(mount_point) == 0.3 and only_the_run(mount_point), result.output
    assert (mount_point / RUN_MARKER).is_file()
