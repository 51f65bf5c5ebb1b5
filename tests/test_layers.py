"""The package's layers point one way: core <- recipe and stages <- aim <- pipeline and sweep <- cli.

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
    "aim": {"core", "stages", "recipe"},
    "pipeline": {"core", "stages", "recipe", "aim"},
    "sweep": {"core", "stages", "recipe", "pipeline"},
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


BLOCKED = ["recipe", "stages", "aim", "pipeline", "sweep", "cli"]
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


def test_loading_a_checkpoint_loads_neither_the_recipe_nor_the_compression_stack():
    """`fwsvd_export.load` needs the low-rank module, not the statistics, allocation or recipe code."""
    import subprocess
    import sys
    script = ("import sys\nfrom fwsvd_export import load\n"
              "print(' '.join(m for m in sys.modules if m.startswith('fwsvd_export')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(done.stdout.split())
    assert "fwsvd_export.core.factorize" in loaded
    assert not loaded & {"fwsvd_export.recipe", "fwsvd_export.core.compress", "fwsvd_export.core.statistics",
                         "fwsvd_export.core.allocate", "fwsvd_export.stages.data"}
