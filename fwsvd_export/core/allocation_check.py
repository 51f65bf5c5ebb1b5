"""An allocation that checks itself. The global allocation ranks layers by a local second-order
estimate made once on the dense model; cut every layer deeply and the errors compound, so the estimate
can prefer an allocation that is worse than uniform ranks. Before committing, candidates (uniform, the
global one, and blends between them) are applied to the model and scored by the real task loss on
calibration batches the statistics never saw; the lowest loss wins, and the result says by how much.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .batch import Batch
from .lowrank import Eigen, Factors, Side, factorize, linear_weight, low_rank_module, pays_off, rank_for_ratio
from .modules import set_module

BLENDS = (0.25, 0.5, 0.75)  # weight of the global ranks in the blended candidates


@dataclass
class Layer:
    name: str
    in_features: int
    out_features: int
    module: nn.Module  # the dense layer
    left: Side
    right: Side
    eigen: Eigen | None = None  # the weighted decomposition the spectrum already took
    factors: Factors | None = None  # set by `choose`: at the largest rank a candidate gives the layer


def held_out(calibration: list[Batch], fraction: float) -> tuple[list[Batch], list[Batch]]:
    """(batches for the statistics, batches for the check): the last `fraction` of the batches, at least
    one; with a single batch the check reuses it (the result says so)."""
    if fraction <= 0 or not calibration:
        return calibration, []
    if len(calibration) == 1:
        return calibration, calibration
    k = min(len(calibration) - 1, max(1, round(fraction * len(calibration))))
    return calibration[:-k], calibration[-k:]


def _snap(rank: float | None, layer: Layer, multiple: int) -> int | None:
    if rank is None:
        return None
    rank = int(rank) // multiple * multiple if multiple > 1 else int(rank)
    rank = max(multiple, rank)
    return rank if pays_off(layer.in_features, layer.out_features, rank) else None


def candidates(
    layers: list[Layer], global_ranks: dict[str, int | None], budget: int, multiple: int
) -> dict[str, dict[str, int | None]]:
    """Uniform ranks spending the same parameter budget, the global ranks, and blends of the two."""
    dense = sum(layer.in_features * layer.out_features for layer in layers)
    ratio = min(1.0, budget / dense)
    uniform = {
        layer.name: _snap(rank_for_ratio(layer.in_features, layer.out_features, ratio), layer, multiple)
        for layer in layers
    }
    full = {layer.name: min(layer.in_features, layer.out_features) for layer in layers}
    found = {"uniform": uniform, "global": dict(global_ranks)}
    for alpha in BLENDS:
        found[f"blend {alpha:g}"] = {
            layer.name: _snap(
                alpha * (global_ranks[layer.name] or full[layer.name])
                + (1 - alpha) * (uniform[layer.name] or full[layer.name]),
                layer,
                multiple,
            )
            for layer in layers
        }
    return found


def _params(layers: list[Layer], ranks: dict[str, int | None]) -> int:
    return sum(
        layer.in_features * layer.out_features
        if (rank := ranks[layer.name]) is None
        else rank * (layer.in_features + layer.out_features)
        for layer in layers
    )


def choose(
    model: nn.Module,
    layers: list[Layer],
    options: dict[str, dict[str, int | None]],
    budget: int,
    check: list[Batch],
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
) -> tuple[str, dict[str, dict[str, float]]]:
    """Apply each candidate within `budget` in turn, score it by the summed task loss on `check`, put the
    dense layers back, and return the winner's name and every candidate's loss (with its standard error
    where there are several batches) and size. Each layer is factorized once, at the largest rank any
    candidate gives it, and keeps those factors (`Layer.factors`): every candidate's, the winner's included,
    are their leading components."""
    options = {k: v for k, v in options.items() if k in ("uniform", "global") or _params(layers, v) <= budget}
    for layer in layers:
        if top := max(r[layer.name] or 0 for r in options.values()):
            layer.factors = factorize(linear_weight(layer.module), top, layer.left, layer.right, layer.eigen)
    scores: dict[str, dict[str, float]] = {}
    was_training = model.training
    model.eval()
    try:
        for name, ranks in options.items():
            for layer in layers:
                if (rank := ranks[layer.name]) is not None and layer.factors is not None:
                    set_module(model, layer.name, low_rank_module(layer.module, layer.factors, rank))
            with torch.no_grad():
                losses = [float(loss_fn(model, b)) for b in check]
            scores[name] = {"loss": sum(losses), "params": _params(layers, ranks)}
            if len(losses) > 1:  # the summed loss's standard error, from the spread of its batches
                scores[name]["loss_se"] = statistics.stdev(losses) * math.sqrt(len(losses))
            for layer in layers:
                set_module(model, layer.name, layer.module)
    finally:
        model.train(was_training)
    finite = {k: v for k, v in scores.items() if v["loss"] == v["loss"]}
    winner = min(finite or scores, key=lambda k: (scores[k]["loss"], k != "global"))
    return winner, scores
