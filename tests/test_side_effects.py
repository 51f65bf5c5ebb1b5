"""Side effects and error handling, as a specification: using the package changes no global setting of the
libraries around it (ONNX Runtime's logger, matplotlib's backend); what the exporter says reaches the
'fwsvd_export' log rather than the console or nowhere; the split-MatMul check passes a layer only when both
of its matrix multiplies take a constant weight of the factor's shape; user errors are FwsvdError and bugs
keep their own exception. Everything runs on real tiny models, real ONNX graphs and real ONNX Runtime."""

from __future__ import annotations

import csv
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import BertForSequenceClassification

from fwsvd_export.core.lowrank import low_rank_from_linear
from fwsvd_export.core.modules import set_module
from fwsvd_export.errors import FwsvdError
from fwsvd_export.loader import parse_recipe
from fwsvd_export.stages import data
from fwsvd_export.stages.export import export_onnx, inspect_graph
from fwsvd_export.stages.ort_io import feeds

UNUSED_INITIALIZER_WARNING = "Removing initializer 'unused'"


def unused_initializer_model(path) -> None:
    """A valid graph with an initializer no node uses: every ONNX Runtime session made from it logs a
    warning at its start, through the default logger's severity unless the session sets its own."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[helper.make_tensor("unused", TensorProto.FLOAT, [1], [1.0])],
    )
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "MPLBACKEND"},
    )
    assert done.returncode == 0, done.stderr
    return done


# --- nothing global changes at import ----------------------------------------------------------------

MARK = "--- probe step: "
PROBE = f"""
import sys
from pathlib import Path
import matplotlib
matplotlib.use("svg")
import onnxruntime as ort
import fwsvd_export, fwsvd_export.cli, fwsvd_export.pipeline, fwsvd_export.sweep
import fwsvd_export.stages.validate, fwsvd_export.stages.export, fwsvd_export.stages.report
from fwsvd_export.stages.report import plot_ranks
from fwsvd_export.stages.validate import open_session

def step(name):
    print("{MARK}" + name, file=sys.stderr, flush=True)

step("plain session after import")
ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
step("the tool's session")
session, reason = open_session(Path(sys.argv[1]), "cpu")
assert session is not None, reason
step("plain session after the tool's")
ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
step("matplotlib")
print("backend after import:", matplotlib.get_backend(), "pyplot" if "matplotlib.pyplot" in sys.modules else "")
from fwsvd_export.core import CompressionResult
from fwsvd_export.core.compress import LayerPlan
layers = [LayerPlan(f"layer.{{i}}", 48, 96, r) for i, r in enumerate((8, None))]
assert plot_ranks(CompressionResult("fwsvd", layers), Path(sys.argv[2]))
print("backend after plot:", matplotlib.get_backend(), "pyplot" if "matplotlib.pyplot" in sys.modules else "")
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> tuple[dict[str, str], str]:
    """One fresh interpreter that imports every module of the package, then opens ONNX Runtime sessions
    and draws the ranks plot: its stderr split by step, and its stdout."""
    pytest.importorskip("matplotlib")
    folder = tmp_path_factory.mktemp("probe")
    unused_initializer_model(folder / "m.onnx")
    done = python(PROBE, folder / "m.onnx", folder / "ranks.png")
    assert (folder / "ranks.png").read_bytes().startswith(b"\x89PNG")
    steps = dict(part.split("\n", 1) for part in done.stderr.split(MARK)[1:])
    return steps, done.stdout


def test_the_warning_observable_is_sharp(tmp_path):
    """onnxruntime has no getter for the default logger's severity, so the tests observe its effect: a
    session from this graph logs a warning at default severity, and none once the severity is raised to 4."""
    unused_initializer_model(tmp_path / "m.onnx")
    code = "import sys, onnxruntime as ort\n{}\nort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])"
    assert UNUSED_INITIALIZER_WARNING in python(code.format(""), tmp_path / "m.onnx").stderr
    assert (
        UNUSED_INITIALIZER_WARNING
        not in python(code.format("ort.set_default_logger_severity(4)"), tmp_path / "m.onnx").stderr
    )


@pytest.mark.slow
def test_importing_the_package_leaves_onnx_runtimes_default_logger_as_it_was(probe):
    steps, _ = probe
    assert UNUSED_INITIALIZER_WARNING in steps["plain session after import"]


