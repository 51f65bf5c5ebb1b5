"""The one verb of the Python API: ``compress_(model, spec, calibration, loss_fn)`` picks the Linear
layers a plan targets, gathers the statistics its method needs, and replaces each layer in place by
its two-factor LowRankLinear. Layers whose rank would not save parameters stay dense, with a reason.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import FwsvdError
from .factorize import LowRankLinear, low_rank_from_linear, pays_off, rank_for_ratio
from .fisher import LayerStats, collect_statistics
from .methods import get_method
from .recipe import CompressionSpec
from .tasks import Batch


@dataclass
class LayerPlan:
    name: str
    in_features: int
    out_features: int
    rank: Optional[int]  # None: stays dense
    reason: str = ""  # why it stays dense, or which rule chose the rank
    params_before: int = 0
    params_after: int = 0
    weighted_error: Optional[float] = None  # relative tail energy of the weighted spectrum
    notes: list[str] = field(default_factory=list)


@dataclass
class CompressionResult:
    method: str
    layers: list[LayerPlan]
    seconds: dict[str, float] = field(default_factory=dict)  # statistics pass, factorization

    @property
    def compressed(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.rank is not None]

    def summary(self) -> dict:
        before = sum(p.params_before for p in self.layers)
        after = sum(p.params_after for p in self.layers)
        return {
            "method": self.method,
            "targeted_layers": len(self.layers),
            "compressed_layers": len(self.compressed),
            "dense_layers": len(self.layers) - len(self.compressed),
            "targeted_params_before": before,
            "targeted_params_after": after,
            "targeted_kept_ratio": after / before if before else 1.0,
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "layers": [asdict(p) for p in self.layers]}


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _tied(model: nn.Module) -> set[int]:
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {key for key, n in counts.items() if n > 1}


def plan_layers(model: nn.Module, spec: CompressionSpec) -> list[LayerPlan]:
    """Decide each targeted layer's rank; raises when the plan cannot apply to this model."""
    layers = linear_layers(model)
    chosen = {
        name: m for name, m in layers.items()
        if any(re.search(p, name) for p in spec.target) and not any(re.search(p, name) for p in spec.exclude)
    }
    if not chosen:
        sample = ", ".join(list(layers)[:8]) + (" ..." if len(layers) > 8 else "")
        raise FwsvdError(f"compression.target {spec.target} (exclude {spec.exclude}) matches no Linear layer; "
                         f"the model's Linear layers are: {sample}")
    for pattern in spec.overrides:
        if not any(re.search(pattern, name) for name in chosen):
            raise FwsvdError(f"compression.overrides key '{pattern}' matches no targeted layer")
    tied = _tied(model)
    plans = []
    for name, module in chosen.items():
        out_f, in_f = module.weight.shape
        dense = in_f * out_f
        ratio, rank, rule = spec.ratio, spec.rank, "default"
        for pattern, override in spec.overrides.items():
            if re.search(pattern, name):
                ratio, rank, rule = override.ratio, override.rank, f"override '{pattern}'"
                break
        if rank is not None and rank > min(in_f, out_f):
            raise FwsvdError(f"rank {rank} ({rule}) is larger than layer '{name}' allows: "
                             f"its weight is {out_f}x{in_f}, so its rank is at most {min(in_f, out_f)}")
        if rank is None:
            rank = rank_for_ratio(in_f, out_f, ratio)
            rule += f", ratio {ratio:g}"
        else:
            rule += f", rank {rank}"
        plan = LayerPlan(name, in_f, out_f, rank, rule, params_before=dense, params_after=dense)
        if id(module.weight) in tied:
            plan.rank, plan.reason = None, "weight is tied to another module; kept dense"
        elif ratio is not None and ratio >= 1:
            plan.rank, plan.reason = None, "ratio 1 keeps the layer dense"
        elif not pays_off(in_f, out_f, rank):
            plan.rank = None
            plan.reason = f"rank {rank} would not save parameters (break-even {in_f * out_f / (in_f + out_f):.1f}); kept dense"
        else:
            plan.params_after = rank * (in_f + out_f)
        plans.append(plan)
    return plans


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def compress_(
    model: nn.Module,
    spec: CompressionSpec,
    calibration: Optional[list[Batch]] = None,
    loss_fn: Optional[Callable[[nn.Module, Batch], torch.Tensor]] = None,
    progress: bool = True,
) -> CompressionResult:
    """Factorize the layers `spec` targets, in place, with `spec.method`; returns the per-layer plan."""
    method = get_method(spec.method)
    plans = plan_layers(model, spec)
    todo = {p.name: model.get_submodule(p.name) for p in plans if p.rank is not None}
    if method.needs and (calibration is None or loss_fn is None):
        raise FwsvdError(f"method '{method.name}' needs calibration data and a task loss")
    start = time.perf_counter()
    stats = collect_statistics(model, todo, calibration or [], loss_fn, set(method.needs), progress) if method.needs else {}
    result = CompressionResult(method.name, plans, {"statistics": time.perf_counter() - start})
    start = time.perf_counter()
    for plan in tqdm([p for p in plans if p.rank is not None], desc="factorizing", unit="layer", disable=not progress):
        weighting = method.build(stats.get(plan.name, LayerStats()), spec.damping)
        module, factors = low_rank_from_linear(todo[plan.name], plan.rank, weighting.left, weighting.right)
        energy = factors.singular_values.square()
        plan.weighted_error = float((energy[plan.rank:].sum() / energy.sum().clamp(min=1e-300)).sqrt())
        plan.notes = weighting.notes
        set_module(model, plan.name, module)
    result.seconds["factorize"] = time.perf_counter() - start
    return result


def factorized_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
