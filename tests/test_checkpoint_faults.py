"""Bad input where a checkpoint or a model is read: a tampered manifest or weights file, a path that is no
checkpoint, a model location that is no model. Each must end in an FwsvdError that names what and where."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

import fwsvd_export
from fwsvd_export.cli import main
from fwsvd_export.errors import MESSAGE_LIMIT, FwsvdError
from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import compress_only
from fwsvd_export.stages.checkpoint import MANIFEST, WEIGHTS, load, read_manifest
from fwsvd_export.stages.models import is_local_path, load_pretrained

from conftest import quick_validation, write_recipe

QUERY = "bert.encoder.layer.0.attention.self.query"  # 48 -> 48, rank 12 at ratio 0.5
INTERMEDIATE = "bert.encoder.layer.0.intermediate.dense"  # 48 -> 96, rank 16


@pytest.fixture(scope="module")
def made(tmp_path_factory, bert_dir, data_dir) -> Path:
    """One real checkpoint per module (the classifier recipe of conftest; its fixture is per test)."""
    source = {"path": str(data_dir / "labelled.jsonl"), "text_column": "sentence", "label_column": "label"}
    recipe = {
        "model": {"path": str(bert_dir), "task": "text-classification"},
        "data": {
            "calibration": dict(source, max_samples=32),
            "evaluation": dict(source),
            "max_length": 32,
            "batch_size": 8,
        },
        "compression": {"method": "fwsvd", "target": [r"encoder\.layer\.\d+\."], "ratio": 0.5},
        "validation": quick_validation(),
    }
    tmp = tmp_path_factory.mktemp("made")
    folder, _ = compress_only(load_recipe(write_recipe(tmp, recipe)), tmp / "ckpt", progress=False)
    return folder


@pytest.fixture
def ckpt(made, tmp_path) -> Path:
    """A private copy of the checkpoint, to tamper with."""
    return Path(shutil.copytree(made, tmp_path / "ckpt"))


def edit_manifest(folder: Path, change) -> None:
    """Apply `change` to the manifest in place; what it returns, if anything, replaces the manifest."""
    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    manifest = change(manifest) or manifest
    path.write_text(json.dumps(manifest))


def error_of(call, *args) -> str:
    with pytest.raises(FwsvdError) as info:
        call(*args)
    return str(info.value)


def layer(name: str, **changes):
    """A change to one layer's entry of 'factorized'; a value of ... removes the key."""

    def change(manifest):
        entry = manifest["factorized"][name]
        for key, value in changes.items():
            if value is ...:
                del entry[key]
            else:
                entry[key] = value

    return change


def rename(old: str, new: str):
    def change(manifest):
        manifest["factorized"][new] = manifest["factorized"].pop(old)

    return change


@pytest.mark.slow
def test_an_intact_checkpoint_loads(ckpt):
    model = load(ckpt)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, fwsvd_export.LowRankLinear)}
    assert ranks[QUERY] == 12 and ranks[INTERMEDIATE] == 16 and len(ranks) == 12


MANIFEST_FAULTS = {
    "rank-is-a-string": (layer(QUERY, rank="12"), [QUERY, "'rank' must be a positive integer", 'got "12"']),
    "rank-is-negative": (layer(QUERY, rank=-12), [QUERY, "'rank' must be a positive integer", "got -12"]),
    "in-features-is-a-float": (layer(QUERY, in_features=48.0), [QUERY, "'in_features'", "got 48.0"]),
    "out-features-is-a-bool": (layer(QUERY, out_features=True), [QUERY, "'out_features'", "got true"]),
    "bias-missing": (layer(QUERY, bias=...), [QUERY, "has no 'bias'"]),
    "bias-not-a-bool": (layer(QUERY, bias="yes"), [QUERY, "'bias' must be true or false", 'got "yes"']),
    "layer-not-a-mapping": (lambda m: m["factorized"].update({QUERY: 12}), [QUERY, "must map in_features, rank"]),
    "factorized-not-a-mapping": (
        lambda m: m.update(factorized=list(m["factorized"])),
        ["'factorized' must map", "list"],
    ),
    "dtype-int8": (
        lambda m: m.update(dtype="int8"),
        ["'dtype' must be one of float32, float16, bfloat16", 'got "int8"'],
    ),
    "unknown-task": (lambda m: m.update(task="translation"), ["'task' must be one of", 'got "translation"']),
    "dtype-missing": (lambda m: {k: v for k, v in m.items() if k != "dtype"}, ["incomplete manifest, missing dtype"]),
    "not-an-object": (lambda m: [m], ["expected a JSON object, found list"]),
    "module-does-not-exist": (
        rename(QUERY, "bert.encoder.layer.7.attention.self.query"),
        ["'bert.encoder.layer.7.attention.self.query' does not exist in the bert model"],
    ),
    "module-is-not-linear": (
        rename(QUERY, "bert.encoder.layer.0.output.LayerNorm"),
        ["'bert.encoder.layer.0.output.LayerNorm' is a LayerNorm", "not a Linear layer"],
    ),
    "features-swapped": (
        layer(INTERMEDIATE, in_features=96, out_features=48),
        [INTERMEDIATE, "'in_features' 96 and 'out_features' 48", "(48 in, 96 out)"],
    ),
}


