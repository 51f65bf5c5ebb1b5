"""Global rank allocation under a budget, and statistics that scale: shared Grams, diagonal sides,
several passes under a memory budget, and the on-disk cache."""

import copy
import re

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from fwsvd_export.config import DataSource
from fwsvd_export.core import Batch, CompressionSpec, LayerOverride, compress_, factorized_layers
from fwsvd_export.core.allocate import Candidate, allocate_ranks
from fwsvd_export.errors import FwsvdError
from fwsvd_export.stages.tasks import TASKS

from conftest import sentences

TARGET = [r"encoder\.layer\.\d+\."]


@pytest.fixture
def bert(bert_dir):
    return AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()


@pytest.fixture
def batches(bert, tokenizer):
    records = [{"text": t, "label": i % 3} for i, t in enumerate(sentences(24, 8))]
    return TASKS["text-classification"].make_batches(
        records, DataSource(label_column="label"), tokenizer, 32, 8, True, bert.config
    )


def tail(spectrum, rank):
    return float(spectrum[rank:].square().sum())


def test_allocation_spends_the_budget_where_the_spectrum_is_heavy():
    steep = Candidate("steep", 64, 64, torch.logspace(0, -6, 64))
    flat = Candidate("flat", 64, 64, torch.ones(64))
    ranks = allocate_ranks([steep, flat], budget_params=20 * 128, multiple=1)
    assert ranks["flat"] > ranks["steep"] >= 1
    assert (ranks["flat"] + ranks["steep"]) * 128 <= 20 * 128


def test_allocation_rounds_to_multiples_and_can_restore_a_layer_to_dense():
    heavy = Candidate("heavy", 64, 64, torch.ones(64))
    light = Candidate("light", 64, 64, torch.logspace(0, -8, 64))
    ranks = allocate_ranks([heavy, light], budget_params=64 * 64 + 8 * 128, multiple=8)
    assert ranks["heavy"] is None and ranks["light"] == 8
    ranks = allocate_ranks([heavy, light], budget_params=24 * 128, multiple=8)
    assert all(r % 8 == 0 for r in ranks.values())


@pytest.mark.slow
def test_budget_run_meets_the_budget_and_beats_uniform_ranks(bert, batches):
    task = TASKS["text-classification"]
    uniform = copy.deepcopy(bert)
    uni = compress_(
        uniform, CompressionSpec(method="kfac", target=TARGET, ratio=0.4), batches, task.loss, progress=False
    )
    glob = copy.deepcopy(bert)
    res = compress_(
        glob, CompressionSpec(method="kfac", target=TARGET, ratio=None, budget=0.4), batches, task.loss, progress=False
    )
    summary = res.summary()
    assert summary["targeted_kept_ratio"] <= 0.4
    assert summary["targeted_params_after"] >= uni.summary()["targeted_params_after"] * 0.95
    assert len({p.rank for p in res.layers}) > 2  # ranks differ between layers
    assert all(p.allocate and "global allocation" in p.reason for p in res.layers)
    # Summed weighted truncation error (the loss estimate) is lower than with one ratio everywhere.
    from fwsvd_export.core.compress import gather_statistics
    from fwsvd_export.core.lowrank import weighted_spectrum
    from fwsvd_export.core.methods import METHODS

    layers = {p.name: bert.get_submodule(p.name) for p in res.layers}
    stats, _ = gather_statistics(
        bert, layers, {"input_gram", "output_gram"}, CompressionSpec(), batches, task.loss, False
    )
    total = {"uniform": 0.0, "global": 0.0}
    for name, plan_u, plan_g in zip(layers, uni.layers, res.layers):
        w = METHODS["kfac"].build(stats[name], CompressionSpec().damping)
        s = weighted_spectrum(layers[name].weight, w.left, w.right)
        total["uniform"] += tail(s, plan_u.rank)
        total["global"] += tail(s, plan_g.rank if plan_g.rank is not None else len(s))
    assert total["global"] < total["uniform"]


