"""The model card: README.md in every run output (and the `compress` checkpoint folder), in the Hugging Face
format that huggingface_hub.ModelCard.load reads, made from the RunReport alone; its snippet runs."""

import copy
import hashlib
import json
import re
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard

from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import compress_only, run
from fwsvd_export.stages.model_card import model_card, recommended
from fwsvd_export.stages.run_report import RunReport

from conftest import write_recipe

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out


@pytest.fixture(scope="module")
def card_run(tmp_path_factory, classifier_dir, data_dir):
    """One run of the tiny classifier in fp32 and int8 (conftest's classifier_recipe, with int8)."""
    from conftest import quick_validation, recipe_for_classifier

    folder = tmp_path_factory.mktemp("card")
    recipe = {
        **recipe_for_classifier(classifier_dir, data_dir),
        "export": {"precisions": ["fp32", "int8"]},
        "validation": quick_validation(max_quantization_loss=0.05),
    }
    return run(load_recipe(write_recipe(folder, recipe)), folder / "out", progress=False)


def code_block(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def metric_of(report: dict, artifact: str, provider: str) -> float:
    """An artifact's metric as report.json holds it."""
    val = report["validation"]
    if artifact == "dense-fp32":
        return val["original_torch"]
    if artifact == "compressed-fp32":
        return val["providers"][provider]["metric"]
    return val["variants"][artifact][provider]["metric"]


def test_the_card_loads_with_huggingface_hub_and_holds_the_reports_metrics(card_run):
    assert card_run.passed
    card = ModelCard.load(card_run.output / "README.md")
    data = card.data.to_dict()
    report = json.loads((card_run.output / "report.json").read_text())
    assert data["base_model"] == report["model"]["source"] and data["library_name"] == "onnx"
    assert data["pipeline_tag"] == "text-classification" and {"fwsvd-export", "fwsvd"} <= set(data["tags"])
    assert data["model-index"][0]["results"]
    results = {r.metric_name: r for r in card.data.eval_results}
    pick = recommended(RunReport.from_dict(report))
    for artifact in ("dense-fp32", "compressed-fp32", "dense-int8", "compressed-int8"):
        result = results[f"accuracy ({artifact}, cpu)"]
        assert result.metric_type == "accuracy" and result.task_type == "text-classification"
        assert result.metric_value == metric_of(report, artifact, "cpu")
    assert results[f"accuracy ({pick.artifact}, {pick.provider})"].metric_value == metric_of(
        report, pick.artifact, pick.provider
    )
    assert (
        f"**{pick.artifact}** in `{pick.folder}`" in card.text
        and (card_run.output / pick.folder / "model.onnx").is_file()
    )


def test_the_card_is_made_from_the_report_alone(card_run):
    back = RunReport.from_dict(json.loads((card_run.output / "report.json").read_text()))
    assert str(model_card(back)) == str(ModelCard.load(card_run.output / "README.md"))


def test_the_card_names_the_calibration_data_by_its_sha256(card_run, data_dir):
    digest = hashlib.sha256((data_dir / "labelled.jsonl").read_bytes()).hexdigest()
    report = json.loads((card_run.output / "report.json").read_text())
    assert report["data_sha256"] == {"calibration": digest, "evaluation": digest}
    text = (card_run.output / "README.md").read_text()
    assert f"SHA-256 `{digest}`" in text and "Recovery: none" in text and "fwsvd" in text
    assert report["machine"]["cores"] >= 1 and f"timed on {report['machine']['cpu']}" in text


def test_the_cards_snippet_runs_from_the_output_folder(card_run):
    code = code_block((card_run.output / "README.md").read_text())
    assert "from optimum.onnxruntime import ORTModelForSequenceClassification" in code
    done = subprocess.run([sys.executable, "-c", code], cwd=card_run.output, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"tensor\(\[\d\]\)", done.stdout)


def _pick(report: dict, dense_bytes: int, dense_ms_factor: float, dense_metric: float | None = None):
    """The card's pick with dense int8 given a size, a latency (a multiple of compressed int8's) and a metric
    (default: compressed int8's own)."""
    changed = copy.deepcopy(report)
    dense, small = changed["validation"]["variants"]["dense-int8"], changed["validation"]["variants"]["compressed-int8"]
    dense["bytes"] = dense_bytes
    dense["cpu"]["metric"] = small["cpu"]["metric"] if dense_metric is None else dense_metric
    dense["cpu"]["latency"][0]["median_ms"] = small["cpu"]["latency"][0]["median_ms"] * dense_ms_factor
    return RunReport.from_dict(changed), recommended(RunReport.from_dict(changed))


def test_dense_int8_is_recommended_where_it_is_as_good_and_no_slower(card_run):
    report = json.loads((card_run.output / "report.json").read_text())
    small = report["validation"]["variants"]["compressed-int8"]
    _, pick = _pick(report, small["bytes"] + 1, 2.0)  # ours as good, smaller and faster: ours
    assert pick.artifact == "compressed-int8" and pick.folder == "onnx/compressed-int8"
    assert "smallest compressed artifact that passed every check" in pick.why
    _, pick = _pick(report, small["bytes"] + 1, 0.5, small["cpu"]["metric"] - 0.01)  # dense faster but worse: ours
    assert pick.artifact == "compressed-int8"
    _, pick = _pick(report, small["bytes"] + 1, 0.5)  # dense as good and faster, ours smaller: dense, saying so
    assert pick.artifact == "dense-int8" and "at least as good and no slower" in pick.why
    assert "though compressed-int8 is smaller" in pick.why and "where size decides" in pick.why
    _, pick = _pick(report, small["bytes"] + 1, 1.03)  # dense 3% slower is a tie on latency: dense, as good
    assert pick.artifact == "dense-int8"
    _, pick = _pick(report, small["bytes"] + 1, 1.10)  # ours 10% faster (and smaller): ours
    assert pick.artifact == "compressed-int8"
    theirs, pick = _pick(report, 1, 0.5, 1.0)  # dense better, smaller and faster: dense
    assert pick.artifact == "dense-int8" and pick.folder == "onnx/dense-int8" and "smaller" not in pick.why
    assert "onnx/dense-int8" in code_block(str(model_card(theirs)))


def test_a_failed_run_recommends_nothing(card_run):
    report = json.loads((card_run.output / "report.json").read_text())
    report["validation"]["checks"][0]["passed"] = False
    text = str(model_card(RunReport.from_dict(report)))
    assert "**FAILED**" in text and "nothing is recommended: the run failed validation (metric loss" in text


def test_a_decoders_card_runs_generate(tmp_path, lm_recipe):
    result = run(load_recipe(write_recipe(tmp_path, lm_recipe)), tmp_path / "out", progress=False)
    card = ModelCard.load(result.output / "README.md")
    assert card.data.pipeline_tag == "text-generation"
    code = code_block(card.text)
    assert "ORTModelForCausalLM" in code and "generate" in code
    done = subprocess.run([sys.executable, "-c", code], cwd=result.output, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-3000:]


def test_the_compress_checkpoint_folder_has_a_card_and_its_snippet_runs(tmp_path, classifier_recipe, data_dir):
    folder, _ = compress_only(load_recipe(write_recipe(tmp_path, classifier_recipe)), tmp_path / "ckpt", progress=False)
    card = ModelCard.load(folder / "README.md")
    assert (
        card.data.pipeline_tag == "text-classification" and card.data.base_model == classifier_recipe["model"]["path"]
    )
    digest = hashlib.sha256((data_dir / "labelled.jsonl").read_bytes()).hexdigest()
    assert f"SHA-256 `{digest}`" in card.text
    code = code_block(card.text)
    assert "from fwsvd_export import load" in code
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
