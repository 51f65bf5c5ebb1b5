"""The recipe: one YAML file that describes a whole run, parsed into typed dataclasses.

Parsing is strict on purpose: a misspelt key in a recipe that lives in a user's repo would otherwise
silently fall back to a default and compress the wrong thing. Every error names the key and the file.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import yaml

from .core.spec import CompressionSpec
from .errors import FwsvdError, SpecError
from .stages.precision import PRECISIONS
from .stages.tasks import TASKS

# Allowed values come from the registries (methods: checked by CompressionSpec): a new task needs no edit here.
Task = Literal[tuple(TASKS)]  # type: ignore[valid-type]
Precision = Literal[tuple(PRECISIONS)]  # type: ignore[valid-type]


@dataclass
class ModelSpec:
    """Where the model comes from: exactly one of a local folder, a hub id, or a Python package
    that ships one (the package must expose ``get_model_path()``)."""

    task: Task
    path: Optional[str] = None
    hub_id: Optional[str] = None
    package: Optional[str] = None
    revision: Optional[str] = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device_map: Optional[str] = None  # accelerate placement for the statistics pass: "auto", "cuda", "sequential", ...
    max_memory: dict[str, str] = field(default_factory=dict)  # per device, e.g. {"0": "20GiB", "cpu": "60GiB"}
    offload_folder: Optional[str] = None  # where device_map may put weights that fit on no device ("disk")
    trust_remote_code: bool = False  # run the model folder's own Python (config.json's auto_map); named in the report


@dataclass
class DataSource:
    """Records from a local JSONL/CSV/TSV/plain-text file, or from a `datasets` hub dataset."""

    path: Optional[str] = None
    dataset: Optional[str] = None
    dataset_config: Optional[str] = None
    split: str = "train"
    format: Literal["auto", "jsonl", "csv", "tsv", "text"] = "auto"
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = None
    max_samples: Optional[int] = None
    stride: Optional[int] = None  # text-generation evaluation: sliding-window step (default: max_length)


DATA_ROLES = ("calibration", "evaluation", "finetune")  # the data sections a recipe may name


@dataclass
class DataSpec:
    calibration: DataSource
    evaluation: DataSource
    finetune: Optional[DataSource] = None  # rows recovery fine-tuning trains on (default: the calibration rows)
    max_length: int = 128
    batch_size: int = 16
    seed: int = 0


@dataclass
class FinetuneSpec:
    """Optional recovery training of the factorized model on data.finetune, else the calibration data
    (epochs 0: off)."""

    epochs: int = 0
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    objective: Literal["task", "distill"] = "task"  # distill: match the dense model's outputs (no labels needed)
    temperature: float = 2.0  # distill: softening of both models' logits
    train: Literal["factors", "factors+norms", "all"] = "factors"  # what moves; the rest has no optimizer state


@dataclass
class ExportSpec:
    opset: Optional[int] = None
    with_past: bool = True  # text-generation: export the key/value cache, so generate() runs in ONNX Runtime
    precisions: list[Precision] = field(default_factory=lambda: ["fp32"])  # int8, int4 (CPU), fp16 (CUDA): extra folders
    int8_mode: Literal["dynamic", "static"] = "dynamic"  # static: QDQ calibrated on data.calibration
    output: str = "outputs/run"


@dataclass
class ProviderSpec:
    name: Literal["cpu", "cuda"]
    required: bool = False


@dataclass
class LatencySpec:
    shapes: list[str] = field(default_factory=lambda: ["1x128"])
    warmup: int = 5
    runs: int = 30  # per artifact and shape, spread over the rounds
    rounds: int = 5  # the artifacts take turns this many times, so machine noise hits all alike
    threads: Optional[int] = None  # ONNX Runtime intra-op threads for every timed session (null: every core)
    # true: hold one session at a time, reopened each turn; auto: when the graphs side by side would take more
    # than half the memory available (graphs too big to sit side by side)
    one_at_a_time: Literal[False, True, "auto"] = "auto"


@dataclass
class ValidationSpec:
    providers: list[ProviderSpec] = field(
        default_factory=lambda: [ProviderSpec("cpu", required=True), ProviderSpec("cuda")]
    )
    atol: float = 1e-3
    rtol: float = 1e-2
    parity_batches: int = 2
    max_metric_loss: float = 0.05
    max_quantization_loss: float = 0.005  # int8/fp16 compressed against fp32 compressed (absolute; relative for perplexity)
    latency: LatencySpec = field(default_factory=LatencySpec)
    prompts: list[str] = field(default_factory=list)  # greedy generation check (text-generation with past)
    generation_tokens: int = 16


@dataclass
class Recipe:
    model: ModelSpec
    data: DataSpec
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    source: Optional[str] = None  # the file it was read from; not a recipe key
    base_dir: Optional[str] = None  # folder that relative paths resolve against; not a recipe key

    def resolve(self, value: str) -> Path:
        """A path from the recipe, relative to the recipe's own folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(os.path.normpath(Path(self.base_dir or ".") / path))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        data.pop("base_dir")
        return data


