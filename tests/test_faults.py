"""The fault matrix: what the tool does when things go wrong. Each case checks the exit code, that the
message names the problem, that nothing partial is left, and that what was there before is intact,
byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fwsvd_export.cli import main
from fwsvd_export.stages.outputs import RUN_MARKER, STAGE_MARKER

from conftest import write_recipe

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".replaced-" in p.name)


def cli(*args: str):
    return CliRunner().invoke(main, [*args, "--quiet"] if args[0] in ("run", "compress", "sweep") else list(args))


@pytest.fixture
def earlier_run(tmp_path, classifier_recipe) -> Path:
    """A finished run in tmp_path/out, made by the tool itself."""
    recipe = write_recipe(tmp_path, classifier_recipe)
    result = cli("run", str(recipe), "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    return tmp_path / "out"


# --- output handling: never delete what the tool did not write -------------------------------------


def test_output_dot_is_refused_and_the_current_folder_is_untouched(tmp_path, classifier_recipe, monkeypatch):
    recipe = write_recipe(tmp_path, classifier_recipe)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for output in (".", "./", "..", str(work)):
        result = cli("run", str(recipe), "-o", output)
        assert result.exit_code == 2, result.output
        assert "current folder" in result.output
    assert snapshot(work) == {"notes.txt": b"mine"} and leftovers(tmp_path) == []


def test_a_folder_with_a_copied_report_and_user_files_is_not_replaced(tmp_path, classifier_recipe, earlier_run):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "report.json").write_bytes((earlier_run / "report.json").read_bytes())
    (user / "notes.txt").write_text("my notes")
    (user / "src").mkdir()
    (user / "src" / "train.py").write_text("print('hi')")
    before = snapshot(user)
    result = cli("run", str(tmp_path / "recipe.yaml"), "-o", str(user))
    assert result.exit_code == 2
    assert "not an earlier fwsvd-export output" in result.output and RUN_MARKER in result.output
    assert snapshot(user) == before and leftovers(tmp_path) == []


def test_an_earlier_run_with_a_user_file_added_is_not_replaced(tmp_path, earlier_run):
    (earlier_run / "notes.txt").write_text("my reading of the results")
    before = snapshot(earlier_run)
    result = cli("run", str(tmp_path / "recipe.yaml"), "-o", str(earlier_run))
    assert result.exit_code == 2
    assert "files the tool did not write: notes.txt" in result.output
    assert snapshot(earlier_run) == before and leftovers(tmp_path) == []


def test_an_earlier_run_with_a_changed_file_is_not_replaced(tmp_path, earlier_run):
    (earlier_run / "report.md").write_text("edited by hand")
    before = snapshot(earlier_run)
    result = cli("run", str(tmp_path / "recipe.yaml"), "-o", str(earlier_run))
    assert result.exit_code == 2 and "files changed since: report.md" in result.output
    assert snapshot(earlier_run) == before


def test_an_edit_that_keeps_the_size_still_counts_as_a_change(tmp_path, earlier_run):
    report = earlier_run / "report.md"
    text = report.read_text()
    time.sleep(0.01)
    report.write_text(text.replace("a", "b", 1) if "a" in text else text.upper())  # same size, new content
    before = snapshot(earlier_run)
    result = cli("run", str(tmp_path / "recipe.yaml"), "-o", str(earlier_run))
    assert result.exit_code == 2 and "files changed since: report.md" in result.output
    assert snapshot(earlier_run) == before


def test_an_untouched_earlier_run_is_replaced_whole(tmp_path, earlier_run):
    before = json.loads((earlier_run / "report.json").read_text())
    result = cli("run", str(tmp_path / "recipe.yaml"), "-o", str(earlier_run), "--set", "compression.ratio=0.3")
    assert result.exit_code == 0, result.output
    after = json.loads((earlier_run / "report.json").read_text())
    assert before["recipe"]["compression"]["ratio"] == 0.5 and after["recipe"]["compression"]["ratio"] == 0.3
    assert leftovers(tmp_path) == []


def test_a_symlink_to_an_earlier_run_replaces_the_run_it_points_to(tmp_path, earlier_run):
    link = tmp_path / "latest"
    link.symlink_to(earlier_run, target_is_directory=True)
    result = cli("run", str(tmp_path / "recipe.yaml"), "-o", str(link), "--set", "compression.ratio=0.3")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and link.resolve() == earlier_run.resolve()
    assert json.loads((link / "report.json").read_text())["recipe"]["compression"]["ratio"] == 0.3
    assert leftovers(tmp_path) == []


def test_compress_replaces_its_own_earlier_checkpoint(tmp_path, classifier_recipe):
    recipe = write_recipe(tmp_path, classifier_recipe)
    for ratio in ("0.5", "0.3"):
        result = cli("compress", str(recipe), "-o", str(tmp_path / "ckpt"), "--set", f"compression.ratio={ratio}")
        assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "ckpt" / "fwsvd_manifest.json").read_text())
    assert manifest["recipe"]["compression"]["ratio"] == 0.3


def test_a_checkpoint_is_never_exported_into_itself(tmp_path, classifier_recipe):
    recipe = write_recipe(tmp_path, classifier_recipe)
    assert cli("compress", str(recipe), "-o", str(tmp_path / "ckpt")).exit_code == 0
    before = snapshot(tmp_path / "ckpt")
    for output in (tmp_path / "ckpt", tmp_path):
        result = cli("export", str(tmp_path / "ckpt"), "-o", str(output))
        assert result.exit_code == 2, result.output
        assert "which this command reads" in result.output
    assert snapshot(tmp_path / "ckpt") == before and leftovers(tmp_path) == []


def test_a_run_never_replaces_the_earlier_run_its_model_comes_from(tmp_path, classifier_recipe):
    """A recipe whose model is an earlier run's checkpoint cannot write over that run."""
    recipe = write_recipe(tmp_path, classifier_recipe)
    assert cli("compress", str(recipe), "-o", str(tmp_path / "first")).exit_code == 0
    before = snapshot(tmp_path / "first")
    classifier_recipe["model"]["path"] = str(tmp_path / "first")
    second = write_recipe(tmp_path, classifier_recipe)
    result = cli("compress", str(second), "-o", str(tmp_path / "first"))
    assert result.exit_code == 2 and "which this command reads" in result.output, result.output
    assert snapshot(tmp_path / "first") == before and leftovers(tmp_path) == []


