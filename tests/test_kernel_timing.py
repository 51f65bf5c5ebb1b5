"""Ranks chosen by measured latency: factor pairs timed in ONNX Runtime and cached per machine, the
recommended rank multiple, and global allocation spending a budget in time instead of parameters.
Timings come from real ONNX Runtime sessions on tiny shapes; no assertion is about how fast anything runs."""

import json
import math
import re

import pytest
import torch

from fwsvd_export.core import CompressionSpec
from fwsvd_export.core.allocate import (
    Candidate,
    CostTable,
    TimeBudget,
    allocate,
    allocate_ranks,
    speedup_budget,
    table_costs,
)
from fwsvd_export.errors import FwsvdError
from fwsvd_export.stages.kernel_timing import Timing, cost_tables, in_graph, measure, rank_grid, recommended_multiple

SHAPES = [(48, 96), (96, 48)]
QUICK = dict(rounds=2, repeats=1, progress=False)


def test_the_timing_table_has_every_shape_its_grid_and_positive_times(tmp_path):
    timings = measure(SHAPES + [(48, 96)], "cpu", "fp32", "2x8", 1, tmp_path, **QUICK)
    assert sorted(timings) == sorted(SHAPES)
    for (in_f, out_f), t in timings.items():
        assert (t.in_features, t.out_features) == (in_f, out_f)
        assert (
            t.ranks == rank_grid(in_f, out_f) == [4, 8, 12, 16, 20, 24, 28, 31]
        )  # up to the break-even rank 32, exclusive
        assert len(t.factored_ms) == len(t.ranks) and all(ms > 0 for ms in t.factored_ms)
        assert t.dense_ms > 0 and t.empty_ms > 0 and t.noise_ms >= 0
        table = t.cost_table(8)
        assert table.ranks == (8, 16, 24) and list(table.costs) == sorted(table.costs)
    (cache,) = tmp_path.glob("kernel-timing-*.json")
    stored = json.loads(cache.read_text())
    assert stored["key"]["provider"] == "cpu" and stored["key"]["tokens"] == 16 and stored["key"]["threads"] == 1
    assert "onnxruntime" in stored["key"] and "cpu" in stored["key"]["machine"]
    assert sorted(stored["shapes"]) == ["48x96", "96x48"]


def test_a_second_call_measures_nothing_and_a_new_shape_only_itself(tmp_path):
    measure(SHAPES, "cpu", "fp32", "2x8", 1, tmp_path, **QUICK)
    (cache,) = tmp_path.glob("kernel-timing-*.json")
    stored = json.loads(cache.read_text())
    for entry in stored["shapes"].values():  # marks no measurement could produce
        entry["factored_ms"] = [1000.0 + i for i in range(len(entry["ranks"]))]
    cache.write_text(json.dumps(stored))
    again = measure(SHAPES, "cpu", "fp32", "2x8", 1, tmp_path, **QUICK)
    assert all(t.factored_ms[0] == 1000.0 for t in again.values())
    assert json.loads(cache.read_text()) == stored
    grown = measure(SHAPES + [(32, 32)], "cpu", "fp32", "2x8", 1, tmp_path, **QUICK)
    assert grown[(48, 96)].factored_ms[0] == 1000.0 and grown[(32, 32)].factored_ms[0] < 1000.0
    assert sorted(json.loads(cache.read_text())["shapes"]) == ["32x32", "48x96", "96x48"]
    measure(SHAPES, "cpu", "fp32", "2x16", 1, tmp_path, **QUICK)  # other tokens: another key, another file
    assert len(list(tmp_path.glob("kernel-timing-*.json"))) == 2


def test_an_unreadable_cache_is_measured_again_and_replaced(tmp_path):
    measure(SHAPES[:1], "cpu", "fp32", "2x8", 1, tmp_path, **QUICK)
    (cache,) = tmp_path.glob("kernel-timing-*.json")
    cache.write_text("{not json")
    timings = measure(SHAPES[:1], "cpu", "fp32", "2x8", 1, tmp_path, **QUICK)
    assert timings[SHAPES[0]].dense_ms > 0 and sorted(json.loads(cache.read_text())["shapes"]) == ["48x96"]


