"""What every compression of one model shares (`Prepared`: the model, its data, loaded once per run or
once per sweep) and the dense model's measured graph (`Dense`), which each compressed point is compared
with. Plain holders: the pipeline fills them, the speed-up aim (``aim.py``) and the points read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..config import Recipe
from ..core import Batch
from .clock import release_freed_memory
from .tasks import Task
from .validate import Reference


@dataclass
class Prepared:
    """What every compression of one model shares: loaded once per run, or once per sweep."""

    recipe: Recipe
    task: Task
    model: nn.Module
    tokenizer: object
    location: str
    calibration: list[Batch]
    evaluation: list[Batch]
    runner: nn.Module | None  # a copy placed with the recipe's device_map for the statistics pass
    dense_params: int = 0
    finetune: list[Batch] | None = None  # data.finetune's batches, when the recipe names them
    loading_notes: list[str] = field(default_factory=list)  # what loading let pass (a new or unused head)

    def release_models(self) -> None:
        """Drop the torch models once no later stage reads them (after the last point's PyTorch results)."""
        self.model = self.runner = None  # type: ignore[assignment]
        release_freed_memory()


@dataclass
class Dense:
    """The dense model's graph and reference results, which every compressed point is compared with."""

    onnx: Path
    graph: dict
    reference: Reference
