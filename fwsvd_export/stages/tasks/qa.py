"""Extractive question answering (SQuAD format): a span head's start and end logits, their cross-entropy for
the Fisher, and SQuAD's exact match and F1.

A record holds a question, a context and ``answers: {text: [...], answer_start: [...]}`` (characters into the
context). A context too long for one window is cut into several features by the tokenizer's overflow, each
window sharing ``doc_stride`` tokens with the next (as Hugging Face's run_qa). A feature is labelled with the
first answer's start and end tokens where the answer lies whole in its window, else with the first token (the
[CLS] convention for "not here"). Its batch's `meta` keeps what the metric reads: each row's example, the
character span of each context token (-1 for the question, special tokens and padding), and each example's
context and gold answers. The answer predicted for an example is the best span over its features (start + end
logit; within the context, end >= start, at most ``max_answer_length`` tokens), cut from the context's
characters; it is scored against every gold answer, the best one counting.
"""

from __future__ import annotations

import collections
import json
import re
import string
from typing import TYPE_CHECKING, Any

from ...errors import FwsvdError
from .base import Record, Source, Task
from .common import chunks, kl

if TYPE_CHECKING:
    import torch

    from ...core.batch import Batch

# Stand-in for -inf where a span may not start or end: finite, so sums and softmaxes stay finite.
_OUTSIDE = -1e4


