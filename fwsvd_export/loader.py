"""Reading a recipe: one YAML file that describes a whole run, and the ``--set`` overrides of the command
line, built into the checked dataclasses of config.py.

Reading is strict on purpose: a misspelt key in a recipe that lives in a user's repo would otherwise
silently fall back to a default and compress the wrong thing. The YAML is read strictly (no key twice,
numbers as YAML 1.2 reads them); the mapping becomes sections, which check themselves (config.py,
core/spec.py); every error names the file or the ``--set`` that wrote the value, and its full dotted key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .config import Recipe
from .errors import FwsvdError, SpecError, short_repr

_INTERNAL = {"source", "base_dir"}  # Recipe fields that are not recipe keys
_CUTS = ("ratio", "rank", "budget", "target_speedup")  # how far to cut: one of them


def _text(key: Any) -> str:
    """A mapping key as text for a dotted path (str() for the usual scalars, never failing)."""
    if isinstance(key, str):
        return key
    if isinstance(key, int) and key.bit_length() > 256:
        return short_repr(key)
    try:
        return str(key)
    except Exception:  # noqa: BLE001
        return short_repr(key)


def _under(place: str, key: str) -> bool:
    """`place` is the dotted key `key` or lies inside its value."""
    return place == key or place.startswith((f"{key}.", f"{key}["))


def _origin(place: str, origin: str, sets: Mapping[str, str]) -> str:
    """Who wrote the value at `place`, for its error message: the ``--set`` of it or of a key above it
    (`sets`: dotted key -> that --set), else `origin`, the recipe file."""
    owners = [key for key in sets if _under(place, key)]
    return sets[max(owners, key=len)] if owners else origin


def _section(tp: Any) -> type | None:
    """The section class a field holds (directly or as null), or None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _value(value: Any, tp: Any, where: str, origin: str, sets: Mapping[str, str]) -> Any:
    """A field's raw value with the mappings that stand for sections built into them (a section, a list
    or a mapping of sections); everything else is left for the section to check."""
    cls = _section(tp)
    if cls is not None and isinstance(value, dict):
        return _build(cls, value, where, origin, sets)
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list and isinstance(value, list) and _section(args[0]):
        return [_value(v, args[0], f"{where}[{i}]", origin, sets) for i, v in enumerate(value)]
    if typing.get_origin(tp) is dict and isinstance(value, dict) and _section(args[1]):
        return {k: _value(v, args[1], f"{where}.{_text(k)}", origin, sets) for k, v in value.items()}
    return value


def _build(cls: type, mapping: dict[Any, Any], where: str, origin: str, sets: Mapping[str, str]) -> Any:
    """The section `cls` from its mapping at the dotted key `where`: unknown and missing keys named here,
    the rest by the section itself."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in _INTERNAL]
    for key in mapping:
        if key not in names:
            place = f"{where}.{_text(key)}" if where else _text(key)
            raise FwsvdError(
                f"{_origin(place, origin, sets)}: unknown key '{place}' (allowed here: {', '.join(names)})"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in _INTERNAL:
            continue
        place = f"{where}.{f.name}" if where else f.name
        if f.name in mapping:
            kwargs[f.name] = _value(mapping[f.name], hints[f.name], place, origin, sets)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise FwsvdError(f"{origin}: missing required key '{place}'")
    try:
        return cls(**kwargs)
    except SpecError as exc:
        place = (exc.within(where).key if where else exc.key) or "<recipe>"
        raise FwsvdError(f"{_origin(place, origin, sets)}: '{place}' {exc.problem}") from None


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives one key twice (plain PyYAML silently keeps the last)."""

    def __init__(self, path: str, line: int, first_line: int, mark: Any) -> None:
        super().__init__(
            None, None, f"key '{path}' appears twice in one mapping (line {line}; first on line {first_line})", mark
        )
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
            raise DuplicateKeyError(
                "".join(p if p.startswith("[") or i == 0 else f".{p}" for i, p in enumerate(parts)),
                line,
                seen[key],
                mark,
            )
        seen[key] = line

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
            value = f" {short_repr(node.value)}" if isinstance(node, yaml.ScalarNode) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read{value} as {node.tag}: {exc}", node.start_mark
            ) from None


# YAML 1.2 (core schema) reads a float written with an exponent and no dot or no exponent sign (1e-5, 1.0e5,
# .5E3) as a number, PyYAML's YAML 1.1 as text; the recipe reads numbers as 1.2 does. Tried after PyYAML's own
# resolvers, which read every other number (integers stay integers).
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _yaml(text: str) -> Any:
    # RecipeLoader is a SafeLoader subclass: nothing in a recipe constructs Python objects
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506


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
        raise FwsvdError(
            f"{origin}: in the value of '{key}', key '{key.strip()}.{exc.path}' appears twice in one "
            f"mapping (line {exc.line} of the value; first on line {exc.first_line})"
        ) from None
    except yaml.YAMLError as exc:
        raise FwsvdError(f"{origin}: the value of '{key}' is not valid YAML: {exc}") from None
    except RecursionError:
        raise FwsvdError(f"{origin}: the value of '{key}' is not valid YAML: nested too deeply") from None


def parse_recipe(
    data: dict[str, Any], origin: str = "<recipe>", base_dir: str | Path = ".", sets: Mapping[str, str] | None = None
) -> Recipe:
    """Build a checked Recipe from an already-loaded mapping; a wrong value that a ``--set`` wrote is named by
    that --set (`sets`: dotted key -> the --set as the user typed it), the others by `origin`."""
    if not isinstance(data, dict):
        raise FwsvdError(f"{origin}: a recipe must be a YAML mapping at the top level")
    comp = data.get("compression")
    # YAML alone can say so (in Python an absent cut and a null one look alike): a recipe that clears every
    # cut is refused rather than given the default ratio.
    if isinstance(comp, dict) and any(k in comp for k in _CUTS) and all(comp.get(k) is None for k in _CUTS):
        raise FwsvdError(
            f"{origin}: 'compression' sets ratio, rank, budget and target_speedup all to null; it needs "
            "a ratio or a rank (or a budget, or a target_speedup)"
        )
    recipe: Recipe = _build(Recipe, data, "", origin, sets or {})
    recipe.source = origin
    recipe.base_dir = str(base_dir)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply ``--set key=value`` overrides, and check everything."""
    path = Path(path)
    if not path.is_file():
        raise FwsvdError(f"recipe file not found: {path}")
    try:
        data = _yaml(path.read_text(encoding="utf-8"))
    except DuplicateKeyError as exc:
        raise FwsvdError(
            f"{path}: key '{exc.path}' appears twice in one mapping (line {exc.line}; first on line "
            f"{exc.first_line}); give each key once"
        ) from None
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
        sets[key] = f"--set {short_repr(assignment)}"
        if key.startswith("compression.") and key.split(".", 1)[1] in _CUTS:
            for other in _CUTS:  # the command line's choice replaces the recipe's
                if other != key.split(".", 1)[1]:
                    data["compression"][other] = None
    return parse_recipe(data, str(path), path.parent.resolve(), sets)
