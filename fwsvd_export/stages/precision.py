"""Deployment precisions of an exported fp32 graph, made with ONNX Runtime's own tools: int8 for the
CPU (dynamic weight quantization, per-channel where the operator allows, or static QDQ calibrated on
the recipe's calibration batches), int4 for the CPU (4-bit blockwise weights in ONNX Runtime's
``MatMulNBits`` and embedding tables in its ``GatherBlockQuantized``, the weight-only format decoders
ship in; activations stay float) and fp16 for CUDA
(LayerNorm, Softmax and the other ops ONNX Runtime's converter keeps in fp32 stay fp32; inputs and
outputs keep their types).

Each variant is a folder beside its source (``onnx/compressed`` -> ``onnx/compressed-int8``) with the
same config and tokenizer files, so optimum's ``ORTModelFor*`` loads it like the fp32 one.

The recipe checks its precision names against this registry, so the module is light to import: onnx, ONNX
Runtime and the exporter are imported where a variant is made, and it imports nothing that reads a recipe
(tests/test_layers.py holds it to that).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SpecError

if TYPE_CHECKING:
    import onnxruntime as ort

    from ..core.batch import Batch


@dataclass(frozen=True)
class Precision:
    name: str
    providers: tuple[str, ...]  # where the variant is meant to run, so where it is validated
    rtol: float  # parity: ||output - fp32 source's output|| / ||fp32 source's output|| allowed (Frobenius)


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", ("cpu", "cuda"), 0.0),  # validated by the recipe's own atol and rtol
        # Well-behaved int8 hidden states stay well under half their norm away; a broken quantization lands
        # about a whole norm away, so half a norm tells them apart.
        Precision("int8", ("cpu",), 0.5),
        Precision("fp16", ("cuda",), 0.02),
        # 4-bit weights in blocks of INT4_BLOCK along the input: more error than int8, still well under half
        # the output norm; a layer quantized wrongly gives about a whole norm.
        Precision("int4", ("cpu",), 0.5),
    )
}


def check_runs_on(precision: str, provider: str) -> None:
    """The one rule of where a precision runs: `precision` is in the registry and made for `provider`. A
    refusal names the field at fault as CompressionSpec calls it (the caller adds the section)."""
    if precision not in PRECISIONS:
        raise SpecError("latency_precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    made_for = PRECISIONS[precision].providers
    if provider not in made_for:
        raise SpecError(
            "latency_provider", f"{provider!r} does not run {precision}, which is made for {' and '.join(made_for)}"
        )


QUANTIZED = ("int8", "int4")  # made by a quantizer, which reads weights only as initializers
INT4_BLOCK = 32  # weights per scale: ONNX Runtime's smallest common block, the most accurate
# Ops kept in fp32 in the fp16 graph, beside the converter's own list: normalisations and softmax.
FP16_KEEP = ["LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "Softmax"]


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over the recipe's calibration batches."""

    def __init__(self, session: ort.InferenceSession, batches: list[Batch]) -> None:
        from .ort_io import feeds

        self._feeds: Iterator[dict] = (feeds(session, b.inputs) for b in batches)

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def _copy_side_files(source: Path, target: Path) -> None:
    """config.json, tokenizer files: everything but the graph and its weights."""
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("model.onnx"):
            shutil.copy2(path, target / path.name)


def _int8(source: Path, target: Path, mode: str, calibration: list[Batch], external: bool) -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode == "dynamic":
        # reduce_range (7-bit weights): without it, per-channel int8 MatMuls of the factorized graph saturate
        # on x86 CPUs without VNNI and the model collapses (benchmarks/logs/precisions.md).
        quantize_dynamic(
            source,
            target,
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=external,
        )
        return
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    quantize_static(
        source,
        target,
        _Batches(session, calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        use_external_data_format=external,
    )


def _fp16(source: Path, target: Path, external: bool) -> None:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(
        onnx.load(str(source)), keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_KEEP
    )
    OnnxModel(model).topological_sort()  # the converter appends the input Casts last: a graph ONNX rejects
    onnx.save(model, str(target), save_as_external_data=external, location=target.name + "_data")


def _int4(source: Path, target: Path, external: bool) -> None:
    """Every MatMul with a constant weight (both factors of a split layer, the dense ones kept) becomes a
    MatMulNBits with symmetric 4-bit blocks; accuracy level 4 lets the CPU kernel compute in int8. Every
    Gather of a constant table (the token embedding, the largest matrix of a small decoder, kept in fp32
    otherwise) becomes a GatherBlockQuantized with 4-bit blocks along the hidden axis."""
    import numpy as np
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(
        block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=4, op_types_to_quantize=("MatMul", "Gather")
    )
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=config)
    with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero block (a padding row): 0/0, stored as 0
        quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external)


def make_variant(
    fp32_graph: Path, precision: str, int8_mode: str = "dynamic", calibration: list[Batch] | None = None
) -> Path:
    """Write `precision`'s copy of `fp32_graph` (``.../NAME/model.onnx``) to ``.../NAME-PRECISION/``. A
    source whose weights sit beside it (a large model's) gives a copy whose weights sit beside it too, in
    the file name each tool writes: embedded, a graph over 2 GB could not be saved at all. The quantizers
    read an untied copy of a graph with a tied embedding (`untied_copy`), so its output projection is
    quantized like every other Linear; the copy is removed afterwards."""
    from .export import untied_copy  # here, as the libraries: the recipe reads this module's registry
    from .library_log import library_output_to_log

    folder = fp32_graph.parent.with_name(f"{fp32_graph.parent.name}-{precision}")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / fp32_graph.name
    external = fp32_graph.with_name(fp32_graph.name + "_data").exists()
    scratch = folder / ".untied"
    scratch.mkdir()  # new: only this call's files are in it
    try:
        source = fp32_graph
        if precision in QUANTIZED and untied_copy(fp32_graph, scratch / fp32_graph.name):
            source = scratch / fp32_graph.name
        makers: dict[str, Callable[[], None]] = {
            "int8": lambda: _int8(source, target, int8_mode, calibration or [], external),
            "fp16": lambda: _fp16(source, target, external),
            "int4": lambda: _int4(source, target, external),
        }
        with library_output_to_log(f"{precision} conversion", ("onnxruntime",)):
            makers[precision]()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _copy_side_files(fp32_graph.parent, folder)
    return target
