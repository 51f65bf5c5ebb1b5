"""The sweep over precision variants: every point's compressed fp32 and int8 artifacts beside the dense
fp32 and int8 baselines, in one table and one two-panel plot, and the plain verdict of where dense int8
is the better pick, each number checked against the point's own report.json."""

import copy
import json
import struct

import pytest

from fwsvd_export.stages.run_report import LATENCY_TIE
from fwsvd_export.stages.tasks import get_task
from fwsvd_export.sweep import _verdict, dense_int8_wins, sweep

from conftest import write_recipe

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out

POINTS = ("fwsvd-ratio0.6", "fwsvd-ratio0.3")


@pytest.fixture(scope="module")
def variant_sweep(tmp_path_factory, classifier_dir, data_dir):
    folder = tmp_path_factory.mktemp("variant-sweep")
    source = {"path": str(data_dir / "labelled.jsonl"), "text_column": "sentence", "label_column": "label"}
    recipe = {
        "model": {"path": str(classifier_dir), "task": "text-classification"},
        "data": {
            "calibration": dict(source, max_samples=32),
            "evaluation": dict(source),
            "max_length": 32,
            "batch_size": 8,
        },
        "compression": {"method": "fwsvd", "target": [r"encoder\.layer\.\d+\."], "ratio": 0.5},
        "export": {"precisions": ["fp32", "int8"]},
        "validation": {
            "providers": [{"name": "cpu", "required": True}, {"name": "cuda"}],
            "latency": {"shapes": ["1x16"], "warmup": 1, "runs": 2},
        },
    }
    out, points, plots = sweep(write_recipe(folder, recipe), [0.6, 0.3], ["fwsvd"], folder / "sweep", progress=False)
    reports = {p["folder"]: json.loads((out / p["folder"] / "report.json").read_text()) for p in points}
    return out, points, plots, reports


def expected_rows(report: dict) -> dict[tuple[str, str], tuple]:
    """(artifact, provider) -> (metric, bytes, median ms, speed-up), read straight from a report.json."""
    val, sizes = report["validation"], report["sizes"]
    rows = {}
    for provider, entry in val["providers"].items():
        if entry["status"] == "unavailable":
            continue
        lat = entry["latency"][0]
        rows["dense-fp32", provider] = (
            val["original_torch"],
            sizes["onnx_dense_bytes"],
            lat["dense"]["median_ms"],
            1.0,
        )
        rows["compressed-fp32", provider] = (
            entry["metric"],
            sizes["onnx_compressed_bytes"],
            lat["compressed"]["median_ms"],
            lat["speedup"],
        )
    for artifact, measured in val["variants"].items():
        for provider, entry in measured.items():
            if isinstance(entry, dict) and entry["status"] == "measured":
                lat = entry["latency"][0]
                rows[artifact, provider] = (
                    entry["metric"],
                    measured["bytes"],
                    lat["median_ms"],
                    lat["speedup_vs_dense_fp32"],
                )
    return rows


def artifact_table(markdown: str) -> dict[tuple[str, str, str], list[str]]:
    section = markdown.split("## Every artifact", 1)[1].split("\n\n")[1]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()[2:]]
    return {(c[0], c[1], c[2]): c[3:] for c in cells}


def expected_wins(reports: dict[str, dict]) -> dict[str, list[dict]]:
    """Dense int8 beats a compressed artifact on a provider: accuracy at least as good, and no larger or no slower
    (a median within LATENCY_TIE of ours is a tie)."""
    wins = {}
    for name, report in reports.items():
        rows = expected_rows(report)
        for (artifact, provider), (metric, size, ms, _) in rows.items():
            dense = rows.get(("dense-int8", provider))
            if not artifact.startswith("compressed-") or dense is None or dense[0] < metric:
                continue
            on = [k for k, ok in (("size", dense[1] <= size), ("latency", dense[2] <= ms * (1 + LATENCY_TIE))) if ok]
            if on:
                wins.setdefault(name, []).append({"artifact": artifact, "provider": provider, "on": on})
    return wins


