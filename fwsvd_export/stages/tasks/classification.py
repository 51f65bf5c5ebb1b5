"""Text classification: a sequence classifier's logits, cross-entropy for the Fisher, accuracy."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import FwsvdError
from .base import Source, Task
from .common import chunks, encode, kl, label_id

if TYPE_CHECKING:
    import torch

    from ...core.batch import Batch


def _columns(source: Source, calibration: bool) -> list[str]:
    if source.label_column is None:
        raise FwsvdError("text-classification needs 'label_column' in data.calibration and data.evaluation")
    return [c for c in (source.text_column, source.text_pair_column, source.label_column) if c]


def _batches(records, source, tokenizer, max_length, batch_size, calibration, config) -> list[Batch]:
    import torch

    from ...core.batch import Batch

    batches = []
    for chunk in chunks(records, batch_size):
        texts = [str(r[source.text_column]) for r in chunk]
        pairs = [str(r[source.text_pair_column]) for r in chunk] if source.text_pair_column else None
        inputs = encode(tokenizer, texts, pairs, max_length)
        labels = torch.tensor([label_id(r, source.label_column, config) for r in chunk])
        batches.append(Batch(inputs, inputs["attention_mask"].bool(), labels))
    return batches


def loss(model, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the logits, summed over samples."""
    import torch.nn.functional as F

    logits = model(**batch.inputs).logits
    return F.cross_entropy(logits.float(), batch.labels, reduction="sum")


def distill(student, teacher, batch: Batch, temperature: float) -> torch.Tensor:
    return kl(student, teacher, temperature).sum()


def accuracy(outputs, batches, reference=None) -> dict[str, float]:
    correct = sum(int((o.argmax(-1) == b.labels).sum()) for o, b in zip(outputs, batches))
    return {"accuracy": correct / sum(len(b.labels) for b in batches)}


TASKS = (
    Task("text-classification", "AutoModelForSequenceClassification", "logits", ("accuracy",), _columns, _batches,
         loss, accuracy, distill, new_head="its predictions mean nothing until that head is fine-tuned"),
)
