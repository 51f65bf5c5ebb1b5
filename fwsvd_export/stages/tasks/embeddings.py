"""Sentence embeddings: a bare encoder's pooled states, the in-batch contrastive loss such models are
trained with for the Fisher, and two kinds of metric: the cosine to the original model's embeddings, and
retrieval on the evaluation pairs.

Pooling follows the model: a sentence-transformers folder's ``modules.json`` and its Pooling module's
``config.json`` (mean, CLS or max over the real tokens; a Normalize module), read when the model is loaded
(``stages.models.read_pooling``) and bound to the task by `Task.for_model`; mean pooling otherwise. The
report's model entry names it. Normalizing changes no cosine, so it is recorded, not applied.

Retrieval (when the evaluation data has ``text_pair_column``): each ``text`` retrieves its ``text_pair``
among the pairs of all evaluation rows by cosine. Pairs the model sees as identical (the same tokens) are
one document, so a duplicated pair is never its own rival; a document as similar to the query as its gold
pair ranks ahead of it (ties count against the model, so embeddings collapsed to one point score 0, not
1). With the gold pair's rank r (1-based): recall@k = [r <= k], MRR@10 = 1/r if r <= 10, nDCG@10 =
1/log2(r + 1) if r <= 10 (one relevant document: its ideal DCG is 1); each averaged over the queries.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ...errors import FwsvdError
from .base import Source, Task
from .common import chunks, encode

if TYPE_CHECKING:
    import torch

    from ...core.batch import Batch

# In-batch contrastive loss scale, as used to train sentence-embedding models (cosine * 20).
CONTRASTIVE_SCALE = 20.0
POOLING = "fwsvd_pooling"  # the model attribute stages.models sets from a sentence-transformers folder
POOLING_MODES = ("mean", "cls", "max")
DEFAULT_POOLING = {"mode": "mean", "normalize": False, "source": "default (no sentence-transformers modules.json)"}
METRICS = ("cosine_to_original", "recall@1", "recall@10", "mrr@10", "ndcg@10")


def _columns(source: Source, calibration: bool) -> list[str]:
    if calibration and source.text_pair_column is None:
        raise FwsvdError("feature-extraction calibrates on text pairs: set 'data.calibration.text_pair_column'")
    return [c for c in (source.text_column, source.text_pair_column) if c]


def _batches(records, source, tokenizer, max_length, batch_size, calibration, config) -> list[Batch]:
    """Calibration batches must hold at least 2 pairs: with one, the in-batch contrastive loss has no
    negative, its gradient is exactly zero, and the Fisher weighting silently falls back to plain SVD."""
    from ...core.batch import Batch

    groups_of = chunks(records, batch_size)
    if calibration:
        if len(records) < 2:
            raise FwsvdError(
                "feature-extraction calibration needs at least 2 text pairs (in-batch negatives);"
                f" got {len(records)} from data.calibration"
            )
        if batch_size < 2:
            raise FwsvdError(
                f"feature-extraction calibration needs data.batch_size >= 2 (in-batch negatives); it is {batch_size}"
            )
        if len(groups_of[-1]) == 1:  # a lone last pair would add nothing: let the previous batch take it
            groups_of[-2:] = [groups_of[-2] + groups_of[-1]]
    batches = []
    for chunk in groups_of:
        texts = [str(r[source.text_column]) for r in chunk]
        groups = 1
        if source.text_pair_column:
            texts += [str(r[source.text_pair_column]) for r in chunk]
            groups = 2
        inputs = encode(tokenizer, texts, None, max_length)
        batches.append(Batch(inputs, inputs["attention_mask"].bool(), None, groups))
    return batches


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as the mean of real-token states (how MiniLM-style models are trained)."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Sentence embeddings of `hidden` (rows x tokens x features) as sentence-transformers pools them: the
    mean or the maximum over real tokens, or the first token's (CLS) state."""
    import torch

    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min).amax(1)
    return mean_pool(hidden, mask)


def _loss(model, batch: Batch, mode: str = "mean") -> torch.Tensor:
    """In-batch contrastive loss: each text must pick its own pair among all pairs in the batch."""
    import torch
    import torch.nn.functional as F

    if batch.groups != 2:
        raise FwsvdError("feature-extraction calibration batches must hold text pairs")
    hidden = model(**batch.inputs).last_hidden_state
    emb = F.normalize(pool(hidden.float(), batch.token_mask, mode), dim=-1)
    anchors, positives = emb.chunk(2)
    scores = CONTRASTIVE_SCALE * anchors @ positives.T
    return F.cross_entropy(scores, torch.arange(len(anchors), device=scores.device), reduction="sum")