def test_int8_timings_are_their_own_table(tmp_path):
    timings = measure(SHAPES[:1], "cpu", "int8", "2x8", 1, tmp_path, **QUICK)
    assert all(ms > 0 for ms in timings[SHAPES[0]].factored_ms)
    (cache,) = tmp_path.glob("kernel-timing-*.json")
    assert json.loads(cache.read_text())["key"]["precision"] == "int8"


@pytest.mark.parametrize(
    "provider, precision, problem",
    [
        ("tpu", "fp32", "latency_provider must be one of"),
        ("cpu", "int9", "'compression.latency_precision' must be one of"),
        ("cuda", "int8", "'compression.latency_provider' 'cuda' does not run int8, which is made for cpu"),
        ("cpu", "fp16", "'compression.latency_provider' 'cpu' does not run fp16, which is made for cuda"),
    ],
)
def test_a_provider_or_precision_that_cannot_be_timed_is_named(tmp_path, provider, precision, problem):
    with pytest.raises(FwsvdError, match=re.escape(problem)):
        measure(SHAPES, provider, precision, "1x8", 1, tmp_path, **QUICK)
    assert not list(tmp_path.iterdir())


def timing(times, noise=0.0):
    ranks = list(range(4, 4 * len(times) + 1, 4))
    return Timing(64, 512, ranks, [0.01 + t for t in times], 2 * max(times) + 0.01, 0.01, noise)


def test_the_recommended_multiple_is_the_step_of_the_measured_time():
    ranks = list(range(4, 97, 4))
    stairs = {m: timing([0.1 * math.ceil(r / m) for r in ranks]) for m in (8, 16, 32)}
    assert recommended_multiple({(64, 512): stairs[16]}) == 16
    assert recommended_multiple({(64, 512): stairs[8], (512, 64): stairs[8]}) == 8
    assert recommended_multiple({(64, 512): stairs[32]}) == 32
    assert recommended_multiple({(64, 512): timing([0.01 * r for r in ranks])}) == 1  # smooth: no step
    ragged = timing([0.01 * r * (3 if r % 8 else 1) for r in ranks])  # ranks off multiples of 8 take a slow path
    assert recommended_multiple({(64, 512): ragged}) == 8
    wobble = timing([0.001 * ((r * 7919) % 13) for r in ranks], noise=0.003)  # noise without a trend says nothing
    assert recommended_multiple({(64, 512): wobble}) == 1


def test_cost_tables_drop_the_empty_run_keep_the_multiple_and_never_decrease():
    t = Timing(64, 64, [8, 16, 24, 31], [0.3, 0.25, 0.5, 0.6], 0.9, 0.1)
    table = cost_tables({(64, 64): t}, {"a": (64, 64), "b": (64, 64)}, 8)["b"]
    assert (
        table.ranks == (8, 16, 24)
        and table.costs == pytest.approx((0.175, 0.175, 0.4))
        and table.dense == pytest.approx(0.8)
    )
    assert (
        table(20) == table(24) and table(None) == table.dense and table(48) == pytest.approx(0.8)
    )  # above the grid: in proportion
    assert CostTable((), (), 1.0)(8) == math.inf
    with pytest.raises(ValueError):
        CostTable((8, 16), (0.2, 0.1), 1.0)


def flat(name, size=64):
    return Candidate(name, size, size, torch.ones(size))