@pytest.mark.parametrize("change, fragments", MANIFEST_FAULTS.values(), ids=MANIFEST_FAULTS.keys())
def test_a_tampered_manifest_names_the_field_and_layer(ckpt, change, fragments):
    edit_manifest(ckpt, change)
    message = error_of(load, ckpt)
    assert str(ckpt / MANIFEST) in message
    for fragment in fragments:
        assert fragment in message


WEIGHTS_FAULTS = {
    "rank-differs-from-the-factors": (
        layer(QUERY, rank=8),
        [f"'{QUERY}.first.weight' has shape [12, 48]", "(rank 8, in_features 48", "needs [8, 48]"],
    ),
    "bias-false-but-stored": (layer(QUERY, bias=False), [f"holds '{QUERY}.second.bias'", "'bias' false"]),
}


@pytest.mark.parametrize("change, fragments", WEIGHTS_FAULTS.values(), ids=WEIGHTS_FAULTS.keys())
def test_a_manifest_that_disagrees_with_the_weights_file(ckpt, change, fragments):
    edit_manifest(ckpt, change)
    message = error_of(load, ckpt)
    assert f"{ckpt / WEIGHTS} does not match {ckpt / MANIFEST}" in message
    for fragment in fragments:
        assert fragment in message


def test_a_float16_manifest_over_float32_weights_is_refused(ckpt):
    edit_manifest(ckpt, lambda m: m.update(dtype="float16"))
    message = error_of(load, ckpt)
    assert f"{ckpt / WEIGHTS} does not match {ckpt / MANIFEST}" in message
    assert "'dtype' is 'float16'" in message and "tensors are stored otherwise" in message and "as float32" in message


def rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def test_one_tensor_of_another_dtype_is_refused(ckpt):
    name = f"{INTERMEDIATE}.second.weight"
    rewrite_weights(ckpt, lambda t: t.update({name: t[name].half()}))
    message = error_of(load, ckpt)
    assert "'dtype' is 'float32' but 1 of" in message and f"'{name}' as float16" in message


def test_transposed_factors_in_the_weights_file_are_refused(ckpt):
    name = f"{INTERMEDIATE}.first.weight"
    rewrite_weights(ckpt, lambda t: t.update({name: t[name].T.contiguous()}))
    message = error_of(load, ckpt)
    assert f"'{name}' has shape [48, 16]" in message and "needs [16, 48]" in message


def test_a_missing_weights_file(ckpt):
    (ckpt / WEIGHTS).unlink()
    assert f"{ckpt / WEIGHTS} is missing" in error_of(load, ckpt)


