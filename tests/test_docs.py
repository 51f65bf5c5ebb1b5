"""The docs build strictly, and every example in them runs, so none rots.

What a page's fenced blocks mean to this test (README.md and docs/*.md):

- ```` ```python ````: run as a script, each block in its own process, in the page's sandbox folder.
- ```` ```bash ```` / ```` ```shell ````: each line (with its ``\\`` continuations) that calls ``fwsvd-export``, or
  runs a repository script (``python recipes/...``), runs in the page's sandbox and must exit 0; ``run`` and
  ``sweep`` may also exit 1 (a validation check failed, the report written): on a tiny model one changed
  prediction in 48 is 2%, above the default int8 gate (0.5 points), and the gates are the recipe's, not the
  example's point. Other lines (pip, pytest, ruff, torchrun) are not run.
- ``<!-- docs-test: file NAME -->`` on the line before a block writes that block into the sandbox as NAME,
  for the blocks after it (a page's recipe, then the commands that check and run it).
- ``<!-- docs-test: skip: REASON -->`` on the line before a block skips it (a GPU, the hub, torchrun, an
  install); the skips are counted and each must give a reason.

The sandbox is a fresh folder per page, holding what the examples name: ``my-classifier/`` (the tiny BERT
classifier of conftest.py), ``data/train.jsonl`` and ``data/dev.jsonl`` (``{"text", "label"}`` records it
labels itself: train 32 of them, dev all 48, so one changed prediction costs 2%, within the default
``max_metric_loss``), and a copy of ``recipes/``. Everything is offline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(
    r"(?:^<!-- docs-test: (?P<marker>[^>]*?) -->\n)?^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```", re.M | re.S
)
RUN_LANGS = {"python", "bash", "shell", "sh"}


def blocks(path: Path) -> list[tuple[str, str, str]]:
    """(language, marker or '', body) of every fenced block of a page."""
    return [(m["lang"], (m["marker"] or "").strip(), m["body"]) for m in FENCE.finditer(path.read_text())]


def commands(body: str) -> list[str]:
    """The lines of a shell block the test runs: fwsvd-export commands and repository scripts."""
    lines, current = [], ""
    for line in body.splitlines():
        current += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [
        c
        for c in lines
        if c.startswith("fwsvd-export") or "| fwsvd-export" in c or re.match(r"python (recipes|examples)/", c)
    ]


# --------------------------------------------------------------------------------------------- structure
def test_the_readme_is_a_front_page_of_at_most_150_lines():
    assert len(README.read_text().splitlines()) <= 150


def test_the_readme_and_the_docs_link_only_to_files_that_exist():
    for page in [README, *PAGES]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.name} links to {target}, which does not exist"


def test_every_skip_gives_a_reason_and_every_marker_is_known():
    skips = 0
    for page in [README, *PAGES]:
        for _lang, marker, _ in blocks(page):
            if marker.startswith("skip"):
                assert re.match(r"skip: \S", marker), f"{page.name}: a skip without a reason"
                skips += 1
            else:
                assert marker == "" or re.fullmatch(r"file [\w.-]+", marker), f"{page.name}: unknown marker {marker!r}"
    assert 0 < skips < 10, f"{skips} skipped blocks"


def test_the_generated_parts_are_up_to_date_with_the_code():
    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    from fwsvd_export.recipe_schema import recipe_schema
    from fwsvd_export.stages.tasks import TASKS

    reference, table = generate.recipe_reference(), generate.tasks_table()
    for section in recipe_schema()["$defs"].values():
        for key in section["properties"]:
            assert f"| `{key}` |" in reference
    for name in TASKS:
        assert f"| `{name}` |" in table


# --------------------------------------------------------------------------------------------- the build
@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install mkdocs-material 'mkdocstrings[python]')")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed")
    pytest.importorskip("material", reason="mkdocs-material is not installed")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("fwsvd_export.api.compress") > 0
    assert "AutoModelForCausalLM" in (tmp_path / "site" / "tasks" / "index.html").read_text()


# --------------------------------------------------------------------------------------------- the examples
@pytest.fixture(scope="module")
def sandbox_template(tmp_path_factory, classifier_dir, data_dir) -> Path:
    folder = tmp_path_factory.mktemp("docs-sandbox")
    shutil.copytree(classifier_dir, folder / "my-classifier")
    rows = [json.loads(line) for line in (data_dir / "labelled.jsonl").read_text().splitlines()]
    (folder / "data").mkdir()
    for name, part in (("train.jsonl", rows[:32]), ("dev.jsonl", rows)):  # 48 held-out rows: 1 miss is 2%
        (folder / "data" / name).write_text(
            "".join(json.dumps({"text": r["sentence"], "label": r["label"]}) + "\n" for r in part)
        )
    shutil.copytree(ROOT / "recipes", folder / "recipes", ignore=shutil.ignore_patterns("tiny-llama", "__pycache__"))
    return folder


def run_page(page: Path, sandbox: Path) -> dict[str, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    counts = {"python": 0, "commands": 0, "skipped": 0, "files": 0}
    for lang, marker, body in blocks(page):
        if marker.startswith("skip"):
            counts["skipped"] += 1
            continue
        if marker.startswith("file "):
            (sandbox / marker.split(" ", 1)[1]).write_text(body)
            counts["files"] += 1
            continue
        if lang == "python":
            done = subprocess.run([sys.executable, "-c", body], cwd=sandbox, env=env, capture_output=True, text=True)
            assert done.returncode == 0, (
                f"{page.name}: python block failed:\n{body}\n{done.stdout}{done.stderr[-3000:]}"
            )
            counts["python"] += 1
        elif lang in RUN_LANGS:
            for command in commands(body):
                done = subprocess.run(["bash", "-c", command], cwd=sandbox, env=env, capture_output=True, text=True)
                verdict = (
                    re.match(r"fwsvd-export (run|sweep) ", command)
                    and done.returncode == 1
                    and re.search(r"FAILED|validation failed", done.stdout + done.stderr)
                )
                assert done.returncode == 0 or verdict, (
                    f"{page.name}: `{command}` exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
                )
                counts["commands"] += 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_example_runs(page, sandbox_template, tmp_path):
    sandbox = tmp_path / "sandbox"
    shutil.copytree(sandbox_template, sandbox)
    counts = run_page(page, sandbox)
    print(page.name, counts)
