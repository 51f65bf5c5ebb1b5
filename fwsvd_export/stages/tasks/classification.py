"""Text classification as GLUE scores it, for the three heads a sequence classifier has.

The head is the model config's, as transformers reads it: ``problem_type``, else ``regression`` where
``num_labels`` is 1 and single-label classification otherwise (``multi_label_classification`` only when
the config says so).

========================  ===================  =========================  ===================================
head                      labels               loss (Fisher), distill     metrics (the first: the default)
========================  ===================  =========================  ===================================
single-label              a class name or id   cross-entropy; KL          accuracy, f1 (2 classes: class 1's,
                                                                          as GLUE's MRPC/QQP), macro_f1, mcc
regression                a number             MSE; MSE to the teacher    pearson, spearman (STS-B)
multi-label               a list of names/ids  BCE; BCE to the teacher's  micro_f1, macro_f1
                                               sigmoid                    (a label is on where its logit > 0)
========================  ===================  =========================  ===================================

GLUE's defaults: accuracy for most tasks (SST-2, MNLI, QNLI, RTE, WNLI), F1 and accuracy for MRPC and QQP
(pick ``validation.metric: f1``), MCC for CoLA (``validation.metric: mcc``), Pearson and Spearman for STS-B
(Pearson first, as GLUE lists them). ``score`` returns the metrics of the head it finds in the labels
(float labels: regression; rows of float labels: multi-label), so the report shows all of them and
`Task.headline` takes the first present. A correlation of constant predictions or labels is undefined:
reported as 0 (no correlation), as MCC is for a constant prediction. The metrics are scikit-learn's and
SciPy's, as Hugging Face `evaluate`'s GLUE metric computes them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ...errors import FwsvdError
from .base import Source, Task
from .common import chunks, encode, kl, label_id

if TYPE_CHECKING:
    import torch

    from ...core.batch import Batch

SINGLE, REGRESSION, MULTI = "single_label_classification", "regression", "multi_label_classification"
METRICS = {
    SINGLE: ("accuracy", "f1", "macro_f1", "mcc"),
    REGRESSION: ("pearson", "spearman"),
    MULTI: ("micro_f1", "macro_f1"),
}
# Every head's metrics, ordered so that the first of them a head's scores hold (`Task.headline`) is its first.
ALL_METRICS = ("accuracy", "f1", "micro_f1", "macro_f1", "mcc", "pearson", "spearman")


def head(config: Any) -> str:
    """The config's head, as transformers' sequence classifiers choose their loss."""
    kind = getattr(config, "problem_type", None)
    if kind in METRICS:
        return kind
    return REGRESSION if getattr(config, "num_labels", 2) == 1 else SINGLE


def _columns(source: Source, calibration: bool) -> list[str]:
    if source.label_column is None:
        raise FwsvdError("text-classification needs 'label_column' in data.calibration and data.evaluation")
    return [c for c in (source.text_column, source.text_pair_column, source.label_column) if c]


def _number(record, column: str) -> float:
    value = record[column]
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        where = getattr(record, "where", "a record")
        raise FwsvdError(
            f"{where}: label {value!r} in column '{column}' is not a number (the model's head is a"
            " regression: num_labels 1)"
        ) from None


def _label_set(record, column: str, config) -> list[float]:
    """A multi-hot row from a list of label names or ids (one name or id alone is a list of one)."""
    value = record[column]
    items = value if isinstance(value, (list, tuple)) else [value]
    row = [0.0] * config.num_labels
    for item in items:
        row[label_id(_Located(record, column, item), column, config)] = 1.0
    return row


class _Located(dict):
    """One item of a record's label list, still knowing the record's file:line for label_id's errors."""

    def __init__(self, record, column: str, item) -> None:
        super().__init__({column: item})
        self.where = getattr(record, "where", "a record")


def labels(records, column: str, config) -> torch.Tensor:
    """The batch's labels for the config's head: class ids, numbers, or multi-hot rows."""
    import torch

    kind = head(config)
    if kind == REGRESSION:
        return torch.tensor([_number(r, column) for r in records], dtype=torch.float32)
    if kind == MULTI:
        return torch.tensor([_label_set(r, column, config) for r in records], dtype=torch.float32)
    return torch.tensor([label_id(r, column, config) for r in records])


def _batches(records, source, tokenizer, max_length, batch_size, calibration, config) -> list[Batch]:
    from ...core.batch import Batch

    batches = []
    for chunk in chunks(records, batch_size):
        texts = [str(r[source.text_column]) for r in chunk]
        pairs = [str(r[source.text_pair_column]) for r in chunk] if source.text_pair_column else None
        inputs = encode(tokenizer, texts, pairs, max_length)
        batches.append(Batch(inputs, inputs["attention_mask"].bool(), labels(chunk, source.label_column, config)))
    return batches


