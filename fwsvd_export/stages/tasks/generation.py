"""Causal language modelling: next-token cross-entropy for the Fisher, perplexity over a sliding window."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import FwsvdError
from .base import Source, Task
from .common import chunks, kl

if TYPE_CHECKING:
    import torch

    from ...core.batch import Batch


def _columns(source: Source, calibration: bool) -> list[str]:
    return [source.text_column]


def _token_stream(records, source, tokenizer) -> list[int]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for r in records:
        stream += tokenizer(str(r[source.text_column]), add_special_tokens=False)["input_ids"] + eos
    return stream


def _batches(records, source, tokenizer, max_length, batch_size, calibration, config) -> list[Batch]:
    """Calibration: all texts joined (EOS between) and cut into full blocks of `max_length` tokens.
    Evaluation: a sliding window of `max_length` moved by `stride` (default: no overlap) over the same
    stream, each token scored once with the most context the window gives, as in the Hugging Face
    perplexity guide and lm-eval; earlier tokens of a window are context only (label -100)."""
    import torch

    from ...core.batch import Batch

    stream = _token_stream(records, source, tokenizer)
    if len(stream) < max_length:
        raise FwsvdError(f"the text holds {len(stream)} tokens, fewer than one block of data.max_length={max_length}")
    if calibration:
        windows = [(stream[i : i + max_length], 0) for i in range(0, len(stream) - max_length + 1, max_length)]
    else:
        stride = source.stride or max_length
        windows, scored_to = [], 0
        for begin in range(0, len(stream) - 1, stride):
            end = min(begin + max_length, len(stream))
            windows.append((stream[begin:end], scored_to - begin if scored_to > begin else 0))
            scored_to = end
            if end == len(stream):
                break
    batches = []
    by_length: dict[int, list] = {}
    for ids, context in windows:
        by_length.setdefault(len(ids), []).append((ids, context))
    for group in by_length.values():
        for chunk in chunks(group, batch_size):
            ids = torch.tensor([c[0] for c in chunk])
            labels = ids.clone()
            for row, (_, context) in enumerate(chunk):
                labels[row, :context] = -100
            mask = torch.ones_like(ids)
            batches.append(Batch({"input_ids": ids, "attention_mask": mask}, mask.bool(), labels))
    return batches


def nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy; labels of -100 are context, not scored. The labels move one to
    the left, not the logits: the logits without their last position would be a copy of tokens x
    vocabulary (a batch of Qwen2.5-0.5B's 2 x 128 tokens: 155 MB, and as much again for its gradient)."""
    import torch.nn.functional as F

    following = F.pad(labels[:, 1:], (0, 1), value=-100)  # the last position has no next token
    return F.cross_entropy(logits.flatten(0, 1).float(), following.flatten(), reduction="sum", ignore_index=-100)


def loss(model, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy summed over the labelled tokens (the Fisher's loss for decoders)."""
    return nll(model(**batch.inputs).logits, batch.labels)


def distill(student, teacher, batch: Batch, temperature: float) -> torch.Tensor:
    """Next-token KL per real token, averaged over each sequence's tokens, summed over sequences."""
    mask = batch.token_mask.to(student.device).float()
    per_token = kl(student, teacher, temperature) * mask
    return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum()


def _batch_nll(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return nll(logits, batch.labels)


def _score(nlls, batches, reference=None) -> dict[str, float]:
    import torch

    total = sum(float(n) for n in nlls)
    tokens = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
    return {"perplexity": float(torch.exp(torch.tensor(total / tokens)))}


TASKS = (
    Task(
        "text-generation",
        "AutoModelForCausalLM",
        "logits",
        ("perplexity",),
        _columns,
        _batches,
        loss,
        _score,
        distill,
        lower_is_better=frozenset({"perplexity"}),
        skip_empty=True,
        onnx_task_with_past="text-generation-with-past",
        generates=True,
        summary=_batch_nll,
    ),
)
