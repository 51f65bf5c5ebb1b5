"""The command line: exit codes, messages, inspect, and the methods list."""

import json

import pytest
from click.testing import CliRunner

from fwsvd_export.cli import main

from conftest import write_recipe

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out


def test_run_passes_and_prints_the_checks(tmp_path, classifier_recipe):
    path = write_recipe(tmp_path, classifier_recipe)
    result = CliRunner().invoke(
        main, ["run", str(path), "-o", str(tmp_path / "out"), "--quiet", "--set", "compression.ratio=0.6"]
    )
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output and "[ok] cpu: numeric parity" in result.output
    assert "[ok] cpu: metric loss: accuracy 1.0000 -> " in result.output and "allowed 0.1)" in result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["recipe"]["compression"]["ratio"] == 0.6


def test_run_exits_1_when_validation_fails(tmp_path, classifier_recipe):
    """Ratio 0.1 cuts the classifier's layers below their rank: the export is faithful, the accuracy is not."""
    classifier_recipe["validation"]["providers"] = [{"name": "cpu", "required": True}]
    path = write_recipe(tmp_path, classifier_recipe)
    result = CliRunner().invoke(
        main, ["run", str(path), "-o", str(tmp_path / "out"), "--quiet", "--set", "compression.ratio=0.1"]
    )
    assert result.exit_code == 1, result.output
    assert result.output.startswith("FAILED: 12 layers factorized with fwsvd")
    assert "[FAIL] cpu: metric loss" in result.output and "[FAIL] metric loss (compressed torch)" in result.output
    assert "[ok] cpu: numeric parity" in result.output


def test_bad_input_exits_2_with_a_message(tmp_path, classifier_recipe):
    classifier_recipe["compression"]["target"] = ["nothing-like-this"]
    path = write_recipe(tmp_path, classifier_recipe)
    result = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2
    assert "error:" in result.output and "matches no Linear layer" in result.output
    assert not (tmp_path / "out").exists()


def test_inspect_lists_layers_with_break_even_ranks(bert_dir):
    result = CliRunner().invoke(main, ["inspect", str(bert_dir), "--task", "text-classification", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    intermediate = rows["bert.encoder.layer.0.intermediate.dense"]
    assert (intermediate["in"], intermediate["out"]) == (48, 96) and intermediate["break_even_rank"] == 32.0


def test_inspect_shows_ranks_of_a_compressed_checkpoint(tmp_path, classifier_recipe):
    path = write_recipe(tmp_path, classifier_recipe)
    run = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "out"), "--quiet"])
    assert run.exit_code == 0, run.output
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out" / "compressed")])
    assert result.exit_code == 0, result.output
    line = next(r for r in result.output.splitlines() if r.startswith("bert.encoder.layer.0.intermediate.dense "))
    assert line.split()[3] == "16"  # rank at ratio 0.5 of a 96x48 layer
    assert "first" not in result.output


def test_methods_lists_every_method_with_its_statistics():
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()}
    assert list(rows) == ["svd", "fwsvd", "asvd", "svd-llm", "kfac"]
    assert rows["svd"].endswith("(statistics: none)") and rows["fwsvd"].endswith("(statistics: fisher)")
    assert rows["kfac"].endswith("(statistics: input_gram, output_gram)")


def test_compress_then_export_as_separate_stages(tmp_path, classifier_recipe):
    path = write_recipe(tmp_path, classifier_recipe)
    result = CliRunner().invoke(main, ["compress", str(path), "-o", str(tmp_path / "ckpt"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "12 layers factorized with fwsvd" in result.output
    assert (tmp_path / "ckpt" / "fwsvd_manifest.json").is_file()
    result = CliRunner().invoke(main, ["export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert "12 of 12 factorized layers are two matrix multiplies" in result.output
    assert (tmp_path / "onnx" / "model.onnx").is_file()


def test_export_of_a_folder_that_is_no_checkpoint(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "onnx")])
    assert result.exit_code == 2 and "fwsvd_manifest.json is missing" in result.output
