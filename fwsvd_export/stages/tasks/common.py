"""Pieces several tasks share: encoding text, cutting batches, reading labels, softened KL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import FwsvdError
from .base import Record

if TYPE_CHECKING:
    import torch


def encode(tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> dict[str, torch.Tensor]:
    """What the tokenizer returns (input_ids, attention_mask, and token_type_ids where it makes them: the
    pipeline keeps what the model's forward takes)."""
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(enc)


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def label_id(record: Record, column: str, config) -> int:
    """The class index of the record's label (an index, or a name from the model's label2id)."""
    value = record[column]
    # Records read by data.py know their file:line; ones built in code (tests, benchmarks) are plain dicts.
    where = getattr(record, "where", "a record")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < config.num_labels:
            raise FwsvdError(
                f"{where}: label {value} in column '{column}' is outside the model's {config.num_labels} classes"
                f" (0..{config.num_labels - 1})"
            )
        return value
    label2id = {str(k): v for k, v in (config.label2id or {}).items()}
    if str(value) not in label2id:
        raise FwsvdError(
            f"{where}: label {value!r} in column '{column}' is not one of the model's labels:"
            f" {', '.join(sorted(label2id, key=label2id.get))}"
        )
    return int(label2id[str(value)])


def kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened distributions over the last axis, times T^2
    (so its gradients keep their scale across temperatures), per position."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1) * temperature**2
