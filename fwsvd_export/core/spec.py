"""What to compress and how far: the one description of a compression plan, for Python and YAML alike.

A spec checks itself when it is made, so ``CompressionSpec(damping=0)`` fails here, with the field
named, and the recipe (its YAML face) needs no rules of its own.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Literal, Optional

from ..errors import SpecError
from .methods import METHODS


def _finite(spec: LayerOverride | CompressionSpec) -> None:
    for f in fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(f.name, f"must be a finite number, got {value}")


def _regex(pattern: str, key: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise SpecError(key, f"is not a valid regular expression: {exc}") from None


def _cut(ratio: Optional[float], rank: Optional[int], key: str) -> None:
    """A uniform cut: exactly one of a kept ratio in (0, 1] and a rank >= 1."""
    prefix = f"{key}." if key else ""
    if ratio is not None and rank is not None:
        raise SpecError(key or "ratio", "sets both ratio and rank; keep one")
    if ratio is None and rank is None:
        raise SpecError(key or "ratio", "needs a ratio or a rank")
    if ratio is not None and not 0 < ratio <= 1:
        raise SpecError(f"{prefix}ratio", f"must be in (0, 1], got {ratio}")
    if rank is not None and rank < 1:
        raise SpecError(f"{prefix}rank", f"must be at least 1, got {rank}")


@dataclass
class LayerOverride:
    ratio: Optional[float] = None
    rank: Optional[int] = None

    def __post_init__(self) -> None:
        _finite(self)
        _cut(self.ratio, self.rank, "")


@dataclass
class CompressionSpec:
    """Which Linear layers to factorize, how to weight them, and how far to cut them. With none of
    ratio, rank, budget and target_speedup given, each layer keeps half its weights."""

    method: str = "kfac"  # the strongest in BENCHMARKS.md; "fwsvd" is the paper's method
    target: Optional[list[str]] = None  # None: the model family's attention and MLP projections
    exclude: list[str] = field(default_factory=list)
    ratio: Optional[float] = None  # uniform: kept fraction of each layer's weights
    rank: Optional[int] = None  # uniform: one fixed rank
    budget: Optional[float] = None  # global allocation: kept fraction of the budget_scope's parameters
    budget_scope: Literal["targeted", "model"] = "targeted"
    # Round ranks down to a multiple of this (8, 16, 32 suit fast GEMMs). None: 1, except that a
    # target_speedup run takes the step its kernel timings show (the stage measures them anyway).
    rank_multiple: Optional[int] = None
    overrides: dict[str, LayerOverride] = field(default_factory=dict)
    damping: float = 1e-2
    max_gram_size: int = 8192  # a Gram side larger than this is gathered as its diagonal only
    memory_budget_gb: Optional[float] = None  # statistics memory; over it, layers are gathered in several passes
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass: less memory, more time
    cache_dir: Optional[str] = None  # reuse calibration statistics across runs (safetensors files)
    balance_factors: bool = True  # equal norms per rank component in both factors: they then quantize alike
    sequential: bool = False  # block by block, each block's statistics taken through the already-factorized ones
    allocation_check: float = 0.2  # budget: calibration held out to pick global, uniform or a blend (0: trust global)
    # Global allocation of a latency budget: the model should run this many times faster, as measured on
    # latency_provider at latency_shape (BATCHxSEQUENCE) in latency_precision, from timed factor pairs.
    target_speedup: Optional[float] = None
    latency_provider: Literal["cpu", "cuda"] = "cpu"
    latency_shape: str = "1x128"
    latency_precision: str = "fp32"  # a precision of export.precisions meant for latency_provider

    @property
    def allocates(self) -> bool:
        """Whether ranks come from a global allocation (a parameter budget or a speed-up target)."""
        return self.budget is not None or self.target_speedup is not None

    @property
    def multiple(self) -> int:
        """The rank multiple in force where no kernel timings chose one."""
        return self.rank_multiple or 1

    def __post_init__(self) -> None:
        _finite(self)
        if self.method not in METHODS:
            raise SpecError("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.budget_scope not in ("targeted", "model"):
            raise SpecError("budget_scope", f"must be 'targeted' or 'model', got {self.budget_scope!r}")
        if self.target_speedup is not None:
            if self.budget is not None or self.rank is not None or self.ratio is not None:
                raise SpecError("target_speedup", "cannot be set together with ratio, rank or budget; keep one")
            if not self.target_speedup > 1:
                raise SpecError("target_speedup", f"must be > 1 (times faster than the dense model), got {self.target_speedup}")
        elif self.budget is not None:
            if self.rank is not None or self.ratio is not None:
                raise SpecError("budget", "cannot be set together with ratio or rank; keep one")
            if not 0 < self.budget <= 1:
                raise SpecError("budget", f"must be in (0, 1], got {self.budget}")
        else:
            if self.ratio is None and self.rank is None:
                self.ratio = 0.5
            _cut(self.ratio, self.rank, "")
        if self.rank_multiple is not None and self.rank_multiple < 1:
            raise SpecError("rank_multiple", f"must be at least 1, got {self.rank_multiple}")
        if self.latency_provider not in ("cpu", "cuda"):
            raise SpecError("latency_provider", f"must be 'cpu' or 'cuda', got {self.latency_provider!r}")
        if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", self.latency_shape):
            raise SpecError("latency_shape", f"must look like BATCHxSEQUENCE (e.g. '1x128'), got {self.latency_shape!r}")
        if not self.latency_precision:
            raise SpecError("latency_precision", "must name a precision (fp32, int8, ...)")
        if self.max_gram_size < 1:
            raise SpecError("max_gram_size", f"must be at least 1, got {self.max_gram_size}")
        if not 0 <= self.allocation_check < 1:
            raise SpecError("allocation_check", f"must be in [0, 1), got {self.allocation_check}")
        if not self.damping > 0:
            raise SpecError("damping", f"must be > 0 (it keeps weights invertible), got {self.damping}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise SpecError("memory_budget_gb", f"must be > 0, got {self.memory_budget_gb}")
        for i, pattern in enumerate(self.target or []):
            _regex(pattern, f"target[{i}]")
        for i, pattern in enumerate(self.exclude):
            _regex(pattern, f"exclude[{i}]")
        for pattern, override in self.overrides.items():
            _regex(pattern, f"overrides.{pattern}")
            if not isinstance(override, LayerOverride):
                raise SpecError(f"overrides.{pattern}", f"must be a LayerOverride, got {override!r}")
