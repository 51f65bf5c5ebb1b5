"""ONNX export through optimum's exporter, so the folder loads with ``optimum.onnxruntime``'s
``ORTModelFor*`` classes, plus a check that each factorized Linear really became two MatMuls."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
from torch import nn

from ..core.lowrank import nonfinite
from ..core.modules import factorized_layers
from ..errors import FwsvdError
from .library_log import library_output_to_log

ONNX_FILE = "model.onnx"
T = TypeVar("T")


def export_onnx(model: nn.Module, preprocessor, folder: Path, task: str, opset: int | None = None) -> Path:
    """Write ``folder/model.onnx`` (with config and preprocessor: tokenizer, image processor, ...) for the
    in-memory `model`. What the exporter
    prints, warns or logs goes to the 'fwsvd_export' log (see `library_output_to_log`), not to the console."""
    from optimum.exporters.onnx import onnx_export_from_model

    folder.mkdir(parents=True, exist_ok=True)
    # no_post_process: optimum's own post-processing holds the whole graph in memory 3 times
    with (
        library_output_to_log("exporter", EXPORTER_LOGGERS),
        _graph_without_weights() as inputs,
        _shape_inference_without_weight_values(),
    ):
        onnx_export_from_model(
            model,
            output=folder,
            task=task,
            opset=opset,
            do_validation=False,
            no_post_process=True,
            do_constant_folding=False,
        )
    _store_weights(folder / ONNX_FILE, model, inputs)
    preprocessor.save_pretrained(folder)
    return folder / ONNX_FILE


@contextmanager
def _graph_without_weights() -> Iterator[list[str]]:
    """Have optimum's call of ``torch.onnx.export`` write the graph alone (``export_params=False``: each weight
    becomes a graph input named as in the model's state dict); yields the names of the model's own inputs,
    as optimum passes them. With its weights, torch's TorchScript exporter (the one optimum uses) holds a
    graph under 2 GB three times in memory beside the model (built, serialized, copied out: the largest part
    of a 0.5B run's peak: benchmarks/logs/scaling.md), and optimum loads a graph over 2 GB whole to save it again.

    Scoped: ``torch.onnx.export`` is the function found there again on exit, the block raising or not, and
    `export_onnx` holds this around optimum's call alone. It is a module attribute, so another thread
    exporting meanwhile would get the wrapper too: the tool exports from one thread."""
    import torch.onnx

    export, inputs = torch.onnx.export, []

    def without_weights(*args, **kwargs):
        inputs.extend(kwargs.get("input_names") or ())
        return export(*args, **{**kwargs, "export_params": False})

    torch.onnx.export = without_weights
    try:
        yield inputs
    finally:
        torch.onnx.export = export


@contextmanager
def _shape_inference_without_weight_values() -> Iterator[None]:
    """Run torch's graph-wide ONNX shape inference (twice per export) without the weights' values: given
    them, the 0.5B decoder's dense export took about twice the memory and time (benchmarks/logs/scaling-memory.md,
    "Shape inference without the weights' values"). A weight's shape is in its traced
    type, which is all the inference needs: the graph is byte for byte the same (tests/test_causal_lm.py).
    Scoped as `_graph_without_weights`: torch's pass is the one found there again on exit."""
    import torch

    infer = getattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", None)
    if infer is None:  # a torch without this pass has nothing to patch
        yield
        return

    def without_values(graph, params_dict, *rest):
        return infer(graph, {}, *rest)

    torch._C._jit_pass_onnx_graph_shape_type_inference = without_values
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = infer


