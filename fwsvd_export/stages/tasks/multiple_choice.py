"""Zero-shot multiple choice for decoders, scored as lm-evaluation-harness scores it: each choice's
log-likelihood given the context, acc (the likeliest choice is the label) and acc_norm (the likeliest per
byte of the choice).

A record holds ``context`` (a string), ``choices`` (a list of strings, or a JSON list in a CSV cell) and
``label`` (the correct choice's index, or its text); the columns are `context_column`, `choices_column`
and `label_column` (default "label"). Text is joined and tokenized as lm-eval does: a choice is appended to
the context with one space between unless the context ends in whitespace or the choice begins with it
(lm-eval's target delimiter " "); trailing whitespace of the context is moved onto the choice; context +
choice is encoded whole without special tokens and the choice's tokens are the encoding's tail past the
context's own encoding (an empty context would be the end-of-text token: load_records refuses empty values).
A row longer than `data.max_length` loses context tokens from the left (lm-eval's truncation); a choice that
alone does not fit is refused, naming its record. acc_norm divides by the choice's length in UTF-8 bytes as
written, leading whitespace excluded (lm-eval divides by `len` of the choice without its delimiter:
characters, the same for ASCII).

Evaluation: one row per (item, choice), padded on the right, labels -100 on the context and padding; a
batch holds `data.batch_size` rows. Its summary is each row's summed log-likelihood of its choice tokens, and
its `meta` each row's item, choice and byte length and each item's label, so `score` groups the rows by item
(an item's rows may span batches). Ties go to the first choice (numpy's argmax, as lm-eval). Calibration and
fine-tuning: the causal LM loss on context + correct choice, every real token labelled (the text the model
is scored on, and more tokens for the Fisher than the choice alone). The graph is optimum's text-generation
export (with the key/value cache unless export.with_past is false), so what ships is a plain causal LM and
what is scored is that graph, run without a cache.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ...errors import FwsvdError
from .base import Record, Source, Task
from .common import chunks
from .generation import distill, loss

if TYPE_CHECKING:
    import torch

    from ...core.batch import Batch


def _label_column(source: Source) -> str:
    return source.label_column or "label"


def _columns(source: Source, calibration: bool) -> list[str]:
    return [source.context_column, source.choices_column, _label_column(source)]


def _choices(record: Record, source: Source) -> list[str]:
    where = getattr(record, "where", "a record")
    column = source.choices_column
    value = record[column]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise FwsvdError(f"{where}: column '{column}' must hold a list of strings (the choices)")
    if len(value) < 2 or any(not c.strip() for c in value):
        raise FwsvdError(f"{where}: column '{column}' must hold at least two choices, none empty; got {value!r}")
    return value


def _label(record: Record, source: Source, choices: list[str]) -> int:
    where = getattr(record, "where", "a record")
    column = _label_column(source)
    value = record[column]
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(choices):
            raise FwsvdError(
                f"{where}: label {value} in column '{column}' is outside the record's {len(choices)} "
                f"choices (0..{len(choices) - 1})"
            )
        return value
    if isinstance(value, str) and value in choices:
        return choices.index(value)
    raise FwsvdError(
        f"{where}: label {value!r} in column '{column}' is neither a choice's index nor one of its choices"
    )


def continuation(context: str, choice: str) -> tuple[str, str]:
    """(context, continuation) as lm-eval encodes them: the choice after a space unless one is there, and the
    context's trailing whitespace moved onto the continuation."""
    if not context[-1:].isspace() and not choice[:1].isspace():
        choice = " " + choice
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, choice = context[:-spaces], context[-spaces:] + choice
    return context, choice


def encode_pair(tokenizer: Any, context: str, choice: str) -> tuple[list[int], list[int]]:
    """The context's tokens and the choice's (the tail of context + choice encoded whole), lm-eval's way."""
    context, cont = continuation(context, choice)
    whole = tokenizer(context + cont, add_special_tokens=False)["input_ids"]
    head = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    if not head:  # lm-eval: an empty context is the end-of-text token
        eos = tokenizer.eos_token_id
        return ([eos] if eos is not None else []), whole
    return whole[: len(head)], whole[len(head) :]


