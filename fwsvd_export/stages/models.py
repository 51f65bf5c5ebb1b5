"""Loading the model and preprocessor a recipe names (a local folder, a hub id, or a package that ships
one), and fitting batches to what the model's forward takes."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoProcessor,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..config import ModelSpec, Recipe
from ..core.batch import Batch
from ..errors import FwsvdError, short_message
from .checkpoint import DTYPES
from .tasks import Task, get_task
from .tasks.embeddings import POOLING

log = logging.getLogger("fwsvd_export")


def is_local_path(location: str) -> bool:
    """Whether `location` means a path on disk rather than a hub id. Hub ids are `name` or `org/name`: one
    '/' at most, never starting with '.' or '~', never absolute. So a location is local when it exists, or
    starts with '.' or '~', or is absolute, or holds two or more path separators; a bare `org/name` that
    does not exist here is a hub id."""
    separators = location.count("/") + (location.count(os.sep) if os.sep != "/" else 0)
    return (
        os.path.exists(os.path.expanduser(location))
        or location.startswith((".", "~"))
        or Path(location).is_absolute()
        or separators >= 2
    )


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
        raise FwsvdError(
            f"{location} is a compressed fwsvd-export checkpoint, not a dense model: load it with "
            "fwsvd_export.load (or `fwsvd-export inspect`), or compress its source model instead"
        )
    if not (path / "config.json").is_file():
        raise FwsvdError(
            f"{location} has no config.json; expected a model folder (config.json and weights) or a hub id"
        )
    return str(path)


def model_location(recipe: Recipe) -> str:
    """A local folder path or a hub id, from whichever source key the recipe used."""
    spec: ModelSpec = recipe.model
    if spec.package:
        try:
            module = importlib.import_module(spec.package)
        except ImportError:
            raise FwsvdError(
                f"{recipe.source}: 'model.package' names '{spec.package}', which is not installed"
            ) from None
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


def check_custom_code(folder: Path, allowed: bool) -> None:
    """Refuse a model folder whose config.json maps transformers' Auto classes to the folder's own Python
    (`auto_map`) for a model type transformers does not know: loading it runs that code (transformers would
    ask on the terminal, where a CI job hangs), so it runs only where the recipe says
    model.trust_remote_code: true. Checked before transformers reads the folder."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # transformers reports it, running nothing
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map or allowed or config.get("model_type") in CONFIG_MAPPING:
        return
    code = sorted(
        {
            str(ref).split("--")[-1].split(".")[0] + ".py"
            for refs in auto_map.values()
            for ref in (refs if isinstance(refs, list) else [refs])
            if ref
        }
    )
    raise FwsvdError(
        f"{path} has an auto_map to the folder's own Python ({', '.join(code)}) for model type "
        f"{json.dumps(config.get('model_type'))}, which transformers does not know: loading it would run "
        "that code, and fwsvd-export runs no model's code unless told to (trust_remote_code). If you "
        "trust the folder, set model.trust_remote_code: true in the recipe"
    )


