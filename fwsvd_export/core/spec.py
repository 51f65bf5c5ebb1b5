"""What to compress and how far: the one description of a compression plan, for Python and YAML alike.

A spec checks itself when it is made, so ``CompressionSpec(damping=0)`` fails here, with the field
named, and the recipe (its YAML face) needs no rules of its own. ``check_fields`` holds each field to its
annotation (the recipe's sections in config.py use it too), so a spec built in Python and one read from
YAML obey the same rules.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from ..errors import SpecError, short_repr
from .methods import METHODS

INT_RANGE = (-(2**63), 2**63 - 1)  # a spec's integer is a count, a size or a seed: anything larger is a typo
SHAPE = re.compile(r"[1-9]\d*x[1-9]\d*")  # BATCHxSEQUENCE, both at least 1


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    return next(a for a in typing.get_args(tp) if a is not type(None))


def type_name(tp: Any) -> str:
    """An annotation as the recipe's YAML writes it: 'int or null', "'cpu' | 'cuda'", 'list of str'."""
    if typing.get_origin(tp) is Literal:
        return " | ".join(str(a).lower() if isinstance(a, bool) else repr(a) for a in typing.get_args(tp))
    if _is_optional(tp):
        return f"{type_name(_strip_optional(tp))} or null"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({getattr(tp, '__name__', tp)})"
    return str(getattr(tp, "__name__", tp))


def _checked(value: Any, tp: Any, key: str) -> Any:
    """`value` held to the annotation `tp` (an int where a float goes becomes that float; mapping keys
    become text, as YAML's 1 and "1" name one key), else SpecError naming `key`."""
    if _is_optional(tp):
        return None if value is None else _checked(value, _strip_optional(tp), key)
    origin = typing.get_origin(tp)
    kind = "literal" if origin is Literal else "spec" if dataclasses.is_dataclass(tp) else origin or tp
    if kind not in _CHECKERS:
        raise TypeError(f"unsupported spec annotation {tp!r}")
    return _CHECKERS[kind](value, tp, key)


def _wrong(value: Any, tp: Any, key: str) -> SpecError:
    return SpecError(key, f"must be {'a finite number' if tp is float else type_name(tp)}, got {short_repr(value)}")


def _literal(value: Any, tp: Any, key: str) -> Any:
    if not any(type(value) is type(a) and value == a for a in typing.get_args(tp)):  # 1 is not true
        raise _wrong(value, tp, key)
    return value


def _spec(value: Any, tp: Any, key: str) -> Any:
    if not isinstance(value, tp):
        raise _wrong(value, tp, key)
    return value  # it checked itself when it was made


