"""The package's layers point one way: core <- the task and precision registries <- config <- loader, and
config <- stages <- aim <- pipeline and sweep <- cli, and stages <- api; and no module's imports lead back to it.

The registries (the stages/tasks/ package, stages/precision.py) sit below config: config checks task and precision
names against them, so they import nothing that reads a recipe (and load torch, transformers and ONNX
Runtime only where a task runs or a variant is made).

Read from the source (not from what an import happens to load), so a new import that breaks the
layering fails here, naming the file and the module it reached for.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fwsvd_export"

# What each layer may import from the package (besides itself and errors.py); a module named here is held
# to its own entry as well as to its folder's.
ALLOWED = {
    "core": {"core"},
    "stages.tasks": {"core", "stages.tasks"},
    "stages.precision": {"core", "stages.export", "stages.library_log", "stages.ort_io"},  # these read no recipe
    "config": {"core", "stages.tasks", "stages.precision"},
    "loader": {"core", "config"},
    "stages": {"core", "stages", "config"},
    "aim": {"core", "stages", "config"},
    "pipeline": {"core", "stages", "config", "aim"},
    "sweep": {"core", "stages", "config", "loader", "pipeline"},
    "plan": {"core", "stages", "config", "pipeline"},  # `check`: run's own checks and output rules, no compute
    "recipe_schema": {"core", "config", "stages.tasks", "stages.precision"},  # the sections and the registries
    "starter": {"core.methods", "config", "loader", "stages.models", "stages.tasks", "stages.precision"},
    "api": {"core", "stages", "config"},
    # lm-eval on a graph folder or a run's: the report picks the graph, validate names the providers
    "stages.harness": {"stages.model_card", "stages.run_report", "stages.validate"},
}


def package_imports(path: Path, source: str | None = None) -> set[str]:
    """Modules of this package that `path` imports, as dotted names relative to the package."""
    here = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[: len(here) - (node.level - 1)]) if node.level > 1 else list(here)
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found |= {n.removeprefix("fwsvd_export.") for n in names if n.startswith("fwsvd_export.")}
    return found


def layer_files(layer: str) -> list[Path]:
    folder = PACKAGE / layer.replace(".", "/")
    return sorted(folder.glob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]


def violations(layer: str, files: list[Path], source: str | None = None) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE.parent)} imports fwsvd_export.{target}"
        for path in files
        for target in sorted(package_imports(path, source))
        if target not in ("", "errors")
        and not any(target == allowed or target.startswith(allowed + ".") for allowed in ALLOWED[layer])
    ]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_what_is_below_it(layer):
    assert violations(layer, layer_files(layer)) == []


def test_the_checker_sees_a_violation():
    """The rule above can fail: a core module reaching for the recipe or a stage is caught."""
    source = "from ..config import Recipe\nfrom fwsvd_export.stages.data import load_records\nfrom .spec import CompressionSpec\n"
    assert violations("core", [PACKAGE / "core" / "probe.py"], source) == [
        "fwsvd_export/core/probe.py imports fwsvd_export.config",
        "fwsvd_export/core/probe.py imports fwsvd_export.stages.data",
    ]
    registry = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..config import DataSource\n"
    assert violations("stages.tasks", [PACKAGE / "stages" / "tasks.py"], registry) == [
        "fwsvd_export/stages/tasks.py imports fwsvd_export.config"
    ]  # a type-only import counts too


# --- import cycles -------------------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _at_import(tree: ast.Module) -> list[ast.stmt]:
    """The import statements that run when the module is imported: at the top level and inside if, try,
    with and class bodies; not in functions, nor under ``if TYPE_CHECKING:`` (never run)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                todo += node.body
            todo += node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, (ast.With, ast.ClassDef)):
            todo += node.body
    return found