@pytest.mark.slow
def test_budget_with_rank_multiple_and_model_scope(bert, batches):
    task = TASKS["text-classification"]
    spec = CompressionSpec(
        method="fwsvd", target=TARGET, ratio=None, budget=0.99, budget_scope="model", rank_multiple=8
    )
    res = compress_(copy.deepcopy(bert), spec, batches, task.loss, progress=False)
    assert all(p.rank is None or p.rank % 8 == 0 for p in res.layers)
    total = sum(p.numel() for p in bert.parameters())
    saved = sum(p.params_before - p.params_after for p in res.layers)
    assert total - saved <= 0.99 * total


def test_a_budget_too_small_for_one_rank_each_is_an_error(bert, batches):
    spec = CompressionSpec(method="svd", target=TARGET, ratio=None, budget=0.001)
    with pytest.raises(FwsvdError, match="too few"):
        compress_(bert, spec, batches, TASKS["text-classification"].loss, progress=False)


@pytest.mark.slow
def test_layers_reading_one_input_share_one_input_gram(bert, batches):
    from fwsvd_export.core.compress import gather_statistics

    names = [f"bert.encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")]
    layers = {n: bert.get_submodule(n) for n in names}
    stats, _ = gather_statistics(
        bert,
        layers,
        {"input_gram", "output_gram"},
        CompressionSpec(),
        batches,
        TASKS["text-classification"].loss,
        False,
    )
    assert stats[names[1]].shares_input_with == names[0] and stats[names[2]].shares_input_with == names[0]
    assert stats[names[1]].input_gram is stats[names[0]].input_gram
    alone, _ = gather_statistics(
        bert,
        {names[2]: layers[names[2]]},
        {"input_gram"},
        CompressionSpec(),
        batches,
        TASKS["text-classification"].loss,
        False,
    )
    torch.testing.assert_close(alone[names[2]].input_gram, stats[names[2]].input_gram)
    assert not torch.equal(stats[names[0]].output_gram, stats[names[1]].output_gram)


@pytest.mark.slow
def test_wide_sides_fall_back_to_diagonal_and_the_report_says_so(bert, batches):
    spec = CompressionSpec(method="kfac", target=[r"intermediate\.dense"], ratio=0.5, max_gram_size=50)
    res = compress_(bert, spec, batches, TASKS["text-classification"].loss, progress=False)
    for plan in res.layers:  # 96 outputs > 50: diagonal output side; 48 inputs: full input side
        assert any("output side wider than max_gram_size" in n for n in plan.notes)
        assert not any("input side" in n for n in plan.notes)
    assert len(factorized_layers(bert)) == 2


@pytest.mark.slow
def test_a_memory_budget_splits_the_pass_without_changing_the_statistics(bert, batches):
    from fwsvd_export.core.compress import gather_statistics

    layers = {n: m for n, m in bert.named_modules() if n.endswith("intermediate.dense") or n.endswith("output.dense")}
    loss = TASKS["text-classification"].loss
    one, info_one = gather_statistics(
        bert, layers, {"input_gram", "output_gram"}, CompressionSpec(), batches, loss, False
    )
    many, info_many = gather_statistics(
        bert, layers, {"input_gram", "output_gram"}, CompressionSpec(memory_budget_gb=1e-5), batches, loss, False
    )
    assert info_one["passes"] == 1 and info_many["passes"] == len(layers)
    for name in layers:
        torch.testing.assert_close(one[name].input_gram, many[name].input_gram)
        torch.testing.assert_close(one[name].output_gram, many[name].output_gram)


