"""Command-line faults: a JSONL escape no encoder accepts, sweep lists that repeat a point or are empty, numbers
written with an exponent, terminal signals (SIGHUP, SIGQUIT) and Ctrl-C while the libraries load, and a
calibration set far larger than the statistics need. Each case runs the real command on the tiny models."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fwsvd_export.cli import main
from fwsvd_export.errors import FwsvdError
from fwsvd_export.loader import load_recipe
from fwsvd_export.sweep import sweep

from conftest import sentences, write_recipe

PYTHON_M = [sys.executable, "-m", "fwsvd_export"]
SCRIPT = Path(sys.executable).with_name("fwsvd-export")  # the console script, `fwsvd_export.cli:main`


def cli(*args: str):
    return CliRunner().invoke(main, [*args, "--quiet"])


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def _interruptible() -> None:
    """A background shell (as in CI) starts children with SIGINT ignored; a user's terminal does not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# --- data ------------------------------------------------------------------------------------------------


def test_a_lone_surrogate_escape_in_jsonl_names_the_file_and_line(tmp_path, classifier_recipe):
    path = tmp_path / "calibration.jsonl"
    lines = [json.dumps({"sentence": s, "label": "red"}) for s in sentences(6, 5)]
    lines[1] = '{"sentence": "a whole pair \\ud83d\\ude00 is fine", "label": "red"}'
    lines[3] = '{"sentence": "half a pair \\ud800 is not", "label": "red"}'
    path.write_text("\n".join(lines) + "\n")
    classifier_recipe["data"]["calibration"]["path"] = str(path)
    result = cli("compress", str(write_recipe(tmp_path, classifier_recipe)), "-o", str(tmp_path / "ckpt"))
    assert result.exit_code == 2, result.output
    assert f"{path}:4: not UTF-8 text" in result.output, result.output
    assert "'\\ud800' in column 'sentence'" in result.output and "data.calibration" in result.output
    assert not (tmp_path / "ckpt").exists() and partials(tmp_path) == []


# --- sweep lists -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, repeated", [("--ratios", "0.5,0.3,0.5", "0.5"), ("--methods", "kfac,svd,kfac", "kfac")]
)
def test_a_sweep_option_that_repeats_a_value_is_refused_before_any_work(
    tmp_path, classifier_recipe, option, value, repeated
):
    recipe = write_recipe(tmp_path, classifier_recipe)
    result = cli("sweep", str(recipe), option, value, "-o", str(tmp_path / "sweep"))
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {option}: {repeated} is given twice" in result.output
    assert not (tmp_path / "sweep").exists() and partials(tmp_path) == []


def test_the_sweep_function_refuses_a_repeated_point_before_any_work(tmp_path, classifier_recipe):
    recipe = write_recipe(tmp_path, classifier_recipe)
    with pytest.raises(FwsvdError, match="lists the point kfac-ratio0.5 twice"):
        sweep(recipe, [0.5, 0.5], ["kfac"], tmp_path / "sweep", progress=False)
    assert not (tmp_path / "sweep").exists() and partials(tmp_path) == []


@pytest.mark.parametrize("option", ["--ratios", "--budgets"])
def test_an_empty_sweep_list_is_refused_naming_the_option(tmp_path, classifier_recipe, option):
    recipe = write_recipe(tmp_path, classifier_recipe)
    result = cli("sweep", str(recipe), f"{option}=", "-o", str(tmp_path / "sweep"))
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {option}: expected comma-separated numbers, got none" in result.output
    assert not (tmp_path / "sweep").exists() and partials(tmp_path) == []


# --- numbers with an exponent, and whose error a --set is --------------------------------------------------


def test_exponent_floats_are_numbers_in_the_file_and_in_set(tmp_path, classifier_recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(classifier_recipe, sort_keys=False) + "finetune:\n  learning_rate: 3e-5\n")
    assert load_recipe(path).finetune.learning_rate == 3e-5
    assert load_recipe(path, ["compression.ratio=1e-5"]).compression.ratio == 1e-5
    assert load_recipe(path, [f"compression.ratio={1e-9}"]).compression.ratio == 1e-9  # as the sweep writes it
    assert load_recipe(path, ["data.seed=7"]).data.seed == 7  # integers stay integers


