"""The compression core: factorization, the low-rank module and module surgery, the method and
model-family registries, the statistics pass and rank allocation.

It imports nothing from the recipe, data, task, export or report code above it (a test holds it to
that), so it can be used on any ``nn.Module`` with any batches and loss::

    from fwsvd_export.core import CompressionSpec, compress_
    result = compress_(model, CompressionSpec(method="kfac", ratio=0.4), batches, loss_fn)
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and its module: names resolve on first use, so that a module that needs one piece
# of the core (a checkpoint loader needs the low-rank module; a recipe, the spec) does not load the rest,
# and importing the package loads no torch.
_HOMES = {
    **dict.fromkeys(["Batch"], ".batch"),
    **dict.fromkeys(["LowRankLinear", "factorize"], ".lowrank"),
    **dict.fromkeys(
        [
            "CompressionResult",
            "LayerPlan",
            "check_speedup_target",
            "compress_",
            "gather_for",
            "gather_statistics",
            "plan_layers",
        ],
        ".compress",
    ),
    **dict.fromkeys(["FAMILIES", "Family"], ".families"),
    **dict.fromkeys(["METHODS", "Method", "get_method"], ".methods"),
    **dict.fromkeys(["factorized_layers", "linear_layers"], ".modules"),
    **dict.fromkeys(["CompressionSpec", "LayerOverride"], ".spec"),
    **dict.fromkeys(["STATISTICS", "LayerStats", "collect_statistics"], ".statistics"),
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value
    return value
