"""The embedded default: the shipped recipe on the real pretrained MiniLM-L6, every stage, offline."""

from pathlib import Path

import pytest
import yaml

from fwsvd_export.config import ValidationSpec
from fwsvd_export.core import CompressionSpec
from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import run
from fwsvd_export.stages.tasks import TASKS

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "minilm-demo.yaml"


def test_minilm_demo_recipe_passes(tmp_path):
    recipe = load_recipe(DEMO, ["validation.latency.runs=5", "validation.latency.warmup=1"])
    result = run(recipe, tmp_path / "demo", progress=False)
    report = result.report.to_dict()
    assert report["compression"]["summary"]["compressed_layers"] == 12
    assert report["graph"]["compressed"]["split_matmul_pairs_found"] == 12
    cpu = report["validation"]["providers"]["cpu"]
    assert cpu["parity"]["passed"] and cpu["metric"] > 0.9
    assert [lat["shape"] for lat in cpu["latency"]] == ["1x128", "16x128"]
    assert report["sizes"]["onnx_compressed_bytes"] < report["sizes"]["onnx_dense_bytes"]
    assert result.passed, [c for c in report["validation"]["checks"] if not c["passed"]]


def test_offline_causal_lm_recipe_passes(tmp_path, tiny_llama_dir):
    recipe = load_recipe(
        DEMO.with_name("tiny-llama-offline.yaml"), ["validation.latency.runs=3", f"model.path={tiny_llama_dir}"]
    )
    result = run(recipe, tmp_path / "lm", progress=False)
    report = result.report.to_dict()
    assert result.passed, [c for c in report["validation"]["checks"] if not c["passed"]]
    assert report["compression"]["summary"]["targeted_kept_ratio"] <= 0.7
    assert report["validation"]["providers"]["cpu"]["generation"]["matching_prompts"] == 2


def test_every_shipped_recipe_parses_to_what_it_says_and_its_data_files_exist():
    paths = sorted(DEMO.parent.glob("*.yaml"))
    assert DEMO in paths and DEMO.with_name("tiny-llama-offline.yaml") in paths
    for path in paths:
        raw = yaml.safe_load(path.read_text())
        recipe = load_recipe(path)
        assert recipe.model.task == raw["model"]["task"] and recipe.model.task in TASKS, path.name
        assert recipe.compression.method == raw["compression"].get("method", CompressionSpec().method), path.name
        gate = raw.get("validation", {}).get("max_metric_loss", ValidationSpec().max_metric_loss)
        assert recipe.validation.max_metric_loss == gate, path.name
        for role in ("calibration", "evaluation"):
            source = getattr(recipe.data, role)
            assert source.path is None or recipe.resolve(source.path).is_file(), (path.name, role, source.path)