def test_a_stale_partial_folder_of_a_killed_run_is_removed_and_reported(tmp_path, earlier_run):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / ".out.partial-stale"
    stale.mkdir()
    (stale / STAGE_MARKER).write_text(
        json.dumps({"tool": "fwsvd-export", "pid": dead.pid, "host": os.uname().nodename})
    )
    (stale / "model.safetensors").write_bytes(b"half")
    running = tmp_path / ".out.partial-running"  # a run that is still going (this very process)
    running.mkdir()
    (running / STAGE_MARKER).write_text(
        json.dumps({"tool": "fwsvd-export", "pid": os.getpid(), "host": os.uname().nodename})
    )
    foreign = tmp_path / ".out.partial-mine"  # not ours: no marker
    foreign.mkdir()
    finished = tmp_path / ".out.partial-finished"  # complete, killed before it was moved into place
    finished.mkdir()
    (finished / RUN_MARKER).write_text(
        json.dumps({"tool": "fwsvd-export", "pid": dead.pid, "host": os.uname().nodename, "files": {}})
    )
    result = cli("run", str(tmp_path / "recipe.yaml"), "-o", str(earlier_run))
    assert result.exit_code == 0, result.output
    assert "note: removed .out.partial-stale, left by an interrupted run" in result.output
    assert "note: removed .out.partial-finished, left by an interrupted run" in result.output
    assert "left .out.partial-running alone: the run that made it may still be going" in result.output
    assert "left .out.partial-mine alone: it holds no marker of this tool" in result.output
    assert not stale.exists() and not finished.exists() and running.is_dir() and foreign.is_dir()


def test_output_below_a_regular_file_fails_before_the_model_loads(tmp_path, classifier_recipe):
    classifier_recipe["model"]["path"] = str(tmp_path / "no-such-model")  # would fail later, if reached
    recipe = write_recipe(tmp_path, classifier_recipe)
    (tmp_path / "afile").write_text("x")
    result = cli("run", str(recipe), "-o", str(tmp_path / "afile" / "out"))
    assert result.exit_code == 2
    assert "cannot create the output folder" in result.output and "afile" in result.output
    assert (tmp_path / "afile").read_text() == "x" and leftovers(tmp_path) == []