def _kind(labels: torch.Tensor) -> str:
    """The head, from a batch's labels: float numbers (regression), float rows (multi-label), class ids."""
    if labels.is_floating_point():
        return MULTI if labels.dim() == 2 else REGRESSION
    return SINGLE


def loss(model, batch: Batch) -> torch.Tensor:
    """The head's loss, summed over samples: cross-entropy, MSE or BCE with logits."""
    return _loss_of(model(**batch.inputs).logits, batch.labels)


def _loss_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    kind = _kind(target)
    if kind == REGRESSION:
        return F.mse_loss(logits.float().squeeze(-1), target.float(), reduction="sum")
    if kind == MULTI:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="sum")
    return F.cross_entropy(logits.float(), target, reduction="sum")


def distill(student, teacher, batch: Batch, temperature: float) -> torch.Tensor:
    """To the dense teacher's outputs, summed over samples: softened KL (single-label), MSE (regression),
    BCE to its softened sigmoid (multi-label; times T^2, as the KL)."""
    import torch
    import torch.nn.functional as F

    kind = _kind(batch.labels) if batch.labels is not None else SINGLE
    if kind == REGRESSION:
        return F.mse_loss(student.float(), teacher.float(), reduction="sum")
    if kind == MULTI:
        soft = torch.sigmoid(teacher.float() / temperature)
        return F.binary_cross_entropy_with_logits(student.float() / temperature, soft, reduction="sum") * temperature**2
    return kl(student, teacher, temperature).sum()


def _correlation(fn, x, y) -> float:
    """SciPy's correlation of x and y; 0 where either is constant (undefined: no correlation)."""
    import numpy as np

    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(fn(x, y)[0])


def single_label_scores(predicted, gold, classes: int) -> dict[str, float]:
    """accuracy, f1 (binary F1 of class 1, with 2 classes only), macro_f1 and mcc of class predictions."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    scores = {"accuracy": float(accuracy_score(gold, predicted))}
    if classes == 2:
        scores["f1"] = float(f1_score(gold, predicted, pos_label=1, average="binary", zero_division=0))
    scores["macro_f1"] = float(f1_score(gold, predicted, average="macro", zero_division=0))
    # One class in gold and predictions alike leaves MCC undefined: 0, as scikit-learn gives (without its warning).
    one_class = len(set(list(gold)) | set(list(predicted))) == 1
    scores["mcc"] = 0.0 if one_class else float(matthews_corrcoef(gold, predicted))
    return scores


def regression_scores(predicted, gold) -> dict[str, float]:
    """pearson and spearman (average ranks for ties) of predicted against gold numbers."""
    from scipy.stats import pearsonr, spearmanr

    return {"pearson": _correlation(pearsonr, predicted, gold), "spearman": _correlation(spearmanr, predicted, gold)}


def multi_label_scores(predicted, gold) -> dict[str, float]:
    """micro_f1 (over every sample's every label) and macro_f1 (the mean of each label's F1) of 0/1 rows."""
    from sklearn.metrics import f1_score

    return {
        "micro_f1": float(f1_score(gold, predicted, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(gold, predicted, average="macro", zero_division=0)),
    }


def score(outputs, batches, reference=None) -> dict[str, float]:
    """Every metric of the head the labels show (see the module's table), over all evaluation batches."""
    import torch

    logits = torch.cat([o.float() for o in outputs])
    gold = torch.cat([b.labels for b in batches])
    kind = _kind(gold)
    if kind == REGRESSION:
        return regression_scores(logits.squeeze(-1).numpy(), gold.numpy())
    if kind == MULTI:
        return multi_label_scores((logits > 0).int().numpy(), gold.int().numpy())
    return single_label_scores(logits.argmax(-1).numpy(), gold.numpy(), logits.shape[-1])


def accuracy(outputs, batches, reference=None) -> dict[str, float]:
    """Accuracy alone (image classification's metric)."""
    correct = sum(int((o.argmax(-1) == b.labels).sum()) for o, b in zip(outputs, batches))
    return {"accuracy": correct / sum(len(b.labels) for b in batches)}


def _bind(task: Task, model) -> Task:
    return replace(task, settings={"head": head(model.config)})


TASKS = (
    Task(
        "text-classification",
        "AutoModelForSequenceClassification",
        "logits",
        ALL_METRICS,
        _columns,
        _batches,
        loss,
        score,
        distill,
        new_head="its predictions mean nothing until that head is fine-tuned",
        bind=_bind,
    ),
)