def _stored_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """The shape and file of each tensor in the folder's safetensors weights (one file, or the shards its
    index names), from the headers alone; empty for weights in another format."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            shapes.update({key: (tuple(f.get_slice(key).get_shape()), name) for key in f.keys()})
    return shapes


def _config_keys(config: PretrainedConfig, value: int) -> list[str]:
    """The integer keys of `config` that hold `value`: which of them sized a tensor."""
    return [k for k, v in config.to_dict().items() if type(v) is int and v == value]


def check_sizes(folder: Path, task: Task, config: PretrainedConfig, trust_remote_code: bool = False) -> None:
    """Each tensor the model config.json builds must have the shape the weights file stores, checked from
    the safetensors headers before any weight is read: transformers would fail deep inside
    `load_state_dict` with a size mismatch. The message names the config key that sized the tensor."""
    stored = _stored_shapes(folder)
    if not stored:
        return
    with torch.device("meta"):
        model = task.auto_class.from_config(config, trust_remote_code=trust_remote_code)
    prefix = model.base_model_prefix
    wrong = []
    for name, tensor in model.state_dict().items():
        # a task model's names carry the base model's prefix, a base model's do not: checkpoints hold either
        keys = (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}."))
        found, file = next((stored[k] for k in keys if k in stored), (None, ""))
        if found is not None and found != tuple(tensor.shape):
            wrong.append((name, found, file, tuple(tensor.shape)))
    if not wrong:
        return
    name, found, file, built = wrong[0]
    differs = next((b for f, b in zip(found, built) if f != b), None) if len(found) == len(built) else None
    keys = _config_keys(config, differs) if differs is not None else []
    what = f"{folder / 'config.json'}'s {' or '.join(keys)} {differs}" if keys else str(folder / "config.json")
    more = f" ({len(wrong) - 1} more tensors disagree too)" if len(wrong) > 1 else ""
    raise FwsvdError(
        f"{what} disagrees with the weights: {name} is {list(found)} in {file}, where the config "
        f"makes it {list(built)}{more}"
    )


def _checked_config(folder: Path, task: Task, kwargs: dict[str, Any]) -> PretrainedConfig:
    """The local folder's config, once its sizes are checked against the weights' headers (a hub id's
    weights are not here to check before transformers fetches them)."""
    config = AutoConfig.from_pretrained(folder, **kwargs)
    check_sizes(folder, task, config, kwargs["trust_remote_code"])
    return config


def _is_head(model: PreTrainedModel, key: str) -> bool:
    """Whether the weight `key` (as transformers names it in its loading report) lies outside the base
    model (the encoder or decoder stack): a task head."""
    first = key.split(".")[0]
    if model.base_model is model:
        return first not in dict(model.named_children())
    return first != model.base_model_prefix


def _listing(keys: list[str], shown: int = 4) -> str:
    return ", ".join(keys[:shown]) + (f" (and {len(keys) - shown} more)" if len(keys) > shown else "")


def _unread(model: PreTrainedModel, key: str, task: Task) -> bool:
    """Whether the weight `key` lies in a base-model module that `task` never reads (Task.unread)."""
    return any(re.search(rf"(^|\.){re.escape(part)}\.", key) for part in task.unread)


def check_loading(model: PreTrainedModel, info: dict[str, list], task: Task, location: str) -> list[str]:
    """Refuse weights the model lacks (transformers would initialise them randomly) or does not use (it
    would drop them), naming them, except a task's new head (Task.new_head), a module the task never reads
    (Task.unread) and a checkpoint's unused head; returns the notes that say so, for the run's report."""
    config_layers = getattr(model.config, "num_hidden_layers", None)
    notes = []
    for kind, problem, fate in (
        ("missing_keys", "are not in the weights", "randomly initialised"),
        ("unexpected_keys", "are not used by the model", "dropped"),
    ):
        keys = sorted(info.get(kind, []))
        unread = [k for k in keys if kind == "missing_keys" and _unread(model, k, task)]
        head = [k for k in keys if _is_head(model, k) and (kind == "unexpected_keys" or task.new_head)]
        rest = [k for k in keys if k not in head and k not in unread]
        if rest:
            layered = config_layers is not None and all(re.search(r"\.\d+\.", k) for k in rest)
            what = (
                f"config.json's num_hidden_layers {config_layers} disagrees with the weights of '{location}'"
                if layered
                else f"the weights of '{location}' do not fit the model its config.json builds"
            )
            raise FwsvdError(f"{what}: {len(rest)} tensors {problem} (they would be {fate}): {_listing(rest)}")
        if unread:
            notes.append(
                f"{_listing(unread)} (not in the weights of '{location}') were newly initialised; "
                f"{task.name} never reads them"
            )
        if head and kind == "missing_keys":
            notes.append(
                f"the {task.name} head ({_listing(head)}) is not in the weights of '{location}': it was "
                f"newly initialised, so {task.new_head}"
            )
        elif head:
            notes.append(
                f"the task head in the weights of '{location}' ({_listing(head)}) is not used by {task.name}: dropped"
            )
    return notes


# sentence-transformers' Pooling config flags, by the pooling they ask for
_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def read_pooling(folder: Path) -> dict[str, Any] | None:
    """How a sentence-transformers folder pools its token states: {"mode", "normalize", "source"} from its
    modules.json (a Normalize module) and its Pooling module's config.json (mean, cls, max, or what else it
    asks for, which the feature-extraction task refuses; several modes at once are "mode1+mode2"); a
    modules.json without a Pooling module pools by the mean, as sentence-transformers does. None for a
    folder without modules.json."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
        kinds = [(str(m.get("type", "")), str(m.get("path", ""))) for m in modules]
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise FwsvdError(f"{modules_file} is not a sentence-transformers module list: {short_message(exc)}") from None
    normalize = any(kind.endswith(".Normalize") for kind, _ in kinds)
    pooling = next((path for kind, path in kinds if kind.endswith(".Pooling")), None)
    if pooling is None:
        return {"mode": "mean", "normalize": normalize, "source": "modules.json (no Pooling module: mean)"}
    config_file = folder / pooling / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise FwsvdError(
            f"{config_file}: the Pooling config modules.json names cannot be read: {short_message(exc)}"
        ) from None
    modes = [mode for flag, mode in _POOLING_FLAGS.items() if config.get(flag)] or [str(config.get("pooling_mode"))]
    return {"mode": "+".join(modes), "normalize": normalize, "source": f"{Path(pooling) / 'config.json'}"}


