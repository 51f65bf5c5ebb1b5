"""fwsvd-export: Fisher-weighted low-rank compression of transformers, exported to ONNX and proven in ONNX Runtime.

Python API in one breath::

    import fwsvd_export as fx
    small = fx.compress("path/to/model", records, ratio=0.5)  # a model, folder or hub id; texts or records
    graphs = fx.export(small, "onnx-out", precisions=("fp32", "int8"))
    print(small, fx.validate(small, held_out_records, graphs).passed)

and, a level down, on batches you make yourself::

    from fwsvd_export import CompressionSpec, compress_, load
    result = compress_(model, CompressionSpec(method="fwsvd", ratio=0.5), calibration_batches, task.loss)

Names resolve on first use, so ``import fwsvd_export.core`` loads the core alone, without the recipe,
the stages or the pipeline.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import FwsvdError as FwsvdError  # re-exported: the one exception users catch

_HOMES = {
    **{
        name: ".core"
        for name in (
            "METHODS",
            "CompressionResult",
            "CompressionSpec",
            "LowRankLinear",
            "collect_statistics",
            "compress_",
            "factorize",
            "plan_layers",
        )
    },
    **{name: ".api" for name in ("Compressed", "compress", "export", "validate")},
    "run": ".pipeline",
    "Recipe": ".config",
    "load_recipe": ".loader",
    "load": ".stages.checkpoint",
    "save_checkpoint": ".stages.checkpoint",
}
__all__ = sorted([*_HOMES, "FwsvdError"])
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'fwsvd_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value
    return value
