"""Behaviour that no other file pins down: the metric gate failing a broken factorization, the Fisher
of text pairs, delimited data files, the statistics cache key, the graph check, a sweep with a failing
point, and half-precision checkpoints. Real models, real exports, real ONNX Runtime sessions."""

import copy
import json

import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

import fwsvd_export
from fwsvd_export.cli import main
from fwsvd_export.config import DataSource
from fwsvd_export.core import (
    CompressionSpec,
    collect_statistics,
    compress_,
    factorized_layers,
    gather_statistics,
    linear_layers,
)
from fwsvd_export.loader import load_recipe, parse_recipe
from fwsvd_export.pipeline import Clock, compress_stage, dense_stage, prepare
from fwsvd_export.stages.data import load_records
from fwsvd_export.stages.export import export_onnx, inspect_graph
from fwsvd_export.stages.tasks import TASKS
from fwsvd_export.stages.validate import feeds, time_artifacts, torch_results, validate
from fwsvd_export.stages.validate import reference as dense_reference

from conftest import sentences, write_recipe

METRIC_CHECKS = {"metric loss (compressed torch)", "cpu: metric loss"}


def failing(checks: list[dict]) -> set[str]:
    return {c["name"] for c in checks if not c["passed"]}


# --- the metric gate ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_broken_factorization_fails_the_metric_gate_and_only_it(tmp_path, classifier_recipe):
    """Zeroed factors export and run faithfully (parity holds), but the classifier's decisions are gone."""
    classifier_recipe["validation"]["providers"] = [{"name": "cpu", "required": True}]
    recipe = load_recipe(write_recipe(tmp_path, classifier_recipe))
    prepared = prepare(recipe, Clock())
    dense = dense_stage(prepared, tmp_path / "dense", Clock(), progress=False)
    model, _, _ = compress_stage(prepared, recipe, Clock(), progress=False)
    for layer in factorized_layers(model).values():
        layer.first.weight.data.zero_()
    graph = export_onnx(model, prepared.tokenizer, tmp_path / "broken", "text-classification")
    evidence = torch_results(prepared.task, recipe.validation, model, prepared.evaluation, progress=False)
    validation = validate(
        prepared.task, recipe.validation, dense.reference, evidence, prepared.evaluation, graph, progress=False
    ).to_dict()
    assert validation["passed"] is False
    assert failing(validation["checks"]) == METRIC_CHECKS
    assert validation["original_torch"] == 1.0 and validation["compressed_torch"] < 0.5


def test_a_dense_graph_that_does_not_open_fails_the_run_where_the_compressed_one_runs(tmp_path, classifier_recipe):
    """The dense graph is an artifact too (the baseline a user compares against): a provider that runs the
    compressed graph but cannot open the dense one is a failed check, not a silently skipped timing."""
    classifier_recipe["validation"]["providers"] = [{"name": "cpu", "required": True}]
    recipe = load_recipe(write_recipe(tmp_path, classifier_recipe))
    prepared = prepare(recipe, Clock())
    graph = export_onnx(prepared.model, prepared.tokenizer, tmp_path / "dense", "text-classification")
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])  # cut short, as a full disk leaves it
    dense = dense_reference(
        prepared.task, recipe.validation, prepared.model, prepared.evaluation, graph, progress=False
    )
    model, _, _ = compress_stage(prepared, recipe, Clock(), progress=False)
    compressed = export_onnx(model, prepared.tokenizer, tmp_path / "compressed", "text-classification")
    evidence = torch_results(prepared.task, recipe.validation, model, prepared.evaluation, progress=False)
    checked = validate(
        prepared.task, recipe.validation, dense, evidence, prepared.evaluation, compressed, progress=False
    )
    time_artifacts(recipe.validation, dense, checked, compressed, {}, model.config)
    validation = checked.to_dict()
    assert failing(validation["checks"]) == {"cpu: dense graph opens"} and validation["passed"] is False
    assert validation["providers"]["cpu"]["latency_skipped"].startswith("dense graph: CPUExecutionProvider failed")


