"""Property-based fuzzing of the recipe parser: whatever a recipe mapping, a recipe file or a ``--set`` holds,
parsing either gives a checked Recipe or raises FwsvdError with a message that names where it came from;
never another exception (which the CLI would report as a crash).

Seeded (``derandomize=True``), so a run is repeatable; the explicit ``@example``s are the bugs fuzzing found.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import types
import typing

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fwsvd_export.config import Recipe
from fwsvd_export.errors import FwsvdError
from fwsvd_export.loader import apply_override, load_recipe, parse_recipe

from test_recipe import MINIMAL

ORIGIN = "<fuzzed recipe>"

# MINIMAL, with every section present so that mutations reach every part of the schema.
VALID = copy.deepcopy(MINIMAL)
VALID["data"].update(max_length=32, batch_size=8, seed=1)
VALID["data"]["evaluation"].update(max_samples=10, stride=16)
VALID["model"].update(dtype="float32", device_map="auto", max_memory={"0": "20GiB", "cpu": "60GiB"})
VALID["compression"] = {
    "method": "kfac",
    "target": [r"encoder\.layer\.\d+\."],
    "exclude": ["pooler"],
    "ratio": 0.5,
    "rank_multiple": 8,
    "overrides": {"attention": {"rank": 4}},
    "damping": 0.01,
}
VALID["finetune"] = {"epochs": 1, "learning_rate": 1e-4}
VALID["export"] = {"opset": 17, "with_past": True, "output": "out"}
VALID["validation"] = {
    "providers": [{"name": "cpu", "required": True}, {"name": "cuda"}],
    "atol": 1e-3,
    "latency": {"shapes": ["1x16", "4x32"], "warmup": 1, "runs": 3},
    "prompts": ["Hello"],
}

FUZZ = settings(derandomize=True, deadline=None, max_examples=250, database=None)


def _schema_paths(cls: type, prefix: tuple = ()) -> typing.Iterator[tuple]:
    """Every key path the recipe schema knows (``source``/``base_dir`` are not recipe keys)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in ("source", "base_dir"):
            continue
        yield prefix + (f.name,)
        tp = hints[f.name]
        tp = (
            next((a for a in typing.get_args(tp) if a is not type(None)), tp)
            if typing.get_origin(tp) in (typing.Union, types.UnionType)
            else tp
        )
        if dataclasses.is_dataclass(tp):
            yield from _schema_paths(tp, prefix + (f.name,))


SCHEMA_PATHS = sorted(set(_schema_paths(Recipe)))


def _paths(node, prefix: tuple = ()) -> typing.Iterator[tuple]:
    """Every key/index path inside a loaded recipe (into mappings and lists)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


def _parent(data, path: tuple):
    """The container holding `path`'s last step, or None when the way there is not a mapping/list."""
    node = data
    for step in path[:-1]:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            node = node[step]
        else:
            return None
    return node if isinstance(node, (dict, list)) else None


# --- values: everything YAML can hold, with the awkward corners on purpose ----------------------------------
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
AWKWARD_STRINGS = st.sampled_from(
    [
        "",
        " ",
        "(",
        ")",
        "[",
        "*",
        "a{99999999999}",
        "((a)",
        "\\",
        "[z-a]",
        "x**",
        "1x0",
        "0x1",
        "1x16",
        "fp16",
        "kfac",
        "fwsvd",
        "cuda",
        "cpu",
        "auto",
        "-1",
        ".nan",
        "null",
        "~",
        "yes",
        "é",
        "名前",
        "\u200b",
        "text-classification",
        "distill",
    ]
)
SMALL_INTS = st.integers(-5, 40)
INTS = st.one_of(
    SMALL_INTS, st.integers(-(2**70), 2**70), st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**30])
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, 1e-300, 5e-324, 1e308, float("nan"), float("inf"), -float("inf")]),
)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT, AWKWARD_STRINGS)
KEYS = st.one_of(
    TEXT,
    AWKWARD_STRINGS,
    st.sampled_from(["path", "task", "ratio", "rank", "name", "0"]),
    SMALL_INTS,
    st.none(),
    st.booleans(),
    st.sampled_from([0.5, 1.0]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=8,
)
# Only in Python mappings (parse_recipe): what YAML's extra tags give, and ints too long for str().
PY_VALUES = st.one_of(
    VALUES,
    st.sampled_from([2**20000, -(2**20000), datetime.date(2024, 2, 29), b"\x00\xff", {1, 2}, (1, 2), float("nan")]),
)


@st.composite
def mutated(draw, values=VALUES):
    """VALID after 1-4 mutations: a key deleted, a value replaced (whole sections too, so their type changes),
    an unknown key inserted, or a known-but-absent key set."""
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["delete", "replace", "replace", "insert", "schema"]))
        paths = list(_paths(data))
        if action == "schema":  # a key the schema knows, whether or not the recipe has it yet
            path = draw(st.sampled_from(SCHEMA_PATHS))
        elif not paths:
            continue
        else:
            path = draw(st.sampled_from(paths))
        parent = _parent(data, path)
        if parent is None:
            continue
        step = path[-1]
        if action == "delete":
            if isinstance(parent, dict):
                parent.pop(step, None)
            elif isinstance(step, int) and step < len(parent):
                del parent[step]
        elif action == "insert":
            target = parent.get(step) if isinstance(parent, dict) else parent[step]
            if isinstance(target, dict):
                target[draw(KEYS)] = draw(values)
            elif isinstance(target, list):
                target.insert(draw(st.integers(0, len(target))), draw(values))
            else:
                parent[step] = draw(values)
        elif isinstance(parent, dict) or (isinstance(step, int) and step < len(parent)):
            parent[step] = draw(values)
    return data


