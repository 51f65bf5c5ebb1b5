"""Using the package changes no global setting of the libraries around it, and importing it changes nothing
at all: every process-wide change the tool makes is made inside a context manager, where the command line
or a stage asks for it (tests/test_side_effects.py checks that each one restores what it found)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

PROBE = """
import sys
from pathlib import Path
import fwsvd_export.cli, fwsvd_export.stages.validate, fwsvd_export.sweep  # everything the CLI loads
import onnx, onnxruntime as ort
from onnx import TensorProto, helper
graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
ort.InferenceSession(sys.argv[1], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
"""


@pytest.mark.slow
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu")
def test_importing_the_package_leaves_onnx_runtime_logging_as_it_was(tmp_path):
    """On a machine without CUDA libraries, ONNX Runtime itself reports the failed provider on stderr;
    it still does after the package is imported (the tool silences only its own sessions)."""
    from fwsvd_export.stages.validate import open_session

    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "m.onnx")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    session, reason = open_session(tmp_path / "m.onnx", "cuda")
    if session is not None:
        pytest.skip("CUDA starts on this machine: ONNX Runtime has nothing to report")
    assert "CUDAExecutionProvider" in done.stderr and "could not start" in reason


def test_the_sweep_plots_without_touching_matplotlibs_backend(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    from fwsvd_export.sweep import plot

    matplotlib.use("svg")
    points = [
        {
            "method": "kfac",
            "model_kept_ratio": r,
            "compressed_torch": 0.9 - r / 10,
            "original": 0.95,
            "metric": "accuracy",
            "providers": {"cpu": {"compressed_ms": 10 * r, "metric": 0.9, "dense_ms": 12.0}},
        }
        for r in (0.3, 0.6)
    ]
    written = plot(points, tmp_path)
    assert [p.name for p in written] == ["metric_vs_params.png", "metric_vs_latency_cpu.png"]
    assert matplotlib.get_backend() == "svg"


def test_exporter_warnings_reach_the_log_not_the_console(tmp_path, bert_dir, tokenizer, caplog, capsys):
    import logging

    from transformers import AutoModelForSequenceClassification

    from fwsvd_export.stages.export import export_onnx

    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    with caplog.at_level(logging.DEBUG, logger="fwsvd_export"):
        export_onnx(model, tokenizer, tmp_path / "onnx", "text-classification")
    assert any("exporter warning: TracerWarning" in r.getMessage() for r in caplog.records)
    assert "TracerWarning" not in capsys.readouterr().err


def test_a_graph_input_the_tool_cannot_feed_is_a_user_error_naming_it(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from fwsvd_export.errors import FwsvdError
    from fwsvd_export.stages.ort_io import feeds

    graph = helper.make_graph(
        [helper.make_node("Add", ["input_ids", "pixel_values"], ["y"])],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.INT64, [1, 2]) for n in ("input_ids", "pixel_values")],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 2])],
    )
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    import torch

    with pytest.raises(FwsvdError, match="'pixel_values'"):
        feeds(session, {"input_ids": torch.ones(1, 2, dtype=torch.long)})


CONVERT = """
import logging, sys
from pathlib import Path
from fwsvd_export.stages.precision import make_variant
for precision in ("int8", "int4"):
    make_variant(Path(sys.argv[1]), precision)
root = logging.getLogger()
print(len(root.handlers), logging.getLevelName(root.level))
logging.getLogger("fwsvd_export").addHandler(logging.StreamHandler())  # as the CLI does
logging.getLogger("fwsvd_export").warning("after the conversions")
"""


@pytest.mark.slow
def test_making_int8_and_int4_copies_prints_nothing_and_leaves_the_root_logger_as_it_was(tmp_path, bert_dir, tokenizer):
    """ONNX Runtime's quantizers log on the root logger (whose first use gives it a console handler) and one
    of them configures it on import; afterwards every record of the tool would be printed twice."""
    from transformers import AutoModel

    from fwsvd_export.stages.export import export_onnx

    graph = export_onnx(AutoModel.from_pretrained(bert_dir).eval(), tokenizer, tmp_path / "dense", "feature-extraction")
    done = subprocess.run([sys.executable, "-c", CONVERT, str(graph)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "WARNING"]
    assert done.stderr == "after the conversions\n"
    assert (tmp_path / "dense-int8" / "model.onnx").exists() and (tmp_path / "dense-int4" / "model.onnx").exists()


# What a process's global state is, as far as a library could change it: the root logger and the tool's,
# signal handlers, the standard file descriptors and streams, warnings filters, the environment, hooks,
# and torch's exporter, shape-inference pass, thread counts and global modes once torch is loaded.
SNAPSHOT = r"""
import faulthandler, gc, importlib, json, logging, os, signal, sys, threading, warnings
from pathlib import Path

def logger_state(logger):
    if not isinstance(logger, logging.Logger):  # a logger not made yet is one with the defaults
        logger = logging.Logger("unmade")
    return {"handlers": [repr(h) for h in logger.handlers], "filters": [repr(f) for f in logger.filters],
            "level": logger.level, "propagate": logger.propagate, "disabled": logger.disabled}

def snapshot():
    state = {
        "root logger": logger_state(logging.getLogger()),
        "fwsvd_export logger": logger_state(logging.Logger.manager.loggerDict.get("fwsvd_export")),
        "logging.disable": logging.root.manager.disable, "logging.lastResort": repr(logging.lastResort),
        "signal handlers": {signal.Signals(n).name: repr(signal.getsignal(n)) for n in sorted(signal.valid_signals())
                            if n in signal.Signals._value2member_map_ and n not in (signal.SIGKILL, signal.SIGSTOP)},
        "fds 0-2": [[s.st_dev, s.st_ino, s.st_mode] for s in map(os.fstat, (0, 1, 2))],
        "sys streams": [id(sys.stdin), id(sys.stdout), id(sys.stderr)],
        "warnings filters": [repr(f) for f in warnings.filters], "warnings.showwarning": repr(warnings.showwarning),
        "environment": dict(os.environ), "cwd": os.getcwd(),
        "hooks": [repr(sys.excepthook), repr(threading.excepthook), repr(sys.displayhook)],
        "interpreter": [sys.getrecursionlimit(), sys.getswitchinterval(), faulthandler.is_enabled(), gc.isenabled()],
    }
    if "torch" in sys.modules:
        import torch, torch.distributed, torch.onnx
        state["torch"] = {
            "torch.onnx.export": id(torch.onnx.export),
            "shape inference pass": id(getattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", None)),
            "threads": [torch.get_num_threads(), torch.get_num_interop_threads()],
            "modes": [str(torch.get_default_dtype()), torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(),
                      torch.get_float32_matmul_precision()],
            "process group": torch.distributed.is_available() and torch.distributed.is_initialized(),
        }
    return state

def package_modules():
    # every module of the package, found on disk (walking the package would import it)
    root = Path(sys.argv[1])
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = ("fwsvd_export",) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__main__":  # running it is the command line itself
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names
"""
PACKAGE = Path(__file__).resolve().parents[1] / "fwsvd_export"


def _child(code: str, *args: str, env: dict | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SNAPSHOT + code, str(PACKAGE), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _changes(before: dict, after: dict) -> dict:
    changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    if "environment" in changed:
        was, now = changed["environment"]
        changed["environment"] = {
            k: (was.get(k), now.get(k)) for k in was.keys() | now.keys() if was.get(k) != now.get(k)
        }
    return changed


def test_import_fwsvd_export_changes_nothing_and_loads_no_library():
    """The package's names resolve on first use: importing it loads neither torch nor any other library."""
    found = _child("""
before = snapshot()
import fwsvd_export
print(json.dumps({"before": before, "after": snapshot(),
                  "loaded": sorted(m for m in ("torch", "transformers", "onnx", "onnxruntime", "optimum", "numpy")
                                   if m in sys.modules)}))
""")
    assert _changes(found["before"], found["after"]) == {}
    assert found["loaded"] == []


def test_importing_every_module_of_the_package_changes_nothing():
    """A fresh interpreter first imports every library the package's modules load (torch, transformers,
    ONNX Runtime, optimum, ...: what those do on import is theirs), then every module of the package: the
    second step changes nothing observable. The timeouts of torch.distributed are read when a group is
    joined, not at import: unreadable values in the environment do not matter here."""
    libraries = _child("""
for name in package_modules():
    importlib.import_module(name)
print(json.dumps([m for m in list(sys.modules) if m.split(".")[0] not in ("fwsvd_export", "__main__")]))
""")
    env = dict(os.environ, FWSVD_COLLECTIVE_TIMEOUT_S="not a number", FWSVD_START_TIMEOUT_S="not a number")
    found = _child(
        """
for name in json.loads(sys.argv[2]):
    try:
        importlib.import_module(name)
    except Exception:  # a module registered under another name, or one only its parent can load
        pass
assert not any(m.startswith("fwsvd_export") for m in sys.modules)
before = snapshot()
modules = package_modules()
for name in modules:
    importlib.import_module(name)
print(json.dumps({"before": before, "after": snapshot(), "imported": len(modules)}))
""",
        json.dumps(libraries),
        env=env,
    )
    assert found["imported"] >= 30 and "torch" in found["before"]
    assert _changes(found["before"], found["after"]) == {}
