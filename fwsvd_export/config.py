"""The recipe's sections: dataclasses that check themselves when made, as ``core/spec.py``'s CompressionSpec
does, so a Recipe built in Python obeys exactly the rules a YAML recipe does (loader.py reads the YAML).

Each section holds its fields to their annotations (``check_fields``), then to its own ranges; the Recipe
adds the rules that span sections. A refusal is a SpecError whose key is dotted relative to the section
that refused (the loader adds the file and the full key). Task and precision names are checked against
their registries, which are light to import: nothing here loads torch, transformers or ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .core.spec import CompressionSpec, check_fields, check_shape
from .errors import SpecError, short_repr
from .stages.precision import PRECISIONS, check_runs_on
from .stages.tasks import TASKS

DATA_ROLES = ("calibration", "evaluation", "finetune")  # the data sections a recipe may name


def _one_of(value: str, registry: dict[str, Any], key: str) -> None:
    """`value` names an entry of `registry` (written as the recipe's other choices are)."""
    if value not in registry:
        raise SpecError(key, f"must be {' | '.join(map(repr, registry))}, got {short_repr(value)}")


def _at_least(spec: Any, key: str, low: float, note: str = "") -> None:
    value = getattr(spec, key)
    if value is not None and value < low:
        raise SpecError(key, f"must be >= {low:g}{note}, got {value}")


@dataclass
class ModelSpec:
    """Where the model comes from: exactly one of a local folder, a hub id, or a Python package
    that ships one (the package must expose ``get_model_path()``)."""

    task: str  # a name in stages/tasks.py's TASKS
    path: str | None = None
    hub_id: str | None = None
    package: str | None = None
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device_map: str | None = None  # accelerate placement for the statistics pass: "auto", "cuda", "sequential", ...
    max_memory: dict[str, str] = field(default_factory=dict)  # per device, e.g. {"0": "20GiB", "cpu": "60GiB"}
    offload_folder: str | None = None  # where device_map may put weights that fit on no device ("disk")
    trust_remote_code: bool = False  # run the model folder's own Python (config.json's auto_map); named in the report

    def __post_init__(self) -> None:
        check_fields(self)
        _one_of(self.task, TASKS, "task")
        sources = [k for k in ("path", "hub_id", "package") if getattr(self, k)]
        if len(sources) != 1:
            raise SpecError("", f"needs exactly one of path, hub_id, package (got {', '.join(sources) or 'none'})")
        if self.device_map is None:
            for key in ("max_memory", "offload_folder"):
                if getattr(self, key):
                    raise SpecError(key, "only applies with device_map")


@dataclass
class DataSource:
    """Records from a local JSONL/CSV/TSV/plain-text/CoNLL file, or from a `datasets` hub dataset."""

    path: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    format: Literal["auto", "jsonl", "csv", "tsv", "text", "conll"] = "auto"
    text_column: str = "text"
    text_pair_column: str | None = None
    image_column: str = "image"  # image-classification: an image file (path relative to the data file) or hub image
    label_column: str | None = None
    max_samples: int | None = None
    stride: int | None = None  # text-generation evaluation: sliding-window step (default: max_length)
    question_column: str = "question"  # question-answering (SQuAD format): the question
    context_column: str = "context"  # question-answering: the passage the answer is cut from
    answers_column: str = (
        "answers"  # question-answering: {text: [...], answer_start: [...]} (characters into the context)
    )
    choices_column: str = (
        "choices"  # multiple-choice: each record's choices, a list of strings (context_column, label_column)
    )
    # question-answering: tokens that consecutive windows over a long context share (null: a third of
    # data.max_length, as run_qa's 128 of 384)
    doc_stride: int | None = None
    max_answer_length: int = 30  # question-answering: the longest answer span decoded, in tokens
    tokens_column: str = "tokens"  # token-classification: each record's words, a list (a CoNLL file's first column)
    tags_column: str = "tags"  # token-classification: one tag per word, a name from the model's labels or its id
    conll_tag_column: int = -1  # format conll: the whitespace-separated column holding the tag (-1: the last)
    # token-classification: how the tags spell entity spans (none: plain classes such as part of speech, each
    # tagged word a one-word span)
    tag_scheme: Literal["IOB1", "IOB2", "BIOES", "none"] = "IOB2"

    def __post_init__(self) -> None:
        check_fields(self)
        _at_least(self, "max_samples", 1)
        _at_least(self, "stride", 1, " (tokens)")
        _at_least(self, "doc_stride", 0, " (tokens)")
        _at_least(self, "max_answer_length", 1, " (tokens)")
        if self.conll_tag_column == 0:
            raise SpecError("conll_tag_column", "is 0, the word's own column; the tag is another (e.g. -1, the last)")

    def check_source(self) -> None:
        """A recipe's data section reads from exactly one place (a bare DataSource, as tasks' tests build
        to describe columns, need not)."""
        if (self.path is None) == (self.dataset is None):
            raise SpecError("", "needs exactly one of path, dataset")


@dataclass
class DataSpec:
    calibration: DataSource
    evaluation: DataSource
    finetune: DataSource | None = None  # rows recovery fine-tuning trains on (default: the calibration rows)
    max_length: int = 128
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        _at_least(self, "batch_size", 1)
        _at_least(self, "max_length", 2)
        for role in DATA_ROLES:
            source: DataSource | None = getattr(self, role)
            if source is None:
                continue
            try:
                source.check_source()
            except SpecError as exc:
                raise exc.within(role) from None
            if source.stride is not None and source.stride > self.max_length:
                raise SpecError(
                    f"{role}.stride", f"must be between 1 and max_length ({self.max_length}), got {source.stride}"
                )
            if source.doc_stride is not None and source.doc_stride >= self.max_length:
                raise SpecError(
                    f"{role}.doc_stride", f"must be below max_length ({self.max_length}), got {source.doc_stride}"
                )


@dataclass
class FinetuneSpec:
    """Optional recovery training of the factorized model on data.finetune, else the calibration data
    (epochs 0: off). A held-out slice of those batches is scored before training and after each epoch: training
    stops once it no longer improves and the best weights scored (epoch 0: those before training) are exported."""

    epochs: int = 0
    learning_rate: float = 5e-5  # the peak, reached at the end of the warm-up
    weight_decay: float = 0.0
    # task: the task loss on the rows' labels; distill: match the dense model's outputs (no labels needed);
    # task+distill: (1 - distill_weight) * task + distill_weight * distill
    objective: Literal["task", "distill", "task+distill"] = "task"
    distill_weight: float = 0.5  # task+distill: the distillation term's weight, between 0 and 1
    temperature: float = 2.0  # distill: softening of both models' logits
    # distill, task+distill: add the squared error between the model's and the dense model's hidden states of
    # every layer, relative to the dense model's (a signal inside the network, not only at its outputs)
    hidden_states: bool = False
    schedule: Literal["constant", "linear", "cosine"] = "cosine"  # the learning rate's decay after the warm-up
    warmup: float = 0.1  # fraction of all optimizer steps over which the learning rate rises to learning_rate
    # fraction of the batches kept out of training and scored after each epoch, rounded (0, or a fraction of
    # too few batches to round to one: none, every epoch runs and the last is kept)
    holdout: float = 0.1
    patience: int = 2  # epochs without a lower held-out loss before stopping early (0: never stop early)
    # recompute each block's activations in the backward pass: less memory (decoders), about a third more time
    gradient_checkpointing: bool = False
    train: Literal["factors", "factors+norms", "all"] = "factors"  # what moves; the rest has no optimizer state

    def __post_init__(self) -> None:
        check_fields(self)
        _at_least(self, "epochs", 0)
        _at_least(self, "patience", 0)
        for key in ("learning_rate", "temperature"):
            if not getattr(self, key) > 0:
                raise SpecError(key, f"must be > 0, got {getattr(self, key)}")
        if not 0 <= self.distill_weight <= 1:
            raise SpecError("distill_weight", f"must be between 0 and 1, got {self.distill_weight}")
        for key, leaves in (("warmup", "no step after the warm-up"), ("holdout", "no batch to train on")):
            if not 0 <= getattr(self, key) < 1:
                raise SpecError(key, f"must be >= 0 and < 1 ({leaves} otherwise), got {getattr(self, key)}")
        if self.hidden_states and self.objective == "task":
            raise SpecError("hidden_states", "matches the dense model's: it needs objective distill or task+distill")


@dataclass
class ExportSpec:
    opset: int | None = None
    with_past: bool = True  # text-generation: export the key/value cache, so generate() runs in ONNX Runtime
    # names in stages/precision.py's PRECISIONS: int8, int4 (CPU), fp16 (CUDA) are extra folders
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    int8_mode: Literal["dynamic", "static"] = "dynamic"  # static: QDQ calibrated on data.calibration
    output: str = "outputs/run"

    def __post_init__(self) -> None:
        check_fields(self)
        for i, name in enumerate(self.precisions):
            _one_of(name, PRECISIONS, f"precisions[{i}]")
        if "fp32" not in self.precisions:
            raise SpecError("precisions", "must include fp32 (the other precisions are made from it)")


@dataclass
class ProviderSpec:
    name: Literal["cpu", "cuda"]
    required: bool = False

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class LatencySpec:
    shapes: list[str] = field(default_factory=lambda: ["1x128"])
    warmup: int = 5
    runs: int = 30  # per artifact and shape, spread over the rounds
    rounds: int = 5  # the artifacts take turns this many times, so machine noise hits all alike
    threads: int | None = None  # ONNX Runtime intra-op threads for every timed session (null: every core)
    # true: hold one session at a time, reopened each turn; auto: when the graphs side by side would take more
    # than half the memory available (graphs too big to sit side by side)
    one_at_a_time: Literal[False, True, "auto"] = "auto"

    def __post_init__(self) -> None:
        check_fields(self)
        for i, shape in enumerate(self.shapes):
            check_shape(shape, f"shapes[{i}]")
        _at_least(self, "warmup", 0)
        _at_least(self, "runs", 1)
        _at_least(self, "rounds", 1)
        _at_least(self, "threads", 1, " (or null for every core)")


@dataclass
class ValidationSpec:
    providers: list[ProviderSpec] = field(
        default_factory=lambda: [ProviderSpec("cpu", required=True), ProviderSpec("cuda")]
    )
    atol: float = 1e-3
    rtol: float = 1e-2
    parity_batches: int = 2
    max_metric_loss: float = 0.05
    max_quantization_loss: float = (
        0.005  # int8/fp16 compressed against fp32 compressed (absolute; relative for perplexity)
    )
    latency: LatencySpec = field(default_factory=LatencySpec)
    prompts: list[str] = field(default_factory=list)  # greedy generation check (text-generation with past)
    generation_tokens: int = 16
    metric: str | None = None  # what the checks read; null: the task's first metric (the report shows them all)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.providers:
            raise SpecError("providers", "is empty; a run must validate on at least one provider")
        for key in ("atol", "rtol", "max_metric_loss", "max_quantization_loss"):  # below 0, every check would fail
            _at_least(self, key, 0)
        _at_least(self, "parity_batches", 1)
        _at_least(self, "generation_tokens", 1)
        for i, prompt in enumerate(self.prompts):
            if not prompt.strip():
                raise SpecError(f"prompts[{i}]", "is an empty prompt")


@dataclass
class Recipe:
    model: ModelSpec
    data: DataSpec
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    source: str | None = None  # the file it was read from; not a recipe key
    base_dir: str | None = None  # folder that relative paths resolve against; not a recipe key

    def __post_init__(self) -> None:
        """The rules that span sections (each section checked its own when it was made)."""
        check_fields(self)
        comp = self.compression
        if comp.target_speedup is not None:
            if comp.latency_precision not in self.export.precisions:
                raise SpecError(
                    "compression.latency_precision",
                    f"{comp.latency_precision!r} must be one of 'export.precisions' {self.export.precisions}: "
                    "the speed-up is measured on that graph",
                )
            try:
                check_runs_on(comp.latency_precision, comp.latency_provider)
            except SpecError as exc:
                raise exc.within("compression") from None
        try:
            TASKS[self.model.task].headline(self.validation.metric)
        except SpecError as exc:
            raise exc.within("validation") from None
        if self.data.finetune is not None and not self.finetune.epochs:
            raise SpecError("data.finetune", "names rows to fine-tune on, but 'finetune.epochs' is 0 (off)")

    def resolve(self, value: str) -> Path:
        """A path from the recipe, relative to the recipe's own folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(os.path.normpath(Path(self.base_dir or ".") / path))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        data.pop("base_dir")
        return data
