"""Loading the model and tokenizer a recipe names: a local folder, a hub id, or a package that ships one."""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import FwsvdError, short_message
from ..recipe import ModelSpec, Recipe
from .checkpoint import DTYPES
from .tasks import get_task

def is_local_path(location: str) -> bool:
    """Whether `location` means a path on disk rather than a hub id. Hub ids are `name` or `org/name`: one
    '/' at most, never starting with '.' or '~', never absolute. So a location is local when it exists, or
    starts with '.' or '~', or is absolute, or holds two or more path separators; a bare `org/name` that
    does not exist here is a hub id."""
    separators = location.count("/") + (location.count(os.sep) if os.sep != "/" else 0)
    return (os.path.exists(os.path.expanduser(location)) or location.startswith((".", "~"))
            or Path(location).is_absolute() or separators >= 2)


def check_local_model(location: str) -> str:
    """The expanded path of a local model folder, or a clear error before transformers mistakes a missing
    folder or a file for a malformed hub id."""
    from .checkpoint import MANIFEST  # here: checkpoint imports this module

    path = Path(os.path.expanduser(location))
    if not path.exists():
        raise FwsvdError(f"no such model folder: {location}")
    if not path.is_dir():
        raise FwsvdError(f"{location} is a file; expected a model folder (config.json and weights) or a hub id")
    if (path / MANIFEST).is_file():  # transformers would load it with random dense layers
        raise FwsvdError(f"{location} is a compressed fwsvd-export checkpoint, not a dense model: load it with "
                         "fwsvd_export.load (or `fwsvd-export inspect`), or compress its source model instead")
    if not (path / "config.json").is_file():
        raise FwsvdError(f"{location} has no config.json; expected a model folder (config.json and weights) or a hub id")
    return str(path)


def model_location(recipe: Recipe) -> str:
    """A local folder path or a hub id, from whichever source key the recipe used."""
    spec: ModelSpec = recipe.model
    if spec.package:
        try:
            module = importlib.import_module(spec.package)
        except ImportError:
            raise FwsvdError(f"{recipe.source}: 'model.package' names '{spec.package}', which is not installed") from None
        if not hasattr(module, "get_model_path"):
            raise FwsvdError(f"{recipe.source}: package '{spec.package}' has no get_model_path() to find its model")
        return str(module.get_model_path())
    if spec.path:
        path = recipe.resolve(spec.path)
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise FwsvdError(f"{recipe.source}: 'model.path' folder {path} {what}")
        return str(path)
    return str(spec.hub_id)


def load_pretrained(location: str, task_name: str, dtype: str = "float32", revision: str | None = None,
                    placement: Optional[dict[str, Any]] = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in eval mode and its tokenizer, from a local folder or a hub id; `placement` holds
    accelerate's from_pretrained arguments (device_map, max_memory, offload_folder), if any."""
    task = get_task(task_name)
    source = check_local_model(location) if is_local_path(location) else location
    kwargs = {"revision": revision} if revision else {}
    try:
        model = task.auto_class.from_pretrained(source, dtype=DTYPES[dtype], **kwargs, **(placement or {}))
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        hint = ("; with this placement the model may fit on no device at all (raise model.max_memory)"
                if placement else "")
        raise FwsvdError(f"could not load model '{location}' for {task.name}: {short_message(exc)}{hint}") from None
    if tokenizer.pad_token is None:  # causal LMs often ship without one
        if tokenizer.eos_token is None and tokenizer.unk_token is None:
            raise FwsvdError(f"the tokenizer of '{location}' has no pad, EOS or unknown token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers need it to find the last token
    return model.eval(), tokenizer


def load_model(recipe: Recipe) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The recipe's model and tokenizer, and where they were loaded from."""
    location = model_location(recipe)
    model, tokenizer = load_pretrained(location, recipe.model.task, recipe.model.dtype, recipe.model.revision)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and recipe.data.max_length > limit:
        raise FwsvdError(f"{recipe.source}: 'data.max_length' {recipe.data.max_length} exceeds the model's "
                         f"{limit} positions")
    return model, tokenizer, location


def placement(recipe: Recipe) -> Optional[dict[str, Any]]:
    """accelerate's from_pretrained arguments for the recipe's device_map, or None to load on the host."""
    spec = recipe.model
    if spec.device_map is None:
        return None
    if importlib.util.find_spec("accelerate") is None:
        raise FwsvdError(f"{recipe.source}: 'model.device_map' needs accelerate: pip install 'fwsvd-export[big]'")
    kwargs: dict[str, Any] = {"device_map": spec.device_map}
    if spec.max_memory:
        kwargs["max_memory"] = {int(k) if k.isdigit() else k: v for k, v in spec.max_memory.items()}
    if spec.offload_folder:
        kwargs["offload_folder"] = str(recipe.resolve(spec.offload_folder))
    return kwargs


def load_for_statistics(recipe: Recipe, location: str) -> Optional[PreTrainedModel]:
    """A second copy of the model spread over devices by accelerate, for the calibration pass
    (activations and gradients of a big model need accelerator memory); None without a device_map, or
    when the map puts everything in host memory anyway. Factorization, export and validation keep
    working on the host copy."""
    kwargs = placement(recipe)
    if kwargs is None:
        return None
    model = load_pretrained(location, recipe.model.task, recipe.model.dtype, recipe.model.revision, kwargs)[0]
    devices = set(getattr(model, "hf_device_map", {"": "cpu"}).values())
    return None if devices <= {"cpu", torch.device("cpu")} else model
