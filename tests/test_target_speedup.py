"""compression.target_speedup: global allocation spends a budget in measured time, not in parameters. The
layers' factor-pair timings are measured once per machine (cached) and the dense graph timed on the same
provider; a target out of reach is refused before the statistics pass."""

import copy
import json

import pytest
from transformers import BertConfig, BertForSequenceClassification

import fwsvd_export.aim
from fwsvd_export.aim import AIM_TOLERANCE, AIM_TRIALS, next_aim
from fwsvd_export.errors import FwsvdError
from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import compress_only, run
from fwsvd_export.stages.kernel_timing import Timing, recommended_multiple
from fwsvd_export.stages.report import markdown

from conftest import write_recipe

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out


@pytest.fixture(scope="module")
def wide_classifier(tmp_path_factory, tokenizer, classifier_dir):
    """Wide enough (256 x 1024 Linears) that a factor pair can beat its dense MatMul on a CPU; the labels
    of the tiny classifier, so it reads the same data."""
    labels = BertConfig.from_pretrained(classifier_dir).id2label
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    folder = tmp_path_factory.mktemp("wide-classifier")
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def speedup_recipe(classifier_recipe, wide_classifier, tmp_path):
    classifier_recipe["model"]["path"] = str(wide_classifier)
    classifier_recipe["data"]["max_length"] = 64
    classifier_recipe["compression"] = {
        "method": "fwsvd",
        "target": [r"encoder\.layer\.\d+\."],
        "ratio": None,
        "target_speedup": 1.1,
        "latency_shape": "1x64",
        "cache_dir": str(tmp_path / "cache"),
    }
    classifier_recipe["validation"]["latency"] = {"shapes": ["1x64"], "warmup": 1, "runs": 5}
    classifier_recipe["validation"]["max_metric_loss"] = 1.0  # a random model: this test is about the allocation
    return classifier_recipe


def test_a_speedup_target_allocates_ranks_within_the_measured_time_budget(tmp_path, speedup_recipe):
    result = run(load_recipe(write_recipe(tmp_path, speedup_recipe)), tmp_path / "out", progress=False)
    allocation = result.report.to_dict()["compression"]["allocation"]
    assert allocation["target_speedup"] == 1.1 and allocation["measured_on"] == "on cpu at 1x64 (fp32)"
    # the tables' time of the chosen ranks fits the budget of the speed-up the kept trial was aimed at
    assert allocation["predicted_speedup"] >= allocation["aimed_at"]
    # The model's time and its layers' share come from the same profiled runs of the dense graph: the
    # layers take part of it, and the tables were scaled to their time there.
    assert 0 < allocation["targeted_layers_dense_ms"] < allocation["dense_model_ms"]
    assert allocation["in_graph_ratio"] > 0
    layers = result.report.to_dict()["compression"]["layers"]
    assert any(p["rank"] is not None for p in layers)
    assert all("global allocation of time" in p["reason"] for p in layers)
    assert "kernel timing" in result.report.to_dict()["seconds"]
    cached = list((tmp_path / "cache").glob("kernel-timing-*.json"))
    shapes = json.loads(cached[0].read_text())["shapes"]
    assert len(cached) == 1 and {"256x256", "256x1024", "1024x256"} <= set(shapes)
    # With no rank_multiple in the recipe, ranks step with the kernels: the multiple the timings show.
    multiple = recommended_multiple({tuple(map(int, k.split("x"))): Timing(**v) for k, v in shapes.items()})
    assert allocation["rank_multiple"] == multiple and allocation["rank_multiple_from"] == "kernel timings"
    assert all(p["rank"] % multiple == 0 for p in layers if p["rank"] is not None)