def test_an_output_that_cannot_be_written_fails_before_the_model_loads(tmp_path, classifier_recipe):
    classifier_recipe["model"]["path"] = str(tmp_path / "no-such-model")
    result = cli("run", str(write_recipe(tmp_path, classifier_recipe)), "-o", "/sys/fwsvd-export-out")
    assert result.exit_code == 2 and "cannot create the output folder /sys/fwsvd-export-out" in result.output


def test_missing_parents_made_for_a_failed_run_are_removed(tmp_path, classifier_recipe):
    classifier_recipe["model"]["path"] = str(tmp_path / "no-such-model")
    result = cli("run", str(write_recipe(tmp_path, classifier_recipe)), "-o", str(tmp_path / "a" / "b" / "out"))
    assert result.exit_code == 2 and "no-such-model" in result.output
    assert not (tmp_path / "a").exists()


def test_a_crash_exits_3_with_its_traceback_and_leaves_nothing(tmp_path, earlier_run, monkeypatch):
    import fwsvd_export.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault in validation")

    monkeypatch.setattr(fwsvd_export.pipeline, "validate", broken)
    before = snapshot(earlier_run)
    result = cli("run", str(tmp_path / "recipe.yaml"), "-o", str(earlier_run))
    assert result.exit_code == 3
    assert "injected fault in validation" in result.output and "crashed (a bug" in result.output
    assert snapshot(earlier_run) == before and leftovers(tmp_path) == []


# --- whole processes: full disk and signals -----------------------------------------------------------


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fwsvd_export", *args]


def test_a_full_disk_exits_3_and_keeps_the_earlier_run(tmp_path, earlier_run):
    """RLIMIT_FSIZE makes every write past 200 kB fail, as a full disk would (EFBIG instead of ENOSPC)."""
    before = snapshot(earlier_run)
    limit = (
        "import resource, signal, runpy, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); sys.argv = ['fwsvd-export'] + sys.argv[1:]; "
        "runpy.run_module('fwsvd_export', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", limit, "run", str(tmp_path / "recipe.yaml"), "-o", str(earlier_run), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3, done.stderr
    assert "ran out of room" in done.stderr and "File too large" in done.stderr, done.stderr
    assert snapshot(earlier_run) == before and leftovers(tmp_path) == []


def _interruptible() -> None:
    """A background shell (as in CI) starts children with SIGINT ignored; a user's terminal does not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_until_exported(process: subprocess.Popen, folder: Path, limit: float = 120) -> None:
    """Well into a run: its dense ONNX graph is written (and latency timing has begun)."""
    deadline = time.monotonic() + limit
    while not list(folder.glob(".out.partial-*/onnx/dense/model.onnx")):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run ended (rc {process.poll()}) or took over {limit} s before exporting")
        time.sleep(0.1)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_leaves_the_earlier_run_intact_and_nothing_partial(
    tmp_path, classifier_recipe, earlier_run, signum, code
):
    classifier_recipe["validation"]["latency"] = {"shapes": ["8x32"], "warmup": 1, "runs": 100000}  # a long run
    recipe = write_recipe(tmp_path, classifier_recipe, "long.yaml")
    before = snapshot(earlier_run)
    process = subprocess.Popen(
        _command("run", str(recipe), "-o", str(earlier_run), "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_interruptible,
    )
    wait_until_exported(process, tmp_path)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert f"interrupted ({signal.Signals(signum).name})" in err
    assert snapshot(earlier_run) == before and leftovers(tmp_path) == []


def test_after_sigkill_the_next_run_cleans_up(tmp_path, classifier_recipe, earlier_run):
    classifier_recipe["validation"]["latency"] = {"shapes": ["8x32"], "warmup": 1, "runs": 100000}
    long = write_recipe(tmp_path, classifier_recipe, "long.yaml")
    process = subprocess.Popen(
        _command("run", str(long), "-o", str(earlier_run), "--quiet"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until_exported(process, tmp_path)
    process.kill()
    process.wait()
    assert len(leftovers(tmp_path)) == 1  # what SIGKILL leaves
    result = cli("run", str(tmp_path / "recipe.yaml"), "-o", str(earlier_run))
    assert result.exit_code == 0, result.output
    assert "left by an interrupted run" in result.output and leftovers(tmp_path) == []


def test_a_run_that_validated_on_no_provider_does_not_pass(tmp_path, classifier_recipe):
    """Only an optional provider that cannot start here (CUDA on this CPU machine): nothing was checked."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA runs here")
    classifier_recipe["validation"]["providers"] = [{"name": "cuda"}]
    result = cli("run", str(write_recipe(tmp_path, classifier_recipe)), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert not report["passed"]
    assert any(c["name"] == "onnx runtime: validated" and not c["passed"] for c in report["validation"]["checks"])


def test_a_failed_rename_puts_the_earlier_run_back(tmp_path, earlier_run, monkeypatch):
    """The swap moves the earlier run aside, then renames the new one in; when that fails, the earlier
    run is restored byte for byte and the new one is removed."""
    before = snapshot(earlier_run)
    real = Path.rename

    def rename(self, target):
        if ".partial-" in self.name:
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    result = cli("run", str(tmp_path / "recipe.yaml"), "-o", str(earlier_run), "--set", "compression.ratio=0.3")
    assert result.exit_code == 3, result.output
    assert snapshot(earlier_run) == before and leftovers(tmp_path) == []


def test_an_unreadable_statistics_cache_is_said_on_the_console(tmp_path, classifier_recipe):
    classifier_recipe["compression"]["cache_dir"] = str(tmp_path / "cache")
    recipe = write_recipe(tmp_path, classifier_recipe)
    assert cli("run", str(recipe), "-o", str(tmp_path / "one")).exit_code == 0
    (cached,) = (tmp_path / "cache").glob("*.safetensors")
    cached.write_bytes(b"\x00" * 64)
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "two")])
    assert result.exit_code == 0, result.output
    assert f"note: statistics cache: {cached}" in result.output and "gathered again and replaced" in result.output