_INTERNAL = {"source", "base_dir"}
_CUTS = ("ratio", "rank", "budget", "target_speedup")  # how far to cut: one of them
_INT_RANGE = (-(2**63), 2**63 - 1)  # a recipe integer is a count, a size or a seed: anything larger is a typo


class _ShortRepr(reprlib.Repr):
    """repr() for error messages: bounded in size (a YAML alias bomb must not become a gigabyte message) and
    safe for integers too long for ``str`` (Python refuses to print more than 4300 digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 80, 80, 80
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 4

    def repr_int(self, x: int, level: int) -> str:
        return f"<a {x.bit_length()}-bit integer>" if x.bit_length() > 256 else super().repr_int(x, level)


_SHORT = _ShortRepr()


def _show(value: Any) -> str:
    """A short, never-failing repr of a user's value."""
    try:
        return _SHORT.repr(value)
    except Exception:  # noqa: BLE001 - a message must not fail while describing a bad value
        return f"<{type(value).__name__}>"


def _text(key: Any) -> str:
    """A mapping key as text for a dotted path (str() for the usual scalars, never failing)."""
    if isinstance(key, str):
        return key
    if isinstance(key, int) and key.bit_length() > 256:
        return _show(key)
    try:
        return str(key)
    except Exception:  # noqa: BLE001
        return _show(key)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:  # as the recipe's YAML writes them
        return " | ".join(str(a).lower() if isinstance(a, bool) else repr(a) for a in typing.get_args(tp))
    if _is_optional(tp):
        return f"{_type_name(_strip_optional(tp))} or null"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_optional(tp: Any) -> Any:
    return next(a for a in typing.get_args(tp) if a is not type(None))


def _under(place: str, key: str) -> bool:
    """`place` is the dotted key `key` or lies inside its value."""
    return place == key or place.startswith((f"{key}.", f"{key}["))


def _origin(place: str, origin: str, sets: Mapping[str, str]) -> str:
    """Who wrote the value at `place`, for its error message: the ``--set`` of it or of a key above it
    (`sets`: dotted key -> that --set), else `origin`, the recipe file."""
    owners = [key for key in sets if _under(place, key)]
    return sets[max(owners, key=len)] if owners else origin


