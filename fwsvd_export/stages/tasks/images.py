"""Image classification: the seam for inputs beyond text (images read with PIL, made into pixel_values by
the model's image processor); the classifier's loss, distillation and accuracy are text classification's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import FwsvdError
from .base import Record, Source, Task
from .classification import accuracy, distill, loss
from .common import chunks, label_id

if TYPE_CHECKING:
    import torch

    from ...core.batch import Batch


def _columns(source: Source, calibration: bool) -> list[str]:
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


def _batches(records, source, processor, max_length, batch_size, calibration, config) -> list[Batch]:
    """Images read with PIL and made into the model's inputs (pixel_values) by its image processor;
    `max_length` does not apply to images."""
    import torch

    from ...core.batch import Batch

    batches = []
    for chunk in chunks(records, batch_size):
        inputs = dict(processor(images=[_image(r, source.image_column) for r in chunk], return_tensors="pt"))
        labels = torch.tensor([label_id(r, source.label_column, config) for r in chunk])
        pixels = inputs.get("pixel_values")
        positions = _positions(config, pixels) if isinstance(pixels, torch.Tensor) and pixels.dim() == 4 else 1
        batches.append(Batch(inputs, torch.ones(len(chunk), positions, dtype=torch.bool), labels))
    return batches


TASKS = (
    Task(
        "image-classification",
        "AutoModelForImageClassification",
        "logits",
        ("accuracy",),
        _columns,
        _batches,
        loss,
        accuracy,
        distill,
        new_head="its predictions mean nothing until that head is fine-tuned",
    ),
)