def test_ctrl_c_that_passed_through_code_run_for_a_native_caller_still_exits_130(tmp_path):
    """A program run as ``python -m`` (as the tool is) is ended by SIGINT (-2) at exit, whatever exit code it
    asked for, when a KeyboardInterrupt last escaped code CPython evaluated for a native caller (PyRun_*), as
    when Ctrl-C lands in such code inside a library; the tool still exits 130 and says so."""
    (tmp_path / "interrupted_command.py").write_text(
        "import ctypes\n"
        "from fwsvd_export.cli import guarded\n"
        "@guarded\n"
        "def command():\n"
        "    ctypes.pythonapi.PyRun_SimpleString(b'raise KeyboardInterrupt')\n"
        "    raise KeyboardInterrupt\n"
        "command()\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "interrupted_command"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 130, done.stderr
    assert "interrupted (SIGINT): no output was written" in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_a_signal_during_the_swap_arrives_after_it_and_says_the_output_is_complete(
    tmp_path, earlier_run, monkeypatch, signum
):
    from fwsvd_export.stages import outputs

    real = outputs._swap

    def swap_under_signal(stage, folder):
        os.kill(os.getpid(), signum)  # held until the swap is done
        real(stage, folder)

    monkeypatch.setattr(outputs, "_swap", swap_under_signal)
    result = CliRunner().invoke(
        main,
        ["run", str(tmp_path / "recipe.yaml"), "-o", str(earlier_run), "--set", "compression.ratio=0.3", "--quiet"],
    )
    assert result.exit_code == 128 + signum, result.output
    assert f"just after the results were moved into place: {earlier_run.resolve()} is complete" in result.output
    assert json.loads((earlier_run / "report.json").read_text())["recipe"]["compression"]["ratio"] == 0.3
    assert leftovers(tmp_path) == []


def test_a_signal_swallowed_by_a_weakref_callback_still_interrupts_the_run():
    """Python only prints an exception raised in a weakref callback or finalizer; a terminating signal that
    lands there is sent again, so the command still stops (a CI run once hung this way mid-latency)."""
    code = """
import os, signal, sys, time, weakref
from fwsvd_export.cli import Interrupted, _termination_as_interrupt

class Held: pass

def callback(_):
    os.kill(os.getpid(), signal.SIGTERM)
    sum(range(10000))  # the handler runs here, inside the callback, and Python swallows its exception

with _termination_as_interrupt():
    try:
        held = Held()
        ref = weakref.ref(held, callback)
        del held
        time.sleep(5)
        print("not interrupted")
    except Interrupted as exc:
        print("interrupted", exc.signum == signal.SIGTERM)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "interrupted True", done.stdout + done.stderr