def test_a_wrong_set_value_is_named_by_its_set_not_by_the_file(tmp_path, classifier_recipe):
    path = write_recipe(tmp_path, classifier_recipe)
    result = cli("compress", str(path), "-o", str(tmp_path / "ckpt"), "--set", "compression.ratio=abc")
    assert result.exit_code == 2, result.output
    assert "error: --set 'compression.ratio=abc': 'compression.ratio' must be a finite number" in result.output
    assert str(path) not in result.output
    with pytest.raises(FwsvdError, match=r"^--set 'compression=\{ratio: abc\}': 'compression.ratio' must be"):
        load_recipe(path, ["compression={ratio: abc}"])
    with pytest.raises(FwsvdError, match=r"^--set 'compression.rattio=0.4': unknown key 'compression.rattio'"):
        load_recipe(path, ["compression.rattio=0.4"])
    classifier_recipe["data"]["seed"] = "zero"
    with pytest.raises(
        FwsvdError, match=rf"^{re.escape(str(path))}: 'data.seed' must be int"
    ):  # the file's own mistake
        load_recipe(write_recipe(tmp_path, classifier_recipe), ["compression.ratio=0.4"])


# --- signals -----------------------------------------------------------------------------------------------


def _long_run(tmp_path: Path, classifier_recipe: dict) -> list[str]:
    classifier_recipe["validation"]["latency"] = {"shapes": ["8x32"], "warmup": 1, "runs": 100000}
    return ["run", str(write_recipe(tmp_path, classifier_recipe, "long.yaml")), "-o", str(tmp_path / "out"), "--quiet"]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGHUP, 129), (signal.SIGQUIT, 131)])
def test_a_terminal_signal_removes_the_staged_output(tmp_path, classifier_recipe, signum, code):
    process = subprocess.Popen(
        PYTHON_M + _long_run(tmp_path, classifier_recipe), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not partials(tmp_path):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run ended (rc {process.poll()}) or took over 120 s before staging its output")
        time.sleep(0.05)
    time.sleep(1)  # into the run's work
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert f"interrupted ({signal.Signals(signum).name}): no output was written" in err
    assert not (tmp_path / "out").exists() and partials(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("command", [PYTHON_M, [str(SCRIPT)]], ids=["python -m", "console script"])
def test_ctrl_c_while_the_libraries_load_is_one_line(tmp_path, classifier_recipe, command):
    if not SCRIPT.exists() and command[0] == str(SCRIPT):
        pytest.skip("the console script is not installed")
    process = subprocess.Popen(
        command + _long_run(tmp_path, classifier_recipe),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_interruptible,
    )
    time.sleep(1)  # torch and transformers take seconds to import
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("interrupted (SIGINT)") and partials(tmp_path) == []


def test_ctrl_c_while_the_command_module_loads_is_one_line(tmp_path):
    """A real SIGINT, sent by the process to itself while `python -m fwsvd_export` imports click: the
    earliest moment it can run code of its own."""
    starting = (
        "import os, runpy, signal, sys\n"
        "class SendSigint:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'click':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, SendSigint())\n"
        "sys.argv = ['fwsvd-export', 'methods']\n"
        "runpy.run_module('fwsvd_export', run_name='__main__', alter_sys=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", starting],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_interruptible,
        cwd=tmp_path,
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted (SIGINT) while starting: nothing was written\n"


# --- a calibration set far beyond what the statistics need ---------------------------------------------------


@pytest.mark.slow
def test_a_huge_calibration_set_is_warned_about_before_the_statistics_pass(tmp_path, classifier_recipe):
    path = tmp_path / "big.jsonl"
    path.write_text(
        "".join(
            json.dumps({"sentence": s, "label": ("red", "green", "blue")[i % 3]}) + "\n"
            for i, s in enumerate(sentences(8300, 7))
        )
    )
    classifier_recipe["data"]["calibration"] = {"path": str(path), "text_column": "sentence", "label_column": "label"}
    classifier_recipe["data"].update(batch_size=512, max_length=16)
    recipe = write_recipe(tmp_path, classifier_recipe)
    done = subprocess.run(
        PYTHON_M + ["compress", str(recipe), "-o", str(tmp_path / "ckpt"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING: the statistics pass will read 17 batches, 8300 sequences," in done.stderr, done.stderr
    assert "'data.calibration.max_samples'" in done.stderr


@pytest.mark.slow
def test_the_tiny_recipe_says_its_size_without_a_warning(tmp_path, classifier_recipe, caplog):
    with caplog.at_level(logging.INFO, logger="fwsvd_export"):
        result = cli("compress", str(write_recipe(tmp_path, classifier_recipe)), "-o", str(tmp_path / "ckpt"))
    assert result.exit_code == 0, result.output
    said = [r for r in caplog.records if "statistics pass" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]
    assert said[0].getMessage().startswith("the statistics pass reads 4 batches, 32 sequences, ")
    assert re.search(r"\(roughly \d+ s\)$", said[0].getMessage()), said[0].getMessage()