@pytest.mark.slow
@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_a_graph_that_stops_opening_before_its_timing_fails_the_run(tmp_path, classifier_recipe, one_at_a_time):
    """A compressed graph damaged after its validation (as a full disk or a second process leaves it) makes the
    timing fail with a check naming the graph, whether the sessions are held side by side or one at a time."""
    classifier_recipe["validation"]["providers"] = [{"name": "cpu", "required": True}]
    classifier_recipe["validation"]["latency"] = {
        "shapes": ["1x8"],
        "warmup": 1,
        "runs": 2,
        "rounds": 2,
        "one_at_a_time": one_at_a_time,
    }
    recipe = load_recipe(write_recipe(tmp_path, classifier_recipe))
    prepared = prepare(recipe, Clock())
    dense = dense_stage(prepared, tmp_path / "dense", Clock(), progress=False)
    model, _, _ = compress_stage(prepared, recipe, Clock(), progress=False)
    compressed = export_onnx(model, prepared.tokenizer, tmp_path / "compressed", "text-classification")
    evidence = torch_results(prepared.task, recipe.validation, model, prepared.evaluation, progress=False)
    checked = validate(
        prepared.task, recipe.validation, dense.reference, evidence, prepared.evaluation, compressed, progress=False
    )
    assert checked.passed
    compressed.write_bytes(compressed.read_bytes()[: compressed.stat().st_size // 2])
    time_artifacts(recipe.validation, dense.reference, checked, compressed, {}, model.config)
    validation = checked.to_dict()
    assert failing(validation["checks"]) == {"cpu: graphs open for timing"} and validation["passed"] is False
    skipped = validation["providers"]["cpu"]["latency_skipped"]
    assert (
        skipped.startswith(f"{compressed}: CPUExecutionProvider failed")
        and not validation["providers"]["cpu"]["latency"]
    )


# --- the per-sample Fisher of text pairs ------------------------------------------------------------


def pair_batches(tokenizer, n: int = 6, batch_size: int = 3):
    task = TASKS["feature-extraction"]
    records = [{"text": a, "text_pair": b} for a, b in zip(sentences(n, 12), sentences(n, 13))]
    return task, task.make_batches(
        records, DataSource(text_pair_column="text_pair"), tokenizer, 32, batch_size, True, None
    )


def brute_force_fisher(model, task, batches, layers, rows_of):
    """Mean over samples of (dL/dW through the sample's own rows)^2 summed over outputs: one backward per
    sample, the gradient taken by autograd on a zero weight offset that only those rows see."""
    totals = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in layers.items()}
    count = 0
    for batch in batches:
        n = batch.samples
        for sample in range(n):
            rows = torch.zeros(2 * n, 1, 1)
            rows[rows_of(sample, n)] = 1.0
            offsets = {name: torch.zeros_like(m.weight, requires_grad=True) for name, m in layers.items()}
            hooks = [
                m.register_forward_hook(lambda mod, args, out, d=offsets[name], rows=rows: out + (args[0] * rows) @ d.T)
                for name, m in layers.items()
            ]
            try:
                grads = torch.autograd.grad(task.loss(model, batch), list(offsets.values()))
            finally:
                for hook in hooks:
                    hook.remove()
            for name, grad in zip(offsets, grads):
                totals[name] += grad.double().square().sum(0)
            count += 1
    return {name: t / count for name, t in totals.items()}


def test_per_sample_fisher_of_text_pairs_matches_a_loop_over_pairs(bert_dir, tokenizer):
    """A sample is the pair: rows i and n + i of a batch of n pairs, under the in-batch contrastive loss."""
    model = AutoModel.from_pretrained(bert_dir).eval()
    task, batches = pair_batches(tokenizer)
    assert [b.groups for b in batches] == [2, 2]
    layers = {name: m for name, m in linear_layers(model).items() if ".encoder." in f".{name}"}
    stats = collect_statistics(model, layers, batches, task.loss, {"fisher"}, progress=False)
    pairs = brute_force_fisher(model, task, batches, layers, lambda i, n: [i, n + i])
    rows = brute_force_fisher(model, task, batches, layers, lambda i, n: [i])  # the pair split in two
    for name in layers:
        assert stats[name].samples == 6
        torch.testing.assert_close(stats[name].fisher.double(), pairs[name], rtol=2e-3, atol=1e-9)
    name = "encoder.layer.1.output.dense"
    assert not torch.allclose(stats[name].fisher.double(), rows[name], rtol=0.05)  # the test tells the two apart


# --- delimited data files ---------------------------------------------------------------------------


def test_csv_tsv_and_jsonl_of_the_same_rows_give_the_same_batches(tmp_path, classifier_recipe, tokenizer):
    """Quoted delimiters and label names or indices read alike; .tsv is tab-separated, and so is any file
    declared `format: tsv`."""
    rows = [("a quiet river, at morning", "red"), ("silver\tengine", "2"), ('the "old" market', "green")]
    (tmp_path / "data.csv").write_text(
        "sentence,label\n" + "".join(f'"{t.replace(chr(34), 2 * chr(34))}",{label}\n' for t, label in rows)
    )
    (tmp_path / "data.tsv").write_text(
        "sentence\tlabel\n" + "".join(f'"{t.replace(chr(34), 2 * chr(34))}"\t{label}\n' for t, label in rows)
    )
    (tmp_path / "tabs.txt").write_text((tmp_path / "data.tsv").read_text())
    (tmp_path / "data.jsonl").write_text(
        "".join(json.dumps({"sentence": t, "label": label}) + "\n" for t, label in rows)
    )
    expected = [{"sentence": t, "label": label} for t, label in rows]
    task = TASKS["text-classification"]
    batches = {}
    for name, fmt in (("data.csv", "auto"), ("data.tsv", "auto"), ("tabs.txt", "tsv"), ("data.jsonl", "auto")):
        classifier_recipe["data"]["calibration"] = {
            "path": str(tmp_path / name),
            "format": fmt,
            "text_column": "sentence",
            "label_column": "label",
        }
        recipe = parse_recipe(classifier_recipe, "recipe.yaml", tmp_path)
        records = load_records(recipe, "calibration", ["sentence", "label"])
        assert records == expected, (name, fmt)
        first = 1 if name.endswith(".jsonl") else 2  # below the header
        assert [r.where for r in records] == [f"{tmp_path / name}:{first + i}" for i in range(3)]
        config = AutoModelForSequenceClassification.from_pretrained(classifier_recipe["model"]["path"]).config
        batches[name, fmt] = task.make_batches(records, recipe.data.calibration, tokenizer, 32, 8, True, config)
    reference = batches["data.jsonl", "auto"][0]
    assert reference.labels.tolist() == [0, 2, 1]
    for key, (batch,) in batches.items():
        assert torch.equal(batch.inputs["input_ids"], reference.inputs["input_ids"]), key
        assert torch.equal(batch.labels, reference.labels), key


# --- the statistics cache ---------------------------------------------------------------------------


def test_the_statistics_cache_misses_when_one_weight_changes(bert_dir, tokenizer, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    task = TASKS["text-classification"]
    records = [{"text": t, "label": i % 3} for i, t in enumerate(sentences(6, 5))]
    batches = task.make_batches(records, DataSource(label_column="label"), tokenizer, 32, 3, True, model.config)
    todo = {
        name: model.get_submodule(name)
        for name in ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.intermediate.dense")
    }
    spec = CompressionSpec(method="fwsvd", cache_dir=str(tmp_path / "cache"))

    def gather():
        stats, info = gather_statistics(model, todo, {"fisher"}, spec, batches, task.loss, progress=False)
        return stats, info["cache"]

    first, stored = gather()
    assert stored.startswith("stored ")
    assert gather()[1] == f"hit {stored.removeprefix('stored ')}"
    weight = model.bert.encoder.layer[1].output.dense.weight  # not a targeted layer, but on the gradients' path
    with torch.no_grad():
        weight[0, 0] += 1e-4
    changed, again = gather()
    assert again.startswith("stored ") and again != stored
    assert not torch.equal(
        changed["bert.encoder.layer.0.intermediate.dense"].fisher,
        first["bert.encoder.layer.0.intermediate.dense"].fisher,
    )
    with torch.no_grad():
        weight[0, 0] -= 1e-4
    assert gather()[1] == f"hit {stored.removeprefix('stored ')}"  # the key is the weights' content
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


# --- the graph check --------------------------------------------------------------------------------

QUERY = "bert.encoder.layer.0.attention.self.query"


def fuse(path, module: str, out):
    """Rewrite the exported graph as an optimizer that multiplies the factors back together would: one
    MatMul with their product in place of the pair."""
    model = onnx.load(str(path))
    graph = model.graph
    nodes = {n.name: n for n in graph.node if n.op_type == "MatMul"}
    first, second = (
        nodes["/" + f"{module}.{part}".replace(".", "/").replace("layer/", "layer.") + "/MatMul"]
        for part in ("first", "second")
    )  # '/bert/encoder/layer.0/attention/self/query/first/MatMul'
    weights = {i.name: i for i in graph.initializer}
    product = numpy_helper.to_array(weights[first.input[1]]) @ numpy_helper.to_array(weights[second.input[1]])
    graph.initializer.append(numpy_helper.from_array(product, "fused_weight"))
    second.input[0], second.input[1] = first.input[0], "fused_weight"
    graph.node.remove(first)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


def test_inspect_graph_names_the_layers_whose_split_is_absent(tmp_path, bert_dir, tokenizer):
    model = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    compress_(
        model,
        CompressionSpec(method="svd", target=[r"layer\.0\.attention\.self\.(query|key)$"], ratio=0.5),
        progress=False,
    )
    path = export_onnx(model, tokenizer, tmp_path / "onnx", "text-classification")
    assert inspect_graph(path, model)["layers_missing_split"] == []

    fused = fuse(path, QUERY, tmp_path / "fused" / "model.onnx")
    report = inspect_graph(fused, model)
    assert report["layers_missing_split"] == [QUERY] and report["split_matmul_pairs_found"] == 1
    enc = dict(tokenizer(["quiet river at morning"], return_tensors="pt"))
    session = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    with torch.no_grad():  # the fused graph is a valid model of the same function: only the split is gone
        torch.testing.assert_close(
            torch.from_numpy(session.run(["logits"], feeds(session, enc))[0]), model(**enc).logits, atol=1e-5, rtol=1e-4
        )

    more = copy.deepcopy(model)  # a layer factorized after the export: the graph has it dense
    compress_(
        more, CompressionSpec(method="svd", target=[r"layer\.1\.intermediate\.dense$"], ratio=0.5), progress=False
    )
    report = inspect_graph(path, more)
    assert report["factorized_layers"] == 3 and report["split_matmul_pairs_found"] == 2
    assert report["layers_missing_split"] == ["bert.encoder.layer.1.intermediate.dense"]

    graph = onnx.load(str(path))  # a factor fed as a graph input instead of a weight: not a split MatMul
    second = next(n for n in graph.graph.node if n.op_type == "MatMul" and "query/second" in n.name)
    weight = next(i for i in second.input if i in {init.name for init in graph.graph.initializer})
    init = next(i for i in graph.graph.initializer if i.name == weight)
    graph.graph.input.append(onnx.helper.make_tensor_value_info(weight, init.data_type, list(init.dims)))
    graph.graph.initializer.remove(init)
    onnx.save(graph, str(tmp_path / "fed.onnx"))
    assert inspect_graph(tmp_path / "fed.onnx", model)["layers_missing_split"] == [QUERY]


# --- a sweep with a failing point -------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_with_a_failing_point_exits_1_and_keeps_every_point(tmp_path, classifier_recipe):
    """Ratio 0.1 leaves the classifier's layers rank 2 or 3, below their true rank 4: its metric gate fails."""
    classifier_recipe["validation"].update(
        providers=[{"name": "cpu", "required": True}], latency={"shapes": ["1x16"], "warmup": 0, "runs": 1}
    )
    path = write_recipe(tmp_path, classifier_recipe)
    folder = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", str(path), "--ratios", "0.5,0.1", "-o", str(folder), "--quiet"])
    assert result.exit_code == 1, result.output
    assert "validation failed at: fwsvd 0.1\n" in result.output
    points = json.loads((folder / "sweep.json").read_text())["points"]
    assert [(p["ratio"], p["passed"]) for p in points] == [(0.5, True), (0.1, False)]
    assert "| fwsvd | 0.1 |" in (folder / "sweep.md").read_text()
    for point in points:
        report = json.loads((folder / point["folder"] / "report.json").read_text())
        assert report["passed"] is point["passed"]
        assert failing(report["validation"]["checks"]) == (set() if point["passed"] else METRIC_CHECKS)
        assert (folder / point["folder"] / "onnx" / "compressed" / "model.onnx").is_file()


# --- half-precision checkpoints ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_checkpoint_loads_in_its_dtype_and_computes_the_saved_model(
    tmp_path, classifier_recipe, tokenizer, dtype
):
    path = write_recipe(tmp_path, classifier_recipe)
    folder = tmp_path / "ckpt"
    result = CliRunner().invoke(
        main, ["compress", str(path), "-o", str(folder), "--quiet", "--set", f"model.dtype={dtype}"]
    )
    assert result.exit_code == 0, result.output
    want = getattr(torch, dtype)
    model = fwsvd_export.load(folder)
    layers = factorized_layers(model)
    assert len(layers) == 12
    assert {p.dtype for p in model.parameters()} == {want}
    assert json.loads((folder / "fwsvd_manifest.json").read_text())["dtype"] == dtype
    stored = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in stored.items():  # the loaded model is the saved one, bit for bit
        assert tensor.dtype == want and torch.equal(state[name], tensor), name

    # The saved model's function, rebuilt without fwsvd_export: the dense model in float32 with each
    # factorized layer a Linear holding the product of its stored factors.
    reference = AutoModelForSequenceClassification.from_pretrained(classifier_recipe["model"]["path"]).eval()
    for name in layers:
        dense = reference.get_submodule(name)
        with torch.no_grad():
            dense.weight.copy_(stored[f"{name}.second.weight"].float() @ stored[f"{name}.first.weight"].float())
            dense.bias.copy_(stored[f"{name}.second.bias"].float())
    enc = dict(tokenizer(sentences(8, 21), padding=True, return_tensors="pt"))
    with torch.no_grad():
        ours, theirs = model(**enc).logits, reference(**enc).logits
    assert ours.dtype == want
    # Measured: 0.5% (float16) and 1.9% (bfloat16) of the largest logit; a misplaced factor moves them ~100%.
    tolerance = {"float16": 0.01, "bfloat16": 0.05}[dtype] * float(theirs.abs().max())
    assert float((ours.float() - theirs).abs().max()) < tolerance
