"""Property-based fuzzing of whole commands: a sample of generated recipes and argument lists runs through the
real CLI (`run`, `compress`, `sweep`, `export`, `inspect`) on the tiny classifier. Whatever is asked, the command
ends with exit 0, 1 or 2 (3 only for a machine out of room), a refusal (2) is one clear line with no traceback,
nothing half-written is left anywhere, and every file that was there before is byte-identical, except an output
folder that a successful command was asked to write.

Seeded (``derandomize=True``) and bounded (a few minutes on 2 cores); the explicit ``@example``s are faults that
probing found.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from fwsvd_export.cli import main

from conftest import quick_validation

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out

FUZZ = settings(
    derandomize=True,
    deadline=None,
    max_examples=60,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass(frozen=True)
class World:
    """A folder as a user's machine has it: the recipe's model and data, a folder of the user's own, an earlier
    run of the tool, a compressed checkpoint and a plain file; every command of a case runs inside it."""

    root: Path

    def path(self, name: str) -> Path:
        return self.root / name


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def world(tmp_path_factory, classifier_dir, data_dir) -> World:
    root = tmp_path_factory.mktemp("cli-fuzz")
    shutil.copytree(classifier_dir, root / "model")
    shutil.copy(data_dir / "labelled.jsonl", root / "labelled.jsonl")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("the user's own file")
    (root / "plain.txt").write_text("a file, not a folder")
    (root / "recipe.yaml").write_text(yaml.safe_dump(_recipe(root), sort_keys=False))
    for command, output in (("run", "earlier"), ("compress", "checkpoint")):
        result = _cli(command, str(root / "recipe.yaml"), "-o", str(root / output), "--quiet")
        assert result.exit_code == 0, result.output
        shutil.copytree(root / output, tmp_path_factory.getbasetemp() / f"pristine-{output}")  # mtimes kept
    return World(root)


def _recipe(root: Path) -> dict:
    """The tiny classifier's recipe, relative paths as users write them."""
    source = {"path": "labelled.jsonl", "text_column": "sentence", "label_column": "label"}
    return {
        "model": {"path": "model", "task": "text-classification"},
        "data": {
            "calibration": dict(source, max_samples=16),
            "evaluation": dict(source, max_samples=16),
            "max_length": 32,
            "batch_size": 8,
        },
        "compression": {"method": "fwsvd", "target": [r"encoder\.layer\.\d+\."], "ratio": 0.5},
        "validation": quick_validation(),
    }


# --- what a user may type ------------------------------------------------------------------------------------
OUTPUTS = st.sampled_from(
    [
        "new",
        "new/nested/deeper",
        "exp[1]",
        "e*p?",
        "ünï cødé",
        "earlier",
        "mine",
        "plain.txt",
        "model",
        ".",
        "checkpoint",
        "-o",
    ]
)
SETS = st.sampled_from(
    [
        "compression.ratio=0.3",
        "compression.ratio=1e-5",
        "compression.ratio=0",
        "compression.ratio=1.5",
        "compression.ratio=.nan",
        "compression.ratio=abc",
        "compression.method=kfac",
        "compression.method=svd",
        "compression.method=nope",
        "compression.budget=0.5",
        "compression.rank=2",
        "compression.target=[]",
        "compression.target=['nothing matches']",
        "data.batch_size=0",
        "data.batch_size=3",
        "data.max_length=2",
        "data.max_length=100000",
        "data.calibration.max_samples=1",
        "data.calibration.path=missing.jsonl",
        "data.calibration.label_column=nope",
        "model.path=mine",
        "model.path=plain.txt",
        "model.task=feature-extraction",
        "validation.max_metric_loss=-1",
        "validation.providers=[]",
        "validation.latency.shapes=['0x1']",
        "export.precisions=[int8]",
        "export.output=elsewhere",
        "nonsense",
        "=",
        "compression..ratio=1",
    ]
)
RECIPE_EDITS = st.sampled_from(
    [
        ("compression", "ratio", 0.3),
        ("compression", "ratio", -1),
        ("compression", "method", "kfac"),
        ("data", "batch_size", "eight"),
        ("data", "max_length", 8),
        ("model", "path", "nowhere"),
        ("model", "task", "text-generation"),
        ("validation", "atol", float("inf")),
        ("data", "unknown_key", 1),
    ]
)
RATIOS = st.sampled_from(["0.5", "0.5,0.3", "0.5,0.5", "", "1e-9", "2", "abc", "0.4,,0.6", "-0.5", "nan"])
METHODS = st.sampled_from([None, "fwsvd", "svd,kfac", "kfac,kfac", "nope", ""])
CHECKPOINTS = st.sampled_from(["checkpoint", "model", "earlier", "earlier/compressed", "missing", "plain.txt"])
TASKS = st.sampled_from(["text-classification", "feature-extraction", "text-generation"])