@pytest.mark.slow
def test_statistics_cache_is_reused_across_ratios_and_methods_and_keyed_by_data(bert, batches, tmp_path):
    loss = TASKS["text-classification"].loss
    base = dict(target=TARGET, cache_dir=str(tmp_path / "cache"))
    first = copy.deepcopy(bert)
    r1 = compress_(first, CompressionSpec(method="kfac", ratio=0.5, **base), batches, loss, progress=False)
    assert r1.statistics["cache"].startswith("stored")
    second = copy.deepcopy(bert)
    r2 = compress_(second, CompressionSpec(method="kfac", ratio=0.5, **base), batches, loss, progress=False)
    assert r2.statistics["cache"].startswith("hit") and r2.statistics["passes"] == 0
    for (n, a), (_, b) in zip(factorized_layers(first).items(), factorized_layers(second).items()):
        assert torch.equal(a.first.weight, b.first.weight), n
    r3 = compress_(
        copy.deepcopy(bert), CompressionSpec(method="svd-llm", ratio=0.3, **base), batches, loss, progress=False
    )
    assert r3.statistics["cache"].startswith("hit")
    r4 = compress_(
        copy.deepcopy(bert), CompressionSpec(method="kfac", ratio=0.5, **base), batches[:1], loss, progress=False
    )
    assert r4.statistics["cache"].startswith("stored")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_the_python_api_honours_a_budget_over_the_default_ratio(bert, batches):
    res = compress_(bert, CompressionSpec(method="svd", target=TARGET, budget=0.3), batches, None, progress=False)
    assert all(p.allocate for p in res.layers) and res.summary()["targeted_kept_ratio"] <= 0.3


def test_layers_the_loss_never_reaches_stay_dense_with_a_reason(tokenizer):
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=96,
        )
    ).eval()
    records = [{"text": t, "text_pair": t[::-1]} for t in sentences(8, 3)]
    task = TASKS["feature-extraction"]
    batches = task.make_batches(records, DataSource(text_pair_column="text_pair"), tokenizer, 24, 4, True, None)
    res = compress_(model, CompressionSpec(method="kfac", target=[".*"], ratio=0.5), batches, task.loss, progress=False)
    pooler = next(p for p in res.layers if p.name == "pooler.dense")
    assert pooler.rank is None and "no calibration statistics" in pooler.reason
    assert sum(p.rank is not None for p in res.layers) == 6


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_an_unreadable_cache_file_is_a_miss_that_is_gathered_again_and_replaced(bert, batches, tmp_path, damage):
    loss = TASKS["text-classification"].loss
    spec = CompressionSpec(method="kfac", ratio=0.5, target=TARGET, cache_dir=str(tmp_path / "cache"))
    reference = compress_(copy.deepcopy(bert), spec, batches, loss, progress=False)
    (path,) = (tmp_path / "cache").glob("*.safetensors")
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00\xff" * 500, "empty": b""}[damage])
    again = copy.deepcopy(bert)
    result = compress_(again, spec, batches, loss, progress=False)
    assert result.statistics["passes"] == 1 and result.statistics["cache"].startswith("stored")
    assert str(path) in result.statistics["cache_unreadable"]
    assert path.read_bytes() == data  # replaced by the same statistics, gathered again
    assert [p.rank for p in result.layers] == [p.rank for p in reference.layers]
    assert not list((tmp_path / "cache").glob(".*.tmp"))


@pytest.mark.parametrize("which", ["first", "projected"])
def test_a_cache_file_holding_non_finite_statistics_is_a_miss_gathered_again(bert, batches, tmp_path, which):
    from safetensors import safe_open
    from safetensors.torch import save_file

    loss = TASKS["text-classification"].loss
    spec = CompressionSpec(method="kfac", ratio=0.5, target=TARGET, cache_dir=str(tmp_path / "cache"))
    compress_(copy.deepcopy(bert), spec, batches, loss, progress=False)
    (path,) = (tmp_path / "cache").glob("*.safetensors")
    data = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    bad = next(k for k in sorted(tensors) if which == "first" or "|projected_" in k)
    tensors[bad].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    result = compress_(copy.deepcopy(bert), spec, batches, loss, progress=False)
    assert result.statistics["passes"] == 1 and "non-finite" in result.statistics["cache_unreadable"]
    assert path.read_bytes() == data  # replaced by the statistics gathered again


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"damping": 0}, "damping"),
        ({"damping": float("nan")}, "damping"),
        ({"ratio": 1.5}, "ratio"),
        ({"method": "magic"}, "method"),
        ({"budget": 0.3, "ratio": 0.5}, "budget"),
        ({"rank": 0}, "rank"),
        ({"target": ["("]}, "target[0]"),
        ({"memory_budget_gb": float("inf")}, "memory_budget_gb"),
        ({"overrides": {"(": LayerOverride(ratio=0.5)}}, "overrides.("),
        ({"overrides": {"q": {"ratio": 0.5}}}, "overrides.q"),
    ],
)
def test_a_compression_spec_checks_itself_in_python_as_in_yaml(fields, key):
    with pytest.raises(FwsvdError, match=re.escape(f"'{key}'")):
        CompressionSpec(**fields)


