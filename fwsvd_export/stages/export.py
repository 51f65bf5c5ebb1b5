"""ONNX export through optimum's exporter, so the folder loads with ``optimum.onnxruntime``'s
``ORTModelFor*`` classes, plus a check that each factorized Linear really became two MatMuls."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

import onnx
from torch import nn

from ..core.modules import factorized_layers

ONNX_FILE = "model.onnx"
LOG = logging.getLogger("fwsvd_export")


def export_onnx(model: nn.Module, tokenizer, folder: Path, task: str, opset: Optional[int] = None) -> Path:
    """Write ``folder/model.onnx`` (with config and tokenizer) for the in-memory `model`. What the exporter
    prints, warns or logs goes to the 'fwsvd_export' log at debug level, not to the console."""
    from optimum.exporters.onnx import onnx_export_from_model

    folder.mkdir(parents=True, exist_ok=True)
    with _exporter_output_to_log():
        onnx_export_from_model(model, output=folder, task=task, opset=opset, do_validation=False)
    tokenizer.save_pretrained(folder)
    return folder / ONNX_FILE


class _Forward(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        LOG.debug("exporter (%s): %s", record.name, record.getMessage())


@contextlib.contextmanager
def _exporter_output_to_log() -> Iterator[None]:
    optimum = logging.getLogger("optimum")
    handler, propagate = _Forward(), optimum.propagate
    printed = io.StringIO()
    optimum.addHandler(handler)
    optimum.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
            warnings.simplefilter("always")
            yield
    finally:
        optimum.removeHandler(handler)
        optimum.propagate = propagate
        for warning in caught:
            LOG.debug("exporter warning: %s: %s", warning.category.__name__, warning.message)
        if printed.getvalue().strip():
            LOG.debug("exporter output: %s", printed.getvalue().strip())


def _module_path(node_name: str) -> str:
    """'/encoder/layer.0/attention/self/query/first/MatMul' -> 'encoder.layer.0.attention.self.query.first'"""
    return ".".join(node_name.strip("/").split("/")[:-1])


def _find(paths: dict[str, onnx.NodeProto], module: str) -> Optional[onnx.NodeProto]:
    """The node of `module`; the exporter may drop leading scopes (e.g. 'model.'), so match on a suffix."""
    if module in paths:
        return paths[module]
    return next((node for path, node in paths.items() if path and module.endswith("." + path)), None)


def _weight_shape(name: str, shapes: dict[str, tuple], producers: dict[str, onnx.NodeProto]) -> Optional[tuple]:
    """The shape of the initializer `name` is, or comes from through Transpose, Identity or Cast nodes;
    None for anything computed from the graph's inputs."""
    if name in shapes:
        return shapes[name]
    node = producers.get(name)
    if node is None or node.op_type not in ("Transpose", "Identity", "Cast") or not node.input:
        return None
    shape = _weight_shape(node.input[0], shapes, producers)
    return shape[::-1] if shape is not None and node.op_type == "Transpose" else shape


def inspect_graph(path: Path, model: nn.Module) -> dict:
    """Count matrix multiplies and find, for each factorized layer of `model`, its two (MatMul, or Gemm
    where the exporter flattened the input to 2-D) with weights of the factor shapes."""
    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    products = {_module_path(n.name): n for n in graph.node if n.op_type in ("MatMul", "Gemm")}
    layers = {}
    for name, module in factorized_layers(model).items():
        found = {}
        for part, dims in (("first", (module.in_features, module.rank)), ("second", (module.rank, module.out_features))):
            node = _find(products, f"{name}.{part}")
            weight_shapes = [_weight_shape(i, shapes, producers) for i in node.input] if node is not None else []
            found[part] = dims in weight_shapes or dims[::-1] in weight_shapes  # a weight initializer of the factor's shape
        layers[name] = found["first"] and found["second"]
    ops = Counter(n.op_type for n in graph.node)
    return {
        "matmul_nodes": ops.get("MatMul", 0),
        "gemm_nodes": ops.get("Gemm", 0),
        "factorized_layers": len(layers),
        "split_matmul_pairs_found": sum(layers.values()),
        "layers_missing_split": [name for name, ok in layers.items() if not ok],
    }
