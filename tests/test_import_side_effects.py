"""Using the package changes no global setting of the libraries around it."""
import subprocess
import sys

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
    points = [{"method": "kfac", "model_kept_ratio": r, "compressed_torch": 0.9 - r / 10, "original": 0.95, "metric": "accuracy",
               "providers": {"cpu": {"compressed_ms": 10 * r, "metric": 0.9, "dense_ms": 12.0}}} for r in (0.3, 0.6)]
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
    graph = helper.make_graph([helper.make_node("Add", ["input_ids", "pixel_values"], ["y"])], "g",
                              [helper.make_tensor_value_info(n, TensorProto.INT64, [1, 2]) for n in ("input_ids", "pixel_values")],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 2])])
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
