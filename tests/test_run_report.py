"""The typed run report: report.json is `RunReport.to_dict()` serialized once, the JSON reads back into
the same report, report.md and the plots are made once per run by functions that change nothing."""

import copy
import json

import pytest

import fwsvd_export.stages.report as report_module
from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import run
from fwsvd_export.stages.report import draw_plots, markdown, plot_ranks, precision_rows, write_report
from fwsvd_export.stages.run_report import RunReport, artifact_rows, first_measured, verdicts

from conftest import write_recipe

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out

KEYS = [
    "report_version",
    "tool",
    "versions",
    "recipe_file",
    "recipe",
    "model",
    "compression",
    "finetune",
    "sizes",
    "flop_ratio",
    "graph",
    "validation",
    "seconds",
    "peak_rss_mb",
    "artifacts",
    "passed",
    "output_notes",
    "whole_run",
    "data_sha256",
    "machine",
]


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory, classifier_dir, data_dir):
    """One real run of the tiny classifier, with the plotting functions, the Markdown renderer and the
    report's serialization counted (matplotlib and the counters are all that is replaced)."""
    from conftest import recipe_for_classifier

    folder = tmp_path_factory.mktemp("run-report")
    recipe = recipe_for_classifier(classifier_dir, data_dir)
    calls = {"plot_ranks": 0, "plot_frontier": 0, "markdown": 0, "to_dict": 0}

    def counted(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        for name in ("plot_ranks", "plot_frontier", "markdown"):
            patch.setattr(report_module, name, counted(name, getattr(report_module, name)))
        patch.setattr(RunReport, "to_dict", counted("to_dict", RunReport.to_dict))
        result = run(load_recipe(write_recipe(folder, recipe)), folder / "out", progress=False)
    return result, calls


def test_report_json_is_the_report_serialized_once(counted_run):
    result, calls = counted_run
    text = (result.output / "report.json").read_text()
    assert calls["to_dict"] == 1  # the one serialization (verdicts read the report, not its dict)
    assert text == json.dumps(result.report.to_dict(), indent=2, default=str)
    data = json.loads(text)
    assert list(data) == KEYS and data["report_version"] == 2
    assert list(data["validation"]) == [
        "metric",
        "original_torch",
        "compressed_torch",
        "scores",
        "providers",
        "variants",
        "checks",
        "passed",
        "verdicts",
    ]
    compressed = data["validation"]["scores"]["compressed_torch"]
    assert compressed["accuracy"] == data["validation"]["compressed_torch"] and {"macro_f1", "mcc"} <= set(compressed)
    assert data["artifacts"]["ranks_plot"] == "ranks.png" and data["passed"] == result.passed


def test_the_json_reads_back_into_the_same_report(counted_run):
    result, _ = counted_run
    data = json.loads((result.output / "report.json").read_text())
    back = RunReport.from_dict(data)
    assert back.to_dict() == data
    assert back.compression.layers == result.report.compression.layers
    assert back.validation.checks == result.report.validation.checks
    assert markdown(back) == (result.output / "report.md").read_text()


def test_report_md_and_the_plots_are_made_once_per_run(counted_run):
    result, calls = counted_run
    assert calls["plot_ranks"] == 1 and calls["plot_frontier"] == 1 and calls["markdown"] == 1
    assert (result.output / "ranks.png").is_file() and (result.output / "report.md").is_file()


def test_the_renderers_change_nothing_they_are_given(counted_run, tmp_path):
    result, _ = counted_run
    report = result.report
    before, as_dict = copy.deepcopy(report), copy.deepcopy(report.to_dict())
    markdown(report)
    verdicts(report)
    precision_rows(report)
    first_measured(artifact_rows(report))
    plot_ranks(report.compression, tmp_path / "ranks.png")
    drawn = draw_plots(report, tmp_path)
    written = write_report(report, tmp_path)
    assert report == before and report.to_dict() == as_dict
    assert written is not report and written.artifacts.ranks_plot == drawn["ranks_plot"]
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(written.to_dict(), default=str))


def test_a_report_without_plots_or_whole_run_leaves_their_keys_out(counted_run):
    """A sweep point's report has no output_notes or whole_run, and a plot not drawn is not named."""
    from dataclasses import replace

    result, _ = counted_run
    point = replace(
        result.report,
        output_notes=None,
        whole_run=None,
        artifacts=replace(result.report.artifacts, ranks_plot=None, frontier_plot=None),
    )
    data = point.to_dict()
    assert "output_notes" not in data and "whole_run" not in data
    assert not {"ranks_plot", "frontier_plot"} & set(data["artifacts"])
    assert "ranks per layer" not in markdown(point)