LOADING_NOTES = "fwsvd_loading_notes"  # the model attribute load_pretrained leaves its notes in


def loading_notes(model: PreTrainedModel) -> list[str]:
    """What load_pretrained let pass when it loaded `model` (a newly initialised or unused head), for the
    run's report (report.json's model.notes)."""
    return list(getattr(model, LOADING_NOTES, []))


def load_pretrained(
    location: str,
    task_name: str,
    dtype: str = "float32",
    revision: str | None = None,
    placement: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, Any]:
    """The model in eval mode and its preprocessor (`load_preprocessor`), from a local folder or a hub id; `placement` holds
    accelerate's from_pretrained arguments (device_map, max_memory, offload_folder), if any. A local
    folder's config.json is checked against its weights before they are read, and every weight must be
    used; the folder's own Python runs only with `trust_remote_code`. `loading_notes(model)` says what
    loading let pass."""
    task = get_task(task_name)
    local = is_local_path(location)
    source = check_local_model(location) if local else location
    if local:
        check_custom_code(Path(source), trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **({"revision": revision} if revision else {})}
    try:
        checked = {"config": _checked_config(Path(source), task, kwargs)} if local else {}
        model, info = task.auto_class.from_pretrained(
            source,
            dtype=DTYPES[dtype],
            output_loading_info=True,
            use_safetensors=True,  # pickled weights are never loaded
            **checked,
            **kwargs,
            **(placement or {}),
        )
        preprocessor = load_preprocessor(source, kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        hint = (
            "; with this placement the model may fit on no device at all (raise model.max_memory)" if placement else ""
        )
        raise FwsvdError(f"could not load model '{location}' for {task.name}: {short_message(exc)}{hint}") from None
    except RuntimeError as exc:  # weights in a format whose shapes check_sizes cannot read first
        if "size mismatch" not in str(exc):
            raise
        raise FwsvdError(
            f"config.json of '{location}' disagrees with its weights: {' '.join(str(exc).split())}"
        ) from None
    notes = check_loading(model, info, task, location)
    for note in notes:
        log.warning(note)
    setattr(model, LOADING_NOTES, notes)
    if local:  # a hub id's modules.json is not read: mean pooling
        setattr(model, POOLING, read_pooling(Path(source)))
    set_pad_token(text_tokenizer(preprocessor), model, location)
    return model.eval(), preprocessor


def set_pad_token(tokenizer: Any, model: torch.nn.Module, location: str) -> None:
    """Batches are padded with the pad token, else EOS (causal LMs often ship without one), else the unknown
    token; the model's config learns it (sequence classifiers need it to find the last token)."""
    if tokenizer is not None and tokenizer.pad_token is None:
        if tokenizer.eos_token is None and tokenizer.unk_token is None:
            raise FwsvdError(f"the tokenizer of '{location}' has no pad, EOS or unknown token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def check_positions(recipe: Recipe, config: Any) -> None:
    """Refuse a data.max_length beyond the model's positions."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and recipe.data.max_length > limit:
        raise FwsvdError(
            f"{recipe.source}: 'data.max_length' {recipe.data.max_length} exceeds the model's {limit} positions"
        )


def load_preprocessor(source: str, kwargs: dict[str, Any]) -> Any:
    """What turns raw inputs into the model's, as `AutoProcessor` resolves the folder's (or hub id's) files:
    a tokenizer, an image processor or feature extractor, or a processor that holds several. `kwargs`:
    trust_remote_code and revision, as the model was loaded with."""
    return AutoProcessor.from_pretrained(source, **kwargs)


def text_tokenizer(preprocessor: Any) -> PreTrainedTokenizerBase | None:
    """The tokenizer in `preprocessor` (itself, or a processor's `tokenizer`), or None for one without text."""
    if isinstance(preprocessor, PreTrainedTokenizerBase):
        return preprocessor
    inner = getattr(preprocessor, "tokenizer", None)
    return inner if isinstance(inner, PreTrainedTokenizerBase) else None


def forward_inputs(model: torch.nn.Module) -> frozenset[str] | None:
    """The inputs `model.forward` names (input_ids, attention_mask, pixel_values, ...), from its signature;
    None for a forward that names none (``forward(*args, **kwargs)``): then nothing can be told apart."""
    parameters = inspect.signature(model.forward).parameters.values()
    named = frozenset(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return named or None


def fit_batches(batches: list[Batch], model: torch.nn.Module) -> list[Batch]:
    """`batches` holding only the inputs `model.forward` takes (`forward_inputs`): a preprocessor may return
    more than its model reads (MiniLM's tokenizer returns token_type_ids, which DistilBERT's forward refuses).
    What is dropped is logged once."""
    accepted = forward_inputs(model)
    if accepted is None:
        return batches
    dropped = sorted({k for b in batches for k in b.inputs if k not in accepted})
    if not dropped:
        return batches
    log.info(
        "the preprocessor's %s left out of the batches: %s.forward does not take %s",
        ", ".join(dropped),
        type(model).__name__,
        "it" if len(dropped) == 1 else "them",
    )
    return [
        Batch({k: v for k, v in b.inputs.items() if k in accepted}, b.token_mask, b.labels, b.groups, b.meta)
        for b in batches
    ]


def load_model(recipe: Recipe) -> tuple[PreTrainedModel, Any, str]:
    """The recipe's model and preprocessor (a tokenizer, an image processor, ...), and where they were
    loaded from."""
    location = model_location(recipe)
    model, preprocessor = load_pretrained(
        location,
        recipe.model.task,
        recipe.model.dtype,
        recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    check_positions(recipe, model.config)
    return model, preprocessor, location


def placement(recipe: Recipe) -> dict[str, Any] | None:
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


def load_for_statistics(recipe: Recipe, location: str) -> PreTrainedModel | None:
    """A second copy of the model spread over devices by accelerate, for the calibration pass
    (activations and gradients of a big model need accelerator memory); None without a device_map, or
    when the map puts everything in host memory anyway. Factorization, export and validation keep
    working on the host copy."""
    kwargs = placement(recipe)
    if kwargs is None:
        return None
    model = load_pretrained(
        location, recipe.model.task, recipe.model.dtype, recipe.model.revision, kwargs, recipe.model.trust_remote_code
    )[0]
    devices = set(getattr(model, "hf_device_map", {"": "cpu"}).values())
    return None if devices <= {"cpu", torch.device("cpu")} else model