class _Misleading(torch.nn.Module):
    """Layer `loud` has large singular values but barely reaches the output; `quiet` has small ones and
    decides it. Plain spectra (svd) send the global budget to the wrong layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 32)
        self.loud, self.quiet = torch.nn.Linear(32, 32, bias=False), torch.nn.Linear(32, 32, bias=False)
        with torch.no_grad():
            self.loud.weight.mul_(10)
            self.quiet.weight.mul_(0.1)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        x = self.embed(input_ids)
        return 1e-3 * self.loud(x) + 100 * self.quiet(x)


def _regression_case(model: torch.nn.Module, tokens: list[tuple[int, int]]):
    """`model`, one seeded batch per (low, high) token range labelled with the model's own outputs, and the
    squared error to those labels as the task loss."""
    batches = []
    for seed, (low, high) in enumerate(tokens):
        ids = torch.randint(low, high, (4, 6), generator=torch.Generator().manual_seed(seed))
        batches.append(Batch({"input_ids": ids}, torch.ones_like(ids).bool(), labels=model(ids).detach()))
    return model, batches, lambda m, b: (m(**b.inputs) - b.labels).square().sum()


def _misleading_case():
    return _regression_case(_Misleading(), [(0, 10)] * 5)


def test_the_allocation_check_ships_uniform_ranks_when_the_global_allocation_is_worse():
    model, batches, loss = _misleading_case()
    spec = CompressionSpec(method="svd", target=["loud", "quiet"], budget=0.3)
    result = compress_(model, spec, batches, loss, progress=False)
    check = result.allocation
    assert check["winner"] == "uniform" and check["held_out"] and check["check_batches"] == 1
    assert check["candidates"]["global"]["loss"] > 1.3 * check["candidates"]["uniform"]["loss"]
    assert all(c["params"] <= 0.3 * 2 * 32 * 32 for c in check["candidates"].values())
    assert model.quiet.rank == model.loud.rank  # what shipped is the uniform allocation
    unchecked = compress_(
        _misleading_case()[0],
        CompressionSpec(method="svd", target=["loud", "quiet"], budget=0.3, allocation_check=0),
        batches,
        loss,
        progress=False,
    )
    assert unchecked.allocation == {} and unchecked.layers[0].rank > unchecked.layers[1].rank  # global: loud first


class _Shifting(torch.nn.Module):
    """`a` reads the first half of the embedding, `b` the second. Tokens 0-4 live in the first half, 5-9 in
    the second: calibration rows of the first kind make `b` look idle, rows of the second need it most."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 32)
        self.a, self.b = torch.nn.Linear(32, 32, bias=False), torch.nn.Linear(32, 32, bias=False)
        with torch.no_grad():
            self.embed.weight[:5, 16:].mul_(1e-2)
            self.embed.weight[5:, :16].mul_(1e-2)
            self.a.weight[:, 16:] = 0
            self.b.weight[:, :16] = 0

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        x = self.embed(input_ids)
        return self.a(x) + self.b(x)


def _shifting_case():
    """Four batches of tokens 0-4 (the statistics' rows), then one of tokens 5-9 (the check's)."""
    return _regression_case(_Shifting(), [(0, 5)] * 4 + [(5, 10)])


