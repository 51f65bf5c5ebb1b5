"""End to end on tiny real models: recipe -> compressed checkpoint -> ONNX with split MatMuls -> ORT."""

import gc
import json
import weakref

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fwsvd_export
from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import Clock, dense_stage, point_stage, prepare, run
from fwsvd_export.stages.validate import feeds

from conftest import write_recipe

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out


def run_recipe(tmp_path, recipe):
    return run(load_recipe(write_recipe(tmp_path, recipe)), tmp_path / "out", progress=False)


def assert_artifacts(result, n_factorized):
    out = result.output
    for rel in (
        "report.json",
        "report.md",
        "ranks.png",
        "compressed/config.json",
        "compressed/model.safetensors",
        "compressed/fwsvd_manifest.json",
        "compressed/tokenizer.json",
        "onnx/dense/model.onnx",
        "onnx/compressed/model.onnx",
        "onnx/compressed/config.json",
    ):
        assert (out / rel).is_file(), rel
    graph = result.report.to_dict()["graph"]
    assert graph["compressed"]["split_matmul_pairs_found"] == n_factorized
    products = {k: graph[k]["matmul_nodes"] + graph[k]["gemm_nodes"] for k in ("dense", "compressed")}
    assert products["compressed"] == products["dense"] + n_factorized
    assert json.loads((out / "report.json").read_text())["passed"] == result.passed
    assert not list(out.parent.glob(".out.partial-*"))


def test_classifier_end_to_end(tmp_path, classifier_recipe):
    result = run_recipe(tmp_path, classifier_recipe)
    summary = result.report.to_dict()["compression"]["summary"]
    assert summary["compressed_layers"] == 12  # q, k, v, attention output, intermediate, output x 2 layers
    assert_artifacts(result, 12)
    cpu = result.report.to_dict()["validation"]["providers"]["cpu"]
    assert cpu["status"] == "passed" and cpu["parity"]["max_abs_error"] < 1e-4
    assert cpu["metric"] == pytest.approx(result.report.to_dict()["validation"]["compressed_torch"])
    assert result.report.to_dict()["validation"]["providers"]["cuda"]["status"] in ("passed", "unavailable")
    assert {"load model", "data", "compress", "checkpoint", "export", "validate"} <= set(
        result.report.to_dict()["seconds"]
    )
    assert result.passed


def test_checkpoint_reloads_and_reproduces_the_compressed_model(tmp_path, classifier_recipe, tokenizer):
    result = run_recipe(tmp_path, classifier_recipe)
    model = fwsvd_export.load(result.output / "compressed")
    manifest = json.loads((result.output / "compressed" / "fwsvd_manifest.json").read_text())
    assert (
        manifest["compression"]["summary"]["method"] == "fwsvd"
        and manifest["recipe"]["model"]["task"] == "text-classification"
    )
    assert "torch" in manifest["versions"]
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, fwsvd_export.LowRankLinear)}
    assert ranks == {name: v["rank"] for name, v in manifest["factorized"].items()}
    enc = tokenizer(["a quiet river at morning", "yellow engine"], padding=True, return_tensors="pt")
    session = ort.InferenceSession(
        str(result.output / "onnx/compressed/model.onnx"), providers=["CPUExecutionProvider"]
    )
    onnx_logits = session.run(["logits"], feeds(session, dict(enc)))[0]
    with torch.no_grad():
        torch_logits = model(**enc).logits.numpy()
    np.testing.assert_allclose(torch_logits, onnx_logits, atol=1e-4)
    # Reloading twice gives identical outputs: the checkpoint is the model, bit for bit.
    again = fwsvd_export.load(result.output / "compressed")
    with torch.no_grad():
        assert torch.equal(again(**enc).logits, model(**enc).logits)


def test_onnx_folder_loads_with_optimum_ort_classes(tmp_path, classifier_recipe, tokenizer):
    from optimum.onnxruntime import ORTModelForSequenceClassification

    result = run_recipe(tmp_path, classifier_recipe)
    ort_model = ORTModelForSequenceClassification.from_pretrained(result.output / "onnx/compressed")
    enc = tokenizer(["silver mountain letter"], return_tensors="pt")
    torch_model = fwsvd_export.load(result.output / "compressed")
    with torch.no_grad():
        np.testing.assert_allclose(ort_model(**enc).logits.numpy(), torch_model(**enc).logits.numpy(), atol=1e-4)


def test_causal_lm_end_to_end_with_kfac(tmp_path, lm_recipe):
    result = run_recipe(tmp_path, lm_recipe)
    n = result.report.to_dict()["compression"]["summary"]["compressed_layers"]
    assert n == 14  # q, k, v, o, gate, up, down x 2 layers
    assert_artifacts(result, n)
    val = result.report.to_dict()["validation"]
    assert val["metric"] == "perplexity"
    assert val["providers"]["cpu"]["metric"] == pytest.approx(val["compressed_torch"], rel=1e-3)
    assert result.passed


