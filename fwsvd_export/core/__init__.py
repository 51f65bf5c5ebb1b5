"""The compression core: factorization, the low-rank module and module surgery, the method and
model-family registries, the statistics pass and rank allocation.

It imports nothing from the recipe, data, task, export or report code above it (a test holds it to
that), so it can be used on any ``nn.Module`` with any batches and loss::

    from fwsvd_export.core import CompressionSpec, compress_
    result = compress_(model, CompressionSpec(method="kfac", ratio=0.4), batches, loss_fn)
"""
from .batch import Batch
from .compress import CompressionResult, LayerPlan, compress_, gather_for, gather_statistics, plan_layers
from .factorize import LowRankLinear, factorize
from .families import FAMILIES, Family
from .methods import METHODS, Method, get_method
from .modules import factorized_layers, linear_layers
from .spec import CompressionSpec, LayerOverride
from .statistics import STATISTICS, LayerStats, collect_statistics

__all__ = ["Batch", "CompressionResult", "CompressionSpec", "FAMILIES", "Family", "LayerOverride", "LayerPlan",
           "LayerStats", "LowRankLinear", "METHODS", "Method", "STATISTICS", "collect_statistics", "compress_",
           "factorize", "factorized_layers", "gather_for", "gather_statistics", "get_method", "linear_layers", "plan_layers"]
