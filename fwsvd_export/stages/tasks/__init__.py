"""What differs between tasks: the model class, the batches, the loss the Fisher is taken of, the
tensor compared across runtimes, and the task's metrics.

The registry is this package: each module beside this one (but `base` and `common`) defines its tasks in a
tuple `TASKS`, found here by listing the package, so adding a task touches one file. The modules are light
to import (see `base`): the recipe checks its task and metric names against them.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from ...errors import FwsvdError
from .base import Record, Source, Task

if TYPE_CHECKING:
    import torch

    from ...core.batch import Batch

__all__ = ["TASKS", "Record", "Source", "Task", "get_task", "metric_loss", "run_torch"]
_SHARED = {"base", "common"}


def _registry() -> dict[str, Task]:
    found: dict[str, Task] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in _SHARED:
            continue
        for task in importlib.import_module(f"{__name__}.{info.name}").TASKS:
            if task.name in found:
                raise RuntimeError(f"task '{task.name}' is defined twice (stages/tasks/{info.name}.py)")
            found[task.name] = task
    return found


TASKS: dict[str, Task] = _registry()


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise FwsvdError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def run_torch(model: torch.nn.Module, task: Task, batch: Batch) -> torch.Tensor:
    """The compared output of a PyTorch model for one batch (`Task.compared` of its `output_names`)."""
    outputs = model(**batch.inputs)
    return task.compared([getattr(outputs, name) for name in task.output_names])


def metric_loss(task: Task, metric: str, baseline: float, value: float) -> float:
    """How much worse `value` is than `baseline` in `metric`: absolute where higher is better (accuracy,
    cosine, F1), relative where lower is (perplexity)."""
    return baseline - value if task.higher_is_better(metric) else value / baseline - 1.0
