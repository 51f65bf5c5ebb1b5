"""The recipe's JSON Schema (draft 2020-12), generated from the section dataclasses of config.py and
core/spec.py, so that it never drifts from what the loader accepts: every key, its type (Literal -> enum,
Optional -> null allowed, a section -> an object with ``additionalProperties: false``), its default, and its
description from the comment beside it in the source (the section's docstring for the section). Task,
precision and method names come from their registries.

It covers keys, types and choices; the rules between keys (one of path, hub_id, package; one of ratio, rank,
budget, target_speedup; ranges) are the sections' own, which `fwsvd-export check` applies.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal, Union

from .config import Recipe
from .core.methods import METHODS
from .core.spec import CompressionSpec
from .stages.precision import PRECISIONS
from .stages.tasks import TASKS

DRAFT = "https://json-schema.org/draft/2020-12/schema"
INTERNAL = {"source", "base_dir"}  # Recipe fields that are not recipe keys
_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _registries() -> dict[tuple[str, str], list[str]]:
    """String fields whose values are a registry's names: (section class, field) -> the names."""
    return {
        ("ModelSpec", "task"): list(TASKS),
        ("ExportSpec", "precisions"): list(PRECISIONS),
        ("CompressionSpec", "method"): list(METHODS),
        ("CompressionSpec", "latency_precision"): list(PRECISIONS),
    }


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class's source: the comment lines just above it and the one after it on
    its line, joined."""
    try:
        text = textwrap.dedent("".join(inspect.getsourcelines(cls)[0]))
    except (OSError, TypeError):  # no source (a frozen install): no descriptions
        return {}
    comments = {
        t.start[0]: t.string.lstrip("#").strip()
        for t in tokenize.generate_tokens(io.StringIO(text).readline)
        if t.type == tokenize.COMMENT
    }
    lines = text.splitlines()
    found = {}
    body = ast.parse(text).body[0]
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        after = comments.get(node.end_lineno or node.lineno)
        text_ = " ".join(above + ([after] if after else []))
        if text_:
            found[node.target.id] = text_
    return found


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_json_default(v) for v in value]
    return value


def _type(tp: Any, defs: dict[str, Any], names: list[str] | None = None) -> dict[str, Any]:
    """The schema of the annotation `tp`; `names`: a registry's names, for a string (or list of strings)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        schema = _type(inner[0], defs, names)
        if "enum" in schema:
            return {**schema, "enum": [*schema["enum"], None]}
        return {"anyOf": [schema, {"type": "null"}]}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is list:
        return {"type": "array", "items": _type(typing.get_args(tp)[0], defs, names)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type(typing.get_args(tp)[1], defs)}
    if dataclasses.is_dataclass(tp):
        _section(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if tp is str and names:
        return {"type": "string", "enum": names}
    return {"type": _SIMPLE[tp]}


def _section(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    """The object schema of a section class (added to `defs` under its name)."""
    if cls.__name__ in defs:
        return defs[cls.__name__]
    defs[cls.__name__] = {}  # a placeholder while its fields are made
    hints, comments, registries = typing.get_type_hints(cls), field_comments(cls), _registries()
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        if f.name in INTERNAL:
            continue
        schema = _type(hints[f.name], defs, registries.get((cls.__name__, f.name)))
        if f.name in comments:
            schema["description"] = comments[f.name]
        if f.default is not dataclasses.MISSING:
            schema["default"] = _json_default(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            schema["default"] = _json_default(f.default_factory())
        else:
            required.append(f.name)
        properties[f.name] = schema
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    doc = inspect.getdoc(cls)
    if doc and not doc.startswith(f"{cls.__name__}("):  # not the signature dataclass writes
        schema["description"] = " ".join(doc.split())
    defs[cls.__name__] = schema
    return schema


def recipe_schema() -> dict[str, Any]:
    """The recipe's JSON Schema: the top-level object is the Recipe section, the others under ``$defs``."""
    defs: dict[str, Any] = {}
    top = dict(_section(Recipe, defs))
    del defs["Recipe"]
    _section(CompressionSpec, defs)
    return {
        "$schema": DRAFT,
        "$id": "https://github.com/fwsvd-export/recipe.schema.json",
        "title": "fwsvd-export recipe",
        "description": "A recipe for `fwsvd-export run`: the model, the data and the compression plan. "
        "Check one with `fwsvd-export check RECIPE`.",
        **{k: v for k, v in top.items() if k != "description"},
        "$defs": defs,
    }