@st.composite
def recipes(draw) -> tuple[str, ...]:
    """A recipe file name for the case: the valid one, or a copy with up to two edits."""
    edits = draw(st.lists(RECIPE_EDITS, max_size=2))
    return tuple(edits)


@st.composite
def commands(draw) -> tuple[str, tuple, list[str], str | None]:
    """(command, recipe edits, arguments after the command's first argument, output name or None)."""
    command = draw(st.sampled_from(["run", "run", "compress", "sweep", "export", "inspect"]))
    if command == "inspect":
        return command, (), [draw(CHECKPOINTS), "--task", draw(TASKS)], None
    output = draw(OUTPUTS)
    if command == "export":
        return command, (), [draw(CHECKPOINTS), "-o", output], output
    args = ["-o", output, "--quiet"] + [a for s in draw(st.lists(SETS, max_size=2)) for a in ("--set", s)]
    if command == "sweep":
        args += [draw(st.sampled_from(["--ratios", "--budgets"])), draw(RATIOS)]
        methods = draw(METHODS)
        args += ["--methods", methods] if methods is not None else []
    return command, draw(recipes()), args, output


# --- the property --------------------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_case_recipe(world: World, edits: tuple) -> Path:
    if not edits:
        return world.path("recipe.yaml")
    data = copy.deepcopy(_recipe(world.root))
    for section, key, value in edits:
        data[section][key] = value
    path = world.path("case.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _written(world: World, output: str | None) -> Path | None:
    """The folder a successful command may have written (or replaced)."""
    return None if output is None or output in (".", "-o") else world.path(output)


def _check_outcome(world: World, before: dict[str, bytes], result, output: Path | None) -> None:
    text = result.output
    assert result.exit_code in (0, 1, 2, 3), f"exit {result.exit_code}: {text[-2000:]}"
    if result.exit_code == 3:
        assert "ran out of room" in text, f"a crash:\n{text[-3000:]}"
    if result.exit_code == 2:
        assert "Traceback" not in text and text.strip(), text[-3000:]
        assert len(text) < 5000, f"an unbounded message: {text[:500]} ..."
    left = sorted(
        p.relative_to(world.root).as_posix()
        for p in world.root.rglob("*")
        if ".partial-" in p.name or ".replaced-" in p.name
    )
    assert left == [], f"left behind: {left}"
    after = _snapshot(world.root)

    def inside(name: str) -> bool:
        return output is not None and result.exit_code in (0, 1) and (world.root / name).is_relative_to(output)

    changed = sorted(n for n in before if not inside(n) and after.get(n) != before[n])
    added = sorted(n for n in after if n not in before and not inside(n))
    assert changed == [] and added == [], f"touched what was there: changed {changed}, added {added}\n{text[-2000:]}"


@FUZZ
@given(case=commands())
@example(case=("sweep", (), ["-o", "new", "--quiet", "--ratios", "0.5,0.5"], "new"))  # was exit 3 after two points
@example(case=("sweep", (), ["-o", "new", "--quiet", "--budgets", ""], "new"))  # ran the default ratios as budgets
@example(case=("run", (), ["-o", "new", "--quiet", "--set", "compression.ratio=1e-5"], "new"))  # 1e-5 read as text
@example(case=("run", (), ["-o", "exp[1]", "--quiet"], "exp[1]"))  # a glob pattern in the output's name
def test_any_command_ends_cleanly_and_touches_only_its_output(world, case):
    command, edits, args, output = case
    recipe = _write_case_recipe(world, edits)
    before = _snapshot(world.root)
    first = [] if command in ("export", "inspect") else [str(recipe)]
    if command in ("export", "inspect"):
        args = [str(world.path(args[0])), *args[1:]]
    args = [str(world.path(a)) if prev == "-o" and a != "-o" else a for prev, a in zip([None, *args], args)]
    result = _cli(command, *first, *args)
    event(f"{command} exit {result.exit_code}")  # pytest --hypothesis-show-statistics shows the mix
    _check_outcome(world, before, result, _written(world, output))
    _restore(world, output if result.exit_code in (0, 1) else None)


def _restore(world: World, output: str | None) -> None:
    """The next case starts from the same world: what a command wrote goes, an earlier output it replaced
    comes back as it was."""
    world.path("case.yaml").unlink(missing_ok=True)
    if output is None or _written(world, output) is None:
        return
    top = world.path(output.split("/")[0])
    shutil.rmtree(top)
    pristine = world.root.parent / f"pristine-{output}"
    if pristine.is_dir():
        shutil.copytree(pristine, top)