def test_the_check_ships_uniform_when_global_wins_on_the_statistics_rows_but_loses_on_held_out_ones():
    """The greedy allocation fits the rows it was estimated on; the check scores rows it never saw."""
    _, batches, loss = _shifting_case()
    shipped = {}
    for name, fields in {"global": {"budget": 0.3, "allocation_check": 0}, "uniform": {"ratio": 0.3}}.items():
        model = _shifting_case()[0]
        compress_(model, CompressionSpec(target=["a", "b"], **fields), batches[:4], loss, progress=False)
        with torch.no_grad():
            shipped[name] = [sum(float(loss(model, b)) for b in rows) for rows in (batches[:4], batches[4:])]
    assert shipped["global"][0] < 0.01 * shipped["uniform"][0]  # global wins on the statistics' rows
    assert shipped["global"][1] > 1.1 * shipped["uniform"][1]  # and loses on the held-out ones

    model = _shifting_case()[0]
    check = compress_(model, CompressionSpec(target=["a", "b"], budget=0.3), batches, loss, progress=False).allocation
    assert check["winner"] == "uniform" and check["check_batches"] == 1
    assert model.a.rank == model.b.rank
    with torch.no_grad():
        assert sum(float(loss(model, b)) for b in batches[4:]) == pytest.approx(shipped["uniform"][1], rel=1e-4)


def test_the_check_reports_each_candidates_loss_with_its_standard_error_over_the_batches():
    import statistics

    from fwsvd_export.stages.report import _allocation_lines

    model, batches, loss = _misleading_case()
    spec = CompressionSpec(method="svd", target=["loud", "quiet"], budget=0.3, allocation_check=0.4)
    check = compress_(model, spec, batches, loss, progress=False).allocation
    assert check["check_batches"] == 2 and all("loss_se" in c for c in check["candidates"].values())
    with torch.no_grad():  # the shipped model is the winner: its loss on each held-out batch
        losses = [float(loss(model, b)) for b in batches[-2:]]
    winner = check["candidates"][check["winner"]]
    assert winner["loss"] == pytest.approx(sum(losses), rel=1e-4)
    assert winner["loss_se"] == pytest.approx(statistics.stdev(losses) * 2**0.5, rel=1e-3)
    line = _allocation_lines(check)[0]
    assert f"uniform {check['candidates']['uniform']['loss']:.4g} ± " in line and "standard error" in line


def test_the_allocation_check_keeps_the_global_allocation_when_it_is_better(bert, batches):
    loss = TASKS["text-classification"].loss
    result = compress_(bert, CompressionSpec(method="kfac", target=TARGET, budget=0.4), batches, loss, progress=False)
    check = result.allocation
    assert check["winner"] == min(check["candidates"], key=lambda k: check["candidates"][k]["loss"])
    assert check["candidates"][check["winner"]]["loss"] <= check["candidates"]["uniform"]["loss"]
    assert result.summary()["targeted_kept_ratio"] <= 0.4 + 1e-9
    assert set(result.seconds) == {"statistics", "allocation check", "factorize"}  # the check timed on its own


def test_the_factorization_hands_freed_memory_back_once_per_transformer_block(bert, batches, monkeypatch):
    """Within a block the next layer reuses the workspace the one before it freed (a trim after each layer
    made every page fault in again); the heap is trimmed as each block's last layer is installed."""
    from fwsvd_export.core import heap
    from fwsvd_export.core.compress import gather_for

    loss = TASKS["text-classification"].loss
    spec = CompressionSpec(method="kfac", target=TARGET, ratio=0.4)
    stats, _ = gather_for(bert, [spec], batches, loss, progress=False)
    trims = []
    monkeypatch.setattr(heap, "trim", lambda: trims.append(len(factorized_layers(bert))))
    result = compress_(bert, spec, batches, loss, progress=False, statistics=stats)
    per_block = [sum(f".layer.{i}." in p.name for p in result.compressed) for i in range(2)]
    assert per_block[0] > 1 and trims == [per_block[0], sum(per_block)]


