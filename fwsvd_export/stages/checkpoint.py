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

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, PreTrainedModel

from ..core.lowrank import LINEAR_TYPES, LowRankLinear, linear_weight, nonfinite
from ..core.modules import set_module
from ..errors import FwsvdError, short_message
from .tasks import TASKS, get_task

MANIFEST = "fwsvd_manifest.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
CHECKPOINT_HINT = (
    "a checkpoint is a folder written by `fwsvd-export compress` (or the compressed/ folder of a "
    "`fwsvd-export run` output)"
)
LAYER_FIELDS = ("in_features", "rank", "out_features", "bias")

# The dtype names recipes and manifests use.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# safetensors' dtype codes for the tensors a model state holds.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
Header = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, safetensors dtype code)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in (
        "fwsvd-export",
        "torch",
        "transformers",
        "optimum-onnx",
        "onnx",
        "onnxruntime-gpu",
        "onnxruntime",
        "safetensors",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def save_checkpoint(
    model: PreTrainedModel,
    preprocessor,
    folder: Path,
    task: str,
    compression: dict[str, Any],
    recipe: dict[str, Any] | None = None,
    source: str | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    preprocessor.save_pretrained(folder)  # a tokenizer, an image processor, ...
    save_model(model, str(folder / WEIGHTS))
    dtype = next(model.parameters()).dtype
    manifest = {
        "format": FORMAT_VERSION,
        "task": task,
        "dtype": next(k for k, v in DTYPES.items() if v == dtype),
        "source_model": source,
        "factorized": {
            name: {
                "in_features": m.in_features,
                "rank": m.rank,
                "out_features": m.out_features,
                "bias": m.second.bias is not None,
            }
            for name, m in model.named_modules()
            if isinstance(m, LowRankLinear)
        },
        "compression": compression,
        "recipe": recipe,
        "versions": library_versions(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def _not_a_checkpoint(folder: Path) -> str:
    """What the user pointed at instead of a checkpoint, and what to do about it."""
    if not folder.exists():
        return f"{folder} does not exist; {CHECKPOINT_HINT}"
    if not folder.is_dir():
        kind = "an ONNX file" if folder.suffix == ".onnx" else "a file"
        return f"{folder} is {kind}, not a checkpoint: {CHECKPOINT_HINT}"
    if (folder / "compressed" / MANIFEST).is_file():
        return f"{folder} is a `fwsvd-export run` output folder, not a checkpoint: its checkpoint is {folder / 'compressed'}"
    if any(folder.glob("*.onnx")):
        return f"{folder} holds an ONNX export, not a checkpoint: {CHECKPOINT_HINT}"
    if (folder / "config.json").is_file():
        return (
            f"{folder} is a plain Hugging Face model folder (config.json but no {MANIFEST}), so it is not "
            "compressed yet: run `fwsvd-export compress` first"
        )
    return f"{folder} is not an fwsvd-export checkpoint: {MANIFEST} is missing and so is config.json; {CHECKPOINT_HINT}"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_manifest(manifest: Any, path: Path) -> None:
    """Every field `load` relies on, with its type, so that a hand-edited manifest fails here, not deep in torch."""
    if not isinstance(manifest, dict):
        raise FwsvdError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    missing = [k for k in ("format", "task", "dtype", "factorized") if k not in manifest]
    if missing:
        raise FwsvdError(f"{path}: incomplete manifest, missing {', '.join(missing)}")
    if manifest["format"] != FORMAT_VERSION:
        raise FwsvdError(
            f"{path}: checkpoint format {json.dumps(manifest['format'])} is not supported (expected {FORMAT_VERSION})"
        )
    if not isinstance(manifest["task"], str) or manifest["task"] not in TASKS:
        raise FwsvdError(f"{path}: 'task' must be one of {', '.join(TASKS)}, got {json.dumps(manifest['task'])}")
    if not isinstance(manifest["dtype"], str) or manifest["dtype"] not in DTYPES:
        raise FwsvdError(f"{path}: 'dtype' must be one of {', '.join(DTYPES)}, got {json.dumps(manifest['dtype'])}")
    factorized = manifest["factorized"]
    if not isinstance(factorized, dict):
        raise FwsvdError(f"{path}: 'factorized' must map layer names to their shapes, got {type(factorized).__name__}")
    for name, shape in factorized.items():
        where = f"{path}: factorized layer '{name}'"
        if not isinstance(shape, dict):
            raise FwsvdError(f"{where} must map {', '.join(LAYER_FIELDS)} to values, got {json.dumps(shape)}")
        absent = [k for k in LAYER_FIELDS if k not in shape]
        if absent:
            raise FwsvdError(f"{where} has no {', '.join(repr(k) for k in absent)}")
        for key in ("in_features", "rank", "out_features"):
            if not _is_count(shape[key]):
                raise FwsvdError(f"{where}: '{key}' must be a positive integer, got {json.dumps(shape[key])}")
        if not isinstance(shape["bias"], bool):
            raise FwsvdError(f"{where}: 'bias' must be true or false, got {json.dumps(shape['bias'])}")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The checkpoint's manifest, checked field by field; a clear error for anything that is not a checkpoint."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise FwsvdError(_not_a_checkpoint(folder))
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        raise FwsvdError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise FwsvdError(f"{path}: not valid JSON: {exc}") from None
    _check_manifest(manifest, path)
    return manifest


def _read_header(weights: Path) -> Header:
    """Shape and safetensors dtype code of every tensor in the weights file, without loading any."""
    if not weights.is_file():
        raise FwsvdError(
            f"{weights} is missing: the checkpoint is incomplete (its weights were not written or were removed)"
        )
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise FwsvdError(f"{weights} cannot be read as safetensors (damaged or truncated?): {exc}") from None


def _check_layers(model: PreTrainedModel, factorized: dict[str, dict[str, Any]], path: Path) -> None:
    """Each factorized name must be a Linear-like layer of the model config.json builds, of the manifest's shape."""
    for name, shape in factorized.items():
        where = f"{path}: factorized layer '{name}'"
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise FwsvdError(
                f"{where} does not exist in the {model.config.model_type} model that config.json builds"
            ) from None
        if not isinstance(module, LINEAR_TYPES):
            raise FwsvdError(f"{where} is a {type(module).__name__} in the model, not a Linear layer")
        out_features, in_features = linear_weight(module).shape
        if (shape["in_features"], shape["out_features"]) != (in_features, out_features):
            raise FwsvdError(
                f"{where}: 'in_features' {shape['in_features']} and 'out_features' {shape['out_features']} "
                f"do not match the model's layer ({in_features} in, {out_features} out)"
            )


def _check_factors(tensors: Header, factorized: dict[str, dict[str, Any]], path: Path, weights: Path) -> None:
    """The stored factors must have the manifest's shapes, as LowRankLinear holds them: first (rank, in),
    second (out, rank)."""
    for name, shape in factorized.items():
        rank, in_features, out_features = shape["rank"], shape["in_features"], shape["out_features"]
        expected = {f"{name}.first.weight": (rank, in_features), f"{name}.second.weight": (out_features, rank)}
        if shape["bias"]:
            expected[f"{name}.second.bias"] = (out_features,)
        elif f"{name}.second.bias" in tensors:
            raise FwsvdError(
                f"{weights} does not match {path}: it holds '{name}.second.bias' but the manifest says "
                f"'bias' false for layer '{name}'"
            )
        for tensor, wanted in expected.items():
            if tensor not in tensors:
                raise FwsvdError(
                    f"{weights} does not match {path}: layer '{name}' needs tensor '{tensor}', which the file lacks"
                )
            if tensors[tensor][0] != wanted:
                raise FwsvdError(
                    f"{weights} does not match {path}: '{tensor}' has shape {list(tensors[tensor][0])}, but "
                    f"layer '{name}' (rank {rank}, in_features {in_features}, out_features {out_features}) "
                    f"needs {list(wanted)}"
                )


def _check_dtypes(model: PreTrainedModel, tensors: Header, dtype: str, path: Path, weights: Path) -> None:
    """Each stored tensor must have the dtype the rebuilt model holds it in: loading casts silently, so a manifest
    whose dtype was edited would otherwise rebuild a different model from the same weights."""
    state = model.state_dict()
    wrong = [
        (name, code)
        for name, (_, code) in tensors.items()
        if name in state and SAFETENSORS_DTYPES.get(code) != state[name].dtype
    ]
    if wrong:
        name, code = wrong[0]
        found = str(SAFETENSORS_DTYPES.get(code, code)).removeprefix("torch.")
        raise FwsvdError(
            f"{weights} does not match {path}: 'dtype' is '{dtype}' but {len(wrong)} of {len(tensors)} "
            f"tensors are stored otherwise, e.g. '{name}' as {found}"
        )


def _check_finite(model: PreTrainedModel, weights: Path) -> None:
    """A NaN or inf in any tensor reaches the model's outputs and every graph exported from it: a checkpoint
    whose weights file was damaged or written by a diverged run is refused, the tensor named."""
    for name, tensor in model.state_dict().items():
        bad = nonfinite(tensor)
        if bad:
            raise FwsvdError(
                f"{weights}: '{name}' holds {bad}; a checkpoint must hold finite weights "
                "(fwsvd_export.load(..., check_finite=False) loads it anyway, to inspect it)"
            )


def _missing_tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files `folder` lacks: tokenizer_config.json, and those its tokenizer class reads the
    vocabulary from (a fast tokenizer's tokenizer.json, or the slow one's own files)."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    path = folder / "tokenizer_config.json"
    try:
        name = json.loads(path.read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return [f for f in ("tokenizer_config.json", "tokenizer.json") if not (folder / f).is_file()]
    tokenizer_class = tokenizer_class_from_name(name) if isinstance(name, str) else None
    wanted = tokenizer_class.vocab_files_names.values() if tokenizer_class is not None else ["tokenizer.json"]
    return [f for f in wanted if not (folder / f).is_file()]


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # an image processor's, a feature extractor's


def _load_tokenizer(folder: Path, manifest: dict[str, Any], trust_remote_code: bool):
    """The checkpoint's preprocessor: its tokenizer, or an error naming the files it lacks (transformers
    fails on a folder without them with a TypeError or AttributeError from deep inside); where the folder
    holds a processor's files (PROCESSOR_FILES), what `AutoProcessor` makes of them."""
    processor = any((folder / name).is_file() for name in PROCESSOR_FILES)
    try:
        if processor:
            return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        missing = [] if processor else _missing_tokenizer_files(folder)
        source = manifest.get("source_model")
        what = f"it lacks {', '.join(missing)}" if missing else short_message(exc)
        raise FwsvdError(
            f"{folder}: the tokenizer cannot be loaded: {what}. `fwsvd-export compress` writes the "
            "tokenizer files beside config.json; copy them from the source model" + (f" ({source})" if source else "")
        ) from None


def load(folder: str | Path, with_tokenizer: bool = False, check_finite: bool = True, trust_remote_code: bool = False):
    """Rebuild a compressed model from its checkpoint folder (and its tokenizer, if asked), after checking that
    the manifest, config.json and model.safetensors agree with each other and, unless `check_finite` is
    False, that every weight is finite. The folder's own Python (config.json's auto_map) runs only with
    `trust_remote_code`."""
    from .models import check_custom_code  # here: models imports this module

    folder = Path(folder)
    manifest = read_manifest(folder)
    path, weights = folder / MANIFEST, folder / WEIGHTS
    dtype = DTYPES[manifest["dtype"]]
    tensors = _read_header(weights)
    check_custom_code(folder, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise FwsvdError(f"{folder / 'config.json'}: {short_message(exc)}") from None
    model = get_task(manifest["task"]).auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    factorized = manifest["factorized"]
    _check_layers(model, factorized, path)
    _check_factors(tensors, factorized, path, weights)
    for name, shape in factorized.items():
        set_module(
            model,
            name,
            LowRankLinear(shape["in_features"], shape["rank"], shape["out_features"], bias=shape["bias"], dtype=dtype),
        )
    _check_dtypes(model, tensors, manifest["dtype"], path, weights)
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as exc:
        raise FwsvdError(f"{weights} does not match {path}: {exc}") from None
    if check_finite:
        _check_finite(model, weights)
    model.eval()
    if with_tokenizer:
        return model, _load_tokenizer(folder, manifest, trust_remote_code)
    return model
