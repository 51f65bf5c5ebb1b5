"""The package's layers point one way: core <- recipe and stages <- pipeline and sweep <- cli.

Read from the source (not from what an import happens to load), so a new import that breaks the
layering fails here, naming the file and the module it reached for.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fwsvd_export"

# What each layer may import from the package (besides itself and errors.py).
ALLOWED = {
    "core": {"core"},
    "stages": {"core", "stages", "recipe"},
    "recipe": {"core", "stages.tasks", "stages.precision"},
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
    return sorted((PACKAGE / layer).glob("*.py")) if (PACKAGE / layer).is_dir() else [PACKAGE / f"{layer}.py"]


def violations(layer: str, files: list[Path], source: str | None = None) -> list[str]:
    return [f"{path.relative_to(PACKAGE.parent)} imports fwsvd_export.{target}"
            for path in files for target in sorted(package_imports(path, source))
            if target not in ("", "errors")
            and not any(target == allowed or target.startswith(allowed + ".") for allowed in ALLOWED[layer])]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_what_is_below_it(layer):
    assert violations(layer, layer_files(layer)) == []


def test_the_checker_sees_a_violation():
    """The rule above can fail: a core module reaching for the recipe or a stage is caught."""
    source = "from ..recipe import Recipe\nfrom fwsvd_export.stages.data import load_records\nfrom .spec import CompressionSpec\n"
    assert violations("core", [PACKAGE / "core" / "probe.py"], source) == [
        "fwsvd_export/core/probe.py imports fwsvd_export.recipe",
        "fwsvd_export/core/probe.py imports fwsvd_export.stages.data"]