def test_the_table_lists_every_point_and_variant_beside_the_dense_baselines(variant_sweep):
    out, points, _, reports = variant_sweep
    assert [p["folder"] for p in points] == list(POINTS)
    table = artifact_table((out / "sweep.md").read_text())
    expected = {("dense", a, p): v for (a, p), v in expected_rows(reports[POINTS[0]]).items() if a.startswith("dense-")}
    for name, report in reports.items():
        expected.update({(name, a, p): v for (a, p), v in expected_rows(report).items() if a.startswith("compressed-")})
        assert {a for a, p in expected_rows(report) if a.startswith("dense-")} == {"dense-fp32", "dense-int8"}
    assert {("dense", "dense-int8", "cpu"), (POINTS[1], "compressed-int8", "cpu")} <= set(expected)
    assert set(table) == set(expected)
    for key, (metric, size, ms, speedup) in expected.items():
        cells = table[key]
        assert float(cells[0]) == pytest.approx(metric, rel=1e-3), key
        assert float(cells[1]) == pytest.approx(size / 1e6, abs=0.0051), key
        assert float(cells[2]) == pytest.approx(ms, abs=0.0051), key
        assert float(cells[3]) == pytest.approx(speedup, abs=0.0051), key
    # the compressed graphs differ per point and the dense ones are measured once: the sizes say so
    sizes = {key[0]: float(table[key][1]) for key in table if key[1] == "compressed-fp32"}
    assert sizes[POINTS[1]] < sizes[POINTS[0]] < float(table["dense", "dense-fp32", "cpu"][1])


def test_the_dense_int8_verdict_appears_exactly_when_the_numbers_say_so(variant_sweep):
    out, points, _, reports = variant_sweep
    wins = expected_wins(reports)
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["dense_int8_beats"] == wins
    markdown = (out / "sweep.md").read_text()
    verdict = next(line for line in markdown.splitlines() if "ense int8 beats" in line)
    if wins:
        assert verdict.startswith("**Dense int8 beats the compressed artifact**")
        for name in POINTS:
            assert (f"{name}: " in verdict) == (name in wins)
        for found in wins.values():
            for w in found:
                assert f"{w['artifact']} on {w['provider']} ({' and '.join(w['on'])})" in verdict
    else:
        assert verdict.startswith("Dense int8 beats no compressed artifact at any point")

    # the same points with dense int8 made worse than every compressed artifact: no verdict
    worse = copy.deepcopy(points)
    for point in worse:
        for row in point["artifacts"]:
            if row["artifact"] == "dense-int8":
                row["metric"] = -1.0
    classification = get_task("text-classification")
    assert dense_int8_wins(worse, classification) == {}
    assert _verdict(worse, {}).startswith("Dense int8 beats no compressed artifact at any point")
    # perplexity is better when lower: a larger value never wins, a smaller one does where the bytes say so
    as_perplexity = [dict(p, metric="perplexity") for p in worse]
    assert dense_int8_wins(as_perplexity, get_task("text-generation"))  # -1 < every metric
    for point in as_perplexity:
        for row in point["artifacts"]:
            if row["artifact"] == "dense-int8":
                row["metric"] = 1e9
    assert dense_int8_wins(as_perplexity, get_task("text-generation")) == {}
    without = [dict(p, artifacts=[r for r in p["artifacts"] if r["artifact"] != "dense-int8"]) for p in points]
    assert dense_int8_wins(without, classification) == {} and _verdict(without, {}).startswith("No dense int8 artifact")


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_the_frontier_plots_exist_for_the_sweep_and_every_point(variant_sweep):
    pytest.importorskip("matplotlib")
    out, _, plots, reports = variant_sweep
    assert out / "frontier.png" in plots
    assert png_size(out / "frontier.png") == (1210, 495)  # one figure, two panels side by side
    assert "](frontier.png)" in (out / "sweep.md").read_text()
    for name, report in reports.items():
        assert report["artifacts"]["frontier_plot"] == "frontier.png"
        assert png_size(out / name / "frontier.png") == (1210, 495)
        assert "](frontier.png)" in (out / name / "report.md").read_text()