@pytest.mark.parametrize("method", ["svd", "asvd", "svd-llm"])
def test_every_method_runs_from_a_recipe(tmp_path, classifier_recipe, method):
    classifier_recipe["compression"]["method"] = method
    classifier_recipe["validation"]["latency"]["runs"] = 1
    result = run_recipe(tmp_path, classifier_recipe)
    assert result.report.to_dict()["compression"]["summary"]["method"] == method
    assert result.report.to_dict()["validation"]["providers"]["cpu"]["parity"]["passed"]


def test_layers_that_would_not_shrink_stay_dense_and_say_so(tmp_path, classifier_recipe):
    classifier_recipe["compression"].update(ratio=None, rank=20, overrides={r"intermediate": {"rank": 8}})
    result = run_recipe(tmp_path, classifier_recipe)
    layers = {p["name"]: p for p in result.report.to_dict()["compression"]["layers"]}
    attention = layers["bert.encoder.layer.0.attention.self.query"]  # 48x48: break-even rank 24, rank 20 pays
    assert attention["rank"] == 20
    assert layers["bert.encoder.layer.0.intermediate.dense"]["rank"] == 8
    classifier_recipe["compression"].update(rank=30, overrides={})
    result = run_recipe(tmp_path, classifier_recipe)
    query = {p["name"]: p for p in result.report.to_dict()["compression"]["layers"]}[
        "bert.encoder.layer.0.attention.self.query"
    ]
    assert query["rank"] is None and "would not save parameters" in query["reason"]
    assert "dense" in (result.output / "report.md").read_text()


def test_a_failed_threshold_keeps_the_report_and_fails_the_run(tmp_path, classifier_recipe):
    classifier_recipe["compression"]["ratio"] = 0.05
    classifier_recipe["validation"]["atol"] = 1e-12
    classifier_recipe["validation"]["rtol"] = 0.0
    result = run_recipe(tmp_path, classifier_recipe)
    assert not result.passed
    assert any(not c["passed"] and "parity" in c["name"] for c in result.report.to_dict()["validation"]["checks"])
    assert "FAILED" in (result.output / "report.md").read_text()


def test_a_required_provider_that_cannot_run_fails_the_run(tmp_path, classifier_recipe):
    classifier_recipe["validation"]["providers"] = [
        {"name": "cpu", "required": True},
        {"name": "cuda", "required": True},
    ]
    result = run_recipe(tmp_path, classifier_recipe)
    cuda = result.report.to_dict()["validation"]["providers"]["cuda"]
    if torch.cuda.is_available() and cuda["status"] != "unavailable":
        pytest.skip("this machine really runs CUDA")
    assert cuda["status"] == "unavailable" and cuda["reason"]
    assert not result.passed


def test_a_run_reports_peak_host_memory_per_stage(tmp_path, classifier_recipe):
    result = run(load_recipe(write_recipe(tmp_path, classifier_recipe)), tmp_path / "out", progress=False)
    peaks = result.report.to_dict()["peak_rss_mb"]
    stages = {stage for stage in result.report.to_dict()["seconds"] if not stage.startswith("compress: ")}
    assert set(peaks) == stages  # compress's own steps are timed inside its stage
    assert all(0 < mb < 64 * 1024 for mb in peaks.values())
    whole = result.report.to_dict()["whole_run"]  # the run's own peak: the largest stage's
    assert whole["peak_rss_mb"] == max(peaks.values())
    assert whole["seconds"] >= sum(s for stage, s in result.report.to_dict()["seconds"].items() if stage in peaks)
    report_md = (result.output / "report.md").read_text()
    assert "peak host memory (MB)" in report_md and f"| whole run | {whole['seconds']:.4g} |" in report_md


def test_the_last_point_drops_the_torch_model_before_onnx_runtime_validates_it(
    tmp_path, classifier_recipe, monkeypatch
):
    """Validation gets the compressed model's PyTorch results first; then the model, factorized in place of
    the dense one, is released, so the host holds the weights in the ORT sessions alone."""
    recipe = load_recipe(write_recipe(tmp_path, classifier_recipe))
    prepared = prepare(recipe, Clock())
    dense = dense_stage(prepared, tmp_path / "dense", Clock(), progress=False)
    model, alive = weakref.ref(prepared.model), []
    real = fwsvd_export.pipeline.validate

    def observed(*args, **kwargs):  # the real validation, with a look at the model first
        gc.collect()
        alive.append(model() is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(fwsvd_export.pipeline, "validate", observed)
    (tmp_path / "point").mkdir()
    report = point_stage(prepared, dense, recipe, tmp_path / "point", Clock(), progress=False, last=True)
    assert alive == [False] and prepared.model is None
    assert report.validation.providers["cpu"]["parity"]["passed"]
