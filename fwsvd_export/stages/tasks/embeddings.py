"""Sentence embeddings: a bare encoder's mean-pooled states, the in-batch contrastive loss such models are
trained with for the Fisher, and the cosine to the original model's embeddings."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import FwsvdError
from .base import Source, Task
from .common import chunks, encode

if TYPE_CHECKING:
    import torch

    from ...core.batch import Batch

# In-batch contrastive loss scale, as used to train sentence-embedding models (cosine * 20).
CONTRASTIVE_SCALE = 20.0


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
            raise FwsvdError("feature-extraction calibration needs at least 2 text pairs (in-batch negatives);"
                             f" got {len(records)} from data.calibration")
        if batch_size < 2:
            raise FwsvdError("feature-extraction calibration needs data.batch_size >= 2 (in-batch negatives);"
                             f" it is {batch_size}")
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


def _loss(model, batch: Batch) -> torch.Tensor:
    """In-batch contrastive loss: each text must pick its own pair among all pairs in the batch."""
    import torch
    import torch.nn.functional as F

    if batch.groups != 2:
        raise FwsvdError("feature-extraction calibration batches must hold text pairs")
    hidden = model(**batch.inputs).last_hidden_state
    emb = F.normalize(mean_pool(hidden.float(), batch.inputs["attention_mask"]), dim=-1)
    anchors, positives = emb.chunk(2)
    scores = CONTRASTIVE_SCALE * anchors @ positives.T
    return F.cross_entropy(scores, torch.arange(len(anchors), device=scores.device), reduction="sum")


def _distill(student, teacher, batch: Batch, temperature: float) -> torch.Tensor:
    """1 - cosine of the mean-pooled embeddings, summed over texts."""
    import torch.nn.functional as F

    mask = batch.inputs["attention_mask"]
    return (1 - F.cosine_similarity(mean_pool(student.float(), mask), mean_pool(teacher.float(), mask), dim=-1)).sum()


def _pooled(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    return mean_pool(hidden.float(), batch.inputs["attention_mask"])


def _score(pooled, batches, reference) -> dict[str, float]:
    import torch.nn.functional as F

    sims = [F.cosine_similarity(out, ref, dim=-1) for out, ref in zip(pooled, reference)]
    return {"cosine_to_original": float(sum(s.sum() for s in sims)) / sum(len(s) for s in sims)}


TASKS = (
    Task("feature-extraction", "AutoModel", "last_hidden_state", ("cosine_to_original",), _columns, _batches, _loss,
         _score, _distill, needs_reference=True, summary=_pooled, unread=("pooler",)),
)
