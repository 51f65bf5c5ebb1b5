"""Precision variants: int8 (CPU) and fp16 (CUDA) copies of the dense and the compressed graph, made by
ONNX Runtime's own tools, loadable by optimum, and validated against their fp32 source."""

import json
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import run
from fwsvd_export.stages import export
from fwsvd_export.stages.export import export_onnx
from fwsvd_export.stages.latency import in_turn
from fwsvd_export.stages.ort_io import feeds
from fwsvd_export.stages.precision import PRECISIONS, make_variant

from conftest import write_recipe

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out


@pytest.fixture(scope="module")
def precision_run(tmp_path_factory, bert_dir, data_dir):
    folder = tmp_path_factory.mktemp("precisions")
    source = {"path": str(data_dir / "labelled.jsonl"), "text_column": "sentence", "label_column": "label"}
    recipe = {
        "model": {"path": str(bert_dir), "task": "text-classification"},
        "data": {
            "calibration": dict(source, max_samples=32),
            "evaluation": dict(source),
            "max_length": 32,
            "batch_size": 8,
        },
        "compression": {"method": "kfac", "target": [r"encoder\.layer\.\d+\."], "ratio": 0.5},
        "export": {"precisions": ["fp32", "int8", "fp16"]},
        "validation": {
            "providers": [{"name": "cpu", "required": True}, {"name": "cuda"}],
            "max_metric_loss": 0.2,
            "max_quantization_loss": 0.1,
            "latency": {"shapes": ["1x16"], "warmup": 1, "runs": 3, "one_at_a_time": True},
        },
    }
    return run(load_recipe(write_recipe(folder, recipe)), folder / "out", progress=False)


def test_every_artifact_gets_its_int8_and_fp16_folder_beside_the_fp32_one(precision_run):
    onnx_dir = precision_run.output / "onnx"
    assert sorted(p.name for p in onnx_dir.iterdir()) == [
        "compressed",
        "compressed-fp16",
        "compressed-int8",
        "dense",
        "dense-fp16",
        "dense-int8",
    ]
    for name in ("dense", "compressed"):
        fp32 = onnx.load(str(onnx_dir / name / "model.onnx"))
        int8 = onnx.load(str(onnx_dir / f"{name}-int8" / "model.onnx"))
        fp16 = onnx.load(str(onnx_dir / f"{name}-fp16" / "model.onnx"))
        assert {"MatMulInteger", "DynamicQuantizeLinear"} <= {n.op_type for n in int8.graph.node}
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer)
        assert [i.type for i in fp16.graph.input] == [i.type for i in fp32.graph.input]  # io types kept
        for graph in (int8, fp16):
            onnx.checker.check_model(graph)  # valid ONNX (nodes in order), not only loadable by ONNX Runtime
        assert (onnx_dir / f"{name}-int8" / "model.onnx").stat().st_size < 0.6 * (
            onnx_dir / name / "model.onnx"
        ).stat().st_size
        assert (onnx_dir / f"{name}-int8" / "config.json").is_file()