def choice_bytes(choice: str) -> int:
    return max(1, len(choice.lstrip().encode("utf-8")))


def _pad_id(tokenizer: Any) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


def _rows(records, source, tokenizer, max_length: int, calibration: bool) -> list[tuple[list[int], int, dict]]:
    """(tokens, context tokens, row meta) per row: each item's choices, or for calibration its correct one."""
    rows = []
    for item, record in enumerate(records):
        where = getattr(record, "where", "a record")
        choices = _choices(record, source)
        label = _label(record, source, choices)
        context = str(record[source.context_column])
        for k, choice in enumerate(choices):
            if calibration and k != label:
                continue
            head, tail = encode_pair(tokenizer, context, choice)
            if not tail:
                raise FwsvdError(f"{where}: choice {k} ({choice!r}) adds no tokens to the context")
            if len(tail) > max_length - 1:
                raise FwsvdError(
                    f"{where}: choice {k} is {len(tail)} tokens, more than data.max_length - 1 = "
                    f"{max_length - 1} (a choice's first token is scored after at least one of the context)"
                )
            ids = (head + tail)[-max_length:]
            rows.append(
                (ids, len(ids) - len(tail), {"item": item, "choice": k, "bytes": choice_bytes(choice), "label": label})
            )
    return rows


def _batches(records, source, tokenizer, max_length, batch_size, calibration, config) -> list[Batch]:
    import torch

    from ...core.batch import Batch

    pad = _pad_id(tokenizer)
    batches = []
    for chunk in chunks(_rows(records, source, tokenizer, max_length, calibration), batch_size):
        width = max(len(ids) for ids, _, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (tokens, context, _) in enumerate(chunk):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
            begin = 0 if calibration else context  # calibration: every real token; evaluation: the choice's
            labels[row, begin : len(tokens)] = ids[row, begin : len(tokens)]
        meta = {key: [m[key] for _, _, m in chunk] for key in ("item", "choice", "bytes", "label")}
        batches.append(Batch({"input_ids": ids, "attention_mask": mask}, mask.bool(), labels, meta=meta))
    return batches


def loglikelihoods(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens (the choice), shape [rows]."""
    import torch
    import torch.nn.functional as F

    labels = batch.labels.to(logits.device)
    following = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
    scored = following != -100
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, following.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1).double().cpu()


def picks(loglik: list[torch.Tensor], batches: list[Batch]) -> dict[int, tuple[int, int, int]]:
    """item -> (label, acc's choice, acc_norm's choice), from every row's log-likelihood."""
    import numpy as np

    rows: dict[int, list[tuple[int, float, int]]] = {}
    labels: dict[int, int] = {}
    for values, batch in zip(loglik, batches):
        for value, item, k, size, label in zip(
            values.tolist(), batch.meta["item"], batch.meta["choice"], batch.meta["bytes"], batch.meta["label"]
        ):
            rows.setdefault(item, []).append((k, float(value), size))
            labels[item] = label
    result = {}
    for item, entries in rows.items():
        entries.sort()
        lls = np.array([e[1] for e in entries])
        sizes = np.array([float(e[2]) for e in entries])
        result[item] = (labels[item], int(np.argmax(lls)), int(np.argmax(lls / sizes)))
    return result


def _score(loglik, batches, reference=None) -> dict[str, float]:
    chosen = picks(loglik, batches)
    if not chosen:
        raise FwsvdError("multiple-choice: no items to score")
    return {
        "acc": sum(a == label for label, a, _ in chosen.values()) / len(chosen),
        "acc_norm": sum(n == label for label, _, n in chosen.values()) / len(chosen),
    }


TASKS = (
    Task(
        "multiple-choice",
        "AutoModelForCausalLM",
        "logits",
        ("acc", "acc_norm"),
        _columns,
        _batches,
        loss,
        _score,
        distill,
        onnx_task_plain="text-generation",
        onnx_task_with_past="text-generation-with-past",
        summary=loglikelihoods,
    ),
)