def _convert(value: Any, tp: Any, where: str, origin: str, sets: Mapping[str, str]) -> Any:
    """Check `value` against the annotation `tp`; `where` is the dotted key for error messages, `origin`
    the file and `sets` the --set overrides they name (`_origin`)."""
    origin = _origin(where, origin, sets)

    def fail() -> FwsvdError:
        kind = "a finite number" if tp is float else _type_name(tp)
        return FwsvdError(f"{origin}: '{where}' must be {kind}, got {_show(value)}")

    if _is_optional(tp):
        return None if value is None else _convert(value, _strip_optional(tp), where, origin, sets)
    if typing.get_origin(tp) is Literal:
        if not any(type(value) is type(a) and value == a for a in typing.get_args(tp)):  # 1 is not true
            raise fail()
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return _build(tp, value, where, origin, sets)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise fail()
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]", origin, sets) for i, v in enumerate(value)]
    if typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise fail()
        _, item = typing.get_args(tp)
        out: dict[str, Any] = {}
        written: dict[str, Any] = {}
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int, float)) or (
                    isinstance(k, int) and not _INT_RANGE[0] <= k <= _INT_RANGE[1]):
                raise FwsvdError(f"{origin}: '{where}' keys must be strings, got the key {_show(k)}")
            key = str(k)
            if key in out:  # 1 and "1" are one key once read as text: refuse rather than keep the last
                raise FwsvdError(f"{origin}: '{where}' has the key '{key}' twice (written as {_show(written[key])} "
                                 f"and as {_show(k)})")
            written[key] = k
            out[key] = _convert(v, item, f"{where}.{key}", origin, sets)
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            raise FwsvdError(f"{origin}: '{where}' is out of range (a 64-bit integer), got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range
            raise fail() from None
        if not math.isfinite(number):
            raise fail()
        return number
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    raise TypeError(f"unsupported recipe annotation {tp!r}")


def _build(cls: type, mapping: dict[str, Any], where: str, origin: str, sets: Mapping[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in _INTERNAL]
    for key in mapping:
        if key not in names:
            place = f"{where}.{_text(key)}" if where else _text(key)
            raise FwsvdError(f"{_origin(place, origin, sets)}: unknown key '{place}' (allowed here: {', '.join(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in _INTERNAL:
            continue
        place = f"{where}.{f.name}" if where else f.name
        if f.name in mapping:
            kwargs[f.name] = _convert(mapping[f.name], hints[f.name], place, origin, sets)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise FwsvdError(f"{origin}: missing required key '{place}'")
    if cls is CompressionSpec:
        _check_patterns(kwargs, where, origin, sets)
    try:
        return cls(**kwargs)  # core specs check their own fields
    except SpecError as exc:
        place = f"{where}.{exc.key}" if where else exc.key
        raise FwsvdError(f"{_origin(place, origin, sets)}: '{place}' {exc.problem}") from None


def _check_patterns(kwargs: dict[str, Any], where: str, origin: str, sets: Mapping[str, str]) -> None:
    """Regular expressions that ``re`` refuses with something other than ``re.error`` (a repeat count over
    its limit raises OverflowError, a few thousand nested groups RecursionError): named here, because
    CompressionSpec catches only ``re.error``. The usual bad patterns are left to CompressionSpec."""
    prefix = f"{where}." if where else ""
    places = [(f"{prefix}target[{i}]", p) for i, p in enumerate(kwargs.get("target") or [])]
    places += [(f"{prefix}exclude[{i}]", p) for i, p in enumerate(kwargs.get("exclude") or [])]
    places += [(f"{prefix}overrides.{p}", p) for p in kwargs.get("overrides") or {}]
    for place, pattern in places:
        try:
            re.compile(pattern)
        except re.error:
            pass
        except (OverflowError, ValueError) as exc:
            raise FwsvdError(f"{_origin(place, origin, sets)}: '{place}' is not a valid regular expression: {exc}") from None
        except RecursionError:
            raise FwsvdError(f"{_origin(place, origin, sets)}: '{place}' is not a valid regular expression: nested too "
                             "deeply") from None


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives one key twice (plain PyYAML silently keeps the last)."""

    def __init__(self, path: str, line: int, first_line: int, mark: Any) -> None:
        super().__init__(None, None, f"key '{path}' appears twice in one mapping (line {line}; first on line "
                         f"{first_line})", mark)
        self.path, self.line, self.first_line = path, line, first_line


_MERGE_TAG = "tag:yaml.org,2002:merge"
_VALUE_TAG = "tag:yaml.org,2002:value"


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only, never arbitrary objects), made strict for recipes:

    * a mapping that gives one key twice, at any depth, raises :class:`DuplicateKeyError` with the dotted path
      of the key and its line. Keys are compared as loaded values, so ``1``, ``1.0`` and ``true`` collide as
      they would in the resulting dict. A mapping's own keys may still override those of a ``<<`` merge.
    * a scalar its tag cannot hold (``!!int abc``, ``!!bool maybe``, a date ``2021-13-45``, a 5000-digit
      number) raises a ``ConstructorError`` with its position, not a bare ValueError/KeyError from PyYAML.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._path: list[str] = []  # keys and indices leading to the node being composed
        self._seen: dict[int, dict[Any, int]] = {}  # id(mapping node) -> {key: line}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if isinstance(parent, yaml.MappingNode) and index is None:  # a mapping's key
            mark = self.peek_event().start_mark  # where the key is written, also when it is an alias
            node = super().compose_node(parent, index)
            self._check_key(parent, node, mark)
            return node
        if isinstance(parent, yaml.MappingNode):  # a value; index is its key's node
            self._path.append(index.value if isinstance(index, yaml.ScalarNode) else "?")
        elif isinstance(parent, yaml.SequenceNode):
            self._path.append(f"[{index}]")
        else:  # the document's root
            return super().compose_node(parent, index)
        try:
            return super().compose_node(parent, index)
        finally:
            self._path.pop()

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        self._seen.pop(id(node), None)
        return node

    def _check_key(self, mapping: Any, key_node: Any, mark: Any) -> None:
        if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
            return  # merges may be overridden; a list or mapping key is refused when the mapping is built
        key = key_node.value if key_node.tag == _VALUE_TAG else self.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            return
        seen = self._seen.setdefault(id(mapping), {})
        line = mark.line + 1
        if key in seen:
            parts = [*self._path, key_node.value]
            raise DuplicateKeyError("".join(p if p.startswith("[") or i == 0 else f".{p}" for i, p in enumerate(parts)),
                                    line, seen[key], mark)
        seen[key] = line

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
            value = f" {_show(node.value)}" if isinstance(node, yaml.ScalarNode) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read{value} as {node.tag}: {exc}", node.start_mark) from None


# YAML 1.2 (core schema) reads a float written with an exponent and no dot or no exponent sign (1e-5, 1.0e5,
# .5E3) as a number, PyYAML's YAML 1.1 as text; the recipe reads numbers as 1.2 does. Tried after PyYAML's own
# resolvers, which read every other number (integers stay integers).
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
                                   list("-+.0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506: a SafeLoader subclass


def apply_override(data: dict[str, Any], assignment: str, origin: str = "--set") -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to the raw recipe mapping."""
    if "=" not in assignment:
        raise FwsvdError(f"{origin}: expected KEY=VALUE, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise FwsvdError(f"{origin}: bad key {key!r}")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FwsvdError(f"{origin}: '{key}' goes through '{part}', which is not a mapping")
        node = child
    try:
        node[parts[-1]] = _yaml(raw)
    except DuplicateKeyError as exc:
        raise FwsvdError(f"{origin}: in the value of '{key}', key '{key.strip()}.{exc.path}' appears twice in one "
                         f"mapping (line {exc.line} of the value; first on line {exc.first_line})") from None
    except yaml.YAMLError as exc:
        raise FwsvdError(f"{origin}: the value of '{key}' is not valid YAML: {exc}") from None
    except RecursionError:
        raise FwsvdError(f"{origin}: the value of '{key}' is not valid YAML: nested too deeply") from None


def _check(recipe: Recipe, origin: str) -> None:
    """Cross-field rules that types alone cannot express."""
    sources = [k for k in ("path", "hub_id", "package") if getattr(recipe.model, k)]
    if len(sources) != 1:
        raise FwsvdError(f"{origin}: 'model' needs exactly one of path, hub_id, package (got {sources or 'none'})")
    for name in DATA_ROLES:
        src: Optional[DataSource] = getattr(recipe.data, name)
        if src is None:
            continue
        if (src.path is None) == (src.dataset is None):
            raise FwsvdError(f"{origin}: 'data.{name}' needs exactly one of path, dataset")
        if src.max_samples is not None and src.max_samples < 1:
            raise FwsvdError(f"{origin}: 'data.{name}.max_samples' must be at least 1")
    if (recipe.model.max_memory or recipe.model.offload_folder) and recipe.model.device_map is None:
        raise FwsvdError(f"{origin}: 'model.max_memory' and 'model.offload_folder' only apply with 'model.device_map'")
    for i, shape in enumerate(recipe.validation.latency.shapes):
        if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", shape):
            raise FwsvdError(f"{origin}: 'validation.latency.shapes[{i}]' must look like BATCHxSEQUENCE, got {_show(shape)}")
    if recipe.data.batch_size < 1 or recipe.data.max_length < 2:
        raise FwsvdError(f"{origin}: 'data.batch_size' must be >= 1 and 'data.max_length' >= 2")
    comp = recipe.compression
    if comp.target_speedup is not None:
        if comp.latency_precision not in recipe.export.precisions:
            raise FwsvdError(f"{origin}: 'compression.latency_precision' {comp.latency_precision!r} must be one of "
                             f"'export.precisions' {recipe.export.precisions}: the speed-up is measured on that graph")
        if comp.latency_provider not in PRECISIONS[comp.latency_precision].providers:
            raise FwsvdError(f"{origin}: 'compression.latency_provider' {comp.latency_provider!r} does not run "
                             f"{comp.latency_precision} (it runs on {', '.join(PRECISIONS[comp.latency_precision].providers)})")
    if "fp32" not in recipe.export.precisions:
        raise FwsvdError(f"{origin}: 'export.precisions' must include fp32 (the other precisions are made from it)")
    if not recipe.validation.providers:
        raise FwsvdError(f"{origin}: 'validation.providers' is empty; a run must validate on at least one provider")
    for key in ("atol", "rtol", "max_metric_loss", "max_quantization_loss"):  # below 0, every check would fail
        if getattr(recipe.validation, key) < 0:
            raise FwsvdError(f"{origin}: 'validation.{key}' must be >= 0, got {getattr(recipe.validation, key)}")
    if recipe.data.finetune is not None and not recipe.finetune.epochs:
        raise FwsvdError(f"{origin}: 'data.finetune' names rows to fine-tune on, but 'finetune.epochs' is 0 (off)")
    for name in DATA_ROLES:
        stride = getattr(getattr(recipe.data, name), "stride", None)  # data.finetune may be absent
        if stride is not None and not 1 <= stride <= recipe.data.max_length:
            raise FwsvdError(f"{origin}: 'data.{name}.stride' must be between 1 and data.max_length ({recipe.data.max_length})")
    lat = recipe.validation.latency
    if lat.threads is not None and lat.threads < 1:
        raise FwsvdError(f"{origin}: 'validation.latency.threads' must be >= 1 (or null for every core), got {lat.threads}")
    if (lat.runs < 1 or lat.rounds < 1 or lat.warmup < 0 or recipe.validation.parity_batches < 1
            or recipe.validation.generation_tokens < 1):
        raise FwsvdError(f"{origin}: 'validation.latency.runs', 'rounds', 'parity_batches' and 'generation_tokens' must be >= 1, "
                         "'validation.latency.warmup' >= 0")
    if any(not p.strip() for p in recipe.validation.prompts):
        raise FwsvdError(f"{origin}: 'validation.prompts' holds an empty prompt")
    if recipe.finetune.temperature <= 0:
        raise FwsvdError(f"{origin}: 'finetune.temperature' must be > 0, got {recipe.finetune.temperature}")
    if recipe.finetune.epochs < 0 or recipe.finetune.learning_rate <= 0:
        raise FwsvdError(f"{origin}: 'finetune.epochs' must be >= 0 and 'finetune.learning_rate' > 0")


def parse_recipe(data: dict[str, Any], origin: str = "<recipe>", base_dir: str | Path = ".",
                 sets: Optional[Mapping[str, str]] = None) -> Recipe:
    """Build a checked Recipe from an already-loaded mapping; a wrong value that a ``--set`` wrote is named by
    that --set (`sets`: dotted key -> the --set as the user typed it), the others by `origin`."""
    if not isinstance(data, dict):
        raise FwsvdError(f"{origin}: a recipe must be a YAML mapping at the top level")
    comp = data.get("compression")
    if isinstance(comp, dict) and any(k in comp for k in _CUTS) and all(comp.get(k) is None for k in _CUTS):
        raise FwsvdError(f"{origin}: 'compression' sets ratio, rank, budget and target_speedup all to null; it needs "
                         "a ratio or a rank (or a budget, or a target_speedup)")
    recipe = _build(Recipe, data, "", origin, sets or {})
    recipe.source = origin
    recipe.base_dir = str(base_dir)
    _check(recipe, origin)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply ``--set key=value`` overrides, and check everything."""
    path = Path(path)
    if not path.is_file():
        raise FwsvdError(f"recipe file not found: {path}")
    try:
        data = _yaml(path.read_text(encoding="utf-8"))
    except DuplicateKeyError as exc:
        raise FwsvdError(f"{path}: key '{exc.path}' appears twice in one mapping (line {exc.line}; first on line "
                         f"{exc.first_line}); give each key once") from None
    except yaml.YAMLError as exc:
        raise FwsvdError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise FwsvdError(f"{path}: not UTF-8 text: {exc}") from None
    except RecursionError:
        raise FwsvdError(f"{path}: not valid YAML: nested too deeply") from None
    except OSError as exc:
        raise FwsvdError(f"{path}: cannot read the recipe: {exc}") from None
    if data is None:  # an empty file: the missing keys are named below
        data = {}
    if not isinstance(data, dict):
        raise FwsvdError(f"{path}: a recipe must be a YAML mapping at the top level")
    sets: dict[str, str] = {}
    for assignment in overrides:
        apply_override(data, assignment)
        key = assignment.split("=", 1)[0].strip()
        sets = {k: v for k, v in sets.items() if not _under(k, key)}  # this --set replaced what they wrote
        sets[key] = f"--set {_show(assignment)}"
        if key.startswith("compression.") and key.split(".", 1)[1] in _CUTS:
            for other in _CUTS:  # the command line's choice replaces the recipe's
                if other != key.split(".", 1)[1]:
                    data["compression"][other] = None
    return parse_recipe(data, str(path), path.parent.resolve(), sets)
