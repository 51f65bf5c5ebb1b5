"""Token classification (named entities, chunks, part of speech): one tag per word, read from a JSONL list
pair or a CoNLL column file (stages/data.py). Each word's tag goes to its first sub-token; the other sub-tokens
and the special tokens are -100, left out of the loss and the metric. The metric is seqeval's strict
entity-level precision, recall and F1 over the spans the tags spell (`data.evaluation.tag_scheme`: IOB1, IOB2
or BIOES; a span counts only with its exact bounds and type), and the accuracy of the words' tags.
"""

from __future__ import annotations

from numbers import Integral
from typing import TYPE_CHECKING, Any

from ...errors import FwsvdError
from .base import Record, Task
from .common import chunks, kl

if TYPE_CHECKING:
    import torch

    from ...core.batch import Batch

IGNORED = -100  # the label of a position that is not a word's first sub-token
# The span prefixes each scheme's tags carry ("O" is outside every span); "none": plain classes (part of
# speech), each tagged word counted as a one-word span of its tag.
PREFIXES = {"IOB1": ("B", "I"), "IOB2": ("B", "I"), "BIOES": ("B", "I", "E", "S"), "none": ()}


def _columns(source, calibration: bool) -> list[str]:
    return [source.tokens_column, source.tags_column]


def tag_names(config) -> list[str]:
    """The model's label names, by id."""
    names = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return [names.get(i, str(i)) for i in range(config.num_labels)]


def check_scheme(names: list[str], scheme: str) -> None:
    """Every label of the model is "O" or PREFIX-TYPE of `scheme`, so the metric can read spans from them."""
    prefixes = PREFIXES[scheme]
    for name in names if prefixes else []:
        prefix, dash, kind = name.partition("-")
        if name != "O" and not (dash and kind and prefix in prefixes):
            raise FwsvdError(
                f"the model's label {name!r} is not a {scheme} tag (O, or {'/'.join(prefixes)}-TYPE); set "
                "data.evaluation.tag_scheme (IOB1, IOB2, BIOES; none for tags that are not spans, such "
                "as part of speech)"
            )


def _tag_id(tag: Any, word: Any, number: int, where: str, names: list[str], label2id: dict[str, int]) -> int:
    if isinstance(tag, Integral) and not isinstance(tag, bool) or isinstance(tag, str) and tag.isdigit():
        if 0 <= int(tag) < len(names):
            return int(tag)
    elif str(tag) in label2id:
        return label2id[str(tag)]
    raise FwsvdError(
        f"{where}: tag {tag!r} of word {number} ({word!r}) is not one of the model's labels: "
        f"{', '.join(names)} (or their ids 0..{len(names) - 1})"
    )


def tag_ids(record: Record, source, names: list[str], label2id: dict[str, int]) -> list[int]:
    """The label id of each of the record's words: its tag, a name from the model's labels or an id. A bad
    tag is named with its own line where the record knows it (a CoNLL word), else the record's."""
    where = getattr(record, "where", "a record")
    words, tags = record[source.tokens_column], record[source.tags_column]
    for column, value in ((source.tokens_column, words), (source.tags_column, tags)):
        if not isinstance(value, (list, tuple)):
            raise FwsvdError(f"{where}: '{column}' must be a list, one entry per word; got {type(value).__name__}")
    if not words:
        raise FwsvdError(f"{where}: no words in '{source.tokens_column}'")
    if len(words) != len(tags):
        raise FwsvdError(
            f"{where}: {len(words)} words in '{source.tokens_column}' but {len(tags)} tags in "
            f"'{source.tags_column}'; each word needs one tag"
        )
    bad = next((w for w in words if not isinstance(w, str)), None)
    if bad is not None:
        raise FwsvdError(f"{where}: the words in '{source.tokens_column}' must be strings; got {bad!r}")
    wheres = getattr(record, "token_wheres", None) or [where] * len(words)
    return [_tag_id(t, w, i, at, names, label2id) for i, (w, t, at) in enumerate(zip(words, tags, wheres), 1)]


def word_labels(encoding: Any, row: int, ids: list[int], length: int) -> list[int]:
    """Per position of row `row`: the word's label at its first sub-token, IGNORED elsewhere (later
    sub-tokens, special tokens, padding). Words cut off by truncation have no position."""
    labels, previous = [IGNORED] * length, None
    for position, word in enumerate(encoding.word_ids(batch_index=row)):
        if word is not None and word != previous:
            labels[position] = ids[word]
        previous = word
    return labels