@pytest.mark.parametrize("tolerance", [AIM_TOLERANCE, 0.0])  # 0: no trial is close enough, every one is made
def test_a_speedup_target_is_aimed_by_timing_each_trial_against_the_dense_graph(
    tmp_path, speedup_recipe, monkeypatch, tolerance
):
    """The tables predict; the trial's own graph, timed beside the dense one, decides. A trial that misses
    the target by more than the tolerance is followed by one aimed where the miss says; after several
    trials, their graphs are timed again in the same rounds and the one closest to the target there is
    kept (compressed again if need be: its factors are those it was measured with); the scratch graphs
    are gone from the output."""
    monkeypatch.setattr(fwsvd_export.aim, "AIM_TOLERANCE", tolerance)
    # Within reach wherever the Linears take a seventh of the model's time (about a fifth on the slowest
    # machine seen, a busy one): this test is about the search, not about how fast the machine is.
    target = 1.15
    speedup_recipe["compression"]["target_speedup"] = target
    result = run(load_recipe(write_recipe(tmp_path, speedup_recipe)), tmp_path / "out", progress=False)
    allocation = result.report.to_dict()["compression"]["allocation"]
    aim = allocation["aim"]
    trials, miss = aim["trials"], lambda trial: abs(trial["measured"] / target - 1)
    assert aim["tolerance"] == tolerance and trials[0]["aimed_at"] == target
    assert 1 <= len(trials) <= AIM_TRIALS
    if len(trials) < AIM_TRIALS:  # the search stops early at a trial close enough, or an aim the tables cannot reach
        assert (
            aim["stopped"] == "within tolerance"
            and miss(trials[-1]) <= tolerance
            or aim["stopped"].startswith("next aim out of reach")
        )
    assert all(t["measured"] == pytest.approx(t["dense_ms"] / t["compressed_ms"]) for t in trials)
    for before, after in zip(trials, trials[1:]):
        assert miss(before) > aim["tolerance"]
        assert after["aimed_at"] == pytest.approx(
            max(1.0 + tolerance, before["aimed_at"] * target / before["measured"])
        )
    kept = trials[aim["kept"]]
    by = "measured_together" if len(trials) > 1 else "measured"
    assert aim["kept_by"] == by and all(("measured_together" in t) == (len(trials) > 1) for t in trials)
    assert all(abs(kept[by] / target - 1) <= abs(t[by] / target - 1) for t in trials)
    assert allocation["aimed_at"] == kept["aimed_at"]
    assert result.report.to_dict()["compression"]["summary"]["targeted_kept_ratio"] == pytest.approx(kept["kept_ratio"])
    assert not (result.output / ".aim").exists()
    # report.md lists the trials, the kept one marked, and says when the dense graph's own time moved more
    # than the tolerance across the budget and the trials (the machine changed speed under the run).
    text = (result.output / "report.md").read_text()
    columns = 9 if len(trials) > 1 else 8
    rows = [
        line for line in text.splitlines() if line.count("|") == columns + 1 and line.split("|")[1].strip().isdigit()
    ]
    assert "| trial | aimed at | predicted | measured | dense ms | trial ms |" in text
    assert ("| measured together |" in text) == (len(trials) > 1)
    assert len(rows) == len(trials) and [r.rstrip(" |").endswith("yes") for r in rows].count(True) == 1
    assert rows[aim["kept"]].rstrip(" |").endswith("yes")
    steady = copy.deepcopy(result.report)
    for trial in steady.compression.allocation["aim"]["trials"]:
        trial["dense_ms"] = allocation["dense_model_ms"]
    assert "the machine's speed changed" not in markdown(steady)
    drifted = steady.compression.allocation["aim"]["trials"][-1]
    drifted["dense_ms"] = allocation["dense_model_ms"] * (1.5 + tolerance)
    assert f"({0.5 + tolerance:.0%} apart): the machine's speed changed" in markdown(steady)


def test_the_next_aim_corrects_the_last_by_its_miss_and_stays_above_one():
    assert next_aim(2.0, 2.0, 2.26) == pytest.approx(2.0 * 2.0 / 2.26)  # overshot: aim lower
    assert next_aim(1.5, 2.0, 1.8) == pytest.approx(1.5 * 2.0 / 1.8)  # undershot: aim higher than the last aim
    assert next_aim(1.1, 1.1, 5.0) == pytest.approx(1.0 + AIM_TOLERANCE)  # never at or below no speed-up


def test_a_recipes_rank_multiple_overrides_the_one_the_timings_show(tmp_path, speedup_recipe):
    speedup_recipe["compression"]["rank_multiple"] = 24  # a multiple no kernel step suggests
    result = run(load_recipe(write_recipe(tmp_path, speedup_recipe)), tmp_path / "out", progress=False)
    allocation = result.report.to_dict()["compression"]["allocation"]
    assert allocation["rank_multiple"] == 24 and allocation["rank_multiple_from"] == "recipe"
    ranks = [p["rank"] for p in result.report.to_dict()["compression"]["layers"] if p["rank"] is not None]
    assert ranks and all(r % 24 == 0 for r in ranks)


def test_a_second_run_reuses_the_kernel_timings(tmp_path, speedup_recipe):
    recipe = write_recipe(tmp_path, speedup_recipe)
    run(load_recipe(recipe), tmp_path / "one", progress=False)
    (cached,) = (tmp_path / "cache").glob("kernel-timing-*.json")
    before = cached.stat().st_mtime_ns
    second = run(load_recipe(recipe), tmp_path / "two", progress=False)
    assert cached.stat().st_mtime_ns == before  # nothing measured again
    assert second.report.to_dict()["compression"]["allocation"]["target_speedup"] == 1.1


def test_a_target_out_of_reach_is_refused_before_the_statistics_pass(tmp_path, speedup_recipe):
    speedup_recipe["compression"]["target_speedup"] = 1000.0
    with pytest.raises(
        FwsvdError, match=r"'compression.target_speedup' 1000 on cpu at 1x64 \(fp32\) cannot be reached"
    ):
        run(load_recipe(write_recipe(tmp_path, speedup_recipe)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_speedup_target_names_a_precision_the_recipe_exports_and_a_provider_that_runs_it(tmp_path, speedup_recipe):
    speedup_recipe["compression"]["latency_precision"] = "int8"
    with pytest.raises(FwsvdError, match="'compression.latency_precision' 'int8' must be one of 'export.precisions'"):
        load_recipe(write_recipe(tmp_path, speedup_recipe))
    speedup_recipe["export"] = {"precisions": ["fp32", "fp16"]}
    speedup_recipe["compression"]["latency_precision"] = "fp16"
    with pytest.raises(FwsvdError, match="'compression.latency_provider' 'cpu' does not run fp16"):
        load_recipe(write_recipe(tmp_path, speedup_recipe))


def test_compress_alone_refuses_a_speedup_target(tmp_path, speedup_recipe):
    with pytest.raises(FwsvdError, match="use `fwsvd-export run`"):
        compress_only(load_recipe(write_recipe(tmp_path, speedup_recipe)), tmp_path / "out", progress=False)


def test_set_replaces_a_ratio_with_a_speedup_target(tmp_path, classifier_recipe):
    recipe = load_recipe(write_recipe(tmp_path, classifier_recipe), ["compression.target_speedup=2"])
    assert recipe.compression.target_speedup == 2.0 and recipe.compression.ratio is None