def test_a_time_budget_takes_free_rank_steps_first_and_spends_the_rest_by_gain():
    tables = {
        "stairs": CostTable((8, 16, 24, 32), (1.0, 1.0, 2.0, 2.0), 3.0),  # 16 costs what 8 does
        "linear": CostTable((8, 16, 24, 32), (1.0, 2.0, 3.0, 4.0), 5.0),
    }
    layers = [flat("stairs"), Candidate("linear", 64, 64, 2 * torch.ones(64))]  # linear's ranks remove 4x the error
    cost = table_costs(tables)
    assert allocate(layers, 2.0, 8, cost) == {"stairs": 16, "linear": 8}  # rank 8 everywhere costs 2.0: one free step
    assert allocate(layers, 3.0, 8, cost) == {"stairs": 16, "linear": 16}
    assert allocate(layers, 5.0, 8, cost) == {"stairs": 24, "linear": 24}
    assert allocate(layers, 6.0, 8, cost) == {"stairs": 16, "linear": None}  # restoring linear beats stairs' step
    # The same layers under a parameter budget of two rank-8 layers: no step is free.
    assert allocate_ranks(layers, 2 * 8 * 128, 8) == {"stairs": 8, "linear": 8}


def test_a_layer_whose_factors_run_no_faster_than_dense_stays_dense():
    tables = {
        "slow": CostTable((8, 16, 24), (2.0, 2.5, 3.0), 2.0),
        "fast": CostTable((8, 16, 24), (0.5, 1.0, 1.5), 3.0),
    }
    layers = [flat("slow"), flat("fast")]
    assert allocate(layers, 10.0, 8, table_costs(tables)) == {"slow": None, "fast": None}  # 10 ms affords all dense
    assert allocate(layers, 3.2, 8, table_costs(tables)) == {"slow": None, "fast": 16}


def random_candidates(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(48, 48), (48, 96), (96, 48), (8, 3), (64, 16), (2, 1)]
    return [
        Candidate(f"l{i}", a, b, torch.rand(min(a, b), generator=g).pow(3 + i).sort(descending=True).values)
        for i, (a, b) in enumerate(shapes)
    ]


@pytest.mark.parametrize(
    "fraction, multiple, expected",
    [
        (0.2, 1, {"l0": 10, "l1": 5, "l2": 4, "l3": 1, "l4": 3, "l5": None}),
        (0.4, 8, {"l0": 16, "l1": 8, "l2": 8, "l3": None, "l4": None, "l5": None}),
        (0.7, 4, {"l0": None, "l1": 20, "l2": 20, "l3": None, "l4": 8, "l5": None}),
    ],
)
def test_the_parameter_budget_allocates_as_before(fraction, multiple, expected):
    """Ranks the parameter-only greedy gave before it learned other costs (recorded from that version)."""
    candidates = random_candidates(7)
    budget = int(fraction * sum(c.in_features * c.out_features for c in candidates))
    assert allocate_ranks(candidates, budget, multiple) == expected


def test_a_speedup_target_becomes_a_time_budget_for_the_allocated_layers():
    tables = {
        "a": CostTable((8, 16), (1.0, 2.0), 4.0),
        "b": CostTable((8, 16), (1.0, 2.0), 4.0),
        "pinned": CostTable((8, 16), (1.0, 2.0), 4.0),
    }
    # 20 ms model, 2x: save 10 ms. The pinned layer at rank 16 saves 2, so a and b (8 ms dense) may take 8 - 8 = 0 ...
    with pytest.raises(FwsvdError, match=r"'target_speedup' 2 on cpu at 1x128 cannot be reached.*at most 1\.67x"):
        speedup_budget(tables, ["a", "b"], {"pinned": 16}, 20.0, 2.0, 8, "on cpu at 1x128")
    # ... and at 1.5x (save 6.67 ms) they may take 8 - 4.67 = 3.33 ms.
    assert speedup_budget(tables, ["a", "b"], {"pinned": 16}, 20.0, 1.5, 8, "on cpu at 1x128") == pytest.approx(
        8 - (20 / 3 - 2)
    )
    assert speedup_budget(tables, ["a", "b"], {"pinned": None}, 20.0, 1.25, 8, "") == pytest.approx(4.0)


