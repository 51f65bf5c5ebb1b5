"""What differs between tasks: the model class, the batches, the loss the Fisher is taken of, the
tensor compared across runtimes, and the task metric.

The tasks share one shape so that every later stage (statistics, export, validation) is task-blind: a
task's batches hold what its model's preprocessor (a tokenizer, or for image-classification an image
processor) returns, and the pipeline keeps of them what the model's forward takes
(``models.fit_batches``).

The recipe checks its task names against this registry, so the module is light to import: torch and
transformers are imported where a task runs, the model class is named and looked up on use, and it imports
nothing that reads a recipe (tests/test_layers.py holds it to that).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Protocol

from ..errors import FwsvdError

if TYPE_CHECKING:
    import torch

    from ..core.batch import Batch

Record = Mapping[str, Any]  # a row of column -> value (stages.data's Record also knows its `where` and `folder`)


class Source(Protocol):
    """What a task reads of a data source (config.DataSource has it)."""

    text_column: str
    text_pair_column: Optional[str]
    image_column: str
    label_column: Optional[str]
    stride: Optional[int]

# In-batch contrastive loss scale, as used to train sentence-embedding models (cosine * 20).
CONTRASTIVE_SCALE = 20.0


def _whole(output: torch.Tensor, batch: Batch) -> torch.Tensor:
    return output


@dataclass
class Task:
    name: str
    model_class: str  # the transformers auto class, by name (looked up on use: `auto_class`)
    output_name: str  # the ONNX/PyTorch output compared across runtimes
    metric_name: str
    higher_is_better: bool
    columns: Callable[[Source, bool], list[str]]  # required columns (source, is_calibration)
    # (records, source, preprocessor, max_length, batch_size, is_calibration, model config) -> batches
    make_batches: Callable[[list[Record], Source, Any, int, int, bool, object], list[Batch]]
    loss: Callable[[torch.nn.Module, Batch], torch.Tensor]  # summed over samples, so grads are per-sample sums
    # The task metric of a model, from each evaluation batch's `summary` (and the dense model's, when
    # `needs_reference`).
    metric: Callable[[list[torch.Tensor], list[Batch], Optional[list[torch.Tensor]]], float]
    # Distillation: (student output, dense teacher output, batch, temperature) -> loss summed over samples.
    distill: Callable[[torch.Tensor, torch.Tensor, Batch, float], torch.Tensor]
    needs_reference: bool = False  # metric compares against the original model's outputs
    skip_empty: bool = False  # empty texts are dropped (they add no tokens), not reported as bad records
    onnx_task_with_past: Optional[str] = None  # exporter task with the key/value cache, if the task has one
    generates: bool = False  # greedy generation is checked in ONNX Runtime against PyTorch
    # What the metric reads of one batch's output: validation holds it for every evaluation batch and whole
    # outputs for the parity batches only (a decoder's logits are tokens x vocabulary).
    summary: Callable[[torch.Tensor, Batch], torch.Tensor] = _whole
    # A folder that holds the bare model may be loaded for this task with its head newly initialised; what
    # the report says of such a head (None: the head must be in the weights).
    new_head: Optional[str] = None
    # Base-model modules the task never reads (their weights may be missing from a plain checkpoint, e.g. an
    # MLM's pooler under mean pooling), with the report's note on them.
    unread: tuple[str, ...] = ()

    @property
    def auto_class(self) -> Any:
        """The transformers auto class that loads a model for this task."""
        return getattr(importlib.import_module("transformers"), self.model_class)

    def onnx_task(self, with_past: bool) -> str:
        """The exporter's task name for this task's graph."""
        return self.onnx_task_with_past if with_past and self.onnx_task_with_past else self.name


def _encode(tokenizer: Any, texts: list[str], pairs: Optional[list[str]], max_length: int) -> dict[str, torch.Tensor]:
    """What the tokenizer returns (input_ids, attention_mask, and token_type_ids where it makes them: the
    pipeline keeps what the model's forward takes)."""
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(enc)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# --- text classification -------------------------------------------------------------------------

def _cls_columns(source: Source, calibration: bool) -> list[str]:
    if source.label_column is None:
        raise FwsvdError("text-classification needs 'label_column' in data.calibration and data.evaluation")
    return [c for c in (source.text_column, source.text_pair_column, source.label_column) if c]


def _label_id(record: Record, column: str, config) -> int:
    """The class index of the record's label (an index, or a name from the model's label2id)."""
    value = record[column]
    # Records read by data.py know their file:line; ones built in code (tests, benchmarks) are plain dicts.
    where = getattr(record, "where", "a record")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < config.num_labels:
            raise FwsvdError(f"{where}: label {value} in column '{column}' is outside the model's {config.num_labels} classes"
                             f" (0..{config.num_labels - 1})")
        return value
    label2id = {str(k): v for k, v in (config.label2id or {}).items()}
    if str(value) not in label2id:
        raise FwsvdError(f"{where}: label {value!r} in column '{column}' is not one of the model's labels:"
                         f" {', '.join(sorted(label2id, key=label2id.get))}")
    return int(label2id[str(value)])


def _cls_batches(records, source, tokenizer, max_length, batch_size, calibration, config) -> list[Batch]:
    import torch

    from ..core.batch import Batch

    batches = []
    for chunk in _chunks(records, batch_size):
        texts = [str(r[source.text_column]) for r in chunk]
        pairs = [str(r[source.text_pair_column]) for r in chunk] if source.text_pair_column else None
        inputs = _encode(tokenizer, texts, pairs, max_length)
        labels = torch.tensor([_label_id(r, source.label_column, config) for r in chunk])
        batches.append(Batch(inputs, inputs["attention_mask"].bool(), labels))
    return batches


def _cls_loss(model, batch: Batch) -> torch.Tensor:
    import torch.nn.functional as F

    logits = model(**batch.inputs).logits
    return F.cross_entropy(logits.float(), batch.labels, reduction="sum")


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened distributions over the last axis, times T^2
    (so its gradients keep their scale across temperatures), per position."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1) * temperature**2


def _cls_distill(student, teacher, batch: Batch, temperature: float) -> torch.Tensor:
    return _kl(student, teacher, temperature).sum()


def _accuracy(outputs, batches, reference=None) -> float:
    correct = sum(int((o.argmax(-1) == b.labels).sum()) for o, b in zip(outputs, batches))
    return correct / sum(len(b.labels) for b in batches)


# --- image classification ------------------------------------------------------------------------

def _img_columns(source: Source, calibration: bool) -> list[str]:
    if source.label_column is None:
        raise FwsvdError("image-classification needs 'label_column' in data.calibration and data.evaluation")
    return [source.image_column, source.label_column]


def _image(record: Record, column: str):
    """The record's image, RGB: a PIL image as a hub dataset holds it, or a file path (relative to the
    folder of the data file that names it)."""
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    value = record[column]
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    where = getattr(record, "where", "a record")
    path = Path(str(value)).expanduser()
    folder = getattr(record, "folder", None)
    if not path.is_absolute() and folder is not None:
        path = Path(folder) / path
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:  # missing, unreadable or not an image
        reason = "no such file" if isinstance(exc, FileNotFoundError) else str(exc)
        raise FwsvdError(f"{where}: cannot read image {path} (column '{column}'): {reason}") from None


def _positions(config, pixels: torch.Tensor) -> int:
    """The positions a ViT-style encoder runs per image (one per patch, and its [CLS]); 1 for a model
    whose config has no patch_size. Only counted (images have no padding): the statistics read every
    position."""
    patch = getattr(config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if not isinstance(patch, int) or patch < 1:
        return 1
    return (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch) + 1


def _img_batches(records, source, processor, max_length, batch_size, calibration, config) -> list[Batch]:
    """Images read with PIL and made into the model's inputs (pixel_values) by its image processor;
    `max_length` does not apply to images."""
    import torch

    from ..core.batch import Batch

    batches = []
    for chunk in _chunks(records, batch_size):
        inputs = dict(processor(images=[_image(r, source.image_column) for r in chunk], return_tensors="pt"))
        labels = torch.tensor([_label_id(r, source.label_column, config) for r in chunk])
        pixels = inputs.get("pixel_values")
        positions = _positions(config, pixels) if isinstance(pixels, torch.Tensor) and pixels.dim() == 4 else 1
        batches.append(Batch(inputs, torch.ones(len(chunk), positions, dtype=torch.bool), labels))
    return batches


# --- feature extraction (sentence embeddings) ----------------------------------------------------

def _emb_columns(source: Source, calibration: bool) -> list[str]:
    if calibration and source.text_pair_column is None:
        raise FwsvdError("feature-extraction calibrates on text pairs: set 'data.calibration.text_pair_column'")
    return [c for c in (source.text_column, source.text_pair_column) if c]


def _emb_batches(records, source, tokenizer, max_length, batch_size, calibration, config) -> list[Batch]:
    """Calibration batches must hold at least 2 pairs: with one, the in-batch contrastive loss has no
    negative, its gradient is exactly zero, and the Fisher weighting silently falls back to plain SVD."""
    from ..core.batch import Batch

    chunks = _chunks(records, batch_size)
    if calibration:
        if len(records) < 2:
            raise FwsvdError("feature-extraction calibration needs at least 2 text pairs (in-batch negatives);"
                             f" got {len(records)} from data.calibration")
        if batch_size < 2:
            raise FwsvdError("feature-extraction calibration needs data.batch_size >= 2 (in-batch negatives);"
                             f" it is {batch_size}")
        if len(chunks[-1]) == 1:  # a lone last pair would add nothing: let the previous batch take it
            chunks[-2:] = [chunks[-2] + chunks[-1]]
    batches = []
    for chunk in chunks:
        texts = [str(r[source.text_column]) for r in chunk]
        groups = 1
        if source.text_pair_column:
            texts += [str(r[source.text_pair_column]) for r in chunk]
            groups = 2
        inputs = _encode(tokenizer, texts, None, max_length)
        batches.append(Batch(inputs, inputs["attention_mask"].bool(), None, groups))
    return batches


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as the mean of real-token states (how MiniLM-style models are trained)."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def _emb_loss(model, batch: Batch) -> torch.Tensor:
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


def _emb_distill(student, teacher, batch: Batch, temperature: float) -> torch.Tensor:
    """1 - cosine of the mean-pooled embeddings, summed over texts."""
    import torch.nn.functional as F

    mask = batch.inputs["attention_mask"]
    return (1 - F.cosine_similarity(mean_pool(student.float(), mask), mean_pool(teacher.float(), mask), dim=-1)).sum()


def _pooled(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    return mean_pool(hidden.float(), batch.inputs["attention_mask"])


def _cosine_to_reference(pooled, batches, reference) -> float:
    import torch.nn.functional as F

    sims = [F.cosine_similarity(out, ref, dim=-1) for out, ref in zip(pooled, reference)]
    return float(sum(s.sum() for s in sims)) / sum(len(s) for s in sims)


# --- causal language modelling -------------------------------------------------------------------

def _lm_columns(source: Source, calibration: bool) -> list[str]:
    return [source.text_column]


def _token_stream(records, source, tokenizer) -> list[int]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for r in records:
        stream += tokenizer(str(r[source.text_column]), add_special_tokens=False)["input_ids"] + eos
    return stream


def _lm_batches(records, source, tokenizer, max_length, batch_size, calibration, config) -> list[Batch]:
    """Calibration: all texts joined (EOS between) and cut into full blocks of `max_length` tokens.
    Evaluation: a sliding window of `max_length` moved by `stride` (default: no overlap) over the same
    stream, each token scored once with the most context the window gives, as in the Hugging Face
    perplexity guide and lm-eval; earlier tokens of a window are context only (label -100)."""
    import torch

    from ..core.batch import Batch

    stream = _token_stream(records, source, tokenizer)
    if len(stream) < max_length:
        raise FwsvdError(f"the text holds {len(stream)} tokens, fewer than one block of data.max_length={max_length}")
    if calibration:
        windows = [(stream[i:i + max_length], 0) for i in range(0, len(stream) - max_length + 1, max_length)]
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
        for chunk in _chunks(group, batch_size):
            ids = torch.tensor([c[0] for c in chunk])
            labels = ids.clone()
            for row, (_, context) in enumerate(chunk):
                labels[row, :context] = -100
            mask = torch.ones_like(ids)
            batches.append(Batch({"input_ids": ids, "attention_mask": mask}, mask.bool(), labels))
    return batches


def _lm_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy; labels of -100 are context, not scored. The labels move one to
    the left, not the logits: the logits without their last position would be a copy of tokens x
    vocabulary (a batch of Qwen2.5-0.5B's 2 x 128 tokens: 155 MB, and as much again for its gradient)."""
    import torch.nn.functional as F

    following = F.pad(labels[:, 1:], (0, 1), value=-100)  # the last position has no next token
    return F.cross_entropy(logits.flatten(0, 1).float(), following.flatten(), reduction="sum", ignore_index=-100)


def _lm_loss(model, batch: Batch) -> torch.Tensor:
    return _lm_nll(model(**batch.inputs).logits, batch.labels)


def _lm_distill(student, teacher, batch: Batch, temperature: float) -> torch.Tensor:
    """Next-token KL per real token, averaged over each sequence's tokens, summed over sequences."""
    mask = batch.token_mask.to(student.device).float()
    per_token = _kl(student, teacher, temperature) * mask
    return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum()


def _batch_nll(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return _lm_nll(logits, batch.labels)


def _perplexity(nlls, batches, reference=None) -> float:
    import torch

    nll = sum(float(n) for n in nlls)
    tokens = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
    return float(torch.exp(torch.tensor(nll / tokens)))


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("text-classification", "AutoModelForSequenceClassification", "logits", "accuracy", True,
             _cls_columns, _cls_batches, _cls_loss, _accuracy, _cls_distill,
             new_head="its predictions mean nothing until that head is fine-tuned"),
        Task("feature-extraction", "AutoModel", "last_hidden_state", "cosine_to_original", True,
             _emb_columns, _emb_batches, _emb_loss, _cosine_to_reference, _emb_distill, needs_reference=True,
             summary=_pooled, unread=("pooler",)),
        Task("image-classification", "AutoModelForImageClassification", "logits", "accuracy", True,
             _img_columns, _img_batches, _cls_loss, _accuracy, _cls_distill,
             new_head="its predictions mean nothing until that head is fine-tuned"),
        Task("text-generation", "AutoModelForCausalLM", "logits", "perplexity", False,
             _lm_columns, _lm_batches, _lm_loss, _perplexity, _lm_distill, skip_empty=True,
             onnx_task_with_past="text-generation-with-past", generates=True, summary=_batch_nll),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise FwsvdError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def run_torch(model: torch.nn.Module, task: Task, batch: Batch) -> torch.Tensor:
    """The compared output of a PyTorch model for one batch."""
    return getattr(model(**batch.inputs), task.output_name)


def metric_loss(task: Task, baseline: float, value: float) -> float:
    """How much worse `value` is than `baseline`: absolute for accuracy/cosine, relative for perplexity."""
    return baseline - value if task.higher_is_better else value / baseline - 1.0