def _list(value: Any, tp: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise _wrong(value, tp, key)
    (item,) = typing.get_args(tp)
    return [_checked(v, item, f"{key}[{i}]") for i, v in enumerate(value)]


def _mapping(value: Any, tp: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _wrong(value, tp, key)
    _, item = typing.get_args(tp)
    out: dict[str, Any] = {}
    written: dict[str, Any] = {}
    for k, v in value.items():
        text = _mapping_key(k, key)
        if text in out:  # 1 and "1" are one key once read as text: refuse rather than keep the last
            raise SpecError(
                key, f"has the key '{text}' twice (written as {short_repr(written[text])} and as {short_repr(k)})"
            )
        written[text] = k
        out[text] = _checked(v, item, f"{key}.{text}")
    return out


def _mapping_key(k: Any, key: str) -> str:
    if (
        isinstance(k, bool)
        or not isinstance(k, (str, int, float))
        or (isinstance(k, int) and not INT_RANGE[0] <= k <= INT_RANGE[1])
    ):
        raise SpecError(key, f"keys must be strings, got the key {short_repr(k)}")
    return str(k)


def _bool(value: Any, tp: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _wrong(value, tp, key)
    return value


def _int(value: Any, tp: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(value, tp, key)
    if not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise SpecError(key, f"is out of range (a 64-bit integer), got {short_repr(value)}")
    return value


def _float(value: Any, tp: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong(value, tp, key)
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        raise _wrong(value, tp, key) from None
    if not math.isfinite(number):
        raise _wrong(value, tp, key)
    return number


def _str(value: Any, tp: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _wrong(value, tp, key)
    return value


# Each kind of annotation and its checker: (value, annotation, key) -> the value as the spec holds it.
_CHECKERS: dict[Any, Callable[[Any, Any, str], Any]] = {
    "literal": _literal,
    "spec": _spec,
    list: _list,
    dict: _mapping,
    bool: _bool,
    int: _int,
    float: _float,
    str: _str,
}


_HINTS: dict[type, dict[str, Any]] = {}  # resolved annotations of each spec class


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def check_fields(spec: Any) -> None:
    """Hold every field of the dataclass `spec` to its annotation, in place (see `_checked`)."""
    hints = _hints(type(spec))
    for f in dataclasses.fields(spec):
        setattr(spec, f.name, _checked(getattr(spec, f.name), hints[f.name], f.name))


def check_shape(shape: str, key: str) -> None:
    """The one BATCHxSEQUENCE rule (a latency shape such as '1x128'), for the spec and the recipe alike."""
    if not SHAPE.fullmatch(shape):
        raise SpecError(key, f"must look like BATCHxSEQUENCE (e.g. '1x128'), got {short_repr(shape)}")


def _regex(pattern: str, key: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise SpecError(key, f"is not a valid regular expression: {exc}") from None
    except (OverflowError, ValueError) as exc:  # a repeat count over re's limit
        raise SpecError(key, f"is not a valid regular expression: {exc}") from None
    except RecursionError:  # a few thousand nested groups
        raise SpecError(key, "is not a valid regular expression: nested too deeply") from None


def _cut(ratio: float | None, rank: int | None, key: str) -> None:
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
    ratio: float | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        _cut(self.ratio, self.rank, "")


@dataclass
class CompressionSpec:
    """Which Linear layers to factorize, how to weight them, and how far to cut them. With none of
    ratio, rank, budget and target_speedup given, each layer keeps half its weights."""

    method: str = "kfac"  # the strongest in benchmarks/logs/methods.md; "fwsvd" is the paper's method
    target: list[str] | None = None  # None: the model family's attention and MLP projections
    exclude: list[str] = field(default_factory=list)
    ratio: float | None = None  # uniform: kept fraction of each layer's weights
    rank: int | None = None  # uniform: one fixed rank
    budget: float | None = None  # global allocation: kept fraction of the budget_scope's parameters
    budget_scope: Literal["targeted", "model"] = "targeted"
    # Round ranks down to a multiple of this (8, 16, 32 suit fast GEMMs). None: 1, except that a
    # target_speedup run takes the step its kernel timings show (the stage measures them anyway).
    rank_multiple: int | None = None
    overrides: dict[str, LayerOverride] = field(default_factory=dict)
    damping: float = 1e-2
    max_gram_size: int = 8192  # a Gram side larger than this is gathered as its diagonal only
    memory_budget_gb: float | None = None  # statistics memory; over it, layers are gathered in several passes
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass: less memory, more time
    cache_dir: str | None = None  # reuse calibration statistics across runs (safetensors files)
    balance_factors: bool = True  # equal norms per rank component in both factors: they then quantize alike
    sequential: bool = False  # block by block, each block's statistics taken through the already-factorized ones
    allocation_check: float = 0.2  # budget: calibration held out to pick global, uniform or a blend (0: trust global)
    # Global allocation of a latency budget: the model should run this many times faster, as measured on
    # latency_provider at latency_shape (BATCHxSEQUENCE) in latency_precision, from timed factor pairs.
    target_speedup: float | None = None
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
        check_fields(self)
        if self.method not in METHODS:
            raise SpecError("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.target_speedup is not None:
            if self.budget is not None or self.rank is not None or self.ratio is not None:
                raise SpecError("target_speedup", "cannot be set together with ratio, rank or budget; keep one")
            if not self.target_speedup > 1:
                raise SpecError(
                    "target_speedup", f"must be > 1 (times faster than the dense model), got {self.target_speedup}"
                )
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
        check_shape(self.latency_shape, "latency_shape")
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
        for pattern in self.overrides:
            _regex(pattern, f"overrides.{pattern}")