def edges(name: str, deferred: bool, source: str | None = None) -> set[str]:
    """The package modules that importing `name` imports (with `deferred`: also those imported inside
    functions and for type checking only). A submodule brings its packages' __init__ along."""
    path = MODULES[name]
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(source if source is not None else path.read_text())
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))] if deferred else _at_import(tree)
    targets = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            module = ".".join(p for p in base if p)
            targets.add(module)
            targets |= {
                f"{module}.{a.name}".strip(".") for a in node.names if f"{module}.{a.name}".strip(".") in MODULES
            }
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            targets |= {
                n.removeprefix("fwsvd_export").removeprefix(".")
                for n in names
                if n == "fwsvd_export" or n.startswith("fwsvd_export.")
            }
    with_parents = set()
    for target in targets:
        parts = target.split(".")
        with_parents |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} | {""}
    return {t for t in with_parents if t in MODULES and t != name}


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (module -> modules it imports), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_circle_in_the_package():
    """Importing any module of the package never comes back to a module still being imported."""
    assert cycle({name: edges(name, deferred=False) for name in MODULES}) == []


def test_config_and_loader_lie_on_no_import_circle_even_through_deferred_imports():
    """What config imports (the registries) never leads back to config or the loader, not even through an
    import inside a function or one for type checking only."""
    graph = {name: edges(name, deferred=True) for name in MODULES}
    for start in ("config", "loader"):
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo += graph[node]
        assert start not in seen, start


def test_the_cycle_check_sees_a_circle():
    graph = {name: edges(name, deferred=False) for name in MODULES}
    graph["stages.tasks"] = edges("stages.tasks", False, "from ...config import DataSource\n")
    assert cycle(graph) == ["config", "stages.tasks", "config"]


BLOCKED = ["config", "loader", "stages", "aim", "pipeline", "sweep", "cli"]
CORE_ALONE = f"""
import sys
blocked = {["fwsvd_export." + m for m in BLOCKED]!r}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            raise ImportError(f"blocked: {{name}}")

sys.meta_path.insert(0, Refuse())
import torch
from torch import nn
from fwsvd_export.core import METHODS, Batch, CompressionSpec, compress_, factorize

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
    def get_input_embeddings(self):
        return self.embed
    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.relu(self.proj(self.embed(input_ids)))).mean(1)

torch.manual_seed(0)
model = Tiny()
ids = torch.randint(0, 50, (4, 6))
batch = Batch({{"input_ids": ids}}, torch.ones_like(ids).bool(), torch.tensor([0, 1, 2, 0]))
loss = lambda m, b: nn.functional.cross_entropy(m(**b.inputs), b.labels, reduction="sum")
result = compress_(model, CompressionSpec(method="kfac", target=["proj"], rank=4), [batch], loss, progress=False)
assert result.summary()["compressed_layers"] == 1 and sorted(METHODS) and callable(factorize)
loaded = sorted(m for m in sys.modules if m.startswith("fwsvd_export"))
print(" ".join(loaded))
"""


@pytest.mark.slow
def test_the_core_imports_and_compresses_with_every_upper_layer_blocked():
    """The issue's own check: with the recipe, stages, pipeline, sweep and CLI unimportable, the core
    still imports and compresses a model."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CORE_ALONE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = done.stdout.split()
    assert "fwsvd_export.core.compress" in loaded
    assert not [m for m in loaded if any(m.startswith(f"fwsvd_export.{b}") for b in BLOCKED)]


@pytest.mark.slow
def test_loading_a_checkpoint_loads_neither_the_recipe_nor_the_compression_stack():
    """`fwsvd_export.load` needs the low-rank module, not the statistics, allocation or recipe code."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom fwsvd_export import load\n"
        "print(' '.join(m for m in sys.modules if m.startswith('fwsvd_export')))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(done.stdout.split())
    assert "fwsvd_export.core.lowrank" in loaded
    assert not loaded & {
        "fwsvd_export.config",
        "fwsvd_export.loader",
        "fwsvd_export.core.compress",
        "fwsvd_export.core.statistics",
        "fwsvd_export.core.allocate",
        "fwsvd_export.stages.data",
    }