# --- the property --------------------------------------------------------------------------------------------
def _parses_or_refuses_clearly(build, *origins: str):
    """`build()` gives a Recipe or raises FwsvdError whose message is non-empty and names one of `origins`;
    any other exception propagates and fails the test."""
    try:
        recipe = build()
    except FwsvdError as exc:
        message = str(exc)
        assert message.strip(), "an empty error message"
        assert any(origin in message for origin in origins), f"the message names no origin {origins}: {message}"
        assert len(message) < 5000, f"an unbounded message ({len(message)} characters)"
        return exc
    assert isinstance(recipe, Recipe)
    return recipe


def _dump(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "recipe.yaml"


def test_the_starting_recipe_is_valid(recipe_file):
    assert parse_recipe(copy.deepcopy(VALID), ORIGIN).compression.rank_multiple == 8
    recipe_file.write_text(_dump(VALID), encoding="utf-8")
    assert load_recipe(recipe_file).validation.latency.shapes == ["1x16", "4x32"]
    assert any(len(p) == 3 for p in SCHEMA_PATHS)  # the schema walk reaches nested sections


@FUZZ
@given(data=mutated(PY_VALUES))
@example(data={**VALID, "finetune": {"learning_rate": 10**400}})  # was OverflowError: int too large for float
@example(data={**VALID, "compression": {"rank": -(2**20000)}})  # was ValueError: int too long for str() in spec.py
@example(data={**VALID, 2**20000: 1})  # was ValueError: the unknown key could not be printed
@example(data={**VALID, "compression": {"target": ["a{99999999999}"]}})  # was OverflowError from re, in spec.py
@example(data={**VALID, "compression": {"exclude": ["(" * 3000 + ")" * 3000]}})  # was RecursionError from re
@example(data={**VALID, "compression": {"overrides": {"a{99999999999}": {"rank": 2}}}})
@example(data={**VALID, "model": {**VALID["model"], "max_memory": {0: "1GiB", "0": "2GiB"}}})  # was: last silently won
@example(data={**VALID, "model": {**VALID["model"], "max_memory": {None: "1GiB"}}})
def test_a_mutated_recipe_mapping_parses_or_is_refused_clearly(data):
    _parses_or_refuses_clearly(lambda: parse_recipe(data, ORIGIN), ORIGIN)


@pytest.mark.slow
@FUZZ
@given(data=mutated())
def test_a_mutated_recipe_file_loads_or_is_refused_clearly(recipe_file, data):
    recipe_file.write_text(_dump(data), encoding="utf-8")
    _parses_or_refuses_clearly(lambda: load_recipe(recipe_file), str(recipe_file))


# --- --set -------------------------------------------------------------------------------------------------
DOTTED = [".".join(p) for p in SCHEMA_PATHS]
SET_KEYS = st.one_of(
    st.sampled_from(DOTTED),
    st.sampled_from(DOTTED).map(lambda k: k + ".sub"),
    st.sampled_from(["", ".", "a..b", " compression.ratio ", "model.path.x", "=", "compression.="]),
    TEXT,
)


def _flow(value) -> str:
    """A value as a one-line YAML flow, the way one types it after ``--set key=``."""
    return (
        yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6)
        .strip()
        .removesuffix("...")
        .strip()
    )


SET_VALUES = st.one_of(
    VALUES.map(_flow),
    TEXT,
    st.sampled_from(
        [
            "",
            "[unclosed",
            "{a: 1, a: 2}",
            "!!int abc",
            "!!bool maybe",
            "2021-13-45",
            "!!timestamp x",
            "!!python/object/apply:os.system [echo]",
            "&a [*a]",
            "*nope",
            "[" * 40,
            "0x" + "f" * 400,
            "9" * 400,
            "- a\n- b",
            "{<<: 1}",
            "'\\x00'",
        ]
    ),
)