# SQuAD's evaluation (v1.1 script), written out: the `evaluate` package fetches its script from the hub.

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, the articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 where the normalized prediction equals any normalized gold answer."""
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if not pred or not ref:  # an empty answer matches only an empty one (SQuAD v2's unanswerable)
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: list[str]) -> float:
    """Token F1 of the normalized prediction against the best gold answer."""
    return max(_f1(prediction, g) for g in golds)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """Mean exact match and F1 over examples, as fractions (0..1, like the other tasks' metrics)."""
    n = len(predictions)
    return {
        "exact_match": sum(exact_match(p, g) for p, g in zip(predictions, golds)) / n,
        "f1": sum(f1_score(p, g) for p, g in zip(predictions, golds)) / n,
    }


# Records and features


def _columns(source: Source, calibration: bool) -> list[str]:
    return [source.question_column, source.context_column, source.answers_column]


def gold_answers(record: Record, source: Source) -> list[tuple[str, int]]:
    """The record's answers as (text, start character), each checked to stand at its start in the context."""
    where = getattr(record, "where", "a record")
    context, answers = str(record[source.context_column]), record[source.answers_column]
    column = source.answers_column
    if isinstance(answers, str):  # a CSV cell holding the JSON object
        try:
            answers = json.loads(answers)
        except json.JSONDecodeError:
            answers = None
    if (
        not isinstance(answers, dict)
        or not isinstance(answers.get("text"), list)
        or not isinstance(answers.get("answer_start"), list)
    ):
        raise FwsvdError(
            f'{where}: column \'{column}\' must hold {{"text": [...], "answer_start": [...]}} '
            f"(SQuAD format); got {str(answers)[:80]!r}"
        )
    texts, starts = answers["text"], answers["answer_start"]
    if len(texts) != len(starts):
        raise FwsvdError(
            f"{where}: column '{column}' has {len(texts)} answer texts but {len(starts)} answer_start values"
        )
    found = []
    for i, (text, start) in enumerate(zip(texts, starts)):
        if not isinstance(text, str) or not text or isinstance(start, bool) or not isinstance(start, int):
            raise FwsvdError(
                f"{where}: answer {i} in column '{column}' must be a non-empty text and an integer "
                f"answer_start; got {text!r} at {start!r}"
            )
        if context[start : start + len(text)] != text:
            there = context[max(start, 0) : max(start, 0) + len(text)] if 0 <= start < len(context) else ""
            raise FwsvdError(
                f"{where}: answer_start {start} of answer {i} ({text!r}) does not point at its text: "
                + (f"the context there reads {there!r}" if there else f"the context has {len(context)} characters")
            )
        found.append((text, start))
    return found


def _features(tokenizer: Any, record: Record, source: Source, max_length: int) -> Any:
    """The record's windows: the question and a stretch of the context, overlapping by doc_stride tokens."""
    where = getattr(record, "where", "a record")
    stride = source.doc_stride if source.doc_stride is not None else max_length // 3
    question = str(record[source.question_column]).lstrip()  # leading spaces would eat into the window
    asked = len(tokenizer(question, add_special_tokens=False)["input_ids"])
    room = max_length - asked - tokenizer.num_special_tokens_to_add(pair=True)
    if room <= stride:
        raise FwsvdError(
            f"{where}: the question takes {asked} of data.max_length={max_length} tokens, leaving {room} "
            f"for the context, which is not more than the doc_stride of {stride}; shorten the question "
            "or raise data.max_length"
        )
    right = tokenizer.padding_side == "right"
    try:
        return tokenizer(
            question if right else str(record[source.context_column]),
            str(record[source.context_column]) if right else question,
            truncation="only_second" if right else "only_first",
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets
        raise FwsvdError("question-answering needs a fast tokenizer (offsets map tokens back to the context)") from None


def _batches(records, source, tokenizer, max_length, batch_size, calibration, config) -> list[Batch]:
    """One feature per window; batches of `batch_size` features (a long context's windows may fall in two)."""
    import torch

    from ...core.batch import Batch

    features, examples = [], {}
    for index, record in enumerate(records):
        golds = gold_answers(record, source)
        examples[index] = (str(record[source.context_column]), [t for t, _ in golds])
        enc = _features(tokenizer, record, source, max_length)
        context_side = 1 if tokenizer.padding_side == "right" else 0
        for k in range(len(enc["input_ids"])):
            ids = enc.sequence_ids(k)
            offsets = [list(o) if s == context_side else [-1, -1] for o, s in zip(enc["offset_mapping"][k], ids)]
            start = end = 0
            if golds:
                text, first = golds[0]
                inside = [i for i, (a, b) in enumerate(offsets) if a >= 0 and a < first + len(text) and b > first]
                covered = [i for i, (a, b) in enumerate(offsets) if a >= 0]
                if (
                    inside
                    and covered
                    and offsets[covered[0]][0] <= first
                    and offsets[covered[-1]][1] >= first + len(text)
                ):
                    start, end = inside[0], inside[-1]
            inputs = {key: enc[key][k] for key in enc if key not in ("offset_mapping", "overflow_to_sample_mapping")}
            features.append((inputs, offsets, index, start, end))
    pad, right = tokenizer.pad_token_id or 0, tokenizer.padding_side == "right"

    def padded(values: list, fill: Any, width: int) -> list:
        extra = [fill] * (width - len(values))
        return values + extra if right else extra + values

    batches = []
    for chunk in chunks(features, batch_size):
        width = max(len(f[1]) for f in chunk)
        shift = [0 if right else width - len(f[1]) for f in chunk]  # left padding moves each token right

        inputs = {
            key: torch.tensor([padded(f[0][key], pad if key == "input_ids" else 0, width) for f in chunk])
            for key in chunk[0][0]
        }
        if "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.tensor([padded([1] * len(f[1]), 0, width) for f in chunk])
        offsets = torch.tensor([padded(f[1], [-1, -1], width) for f in chunk])
        labels = torch.tensor([[f[3] + s, f[4] + s] for f, s in zip(chunk, shift)])
        ids = [f[2] for f in chunk]
        meta = {
            "example": ids,
            "offsets": offsets,
            "examples": {i: examples[i] for i in ids},
            "max_answer_length": source.max_answer_length,
        }
        batches.append(Batch(inputs, inputs["attention_mask"].bool(), labels, meta=meta))
    return batches


# Loss, distillation, decoding


def _loss(model, batch: Batch) -> torch.Tensor:
    """Mean of the start and end cross-entropies (as the model's own loss), summed over features."""
    import torch.nn.functional as F

    out = model(**batch.inputs)
    return (
        F.cross_entropy(out.start_logits.float(), batch.labels[:, 0], reduction="sum")
        + F.cross_entropy(out.end_logits.float(), batch.labels[:, 1], reduction="sum")
    ) / 2


def _distill(student, teacher, batch: Batch, temperature: float) -> torch.Tensor:
    """KL of the softened start and end distributions over the real tokens, their mean summed over features."""
    mask = batch.token_mask.to(student.device).unsqueeze(1)  # (features, 1, seq) against (features, 2, seq)
    s = student.transpose(1, 2).float().masked_fill(~mask, _OUTSIDE)
    t = teacher.transpose(1, 2).float().masked_fill(~mask, _OUTSIDE)
    return kl(s, t, temperature).mean(-1).sum()


def best_spans(logits: torch.Tensor, offsets: torch.Tensor, max_answer_length: int) -> torch.Tensor:
    """Per feature the best answer span, (features, 3): its score (start + end logit), start and end token.
    A span starts and ends on context tokens (offsets >= 0), ends at or after its start and is at most
    `max_answer_length` tokens long. A feature with no context token scores -inf."""
    import torch

    logits = logits.detach().float().cpu()
    context = offsets[..., 0] >= 0  # (features, seq)
    start = logits[..., 0].masked_fill(~context, float("-inf"))
    end = logits[..., 1].masked_fill(~context, float("-inf"))
    seq = logits.shape[1]
    pos = torch.arange(seq)
    gap = pos[None, :] - pos[:, None]  # end - start
    allowed = (gap >= 0) & (gap < max_answer_length)
    scores = (start[:, :, None] + end[:, None, :]).masked_fill(~allowed, float("-inf"))
    best, flat = scores.flatten(1).max(-1)
    return torch.stack([best, (flat // seq).float(), (flat % seq).float()], dim=-1)


def _summary(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    return best_spans(output, batch.meta["offsets"], batch.meta["max_answer_length"])


def predictions(spans: list[torch.Tensor], batches: list[Batch]) -> dict[int, str]:
    """Per example the text of its best span over all its features, cut from its context's characters."""
    best: dict[int, tuple[float, str]] = {}
    for found, batch in zip(spans, batches):
        for row, (score, start, end) in enumerate(found.tolist()):
            example = batch.meta["example"][row]
            context = batch.meta["examples"][example][0]
            text = ""
            if score != float("-inf"):
                offsets = batch.meta["offsets"][row]
                text = context[int(offsets[int(start), 0]) : int(offsets[int(end), 1])]
            if example not in best or score > best[example][0]:
                best[example] = (score, text)
    return {example: text for example, (_, text) in best.items()}


def _score(spans, batches, reference=None) -> dict[str, float]:
    found = predictions(spans, batches)
    golds = {i: answers or [""] for b in batches for i, (_, answers) in b.meta["examples"].items()}
    order = sorted(found)
    return squad_scores([found[i] for i in order], [golds[i] for i in order])


TASKS = (
    Task(
        "question-answering",
        "AutoModelForQuestionAnswering",
        ("start_logits", "end_logits"),
        ("exact_match", "f1"),
        _columns,
        _batches,
        _loss,
        _score,
        _distill,
        summary=_summary,
        new_head="its answers mean nothing until that head is fine-tuned",
    ),
)