def test_the_model_shipped_after_the_check_is_the_winner_it_scored_factorized_once(bert, batches, monkeypatch):
    """The check factorizes each layer once, at the largest rank a candidate gives it; the winner's layers are
    those factors' leading components, not a second factorization, so the shipped model is the one scored."""
    from fwsvd_export.core import allocation_check, compress

    ranks = []
    real = allocation_check.factorize
    monkeypatch.setattr(allocation_check, "factorize", lambda *a: ranks.append(a[1]) or real(*a))
    monkeypatch.setattr(compress, "low_rank_from_linear", lambda *a: pytest.fail("a layer was factorized again"))
    loss = TASKS["text-classification"].loss
    spec = CompressionSpec(method="kfac", target=TARGET, budget=0.4, balance_factors=False)
    result = compress_(bert, spec, batches, loss, progress=False)
    winner = result.allocation["candidates"][result.allocation["winner"]]
    assert len(ranks) == sum(p.allocate for p in result.layers) and result.compressed
    assert all(r >= p.rank for r, p in zip(ranks, result.compressed))
    with torch.no_grad():
        shipped = sum(float(loss(bert, b)) for b in allocation_check.held_out(batches, spec.allocation_check)[1])
    assert shipped == winner["loss"]


@pytest.mark.parametrize(
    "method, check, once", [("kfac", 0.2, True), ("kfac", 0.0, True), ("fwsvd", 0.2, False)], ids=str
)
def test_under_a_budget_a_gram_weighted_layer_is_decomposed_once(bert, batches, monkeypatch, method, check, once):
    """kfac's decomposition is kept from the spectrum for the check's and the final factorization; a diagonal
    weighting's is not (it would be the largest thing held), so fwsvd decomposes again for each."""
    from fwsvd_export.core import lowrank

    narrow_grams = []
    real = lowrank._narrow_gram
    monkeypatch.setattr(lowrank, "_narrow_gram", lambda *a: narrow_grams.append(1) or real(*a))
    loss = TASKS["text-classification"].loss
    spec = CompressionSpec(method=method, target=TARGET, budget=0.4, allocation_check=check)
    result = compress_(bert, spec, batches, loss, progress=False)
    allocated = sum(p.allocate for p in result.layers)
    assert bool(result.allocation.get("check_batches")) == bool(check) and result.compressed
    assert ("allocation check" in result.seconds) == bool(check)
    assert len(narrow_grams) == allocated if once else len(narrow_grams) >= allocated + len(result.compressed)


def test_sequential_statistics_equal_the_one_pass_ones_while_nothing_before_is_compressed(bert, batches):
    """Block 0 kept dense: block 1's sequential statistics are taken through an unchanged model, so its
    factors are exactly the one-pass ones."""
    loss = TASKS["text-classification"].loss
    keep = {r"layer\.0\.": LayerOverride(ratio=1.0)}
    one = copy.deepcopy(bert)
    compress_(
        one, CompressionSpec(method="kfac", target=TARGET, ratio=0.4, overrides=keep), batches, loss, progress=False
    )
    seq = copy.deepcopy(bert)
    result = compress_(
        seq,
        CompressionSpec(method="kfac", target=TARGET, ratio=0.4, overrides=keep, sequential=True),
        batches,
        loss,
        progress=False,
    )
    assert "sequential statistics" in result.seconds
    pairs = list(zip(factorized_layers(one).items(), factorized_layers(seq).items()))
    assert pairs and all("layer.1." in name for (name, _), _ in pairs)
    for (name, a), (_, b) in pairs:
        torch.testing.assert_close(a.first.weight, b.first.weight, rtol=1e-4, atol=1e-5, msg=name)


def test_sequential_calibration_sees_the_earlier_blocks_errors(bert, batches):
    loss = TASKS["text-classification"].loss
    one, seq = copy.deepcopy(bert), copy.deepcopy(bert)
    compress_(one, CompressionSpec(method="kfac", target=TARGET, ratio=0.3), batches, loss, progress=False)
    compress_(
        seq, CompressionSpec(method="kfac", target=TARGET, ratio=0.3, sequential=True), batches, loss, progress=False
    )
    layers_one, layers_seq = factorized_layers(one), factorized_layers(seq)
    first = [n for n in layers_one if "layer.0." in n]
    later = [n for n in layers_one if "layer.1." in n]
    for name in first:  # the first block sees the dense model either way
        torch.testing.assert_close(layers_one[name].first.weight, layers_seq[name].first.weight)
    assert any(not torch.allclose(layers_one[n].first.weight, layers_seq[n].first.weight, atol=1e-4) for n in later)
