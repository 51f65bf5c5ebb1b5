"""The compressed checkpoint: a folder that loads back into the exact compressed model.

Layout: ``config.json`` and tokenizer files (as transformers writes them), ``model.safetensors``
(every weight, both factors of each compressed layer included: ``<layer>.first.weight``,
``<layer>.second.weight``, ``<layer>.second.bias``) and ``fwsvd_manifest.json`` (method, per-layer
ranks, parameter counts, the recipe and library versions).
"""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from .errors import FwsvdError
from .factorize import LowRankLinear
from .compress import set_module
from .models import DTYPES
from .tasks import get_task

MANIFEST = "fwsvd_manifest.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("fwsvd-export", "torch", "transformers", "optimum-onnx", "onnx", "onnxruntime-gpu", "onnxruntime", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def save_checkpoint(model: PreTrainedModel, tokenizer, folder: Path, task: str, compression: dict[str, Any],
                    recipe: dict[str, Any] | None = None, source: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS))
    dtype = next(model.parameters()).dtype
    manifest = {
        "format": FORMAT_VERSION,
        "task": task,
        "dtype": next(k for k, v in DTYPES.items() if v == dtype),
        "source_model": source,
        "factorized": {name: {"in_features": m.in_features, "rank": m.rank, "out_features": m.out_features,
                              "bias": m.second.bias is not None}
                       for name, m in model.named_modules() if isinstance(m, LowRankLinear)},
        "compression": compression,
        "recipe": recipe,
        "versions": library_versions(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FwsvdError(f"{folder} is not an fwsvd-export checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise FwsvdError(f"{path}: not valid JSON: {exc}") from None
    missing = [k for k in ("format", "task", "dtype", "factorized") if k not in manifest]
    if missing:
        raise FwsvdError(f"{path}: incomplete manifest, missing {', '.join(missing)}")
    if manifest.get("format") != FORMAT_VERSION:
        raise FwsvdError(f"{path}: checkpoint format {manifest.get('format')} is not supported (expected {FORMAT_VERSION})")
    return manifest


def load(folder: str | Path, with_tokenizer: bool = False):
    """Rebuild a compressed model from its checkpoint folder (and its tokenizer, if asked)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    task = get_task(manifest["task"])
    config = AutoConfig.from_pretrained(folder)
    model = task.auto_class.from_config(config, dtype=DTYPES[manifest["dtype"]])
    for name, shape in manifest["factorized"].items():
        set_module(model, name, LowRankLinear(shape["in_features"], shape["rank"], shape["out_features"],
                                              bias=shape["bias"], dtype=DTYPES[manifest["dtype"]]))
    try:
        load_model(model, str(folder / WEIGHTS), strict=True)
    except RuntimeError as exc:
        raise FwsvdError(f"{folder / WEIGHTS} does not match {MANIFEST}: {exc}") from None
    model.eval()
    if with_tokenizer:
        return model, AutoTokenizer.from_pretrained(folder)
    return model