def test_the_tools_own_sessions_are_quiet_and_leave_the_default_logger_alone(probe):
    steps, _ = probe
    assert UNUSED_INITIALIZER_WARNING not in steps["the tool's session"]
    assert UNUSED_INITIALIZER_WARNING in steps["plain session after the tool's"]


def test_importing_and_plotting_leave_matplotlibs_backend_alone(probe):
    _, stdout = probe
    assert "backend after import: svg \n" in stdout  # and pyplot not imported
    assert "backend after plot: svg \n" in stdout


# --- a real compressed tiny BERT, exported once ---------------------------------------------------------

SPLIT = (
    "bert.encoder.layer.0.attention.self.query",
    "bert.encoder.layer.0.intermediate.dense",
    "bert.encoder.layer.1.output.dense",
)


@pytest.fixture(scope="module")
def compressed(bert_dir):
    """The tiny BERT with three Linear layers factorized at rank 8 (real SVD, real modules)."""
    model = BertForSequenceClassification.from_pretrained(bert_dir).eval()
    for name in SPLIT:
        set_module(model, name, low_rank_from_linear(model.get_submodule(name), 8)[0])
    return model


@pytest.fixture(scope="module")
def exported(compressed, tokenizer, tmp_path_factory):
    return export_onnx(compressed, tokenizer, tmp_path_factory.mktemp("onnx"), "text-classification")


def second_matmul_weight(graph: onnx.GraphProto, layer: str) -> onnx.TensorProto:
    """The initializer the `second` MatMul of `layer` multiplies by, in a real export."""
    scope = "/" + layer.replace("bert.", "", 1).replace(".", "/").replace("layer/", "layer.") + "/second/"
    node = next(n for n in graph.node if n.op_type == "MatMul" and scope in n.name)
    return next(i for i in graph.initializer if i.name == node.input[1])


def edited(exported, tmp_path, edit) -> str:
    model = onnx.load(str(exported))
    edit(model.graph)
    onnx.checker.check_model(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path


def test_a_real_export_passes_the_split_check(exported, compressed):
    graph = inspect_graph(exported, compressed)
    assert graph["factorized_layers"] == 3 and graph["split_matmul_pairs_found"] == 3
    assert graph["layers_missing_split"] == []


def test_a_second_matmul_whose_weight_is_a_graph_input_is_missing_the_split(exported, compressed, tmp_path):
    def weight_to_graph_input(graph):
        weight = second_matmul_weight(graph, SPLIT[1])
        graph.input.append(helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims)))
        graph.initializer.remove(weight)

    graph = inspect_graph(edited(exported, tmp_path, weight_to_graph_input), compressed)
    assert graph["layers_missing_split"] == [SPLIT[1]]
    assert graph["split_matmul_pairs_found"] == 2


def test_an_initializer_also_listed_as_graph_input_is_overridable_so_not_a_weight(exported, compressed, tmp_path):
    def also_an_input(graph):
        weight = second_matmul_weight(graph, SPLIT[0])
        graph.input.append(helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims)))

    assert inspect_graph(edited(exported, tmp_path, also_an_input), compressed)["layers_missing_split"] == [SPLIT[0]]


def test_a_weight_of_the_wrong_shape_is_missing_the_split(exported, compressed, tmp_path):
    def wrong_shape(graph):
        weight = second_matmul_weight(graph, SPLIT[2])
        values = numpy_helper.to_array(weight)
        weight.CopyFrom(numpy_helper.from_array(values[:4], weight.name))  # (rank 4, out): not the factor's

    assert inspect_graph(edited(exported, tmp_path, wrong_shape), compressed)["layers_missing_split"] == [SPLIT[2]]


def test_a_transposed_initializer_is_still_a_weight(exported, compressed, tmp_path):
    """Exporters may store a Linear's (out, in) weight and transpose it in the graph: that is a constant."""

    def transposed(graph):
        weight = second_matmul_weight(graph, SPLIT[2])
        stored = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), weight.name + ".stored")
        graph.initializer.remove(weight)
        graph.initializer.append(stored)
        graph.node.insert(0, helper.make_node("Transpose", [stored.name], [weight.name], perm=[1, 0]))

    graph = inspect_graph(edited(exported, tmp_path, transposed), compressed)
    assert graph["layers_missing_split"] == [] and graph["split_matmul_pairs_found"] == 3