def test_a_truncated_weights_file(ckpt):
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[: len(data) // 2])
    message = error_of(load, ckpt)
    assert f"{ckpt / WEIGHTS} cannot be read as safetensors" in message


def test_a_manifest_that_is_not_json(ckpt):
    (ckpt / MANIFEST).write_text("{not json")
    assert f"{ckpt / MANIFEST}: not valid JSON" in error_of(load, ckpt)


# read_manifest: what the path was instead of a checkpoint.


def test_read_manifest_of_a_missing_path(tmp_path):
    message = error_of(read_manifest, tmp_path / "nowhere")
    assert f"{tmp_path / 'nowhere'} does not exist" in message and "written by `fwsvd-export compress`" in message


def test_read_manifest_of_an_onnx_file(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    message = error_of(read_manifest, tmp_path / "model.onnx")
    assert "is an ONNX file, not a checkpoint" in message
    assert "a checkpoint is a folder written by `fwsvd-export compress`" in message and "compressed/ folder" in message


def test_read_manifest_of_another_file(tmp_path):
    (tmp_path / "recipe.yaml").write_text("model: {}\n")
    assert f"{tmp_path / 'recipe.yaml'} is a file, not a checkpoint" in error_of(
        read_manifest, tmp_path / "recipe.yaml"
    )


def test_read_manifest_of_a_plain_model_folder(bert_dir):
    message = error_of(read_manifest, bert_dir)
    assert "plain Hugging Face model folder" in message and "not compressed yet" in message
    assert "run `fwsvd-export compress` first" in message


def test_read_manifest_of_a_run_output(made, tmp_path):
    shutil.copytree(made, tmp_path / "out" / "compressed")
    message = error_of(read_manifest, tmp_path / "out")
    assert (
        "`fwsvd-export run` output folder" in message
        and f"its checkpoint is {tmp_path / 'out' / 'compressed'}" in message
    )


def test_read_manifest_of_an_onnx_export_folder(bert_dir, tmp_path):
    shutil.copy(bert_dir / "config.json", tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    assert "holds an ONNX export, not a checkpoint" in error_of(read_manifest, tmp_path)


def test_read_manifest_of_a_folder_with_neither(tmp_path):
    message = error_of(read_manifest, tmp_path)
    assert f"{MANIFEST} is missing and so is config.json" in message


def test_cli_export_of_a_plain_model_folder_exits_2(bert_dir, tmp_path):
    result = CliRunner().invoke(main, ["export", str(bert_dir), "-o", str(tmp_path / "onnx")])
    assert result.exit_code == 2 and "not compressed yet" in result.output


# load_pretrained (`fwsvd-export inspect MODEL`): local paths checked before transformers sees them.


@pytest.mark.parametrize(
    "location, local",
    [
        ("org/name", False),
        ("bert-base-uncased", False),
        ("./org/name", True),
        ("~/models/x", True),
        ("/no/such/model", True),
        ("models/org/name", True),
        ("tests", True),
    ],
)
def test_which_locations_are_local_paths(location, local):
    assert is_local_path(location) is local


@pytest.mark.parametrize("location", ["./no-such-model-folder", "~/no-such-model-folder", "no/such/model-folder"])
def test_load_pretrained_of_a_missing_relative_path(location):
    assert error_of(load_pretrained, location, "text-classification") == f"no such model folder: {location}"


def test_load_pretrained_of_a_missing_absolute_path(tmp_path):
    missing = str(tmp_path / "nope")
    assert error_of(load_pretrained, missing, "text-classification") == f"no such model folder: {missing}"


def test_load_pretrained_of_a_file(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    message = error_of(load_pretrained, str(tmp_path / "model.onnx"), "text-classification")
    assert (
        message == f"{tmp_path / 'model.onnx'} is a file; expected a model folder (config.json and weights) or a hub id"
    )


def test_load_pretrained_of_a_folder_without_config(tmp_path):
    assert "has no config.json" in error_of(load_pretrained, str(tmp_path), "text-classification")


def test_load_pretrained_of_a_compressed_checkpoint(made):
    """transformers would load it, with every factorized layer freshly random."""
    assert "is a compressed fwsvd-export checkpoint" in error_of(load_pretrained, str(made), "text-classification")


def test_a_config_without_model_type_gives_one_short_line(bert_dir, tmp_path):
    folder = Path(shutil.copytree(bert_dir, tmp_path / "model"))
    (folder / "config.json").write_text(json.dumps({"hidden_size": 48}))
    message = error_of(load_pretrained, str(folder), "text-classification")
    prefix = f"could not load model '{folder}' for text-classification: "
    assert message.startswith(prefix + "Unrecognized model")
    assert "\n" not in message and len(message) <= len(prefix) + MESSAGE_LIMIT and message.endswith(" ...")


def test_an_unknown_model_type_keeps_only_the_first_line(bert_dir, tmp_path):
    folder = Path(shutil.copytree(bert_dir, tmp_path / "model"))
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    message = error_of(load_pretrained, str(folder), "text-classification")
    assert "no-such-architecture" in message and "\n" not in message and "pip install" not in message


@pytest.mark.slow
def test_a_hub_id_goes_to_transformers_unchanged(monkeypatch):
    seen = []

    def refuse(location, **kwargs):
        seen.append(location)
        raise OSError("some-org/some-model is not a valid model identifier\nsecond line of advice")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", refuse)
    message = error_of(load_pretrained, "some-org/some-model", "text-classification")
    assert seen == ["some-org/some-model"]
    assert message == (
        "could not load model 'some-org/some-model' for text-classification: "
        "some-org/some-model is not a valid model identifier"
    )


def test_cli_inspect_of_a_missing_folder_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2 and f"no such model folder: {tmp_path / 'nope'}" in result.output


def test_load_pretrained_still_loads_a_model_folder(bert_dir):
    model, tokenizer = load_pretrained(str(bert_dir), "text-classification")
    assert isinstance(model, torch.nn.Module) and tokenizer.pad_token is not None