def _store_weights(path: Path, model: nn.Module, inputs: Collection[str]) -> None:
    """Make each graph input of the graph at `path` that is not one of the model's `inputs` an initializer
    holding `model`'s own tensor of that state-dict name, store each Linear's weight the way its MatMul reads
    it (`_fold_transposes`) and rewrite the file, the weights streamed to ``model.onnx_data`` one tensor at a
    time when they reach EXTERNAL_BYTES: the host never holds a second copy of them. A weight that is not
    finite is refused, named: no command writes a graph that computes NaN."""
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import TorchTensor

    graph_model = ir.load(path)
    graph, state = graph_model.graph, model.state_dict()
    weights = [v for v in graph.inputs if v.name not in inputs]
    for value in weights:
        tensor = state.get(value.name)
        if tensor is None or value.shape is None or tuple(value.shape) != tuple(tensor.shape):
            found = "no such tensor" if tensor is None else f"a tensor of shape {tuple(tensor.shape)}"
            raise RuntimeError(
                f"{path}: the exporter left graph input {value.name!r} (shape {value.shape}) that is "
                f"not a model input, and the model's state dict has {found}"
            )
        bad = nonfinite(tensor.detach())
        if bad:  # the graph would compute NaN or inf wherever the tensor reaches
            raise FwsvdError(
                f"the model's '{value.name}' holds {bad}: an ONNX graph is written with finite weights only"
            )
        graph.inputs.remove(value)
        value.const_value = TorchTensor(tensor.detach(), name=value.name)
        graph.register_initializer(value)
    _fold_transposes(graph_model, shared=False)
    _rewrite(graph_model, path)


def untied_copy(path: Path, target: Path) -> bool:
    """Write to `target` a copy of the graph at `path` in which a weight that other nodes read besides its
    Transpose (a tied embedding) gets a transposed copy of its own for the Transpose's readers: ONNX
    Runtime's quantizers only quantize a MatMul whose weight is an initializer, and would leave a tied
    output projection, the largest matrix of a small decoder, in fp32. False, writing nothing, when no
    weight is shared so."""
    import onnx_ir as ir

    model = ir.load(path)
    if not _fold_transposes(model, shared=True)["folded"]:
        return False
    _save(model, target, external=_external(model, path))
    return True


def _fold_transposes(model, shared: bool) -> dict[str, int]:
    """Replace, in the onnx_ir `model`, each Transpose of a 2-D weight by the weight's transpose (a lazy
    initializer, computed when the file is written, one tensor at a time). The exporter runs without
    constant folding, which would make each transposed weight a tensor the model does not have (and held
    every weight a second time), so each weight reaches its MatMul through a Transpose. A weight other nodes
    read too keeps its Transpose ("kept"), so a tied embedding (Gathered as it is, multiplied transposed by
    the output projection) is stored once and ONNX Runtime folds the Transpose when a session opens; with
    `shared` it stays for those nodes beside its transposed copy."""
    import onnx_ir as ir

    graph = model.graph
    counts = {"folded": 0, "kept": 0}
    for node in list(graph):
        weight = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if (
            weight is None
            or not weight.is_initializer()
            or weight.is_graph_input()
            or weight.const_value is None
            or weight.shape is None
            or len(weight.shape) != 2
            or node.outputs[0].is_graph_output()
        ):
            continue
        alone = len(weight.uses()) == 1
        if not alone and not shared:
            counts["kept"] += 1
            continue
        tensor, name = weight.const_value, f"{weight.name}.transposed"
        shape = ir.Shape(list(tensor.shape)[::-1])
        folded = graph.initializers.get(name)  # one copy however many Transposes read the weight
        if folded is None:
            folded = ir.Value(
                name=name,
                shape=shape,
                type=ir.TensorType(tensor.dtype),
                const_value=ir.LazyTensor(
                    lambda t=tensor: ir.tensor(np.ascontiguousarray(t.numpy().T)), tensor.dtype, shape, name=name
                ),
            )
            graph.register_initializer(folded)
        node.outputs[0].replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        if alone:
            graph.initializers.pop(weight.name)
        counts["folded"] += 1
    return counts


EXTERNAL_BYTES = 2**30  # a graph whose weights reach this is rewritten with them beside it, in model.onnx_data


def _rewrite(model, path: Path) -> None:
    """Save `model` over `path` through a new sibling folder, then move the new files into place. Weights go
    to an external data file when the graph had one or they reach EXTERNAL_BYTES: written there they are
    streamed, where embedding them would serialize the whole graph twice more in memory."""
    scratch = path.parent / f".{path.name}.rewrite"
    scratch.mkdir()  # new: only this call's files are in it
    try:
        _save(model, scratch / path.name, external=_external(model, path))
        for written in scratch.iterdir():
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _external(model, path: Path) -> bool:
    """Whether `model`, read from `path`, is saved with its weights beside it: the graph had a data file,
    or its weights reach EXTERNAL_BYTES."""
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    return path.with_name(path.name + "_data").exists() or weights >= EXTERNAL_BYTES