# --- the exporter's output goes to the log ---------------------------------------------------------------


class Spy(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_exporter_warnings_and_logs_reach_the_fwsvd_export_log_not_the_console(
    compressed, tokenizer, tmp_path, caplog, capfd
):
    """Opset 17 is below optimum's recommended 18 for BERT, so optimum logs a warning; the legacy exporter
    raises TracerWarnings. Both are on the 'fwsvd_export' log; neither is on the console, and optimum's
    own handlers get nothing meanwhile, yet are back in place afterwards."""
    spy = Spy()
    optimum = logging.getLogger("optimum")
    optimum.addHandler(spy)
    try:
        with caplog.at_level(logging.DEBUG, logger="fwsvd_export"):
            path = export_onnx(compressed, tokenizer, tmp_path / "onnx", "text-classification", opset=17)
        assert spy in optimum.handlers
    finally:
        optimum.removeHandler(spy)
    ours = [r for r in caplog.records if r.name == "fwsvd_export"]
    python_warnings = [r for r in ours if r.getMessage().startswith("exporter warning: TracerWarning")]
    assert python_warnings and all(r.levelno == logging.INFO for r in python_warnings)
    opset = [r for r in ours if "Opset 17 is lower than the recommended" in r.getMessage()]
    assert opset and opset[0].getMessage().startswith("exporter (optimum") and opset[0].levelno == logging.INFO
    assert spy.records == []
    console = capfd.readouterr()
    for text in ("TracerWarning", "Opset 17", "Warning"):
        assert text not in console.err and text not in console.out
    assert onnx.load(str(path), load_external_data=False).opset_import[0].version == 17


def test_an_exporter_failure_keeps_its_exception(compressed, tokenizer, tmp_path):
    handlers = logging.getLogger("optimum").handlers[:]
    with pytest.raises(ValueError, match="doesn't support task not-a-task"):
        export_onnx(compressed, tokenizer, tmp_path / "onnx", "not-a-task")
    assert logging.getLogger("optimum").handlers == handlers


# --- ort_io: what the tool cannot feed is a user error -----------------------------------------------------


def test_a_graph_input_the_tool_cannot_provide_is_a_fwsvd_error_naming_it_and_the_file(exported, tmp_path):
    """A real export whose weight was turned into a graph input: ONNX Runtime wants a value for it."""

    def weight_to_graph_input(graph):
        weight = second_matmul_weight(graph, SPLIT[1])
        graph.input.append(helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims)))
        graph.initializer.remove(weight)
        weight_to_graph_input.name = weight.name

    path = edited(exported, tmp_path, weight_to_graph_input)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(FwsvdError) as info:
        feeds(session, {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    assert f"'{weight_to_graph_input.name}'" in str(info.value) and str(path) in str(info.value)


def test_an_empty_cache_of_unknown_heads_is_a_fwsvd_error_naming_the_input_and_the_file(tmp_path):
    cache = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", "heads", "past", 8])
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", "heads", "past", 8])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])], "g", [ids, cache], [out]
    )
    path = tmp_path / "cache.onnx"
    onnx.save(helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(FwsvdError, match=r"'past_key_values\.0\.key'") as info:
        feeds(session, {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    assert str(path) in str(info.value)


# --- data.py: known problems are user errors, bugs keep their exception --------------------------------------


def records(tmp_path, path, **source):
    source = {"path": str(path), "text_column": "sentence", "label_column": "label", **source}
    recipe = {
        "model": {"path": str(tmp_path), "task": "text-classification"},
        "data": {"calibration": source, "evaluation": source},
    }
    return data.load_records(parse_recipe(recipe, "recipe.yaml", tmp_path), "calibration", ["sentence", "label"])


@pytest.mark.parametrize("helper_name, bug", [("_read_csv", KeyError("fieldnames")), ("_decode", TypeError("bad arg"))])
def test_a_bug_in_a_data_helper_propagates_as_itself(tmp_path, monkeypatch, helper_name, bug):
    path = tmp_path / "data.csv"
    path.write_text("sentence,label\nhello there,red\n")
    assert records(tmp_path, path) == [{"sentence": "hello there", "label": "red"}]

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(data, helper_name, broken)
    with pytest.raises(type(bug)) as info:
        records(tmp_path, path)
    assert not isinstance(info.value, FwsvdError) and info.value is bug


def test_a_line_the_csv_module_cannot_parse_is_a_user_error_naming_the_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("sentence,label\nfine,red\n" + "x" * (csv.field_size_limit() + 1) + ",blue\n")
    with pytest.raises(FwsvdError, match=re.escape(f"{path}:3: not valid CSV (field larger than field limit")):
        records(tmp_path, path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_a_user_error_naming_it(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("sentence,label\nhello there,red\n")
    path.chmod(0)
    try:
        with pytest.raises(FwsvdError, match=re.escape(f"{path}: cannot read the file")):
            records(tmp_path, path)
    finally:
        path.chmod(0o644)


# --- every process-wide change is scoped: each context manager restores what it found, raising or not ------


class Boom(Exception):
    pass


def logger_settings(logger: logging.Logger) -> tuple:
    return logger.handlers[:], logger.filters[:], logger.level, logger.propagate, logger.disabled


def test_library_output_to_log_restores_the_loggers_warnings_and_streams_it_found_even_when_the_block_raises():
    """A library that, meanwhile, configures the root logger and its own, changes the warnings filters and
    prints, then fails: its exception propagates and every one of those settings is as it was."""
    from fwsvd_export.stages.library_log import library_output_to_log

    lib, root = logging.getLogger("fwsvd-test-library"), logging.getLogger()
    kept_handler, kept_filter = logging.NullHandler(), logging.Filter("x")
    lib.addHandler(kept_handler)
    lib.addFilter(kept_filter)
    lib.setLevel(logging.INFO)
    try:
        before = (
            logger_settings(lib),
            logger_settings(root),
            warnings.filters[:],
            warnings.showwarning,
            sys.stdout,
            sys.stderr,
        )
        with pytest.raises(Boom):
            with library_output_to_log("test library", ("fwsvd-test-library",)):
                assert lib.handlers != [kept_handler] and not lib.propagate  # diverted meanwhile
                logging.basicConfig(level=logging.DEBUG)  # the root already has a (placeholder) handler: nothing
                root.addHandler(logging.StreamHandler())
                root.setLevel(logging.DEBUG)
                lib.addHandler(logging.StreamHandler())
                lib.setLevel(logging.DEBUG)
                lib.propagate = True
                warnings.simplefilter("error")
                print("printed by the library")
                raise Boom()
        assert (
            logger_settings(lib),
            logger_settings(root),
            warnings.filters[:],
            warnings.showwarning,
            sys.stdout,
            sys.stderr,
        ) == before
    finally:
        lib.removeHandler(kept_handler)
        lib.removeFilter(kept_filter)
        lib.setLevel(logging.NOTSET)


@pytest.mark.parametrize("configured", [False, True], ids=["unconfigured", "configured by the program"])
def test_the_console_log_is_the_commands_alone(configured):
    """`log_to_console` gives the 'fwsvd_export' log a stderr handler for the block unless the program using
    the package gave it one; on exit, raising or not, its handlers are those it had."""
    from fwsvd_export.stages.library_log import log_to_console

    tool = logging.getLogger("fwsvd_export")
    own = logging.NullHandler()
    if configured:
        tool.addHandler(own)
    try:
        before = logger_settings(tool)
        with pytest.raises(Boom), log_to_console():
            if configured:
                assert tool.handlers == [own]
            else:
                assert len(tool.handlers) == 1 and type(tool.handlers[0]) is logging.StreamHandler
            raise Boom()
        assert logger_settings(tool) == before
    finally:
        tool.removeHandler(own)


def _fd_identity(fd: int) -> tuple:
    found = os.fstat(fd)
    return found.st_dev, found.st_ino, found.st_mode


def test_native_stderr_goes_to_the_log_and_fd_2_comes_back_even_when_the_block_raises(caplog):
    from fwsvd_export.stages.validate import _stderr_to_log

    fd2, open_fds = _fd_identity(2), sorted(os.listdir("/proc/self/fd"))
    with caplog.at_level(logging.DEBUG, logger="fwsvd_export"):
        with pytest.raises(Boom), _stderr_to_log():
            assert _fd_identity(2) != fd2
            os.write(2, b"native code speaking on fd 2\n")
            raise Boom()
    assert _fd_identity(2) == fd2
    assert sorted(os.listdir("/proc/self/fd")) == open_fds  # the saved copy and the sink are closed
    assert "onnxruntime: native code speaking on fd 2" in caplog.text


def test_the_exporters_patches_of_torch_are_undone_even_when_the_export_raises():
    import torch.onnx

    from fwsvd_export.stages.export import _graph_without_weights, _shape_inference_without_weight_values

    export = torch.onnx.export
    infer = getattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", None)
    with pytest.raises(Boom), _graph_without_weights(), _shape_inference_without_weight_values():
        assert torch.onnx.export is not export
        raise Boom()
    assert torch.onnx.export is export
    assert getattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", None) is infer


@pytest.mark.parametrize("fails", [False, True], ids=["ends", "raises"])
def test_a_command_holds_its_signal_handlers_and_console_log_for_itself(fails):
    """The command line turns SIGTERM, SIGHUP and SIGQUIT into an interrupt and prints the tool's log while a
    command runs (here one added for the test); afterwards the process has the handlers it had. A signal the
    caller ignores stays ignored (under ``nohup`` SIGHUP is)."""
    import click
    from click.testing import CliRunner

    from fwsvd_export.cli import _TERMINATING, _raise_interrupted, main

    tool = logging.getLogger("fwsvd_export")
    seen = []

    @click.command("scope-probe")
    def probe():
        seen.append(({s: signal.getsignal(s) for s in _TERMINATING}, tool.handlers[:]))
        if fails:
            raise Boom()

    handlers, log_handlers = {s: signal.getsignal(s) for s in _TERMINATING}, tool.handlers[:]
    main.add_command(probe)
    try:
        result = CliRunner().invoke(main, ["scope-probe"])
    finally:
        main.commands.pop("scope-probe")
    assert isinstance(result.exception, Boom) if fails else result.exit_code == 0
    during, during_log = seen[0]
    assert during == {s: h if h is signal.SIG_IGN else _raise_interrupted for s, h in handlers.items()}
    assert len(during_log) == 1 and type(during_log[0]) is logging.StreamHandler
    assert {s: signal.getsignal(s) for s in _TERMINATING} == handlers and tool.handlers == log_handlers


JOIN = """
import sys
import torch.distributed as dist
from fwsvd_export.core import distributed
try:
    with distributed.joined() as joined:
        assert joined and dist.is_initialized() and distributed.world() == (int(sys.argv[1]), 2)
        assert distributed._start_group is not None
        distributed.start_together()
        raise RuntimeError("the block fails")
except RuntimeError as exc:
    assert str(exc) == "the block fails"
assert not dist.is_initialized() and distributed._start_group is None
print("left the group")
"""


def test_a_process_group_the_tool_joins_is_left_when_the_block_ends_even_raising(tmp_path):
    """Two processes described as torchrun describes them join, meet, fail, and are out of the group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "CUDA_VISIBLE_DEVICES")}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", JOIN, str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(
                base,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                CUDA_VISIBLE_DEVICES="",
                FWSVD_COLLECTIVE_TIMEOUT_S="60",
                FWSVD_START_TIMEOUT_S="60",
            ),
        )
        for rank in (0, 1)
    ]
    for run in runs:
        out, err = run.communicate(timeout=180)
        assert run.returncode == 0 and out == "left the group\n", err[-2000:]


def test_a_process_group_found_initialised_is_used_and_left_alone(tmp_path):
    import torch.distributed as dist

    from fwsvd_export.core import distributed

    with distributed.joined() as joined:  # not under torchrun: nothing to join, nothing changed
        assert not joined and not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        with pytest.raises(Boom), distributed.joined() as joined:
            assert joined and distributed.world() == (0, 1)
            distributed.start_together()  # a no-op: the tool made no start group
            raise Boom()
        assert dist.is_initialized() and dist.group.WORLD is group and distributed._start_group is None
    finally:
        dist.destroy_process_group()
