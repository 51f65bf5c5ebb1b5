"""The unit of calibration data the core consumes: model inputs, which tokens are real, and labels.
Tasks build batches; the statistics pass and the loss only read them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Batch:
    """Model inputs plus what the loss and metric need. Rows are `groups` blocks of `samples` rows:
    a text-pair batch holds all first texts, then all second texts, so one sample spans two rows."""

    inputs: dict[str, torch.Tensor]
    token_mask: torch.Tensor  # (rows, seq) bool: real tokens, not padding
    labels: torch.Tensor | None = None
    groups: int = 1
    # What a task's metric reads beyond tensors (a QA feature's example, character offsets and gold answers):
    # never fed to the model, never moved to a device.
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return next(iter(self.inputs.values())).shape[0] // self.groups  # input_ids, pixel_values, ...

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            {k: v.to(device) for k, v in self.inputs.items()},
            self.token_mask.to(device),
            None if self.labels is None else self.labels.to(device),
            self.groups,
            self.meta,
        )


LossFn = Callable[[nn.Module, Batch], torch.Tensor]  # the task loss of a model on a batch
