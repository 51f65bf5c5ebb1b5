"""Recovery fine-tuning as a recipe stage, and the sweep that draws the accuracy/size/latency frontier."""

import json

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import fwsvd_export
from fwsvd_export.cli import main
from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import run

from conftest import write_recipe

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out


def test_recovery_finetuning_trains_the_factors_and_ships_the_trained_model(tmp_path, classifier_recipe):
    classifier_recipe["compression"]["ratio"] = 0.3
    classifier_recipe["finetune"] = {"epochs": 3, "learning_rate": 3e-3, "train": "all"}
    result = run(load_recipe(write_recipe(tmp_path, classifier_recipe)), tmp_path / "out", progress=False)
    losses = result.report.to_dict()["finetune"]["epoch_loss"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "finetune" in result.report.to_dict()["seconds"]
    assert (
        result.report.to_dict()["finetune"]["data"] == "calibration"
        and result.report.to_dict()["finetune"]["batches"] == 4
    )  # 32 rows
    cpu = result.report.to_dict()["validation"]["providers"]["cpu"]
    assert cpu["parity"]["passed"]  # the exported graph is the fine-tuned model
    reloaded = fwsvd_export.load(result.output / "compressed")
    assert isinstance(reloaded.get_submodule("bert.encoder.layer.0.intermediate.dense"), fwsvd_export.LowRankLinear)


def test_recovery_trains_on_data_finetune_when_the_recipe_names_it(tmp_path, classifier_recipe):
    """Statistics want a few hundred rows; recovery gains from the whole training split: data.finetune."""
    classifier_recipe["compression"]["ratio"] = 0.3
    classifier_recipe["data"]["finetune"] = dict(classifier_recipe["data"]["evaluation"], max_samples=40)
    classifier_recipe["finetune"] = {"epochs": 1, "learning_rate": 1e-3}
    result = run(load_recipe(write_recipe(tmp_path, classifier_recipe)), tmp_path / "out", progress=False)
    assert (
        result.report.to_dict()["finetune"]["data"] == "finetune"
        and result.report.to_dict()["finetune"]["batches"] == 5
    )  # 40 rows of 8
    assert result.report.to_dict()["validation"]["providers"]["cpu"]["parity"]["passed"]


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"finetune": None}, "'data.finetune' names rows to fine-tune on, but 'finetune.epochs' is 0"),
        ({"path": None}, "'data.finetune' needs exactly one of path, dataset"),
        ({"max_samples": 0}, "'data.finetune.max_samples' must be >= 1, got 0"),
    ],
)
def test_bad_finetune_data_is_refused_before_anything_runs(tmp_path, classifier_recipe, change, problem):
    classifier_recipe["data"]["finetune"] = dict(classifier_recipe["data"]["evaluation"])
    classifier_recipe["finetune"] = {"epochs": 1}
    if change.pop("finetune", 1) is None:
        del classifier_recipe["finetune"]
    classifier_recipe["data"]["finetune"].update(change)
    path = write_recipe(tmp_path, classifier_recipe)
    result = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and problem in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_sweep_writes_a_table_points_and_plots(tmp_path, classifier_recipe):
    classifier_recipe["validation"]["latency"]["runs"] = 2
    path = write_recipe(tmp_path, classifier_recipe)
    result = CliRunner().invoke(
        main,
        ["sweep", str(path), "--ratios", "0.6,0.3", "--methods", "svd,kfac", "-o", str(tmp_path / "sweep"), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    folder = tmp_path / "sweep"
    points = json.loads((folder / "sweep.json").read_text())["points"]
    assert [(p["method"], p["ratio"]) for p in points] == [("svd", 0.6), ("svd", 0.3), ("kfac", 0.6), ("kfac", 0.3)]
    assert points[1]["targeted_kept_ratio"] < points[0]["targeted_kept_ratio"]
    assert all("cpu" in p["providers"] for p in points)
    table = (folder / "sweep.md").read_text()
    assert "| kfac | 0.3 |" in table and "accuracy (cpu)" in table
    for png in ("metric_vs_params.png", "metric_vs_latency_cpu.png"):
        assert (folder / png).stat().st_size > 1000
    summary = json.loads((folder / "sweep.json").read_text())
    shared = summary["shared"]
    assert shared["statistics"]["passes"] == 1  # one pass for svd and kfac at both ratios
    point_peaks = [
        max(json.loads((folder / p["folder"] / "report.json").read_text())["peak_rss_mb"].values()) for p in points
    ]
    assert summary["whole_run"]["peak_rss_mb"] == max(
        [*shared["peak_rss_mb"].values(), *point_peaks]
    )  # the sweep's own
    assert f"peak host memory {summary['whole_run']['peak_rss_mb']:.0f} MB" in table
    assert (folder / "dense" / "model.onnx").is_file() and not list(folder.glob("*/onnx/dense"))
    report = json.loads((folder / "kfac-ratio0.3" / "report.json").read_text())
    assert report["compression"]["statistics"]["shared"] and report["compression"]["statistics"]["passes"] == 0
    assert (folder / "kfac-ratio0.3" / report["artifacts"]["onnx_dense"]).resolve() == (
        folder / "dense" / "model.onnx"
    ).resolve()
    assert not any("dense" in stage for stage in report["seconds"])  # a point pays only for its compressed model

    alone = run(
        load_recipe(path, ["compression.method=kfac", "compression.ratio=0.3"]), tmp_path / "alone", progress=False
    )
    ours, theirs = (
        safetensors.torch.load_file(f / "compressed" / "model.safetensors")
        for f in (folder / "kfac-ratio0.3", alone.output)
    )
    assert ours.keys() == theirs.keys()
    for key in ours:  # a sweep point is the run it stands for
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    assert points[3]["compressed_torch"] == pytest.approx(
        alone.report.to_dict()["validation"]["compressed_torch"], abs=1e-6
    )


def test_sweep_over_budgets(tmp_path, classifier_recipe):
    classifier_recipe["validation"]["latency"]["runs"] = 1
    path = write_recipe(tmp_path, classifier_recipe)
    result = CliRunner().invoke(
        main, ["sweep", str(path), "--budgets", "0.5", "-o", str(tmp_path / "sweep"), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    point = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["points"][0]
    assert point["method"] == "fwsvd" and point["budget"] == 0.5 and point["targeted_kept_ratio"] <= 0.5


@pytest.mark.parametrize("recipe_name", ["classifier_recipe", "lm_recipe"])
def test_distillation_trains_only_the_factors_toward_the_dense_model_and_ships_them(tmp_path, request, recipe_name):
    from fwsvd_export.core import LowRankLinear

    recipe = request.getfixturevalue(recipe_name)
    recipe["compression"]["ratio"] = 0.3
    recipe["finetune"] = {"epochs": 3, "learning_rate": 1e-3, "objective": "distill", "temperature": 0.5}
    result = run(load_recipe(write_recipe(tmp_path, recipe)), tmp_path / "out", progress=False)
    losses = result.report.to_dict()["finetune"]["epoch_loss"]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0]  # the distillation loss falls
    assert result.report.to_dict()["validation"]["providers"]["cpu"]["parity"][
        "passed"
    ]  # the export is the trained model
    trained = fwsvd_export.load(result.output / "compressed")
    original = type(trained).from_pretrained(recipe["model"]["path"])
    factorized = {n for n, m in trained.named_modules() if isinstance(m, LowRankLinear)}
    for name, param in trained.named_parameters():  # frozen weights are the dense model's, bit for bit
        if not any(name.startswith(f + ".") for f in factorized):
            assert torch.equal(param, original.get_parameter(name)), name
