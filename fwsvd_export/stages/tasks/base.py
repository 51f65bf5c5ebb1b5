"""The shape every task shares, so that every later stage (statistics, export, validation) is task-blind.

A task's batches hold what its model's preprocessor (a tokenizer, or an image processor) returns, and the
pipeline keeps of them what the model's forward takes (``models.fit_batches``). The recipe checks its task
and metric names against the registry, so this module and every task module are light to import: torch and
transformers are imported where a task runs, and the model class is named and looked up on use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ...errors import FwsvdError, SpecError

if TYPE_CHECKING:
    import torch

    from ...core.batch import Batch

Record = Mapping[str, Any]  # a row of column -> value (stages.data's Record also knows its `where` and `folder`)
# (each evaluation batch's summary, the batches, the dense model's summaries when `needs_reference`) -> metrics
Scorer = Callable[[list["torch.Tensor"], list["Batch"], list["torch.Tensor"] | None], dict[str, float]]


class Source(Protocol):
    """What a task reads of a data source (config.DataSource has it)."""

    text_column: str
    text_pair_column: str | None
    image_column: str
    label_column: str | None
    stride: int | None
    question_column: str  # question-answering's columns, and its windows over a long context
    context_column: str
    answers_column: str
    choices_column: str  # multiple-choice: each record's choices
    doc_stride: int | None
    max_answer_length: int


def _described(settings: Mapping[str, Any]) -> str:
    return f" ({', '.join(f'{k}: {v}' for k, v in settings.items())})" if settings else ""


def _whole(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    return output


@dataclass
class Task:
    name: str
    model_class: str  # the transformers auto class, by name (looked up on use: `auto_class`)
    # The ONNX/PyTorch output compared across runtimes; several (a QA model's start and end logits) are stacked
    # on a new last axis, taken alike in both runtimes (`compared`), so parity and the metric see them all.
    output_name: str | tuple[str, ...]
    metrics: tuple[str, ...]  # what `score` reports; the first is what the checks read unless validation.metric says
    columns: Callable[[Source, bool], list[str]]  # required columns (source, is_calibration)
    # (records, source, preprocessor, max_length, batch_size, is_calibration, model config) -> batches
    make_batches: Callable[[list[Record], Source, Any, int, int, bool, object], list[Batch]]
    loss: Callable[[torch.nn.Module, Batch], torch.Tensor]  # summed over samples, so grads are per-sample sums
    score: Scorer  # every metric of `metrics`, from the evaluation batches' summaries
    # Distillation: (student output, dense teacher output, batch, temperature) -> loss summed over samples.
    distill: Callable[[torch.Tensor, torch.Tensor, Batch, float], torch.Tensor]
    lower_is_better: frozenset[str] = frozenset()  # metrics where less is better (perplexity)
    needs_reference: bool = False  # metric compares against the original model's outputs
    skip_empty: bool = False  # empty texts are dropped (they add no tokens), not reported as bad records
    onnx_task_with_past: str | None = None  # exporter task with the key/value cache, if the task has one
    # The exporter's task without the cache, where it is not this task's name (multiple-choice scores a
    # causal LM's graph: optimum's text-generation)
    onnx_task_plain: str | None = None
    generates: bool = False  # greedy generation is checked in ONNX Runtime against PyTorch
    # What the metric reads of one batch's output: validation holds it for every evaluation batch and whole
    # outputs for the parity batches only (a decoder's logits are tokens x vocabulary).
    summary: Callable[[torch.Tensor, Batch], torch.Tensor] = _whole
    # A folder that holds the bare model may be loaded for this task with its head newly initialised; what
    # the report says of such a head (None: the head must be in the weights).
    new_head: str | None = None
    # Base-model modules the task never reads (their weights may be missing from a plain checkpoint, e.g. an
    # MLM's pooler under mean pooling), with the report's note on them.
    unread: tuple[str, ...] = ()
    # The task as it applies to one loaded model (`for_model`): a copy whose functions read what the model
    # says of itself (an embedding model's pooling) and whose `settings` name it for the report; None: the
    # same for every model.
    bind: Callable[[Task, Any], Task] | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)  # what `bind` read of the model (report.json's model)

    def for_model(self, model: Any) -> Task:
        """This task as it applies to `model` (its pooling, its head): see `bind`."""
        return self.bind(self, model) if self.bind is not None else self

    @property
    def output_names(self) -> tuple[str, ...]:
        """The model outputs `compared` takes, in order."""
        return (self.output_name,) if isinstance(self.output_name, str) else tuple(self.output_name)

    def compared(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The tensor compared across runtimes from the values of `output_names`, in order: the one output
        itself, or several stacked on a new last axis."""
        if len(outputs) == 1:
            return outputs[0]
        import torch

        return torch.stack(outputs, dim=-1)

    @property
    def auto_class(self) -> Any:
        """The transformers auto class that loads a model for this task."""
        return getattr(importlib.import_module("transformers"), self.model_class)

    def onnx_task(self, with_past: bool) -> str:
        """The exporter's task name for this task's graph."""
        if with_past and self.onnx_task_with_past:
            return self.onnx_task_with_past
        return self.onnx_task_plain or self.name

    def headline(self, chosen: str | None = None, scores: Mapping[str, float] | None = None) -> str:
        """The metric the checks read: `chosen` (validation.metric), else the task's first.

        A task's `metrics` name all it may report; `score` returns those that apply to the model and data
        (a regression head has no accuracy, an embedding model's retrieval needs text pairs). Given the
        `scores` measured, the default is the first of `metrics` among them, and a `chosen` metric that is
        not among them is refused (FwsvdError) naming those that are. Without `scores` (a recipe, before
        any model is loaded) any of `metrics` may be chosen (SpecError otherwise)."""
        if chosen is not None and chosen not in self.metrics:
            raise SpecError(
                "metric", f"must be one of {self.name}'s metrics: {', '.join(self.metrics)}; got {chosen!r}"
            )
        present = self.metrics if scores is None else tuple(m for m in self.metrics if m in scores)
        if chosen is None:
            if not present:
                raise FwsvdError(f"{self.name} measured none of its metrics ({', '.join(self.metrics)})")
            return present[0]
        if chosen not in present:
            raise FwsvdError(
                f"validation.metric {chosen!r} does not apply to this model and data: {self.name} "
                f"measured {', '.join(present) or 'nothing'} for it{_described(self.settings)}"
            )
        return chosen

    def higher_is_better(self, metric: str) -> bool:
        return metric not in self.lower_is_better
