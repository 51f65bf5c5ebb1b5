"""fwsvd-export: Fisher-weighted low-rank compression of transformers, exported to ONNX and proven in ONNX Runtime.

Python API in one breath::

    from fwsvd_export import CompressionSpec, compress_, load
    result = compress_(model, CompressionSpec(method="fwsvd", ratio=0.5), calibration_batches, task.loss)
"""
from .core import METHODS, CompressionResult, CompressionSpec, LowRankLinear, collect_statistics, compress_, factorize, plan_layers
from .errors import FwsvdError
from .pipeline import run
from .recipe import Recipe, load_recipe
from .stages.checkpoint import load, save_checkpoint

__all__ = ["CompressionResult", "CompressionSpec", "FwsvdError", "LowRankLinear", "METHODS", "Recipe",
           "collect_statistics", "compress_", "factorize", "load", "load_recipe", "plan_layers", "run", "save_checkpoint"]
__version__ = "0.1.0"
