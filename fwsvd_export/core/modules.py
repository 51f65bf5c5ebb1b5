"""Module surgery: finding the Linear layers of a model and swapping one for its factorized form."""

from __future__ import annotations

from collections import Counter

from torch import nn

from .lowrank import LINEAR_TYPES, LowRankLinear


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}


def factorized_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def tied_parameters(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (e.g. tied input and output embeddings)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {key for key, n in counts.items() if n > 1}
