"""The unit of calibration data the core consumes: model inputs, which tokens are real, and labels.
Tasks build batches; the statistics pass and the loss only read them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class Batch:
    """Model inputs plus what the loss and metric need. Rows are `groups` blocks of `samples` rows:
    a text-pair batch holds all first texts, then all second texts, so one sample spans two rows."""

    inputs: dict[str, torch.Tensor]
    token_mask: torch.Tensor  # (rows, seq) bool: real tokens, not padding
    labels: Optional[torch.Tensor] = None
    groups: int = 1

    @property
    def samples(self) -> int:
        return next(iter(self.inputs.values())).shape[0] // self.groups  # input_ids, pixel_values, ...

    def to(self, device: torch.device | str) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.token_mask.to(device),
                     None if self.labels is None else self.labels.to(device), self.groups)


LossFn = Callable[[nn.Module, Batch], torch.Tensor]  # the task loss of a model on a batch