def _save(model, target: Path, external: bool) -> None:
    """Save the onnx_ir `model` at `target`, its weights in ``<target>_data`` when `external`."""
    import onnx_ir as ir

    for value in model.graph.initializers.values():
        # No value_info for weights (the tensors carry their type and shape), as the exporter writes them:
        # ONNX Runtime's quantizer transposes a Gemm's weight in place and a stale shape beside it fails.
        value.shape, value.type = None, None
    for node in model.graph.all_nodes():
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                # A Constant kept in the data file (optimum puts those of 100 bytes or more there for a graph
                # over 2 GB, or with FORCE_ONNX_EXTERNAL_DATA=1): saving moves initializers only, so it would
                # keep its offset into the old file.
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy(), name=attr.value.name))
    ir.save(model, target, external_data=target.name + "_data" if external else None)


# Libraries whose loggers speak during an export; each keeps a console handler of its own.
EXPORTER_LOGGERS = ("optimum", "transformers", "torch.onnx")


def module_path(node_name: str) -> str:
    """'/encoder/layer.0/attention/self/query/first/MatMul' -> 'encoder.layer.0.attention.self.query.first'"""
    return ".".join(node_name.strip("/").split("/")[:-1])


def find_module(paths: dict[str, T], module: str) -> T | None:
    """What `paths` (module path -> value, from node names) holds for `module`; the exporter may drop
    leading scopes (e.g. 'model.'), so match on a suffix."""
    if module in paths:
        return paths[module]
    return next((node for path, node in paths.items() if path and module.endswith("." + path)), None)


def _weight_shape(name: str, shapes: dict[str, tuple], producers: dict[str, onnx.NodeProto]) -> tuple | None:
    """The shape of the constant `name`: an initializer, a Constant node's tensor, or either of those through
    Transpose (a reversed shape), Identity or Cast nodes; None for anything computed from the graph's inputs."""
    if name in shapes:
        return shapes[name]
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "Constant":
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        return tuple(value.dims) if value is not None else None
    if node.op_type not in ("Transpose", "Identity", "Cast") or not node.input:
        return None
    shape = _weight_shape(node.input[0], shapes, producers)
    if shape is None or node.op_type != "Transpose":
        return shape
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None) or list(range(len(shape)))[::-1]
    return tuple(shape[i] for i in perm)


def _is_factor(
    node: onnx.NodeProto | None,
    in_features: int,
    out_features: int,
    shapes: dict[str, tuple],
    producers: dict[str, onnx.NodeProto],
) -> bool:
    """Whether `node` multiplies by a constant (in_features x out_features) matrix: its B input is an
    initializer (or a Constant, or one of those transposed) of that shape as the node uses it. A MatMul or
    Gemm whose weight comes from a graph input or from computed values is not a factor."""
    if node is None or len(node.input) < 2:
        return False
    shape = _weight_shape(node.input[1], shapes, producers)
    if node.op_type == "Gemm" and shape is not None and any(a.name == "transB" and a.i for a in node.attribute):
        shape = shape[::-1]
    return shape == (in_features, out_features)


def inspect_graph(path: Path, model: nn.Module) -> dict:
    """Count matrix multiplies and find, for each factorized layer of `model`, its two (MatMul, or Gemm
    where the exporter flattened the input to 2-D), each with a constant weight of its factor's shape."""
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {i.name for i in graph.input}  # an initializer also listed as a graph input can be overridden
    shapes = {init.name: tuple(init.dims) for init in graph.initializer if init.name not in inputs}
    producers = {out: n for n in graph.node for out in n.output}
    products = {module_path(n.name): n for n in graph.node if n.op_type in ("MatMul", "Gemm")}
    layers = {}
    for name, module in factorized_layers(model).items():
        layers[name] = _is_factor(
            find_module(products, f"{name}.first"), module.in_features, module.rank, shapes, producers
        ) and _is_factor(find_module(products, f"{name}.second"), module.rank, module.out_features, shapes, producers)
    ops = Counter(n.op_type for n in graph.node)
    return {
        "matmul_nodes": ops.get("MatMul", 0),
        "gemm_nodes": ops.get("Gemm", 0),
        "factorized_layers": len(layers),
        "split_matmul_pairs_found": sum(layers.values()),
        "layers_missing_split": [name for name, ok in layers.items() if not ok],
    }