def _batches(records, source, tokenizer, max_length, batch_size, calibration, config) -> list[Batch]:
    import torch

    from ...core.batch import Batch

    if not getattr(tokenizer, "is_fast", False):
        raise FwsvdError(
            "token-classification needs a fast tokenizer (tokenizer.json): its word_ids() place each "
            "word's tag on the word's first sub-token"
        )
    names = tag_names(config)
    if not calibration:
        check_scheme(names, source.tag_scheme)
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    meta = {"tags": tuple(names), "scheme": source.tag_scheme}
    batches = []
    for chunk in chunks(records, batch_size):
        ids = [tag_ids(r, source, names, label2id) for r in chunk]
        enc = tokenizer(
            [list(r[source.tokens_column]) for r in chunk],
            is_split_into_words=True,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        length = enc["input_ids"].shape[1]
        labels = torch.tensor([word_labels(enc, row, row_ids, length) for row, row_ids in enumerate(ids)])
        batches.append(Batch(dict(enc), enc["attention_mask"].bool(), labels, meta=dict(meta)))
    return batches


def _loss(model, batch: Batch) -> torch.Tensor:
    """Cross-entropy of each word's first sub-token, summed over the words (so over samples)."""
    import torch.nn.functional as F

    logits = model(**batch.inputs).logits
    labels = batch.labels.to(logits.device)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORED, reduction="sum")


def _distill(student, teacher, batch: Batch, temperature: float) -> torch.Tensor:
    """KL to the dense model's tag distribution at each word's first sub-token, summed over the words."""
    words = (batch.labels != IGNORED).to(student.device)
    return (kl(student, teacher, temperature) * words).sum()


def _predicted(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """What the metric reads of a batch's logits: each position's predicted tag id."""
    return logits.argmax(-1)


def _as_spans(tags: list[str], scheme: str) -> list[str]:
    """Plain class tags (scheme "none") as one-word BIOES spans, so seqeval reads them."""
    return tags if scheme != "none" else [t if t == "O" else f"S-{t}" for t in tags]


def entity_scores(gold: list[list[str]], predicted: list[list[str]], scheme: str = "IOB2") -> dict[str, float]:
    """seqeval's strict entity-level precision, recall and F1 (micro over spans): a predicted span counts
    only where a gold span has its exact bounds and type. No span at all predicted (or in the gold): 0."""
    import warnings

    from seqeval import scheme as schemes
    from seqeval.metrics import f1_score, precision_score, recall_score

    kind = {"IOB1": schemes.IOB1, "IOB2": schemes.IOB2}.get(scheme, schemes.IOBES)
    gold = [_as_spans(s, scheme) for s in gold]
    predicted = [_as_spans(s, scheme) for s in predicted]
    with warnings.catch_warnings():  # an empty denominator is 0, as seqeval's warning says
        warnings.simplefilter("ignore")
        return {
            name: float(fn(gold, predicted, mode="strict", scheme=kind, zero_division=0))
            for name, fn in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score))
        }


def token_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of labelled positions (labels other than IGNORED) whose predicted id is the label."""
    words = labels != IGNORED
    return float((predicted[words] == labels[words]).sum()) / max(int(words.sum()), 1)


def word_tags(predicted: torch.Tensor, batch: Batch) -> tuple[list[list[str]], list[list[str]]]:
    """The batch's gold and predicted tag names, word by word, each row a sentence."""
    names = batch.meta["tags"]
    gold, guessed = [], []
    for row_pred, row_labels in zip(predicted.tolist(), batch.labels.tolist()):
        pairs = [(names[label], names[p]) for p, label in zip(row_pred, row_labels) if label != IGNORED]
        gold.append([g for g, _ in pairs])
        guessed.append([p for _, p in pairs])
    return gold, guessed


def _score(
    predictions: list[torch.Tensor], batches: list[Batch], reference: list[torch.Tensor] | None = None
) -> dict[str, float]:
    gold: list[list[str]] = []
    guessed: list[list[str]] = []
    for predicted, batch in zip(predictions, batches):
        g, p = word_tags(predicted, batch)
        gold += g
        guessed += p
    words = sum(len(s) for s in gold)
    accuracy = sum(a == b for g, p in zip(gold, guessed) for a, b in zip(g, p)) / max(words, 1)
    return {**entity_scores(gold, guessed, batches[0].meta["scheme"]), "accuracy": accuracy}


TASKS = (
    Task(
        "token-classification",
        "AutoModelForTokenClassification",
        "logits",
        ("f1", "precision", "recall", "accuracy"),
        _columns,
        _batches,
        _loss,
        _score,
        _distill,
        summary=_predicted,
        new_head="its predictions mean nothing until that head is fine-tuned",
    ),
)