def test_a_speedup_target_is_a_cut_of_its_own():
    spec = CompressionSpec(target_speedup=2.0)
    assert spec.ratio is None and spec.allocates and (spec.latency_provider, spec.latency_shape) == ("cpu", "1x128")
    assert not CompressionSpec().allocates and CompressionSpec(budget=0.5).allocates


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"target_speedup": 1.0}, "target_speedup"),
        ({"target_speedup": 0.5}, "target_speedup"),
        ({"target_speedup": float("nan")}, "target_speedup"),
        ({"target_speedup": float("inf")}, "target_speedup"),
        ({"target_speedup": 2.0, "ratio": 0.5}, "target_speedup"),
        ({"target_speedup": 2.0, "rank": 8}, "target_speedup"),
        ({"target_speedup": 2.0, "budget": 0.5}, "target_speedup"),
        ({"latency_provider": "tpu"}, "latency_provider"),
        ({"latency_shape": "128"}, "latency_shape"),
        ({"latency_shape": "0x128"}, "latency_shape"),
        ({"latency_precision": ""}, "latency_precision"),
    ],
)
def test_the_spec_rejects_bad_latency_settings(fields, key):
    with pytest.raises(FwsvdError, match=re.escape(f"'{key}'")):
        CompressionSpec(**fields)


def test_tables_are_scaled_to_each_layers_time_inside_the_model():
    """A layer's product nodes took 2 ms in the profiled model where its dense graph alone took 4: its table
    halves. Node names are module paths, maybe without the leading scope ('model.'). A layer the profile
    does not name (a fusion renamed it) takes the median ratio of the others."""
    alone = CostTable((8, 16), (1.0, 2.0), 4.0)
    tables = {name: alone for name in ("model.enc.0.q", "model.enc.0.k", "model.enc.1.q", "model.enc.1.k")}
    nodes = {
        "/enc.0/q/MatMul": 2.0,
        "/enc.0/k/MatMul": 4.0,
        "/enc.1/q/MatMul": 1.0,
        "/enc.0/MatMul": 9.0,
    }  # the last: attention scores, no layer's
    scaled, ratio = in_graph(tables, nodes)
    assert ratio == pytest.approx(1.0 / 2)
    assert scaled["model.enc.0.q"] == CostTable((8, 16), (0.5, 1.0), 2.0)
    assert scaled["model.enc.0.k"] == alone
    assert scaled["model.enc.1.q"] == CostTable((8, 16), (0.25, 0.5), 1.0)
    assert scaled["model.enc.1.k"] == CostTable((8, 16), (0.5, 1.0), 2.0)  # not profiled: the median ratio
    assert in_graph(tables, {}) == (tables, 1.0)


def test_a_model_timed_faster_than_its_layers_is_taken_to_take_their_time():
    """Layers timed alone sum to 8 ms, the whole model to 5 ms: the budget counts the model as 8 ms, so a
    saving is never counted against time the model does not spend and an absurd target stays out of reach."""
    tables = {"a": CostTable((8, 16), (1.0, 2.0), 4.0), "b": CostTable((8, 16), (1.0, 2.0), 4.0)}
    budget = TimeBudget(tables, 5.0, "on cpu at 1x128")
    assert budget.linear_ms == 8.0 and budget.total_ms == 8.0
    assert budget.budget(["a", "b"], {}, 2.0, 8) == pytest.approx(8 - 8 / 2)
    assert budget.predicted_speedup({"a": 8, "b": 8}) == pytest.approx(8 / 2)
    with pytest.raises(FwsvdError, match="'target_speedup' 1000 on cpu at 1x128 cannot be reached"):
        budget.budget(["a", "b"], {}, 1000.0, 8)
    slower = TimeBudget(tables, 10.0, "on cpu at 1x128")  # 2 ms outside the targeted layers
    assert slower.total_ms == 10.0 and slower.predicted_speedup({"a": 8, "b": 8}) == pytest.approx(10 / 4)