def test_the_int8_graph_loads_in_optimum_and_agrees_with_its_fp32_source(precision_run):
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    folder = precision_run.output / "onnx" / "compressed-int8"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(["the red fox runs over the hill", "a quiet blue lake"], padding=True, return_tensors="pt")
    quantized = ORTModelForSequenceClassification.from_pretrained(folder, provider="CPUExecutionProvider")(
        **inputs
    ).logits
    session = ort.InferenceSession(
        str(precision_run.output / "onnx" / "compressed" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    fp32 = session.run(["logits"], feeds(session, dict(inputs)))[0]
    error = np.linalg.norm(quantized.detach().numpy() - fp32) / np.linalg.norm(fp32)
    assert 0 < error < 0.5  # quantized (not a copy), and close


def test_the_report_validates_each_variant_where_it_runs_and_states_the_tolerance(precision_run):
    report = json.loads((precision_run.output / "report.json").read_text())
    variants = report["validation"]["variants"]
    assert sorted(variants) == ["compressed-fp16", "compressed-int8", "dense-fp16", "dense-int8"]
    int8 = variants["compressed-int8"]
    assert int8["tolerance_rtol"] == 0.5 and int8["cpu"]["status"] == "measured"
    assert int8["cpu"]["parity"]["relative_error"] <= 0.5 and int8["cpu"]["latency"][0]["speedup_vs_dense_fp32"] > 0
    assert "cpu" not in variants["compressed-fp16"]  # fp16 is for CUDA
    if not report["validation"]["providers"]["cuda"].get("status") == "passed":
        assert variants["compressed-fp16"]["cuda"]["status"] == "unavailable"
    names = [c["name"] for c in report["validation"]["checks"]]
    assert "cpu: compressed-int8 parity" in names and "cpu: compressed-int8 metric loss" in names
    table = (precision_run.output / "report.md").read_text()
    assert "## Precisions" in table and "| dense-int8 | cpu |" in table and "| compressed-int8 | cpu |" in table


def test_every_artifact_is_timed_in_the_same_interleaved_rounds_as_dense_fp32(precision_run):
    cpu = precision_run.report.to_dict()["validation"]["providers"]["cpu"]
    method = cpu["latency_method"]
    assert method["artifacts"] == ["dense", "compressed", "dense-int8", "compressed-int8"]  # fp16 is for CUDA
    assert method["interleaved_rounds"] == 3 and method["runs"] == 3  # rounds are capped at the runs
    assert method["spinning_after_run"] is False  # no session's idle threads take the cores of the next one's run
    assert method["one_at_a_time"] is True and method["one_at_a_time_asked"] is True  # each turn reopens its graph
    point = cpu["latency"][0]
    assert point["dense"]["runs"] == point["compressed"]["runs"] == 3
    assert point["speedup"] == point["dense"]["median_ms"] / point["compressed"]["median_ms"]
    for name in ("dense-int8", "compressed-int8"):
        timing = precision_run.report.to_dict()["validation"]["variants"][name]["cpu"]["latency"][0]
        assert timing["p90_ms"] >= timing["median_ms"] > 0
        assert timing["speedup_vs_dense_fp32"] == point["dense"]["median_ms"] / timing["median_ms"]


def test_graphs_too_big_to_sit_side_by_side_are_timed_one_session_at_a_time(precision_run):
    onnx_dir = precision_run.output / "onnx"
    names = ["dense", "compressed", "dense-int8", "compressed-int8"]
    alive, opened = [], []

    def opener(name):
        def open_one():
            assert all(ref() is None for ref in alive), "a session of an earlier turn is still held"
            session = ort.InferenceSession(str(onnx_dir / name / "model.onnx"), providers=["CPUExecutionProvider"])
            alive.append(weakref.ref(session))
            opened.append(name)
            return session

        return open_one

    config = AutoConfig.from_pretrained(onnx_dir / "dense")  # what the timing inputs are sized by
    timings = in_turn({name: opener(name) for name in names}, ["1x8", "2x8"], config, warmup=1, runs=5, rounds=2)
    assert opened == names + names[1:] + names[:1]  # every artifact each round, the first one rotating
    for name in names:
        for shape in ("1x8", "2x8"):
            assert timings[name][shape]["runs"] == 5  # 3 in the first round, 2 in the second
            assert timings[name][shape]["p90_ms"] >= timings[name][shape]["median_ms"] > 0


def test_graphs_are_timed_one_at_a_time_by_default_only_when_side_by_side_they_would_crowd_the_memory(
    precision_run, monkeypatch
):
    from fwsvd_export.config import LatencySpec
    from fwsvd_export.stages import validate

    onnx_dir = precision_run.output / "onnx"
    graphs = {name: onnx_dir / name / "model.onnx" for name in ("dense", "compressed", "dense-int8", "compressed-int8")}
    assert not validate.one_at_a_time(LatencySpec(), graphs)  # "auto": a few MB fit beside each other
    monkeypatch.setattr(
        validate,
        "SIDE_BY_SIDE_SHARE",
        sum(validate.graph_bytes(g.parent) for g in graphs.values()) / validate._available_bytes() / 2,
    )  # as if the host had room for half of them
    assert validate.one_at_a_time(LatencySpec(), graphs)
    assert not validate.one_at_a_time(LatencySpec(one_at_a_time=False), graphs)  # the recipe's word stands
    assert validate.one_at_a_time(LatencySpec(one_at_a_time=True), {"dense": graphs["dense"]})


def test_a_containers_memory_limit_bounds_the_memory_counted_available(tmp_path):
    from fwsvd_export.stages.validate import _available_bytes

    host = _available_bytes(tmp_path / "no-cgroup")  # the host's MemAvailable alone
    (tmp_path / "memory.max").write_text("max\n")  # no limit set
    (tmp_path / "memory.current").write_text(f"{2**30}\n")
    assert abs(_available_bytes(tmp_path) - host) < 2**28  # the host's figure moves a little between readings
    (tmp_path / "memory.max").write_text(f"{3 * 2**30}\n")  # a 3 GiB container that uses 1 GiB
    assert host < 2**31 or _available_bytes(tmp_path) == 2 * 2**30


def test_the_report_says_when_dense_int8_beats_a_compressed_artifact_on_size_or_latency(precision_run):
    import copy

    from fwsvd_export.stages.report import verdicts

    report = copy.deepcopy(precision_run.report)
    val = report.validation
    dense, ours = val.variants["dense-int8"], val.variants["compressed-int8"]
    dense["cpu"]["metric"] = ours["cpu"]["metric"]  # as accurate
    dense["bytes"], dense["cpu"]["latency"][0]["median_ms"] = (
        ours["bytes"] + 1,
        0.5 * ours["cpu"]["latency"][0]["median_ms"],
    )
    said = verdicts(report)
    assert any(
        v.startswith("dense-int8 beats compressed-int8 on cpu (latency)") and "unless size decides" in v for v in said
    )
    dense["cpu"]["latency"][0]["median_ms"] = 2 * ours["cpu"]["latency"][0]["median_ms"]  # slower and larger: no win
    assert not any("beats compressed-int8" in v for v in verdicts(report))
    dense["bytes"] = ours["bytes"] - 1  # smaller, as accurate: a win on size
    assert any(
        v.startswith("dense-int8 beats compressed-int8 on cpu (size)") and "unless latency decides" in v
        for v in verdicts(report)
    )
    dense["cpu"]["latency"][0]["median_ms"] = 0.5 * ours["cpu"]["latency"][0]["median_ms"]  # smaller and faster
    assert any(
        v.startswith("dense-int8 beats compressed-int8 on cpu (size and latency)") and v.endswith("ship dense-int8")
        for v in verdicts(report)
    )
    dense["cpu"]["metric"] = ours["cpu"]["metric"] - 0.01  # less accurate: never a win
    assert not any("beats compressed-int8" in v for v in verdicts(report))


def test_the_report_never_says_ship_dense_int8_while_a_compressed_artifact_beats_it(precision_run):
    """The demo's case: dense int8 beats the compressed fp32 graph, not the compressed int8 one, which is the pick."""
    import copy

    from fwsvd_export.stages.report import _precisions, verdicts

    report = copy.deepcopy(precision_run.report)
    val = report.validation
    dense, ours = val.variants["dense-int8"], val.variants["compressed-int8"]
    fp32 = val.providers["cpu"]
    dense["cpu"]["metric"] = ours["cpu"]["metric"] = fp32["metric"]
    dense["bytes"], dense["cpu"]["latency"][0]["median_ms"] = (
        ours["bytes"] + 1,
        2 * ours["cpu"]["latency"][0]["median_ms"],
    )
    fp32["latency"][0]["compressed"]["median_ms"] = 2 * dense["cpu"]["latency"][0]["median_ms"]
    report.sizes.onnx_compressed_bytes = 2 * dense["bytes"]
    said = verdicts(report)
    assert any(v.startswith("dense-int8 beats compressed-fp32 on cpu (size and latency)") for v in said)
    assert all(v.endswith("prefer dense-int8 to compressed-fp32") for v in said), said
    assert "- the artifact to ship: **compressed-int8** in " in "\n".join(_precisions(report))


def test_static_int8_is_calibrated_qdq(tmp_path, classifier_recipe):
    classifier_recipe["export"] = {"precisions": ["fp32", "int8"], "int8_mode": "static"}
    classifier_recipe["validation"]["max_quantization_loss"] = 1.0
    result = run(load_recipe(write_recipe(tmp_path, classifier_recipe)), tmp_path / "out", progress=False)
    ops = {n.op_type for n in onnx.load(str(result.output / "onnx" / "compressed-int8" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "MatMulInteger" not in ops
    assert result.report.to_dict()["validation"]["variants"]["compressed-int8"]["cpu"]["status"] == "measured"


def test_fp32_must_stay_among_the_precisions(tmp_path, classifier_recipe):
    from fwsvd_export.errors import FwsvdError

    classifier_recipe["export"] = {"precisions": ["int8"]}
    with pytest.raises(FwsvdError, match="'export.precisions' must include fp32"):
        load_recipe(write_recipe(tmp_path, classifier_recipe))


def test_a_decoder_gets_int8_and_4_bit_matmulnbits_copies_validated_on_the_cpu(tmp_path, lm_recipe):
    lm_recipe["export"] = {"precisions": ["fp32", "int8", "int4"]}
    result = run(load_recipe(write_recipe(tmp_path, lm_recipe)), tmp_path / "out", progress=False)
    four_bit = {}
    for name in ("dense", "compressed"):
        graph = onnx.load(str(result.output / "onnx" / f"{name}-int4" / "model.onnx")).graph
        weights = {i.name for i in graph.initializer}
        float_weights = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
        assert float_weights == []  # every MatMul by a weight is 4-bit (attention's MatMuls stay float)
        four_bit[name] = sum(n.op_type == "MatMulNBits" for n in graph.node)
    assert four_bit["dense"] >= 7 * 2  # the 7 Linears of each of the 2 decoder layers (and the head)
    assert four_bit["compressed"] > four_bit["dense"]  # both factors of each split layer
    for name in ("dense-int8", "compressed-int8"):
        ops = {n.op_type for n in onnx.load(str(result.output / "onnx" / name / "model.onnx")).graph.node}
        assert "MatMulInteger" in ops and "MatMulNBits" not in ops
        int8 = result.report.to_dict()["validation"]["variants"][name]["cpu"]
        assert int8["status"] == "measured" and 0 < int8["parity"]["relative_error"] <= 0.5
        timing = int8["latency"][0]
        assert timing["speedup_vs_dense_fp32"] > 0 and timing["decode_speedup_vs_dense_fp32"] > 0  # prefill and decode
    int4 = result.report.to_dict()["validation"]["variants"]["compressed-int4"]["cpu"]
    assert int4["status"] == "measured" and 0 < int4["parity"]["relative_error"] <= 0.5
    checks = {c["name"]: c for c in result.report.to_dict()["validation"]["checks"]}
    assert checks["cpu: compressed-int4 parity"]["passed"] and "cpu: compressed-int4 metric loss" in checks


def _logits(graph, ids) -> np.ndarray:
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds(session, {"input_ids": ids}))[0]


def test_a_graph_with_its_weights_beside_it_gets_variants_with_their_weights_beside_them(
    tmp_path, monkeypatch, tokenizer
):
    """A large model's graph keeps its weights in a data file (the export's way from 1 GiB of weights,
    forced here on a tiny decoder); its int8, int4 and fp16 copies do too, where embedding them could not be
    saved past 2 GB, and the CPU ones run and agree with the fp32 graph."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    monkeypatch.setattr(export, "EXTERNAL_BYTES", 0)
    fp32 = export_onnx(model, tokenizer, tmp_path / "compressed", "text-generation-with-past")
    assert fp32.with_name("model.onnx_data").exists()
    ids = torch.arange(1, 10)[None] % tokenizer.vocab_size
    reference = _logits(fp32, ids)
    for precision in ("int8", "int4", "fp16"):
        graph = make_variant(fp32, precision)
        assert graph.parent.name == f"compressed-{precision}"
        beside = [p for p in graph.parent.iterdir() if p.name.startswith("model.onnx") and p != graph]
        assert len(beside) == 1 and beside[0].stat().st_size > graph.stat().st_size  # the weights are beside it
        onnx.checker.check_model(str(graph))
        if "cpu" in PRECISIONS[precision].providers:
            error = np.linalg.norm(_logits(graph, ids) - reference) / np.linalg.norm(reference)
            assert 0 < error <= PRECISIONS[precision].rtol, precision
    weights = onnx.load(str(tmp_path / "compressed-fp16" / "model.onnx")).graph.initializer
    assert {onnx.TensorProto.FLOAT16} <= {w.data_type for w in weights}


def test_a_tied_output_projection_is_quantized_like_every_other_linear(tmp_path, tokenizer):
    """A tied embedding is stored once, read by its Gather and, through a Transpose, by the output
    projection; ONNX Runtime's quantizers quantize only MatMuls by an initializer, so they read an untied
    copy of the graph: the output projection, the largest matrix of a small decoder, is int8 (or 4-bit)
    too; in int4 the embedding table is 4-bit as well. The fp32 graph is left as it was and the copy is gone."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    ).eval()
    fp32 = export_onnx(model, tokenizer, tmp_path / "dense", "text-generation-with-past")
    before = fp32.read_bytes()
    ids = torch.arange(1, 10)[None] % tokenizer.vocab_size
    reference = _logits(fp32, ids)
    for precision, op in (("int8", "MatMulInteger"), ("int4", "MatMulNBits")):
        graph = make_variant(fp32, precision)
        nodes = onnx.load(str(graph)).graph.node
        assert sum(n.op_type == op for n in nodes) == 2 * 7 + 1  # two layers of seven projections, and the head
        if precision == "int4":  # the embedding the Gather reads is 4-bit too: a quarter of the fp32 bytes, and less
            assert sum(n.op_type == "GatherBlockQuantized" for n in nodes) == 1
            assert graph.stat().st_size < 0.4 * fp32.stat().st_size
        assert sorted(p.name for p in graph.parent.iterdir() if p.name.startswith(".")) == []
        error = np.linalg.norm(_logits(graph, ids) - reference) / np.linalg.norm(reference)
        assert 0 < error <= PRECISIONS[precision].rtol, precision
    assert fp32.read_bytes() == before
