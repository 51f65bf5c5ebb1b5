"""MkDocs hook: the pages that are generated from the code, so that they cannot drift from it.

A page's Markdown may hold these markers, each replaced before the page is rendered:

- ``<!-- generated: recipe-reference -->``: every recipe key, from ``fwsvd_export.recipe_schema`` (the JSON
  Schema that ``fwsvd-export schema`` prints, built from the config dataclasses): its type, default and
  description, section by section.
- ``<!-- generated: tasks-table -->``: every task of the registry ``fwsvd_export.stages.tasks.TASKS``: its
  model class, metrics, what the statistics' loss is and what the graph exports as.
- ``<!-- generated: benchmarks -->``: BENCHMARKS.md itself, its headings one level down.
- ``<!-- include: FILE.md -->``: a file of the repository's root (SECURITY.md), its headings one level down.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!-- generated: ([a-z-]+) -->")
INCLUDE = re.compile(r"<!-- include: ([A-Za-z0-9_.-]+\.md) -->")


# --------------------------------------------------------------------------------------------- recipe reference
def _link(ref: str) -> str:
    name = ref.rsplit("/", 1)[-1]
    return f"[{name}](#{name.lower()})"


def type_text(schema: dict[str, Any]) -> str:
    """A schema's type in a few words: `a | b`, `list of X`, `map of X`, a link to a section."""
    if "$ref" in schema:
        return _link(schema["$ref"])
    if "anyOf" in schema:
        return " or ".join(type_text(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join("null" if v is None else f"`{v}`" for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return f"list of {type_text(schema['items'])}"
    if kind == "object":
        return f"map of string to {type_text(schema.get('additionalProperties', {}))}"
    return str(kind or "any")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(schema: dict[str, Any]) -> str:
    if "default" not in schema:
        return "required"
    return f"`{json.dumps(schema['default'])}`"


def _section_table(schema: dict[str, Any]) -> list[str]:
    required = set(schema.get("required", ()))
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, prop in schema["properties"].items():
        section = "$ref" in prop or any("$ref" in s for s in prop.get("anyOf", ()))
        default = (
            "required" if key in required else "its section's" if section and prop.get("default") else _default(prop)
        )
        lines.append(f"| `{key}` | {type_text(prop)} | {_cell(default)} | {_cell(prop.get('description', ''))} |")
    return lines


def recipe_reference() -> str:
    from fwsvd_export.recipe_schema import recipe_schema

    schema = recipe_schema()
    out = ["The recipe's top level: each key is a section.", "", *_section_table(schema), ""]
    for name, section in schema["$defs"].items():
        out += [f"### {name}", ""]
        if section.get("description"):
            out += [section["description"], ""]
        out += [*_section_table(section), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- tasks table
def _first_sentence(text: str | None) -> str:
    text = " ".join((text or "").split())
    return text.split(". ")[0].rstrip(".") + "." if text else ""


def tasks_table() -> str:
    import pkgutil

    from fwsvd_export.stages import tasks as registry

    home = {}
    for info in pkgutil.iter_modules(registry.__path__):
        module = importlib.import_module(f"{registry.__name__}.{info.name}")
        for task in getattr(module, "TASKS", ()):
            home[task.name] = info.name
    lines = [
        "| task | model class | metrics (the first is what the checks read) | better | exported as | defined in |",
        "|---|---|---|---|---|---|",
    ]
    for task in registry.TASKS.values():
        where = f"`stages/tasks/{home[task.name]}.py`"
        better = ", ".join(f"{m}: {'lower' if m in task.lower_is_better else 'higher'}" for m in task.metrics)
        exported = f"`{task.onnx_task(False)}`" + (f", `{task.onnx_task(True)}`" if task.onnx_task_with_past else "")
        lines.append(
            f"| `{task.name}` | `{task.model_class}` | {', '.join(f'`{m}`' for m in task.metrics)} | "
            f"{better} | {exported} | {where} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- benchmarks
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")  # the text may wrap onto the next line


def _unlinked(match: re.Match[str]) -> str:
    """A link of the included file: kept when it leaves the repository (http, mailto) or stays in the page
    (#anchor); a path in the repository, which is no page of the site, becomes its name in code."""
    text, target = match.groups()
    if re.match(r"[a-z]+:|#", target):
        return match.group(0)
    return f"`{target}`" if text.strip("`") == target else f"{text} (`{target}`)"


def benchmarks() -> str:
    return included("BENCHMARKS.md")


def included(name: str) -> str:
    """A root file as part of a page: headings one level down, links into the repository (no pages of the
    site) as names in code. Fenced blocks are kept as they are."""
    text = (ROOT / name).read_text(encoding="utf-8")
    parts = re.split(r"(^```.*?^```[^\n]*$)", text, flags=re.M | re.S)
    for i in range(0, len(parts), 2):  # the even parts are outside fences
        demoted = re.sub(r"^#", "##", parts[i], flags=re.M)
        parts[i] = LINK.sub(_unlinked, demoted)
    return "".join(parts)


GENERATORS = {"recipe-reference": recipe_reference, "tasks-table": tasks_table, "benchmarks": benchmarks}


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"unknown generated block '{name}' (known: {', '.join(GENERATORS)})")
        return GENERATORS[name]()

    return INCLUDE.sub(lambda m: included(m.group(1)), MARKER.sub(replace, markdown))