@pytest.mark.slow
@FUZZ
@given(
    assignments=st.lists(st.tuples(SET_KEYS, SET_VALUES), min_size=1, max_size=3),
    base=st.one_of(st.just(VALID), mutated()),
)
@example(assignments=[("compression.ratio", "!!int abc")], base=VALID)  # was ValueError from PyYAML
@example(assignments=[("compression.ratio", "!!bool maybe")], base=VALID)  # was KeyError from PyYAML
@example(assignments=[("data.seed", "2021-13-45")], base=VALID)  # was ValueError: month must be in 1..12
@example(assignments=[("compression.target", "[" * 800)], base=VALID)  # was RecursionError from PyYAML
@example(assignments=[("data.seed", "9" * 5000)], base=VALID)  # was ValueError: too many digits
@example(assignments=[("finetune.learning_rate", "0x" + "f" * 400)], base=VALID)  # was OverflowError
def test_set_overrides_load_or_are_refused_clearly(recipe_file, assignments, base):
    recipe_file.write_text(_dump(base), encoding="utf-8")
    overrides = [f"{key}={value}" for key, value in assignments]
    _parses_or_refuses_clearly(lambda: load_recipe(recipe_file, overrides), str(recipe_file), "--set")


@FUZZ
@given(assignment=st.one_of(st.tuples(SET_KEYS, SET_VALUES).map("=".join), TEXT), data=mutated())
@example(assignment="compression=!!int", data=VALID)  # found by fuzzing: IndexError inside PyYAML
@example(assignment="compression=!!int ;", data=VALID)  # found by fuzzing: ValueError inside PyYAML
def test_apply_override_then_parse_refuses_clearly(assignment, data):
    data = copy.deepcopy(data)

    def build():
        apply_override(data, assignment, origin="--set")
        return parse_recipe(data, ORIGIN)

    _parses_or_refuses_clearly(build, ORIGIN, "--set")


# --- raw text and bytes ------------------------------------------------------------------------------------
YAML_ALPHABET = st.sampled_from(
    list("{}[]:,-?&*!|>'\"#%@`\\ \n\t.=<~")
    + [
        "model",
        "data",
        "path",
        "task",
        "  ",
        "\n  ",
        "- ",
        ": ",
        "!!int ",
        "!!float ",
        "!!bool ",
        "!!timestamp ",
        "!!binary ",
        "!!set ",
        "!!omap ",
        "!!python/name:os.system ",
        "<<: ",
        "&a ",
        "*a ",
        "0x",
        "1e999",
        ".nan",
        "2021-02-30",
        "---\n",
        "...\n",
        "%YAML 1.1\n",
        "\ufeff",
        "\x85",
        "\x00",
        "\x1b",
    ]
)
TEXTS = st.one_of(st.text(max_size=200), st.lists(YAML_ALPHABET, max_size=40).map("".join))
VALID_TEXT = _dump(VALID)


@pytest.mark.slow
@FUZZ
@given(
    raw=st.one_of(
        TEXTS.map(lambda t: t.encode("utf-8", "surrogatepass")),  # lone surrogates: not UTF-8
        st.binary(max_size=200),
        st.tuples(st.integers(0, len(VALID_TEXT)), TEXTS).map(
            lambda cut: (VALID_TEXT[: cut[0]] + cut[1]).encode("utf-8", "surrogatepass")
        ),
        st.tuples(st.integers(0, len(VALID_TEXT)), st.binary(max_size=20)).map(
            lambda cut: VALID_TEXT.encode()[: cut[0]] + cut[1] + VALID_TEXT.encode()[cut[0] :]
        ),
    )
)
@example(raw=b"model: !!int abc\n")
@example(raw=b"model: !!bool maybe\n")
@example(raw=b"model: 2021-13-45\n")
@example(raw=b"model: !!timestamp x\n")
@example(raw=b"[" * 800)
@example(raw=b"a:\n" + b"".join(b" " * i + b"b:\n" for i in range(1, 1200)))
@example(raw=b"data: {seed: 0x" + b"f" * 4000 + b"}\n")
@example(raw=b"0x" + b"f" * 4000 + b": 1\n")
@example(raw=b"model: 1" + b"0" * 5000 + b"\n")
@example(raw=b"- a\n- b\n")
@example(raw=b"0\n")
@example(raw=b"\xff\xfe\x00")
@example(raw=b"model: !!python/object/apply:os.system [echo hi]\n")
@example(
    raw=b"a: &a [*a, *a]\nb: &b [*a, *a, *a, *a]\nc: &c [*b, *b, *b, *b]\nd: &d [*c, *c, *c, *c]\nmodel: {task: *d}\n"
)
def test_any_file_content_loads_or_is_refused_clearly(recipe_file, raw):
    recipe_file.write_bytes(raw)
    _parses_or_refuses_clearly(lambda: load_recipe(recipe_file), str(recipe_file))


def test_an_alias_bomb_gives_a_short_message(recipe_file):
    """Billion-laughs aliases are shared, not copied, by the loader; the error message that shows the value
    must stay short too (a plain repr() would expand 10**9 leaves)."""
    levels = ["&l0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)
    ]
    recipe_file.write_text(f"model: {{path: m, task: [{', '.join(levels)}]}}\n")
    with pytest.raises(FwsvdError, match="'model.task' must be") as info:
        load_recipe(recipe_file)
    assert len(str(info.value)) < 1000