def _distill(student, teacher, batch: Batch, temperature: float, mode: str = "mean") -> torch.Tensor:
    """1 - cosine of the pooled embeddings, summed over texts."""
    import torch.nn.functional as F

    mask = batch.token_mask
    return (1 - F.cosine_similarity(pool(student.float(), mask, mode), pool(teacher.float(), mask, mode), dim=-1)).sum()


def _pooled(hidden: torch.Tensor, batch: Batch, mode: str = "mean") -> torch.Tensor:
    return pool(hidden.float(), batch.token_mask.to(hidden.device), mode)


def gold_ranks(queries: torch.Tensor, documents: torch.Tensor, gold: Sequence[int]) -> torch.Tensor:
    """The 1-based rank by cosine of each query's gold document among `documents`: 1 + the documents other
    than the gold one at least as similar (ties rank ahead of the gold)."""
    import torch
    import torch.nn.functional as F

    sims = F.normalize(queries.double(), dim=-1) @ F.normalize(documents.double(), dim=-1).T
    gold_t = torch.as_tensor(list(gold), dtype=torch.long)
    own = sims[torch.arange(len(gold_t)), gold_t]
    ahead = (sims >= own[:, None]).sum(1) - 1  # the gold document itself is counted once
    return ahead + 1


def retrieval_scores(
    queries: torch.Tensor, pairs: torch.Tensor, keys: Sequence[Hashable] | None = None
) -> dict[str, float]:
    """recall@1, recall@10, mrr@10 and ndcg@10 of query i retrieving pair i among all `pairs` (row i of
    each). Pairs with the same key (their tokens) are one document (its first embedding): see the module."""
    import torch

    keys = list(range(len(pairs))) if keys is None else list(keys)
    first: dict[Hashable, int] = {}
    gold = [first.setdefault(k, len(first)) for k in keys]
    kept = sorted({k: i for i, k in reversed(list(enumerate(keys)))}.values())  # each key's first row, in order
    ranks = gold_ranks(queries, pairs[kept], gold).double()
    top = ranks <= 10
    return {
        "recall@1": float((ranks <= 1).double().mean()),
        "recall@10": float(top.double().mean()),
        "mrr@10": float(torch.where(top, 1 / ranks, 0.0).mean()),
        "ndcg@10": float(torch.where(top, 1 / torch.log2(ranks + 1), 0.0).mean()),
    }


def _tokens(batch: Batch) -> list[tuple[int, ...]]:
    """Each row's real tokens: what tells texts apart as the model sees them."""
    ids, mask = batch.inputs["input_ids"], batch.token_mask.bool()
    return [tuple(row[m].tolist()) for row, m in zip(ids, mask)]


def _score(pooled, batches, reference) -> dict[str, float]:
    """cosine_to_original over every text; with text pairs, retrieval over all evaluation pairs."""
    import torch
    import torch.nn.functional as F

    sims = [F.cosine_similarity(out, ref, dim=-1) for out, ref in zip(pooled, reference)]
    scores = {"cosine_to_original": float(sum(s.sum() for s in sims)) / sum(len(s) for s in sims)}
    if batches and all(b.groups == 2 for b in batches):
        halves = [p.chunk(2) for p in pooled]
        keys = [key for b in batches for key in _tokens(b)[b.samples :]]
        scores.update(retrieval_scores(torch.cat([q for q, _ in halves]), torch.cat([d for _, d in halves]), keys))
    return scores


def _bind(task: Task, model: Any) -> Task:
    """The task with the model's pooling (`POOLING`, set by stages.models from a sentence-transformers
    folder; mean pooling otherwise)."""
    pooling = dict(getattr(model, POOLING, None) or DEFAULT_POOLING)
    mode = pooling["mode"]
    if mode not in POOLING_MODES:
        raise FwsvdError(
            f"{pooling['source']} asks for {mode} pooling; feature-extraction pools by {', '.join(POOLING_MODES)}"
        )
    return replace(
        task,
        loss=functools.partial(_loss, mode=mode),
        distill=functools.partial(_distill, mode=mode),
        summary=functools.partial(_pooled, mode=mode),
        settings={"pooling": pooling},
    )


TASKS = (
    Task(
        "feature-extraction",
        "AutoModel",
        "last_hidden_state",
        METRICS,
        _columns,
        _batches,
        _loss,
        _score,
        _distill,
        needs_reference=True,
        summary=_pooled,
        unread=("pooler",),
        bind=_bind,
    ),
)
