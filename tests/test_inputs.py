"""Inputs beyond one assumed text layout: batches hold only what the model's forward takes, ONNX feeds follow
the graph's own input names and dtypes, and the preprocessor is what `AutoProcessor` finds in the model
folder (a tokenizer, or an image processor). A tiny DistilBERT classifier (whose forward takes no
token_type_ids, which MiniLM's tokenizer returns) and a tiny ViT image classifier go from statistics to a
validated ONNX artifact through `fwsvd-export run`."""

import json
import random
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from fwsvd_export.cli import main
from fwsvd_export.core import Batch
from fwsvd_export.errors import FwsvdError
from fwsvd_export.stages.models import fit_batches, forward_inputs
from fwsvd_export.stages.ort_io import feeds, timing_inputs

from conftest import CLASSIFIER_MAX_LOSS, quick_validation, sentences, write_recipe


def run_cli(tmp_path, recipe):
    path = write_recipe(tmp_path, recipe)
    result = CliRunner().invoke(main, ["run", str(path), "-o", str(tmp_path / "out"), "--quiet"])
    report = tmp_path / "out" / "report.json"
    return result, json.loads(report.read_text()) if report.is_file() else None


# --- the graph's own inputs --------------------------------------------------------------------------------


def _session(inputs: list[tuple[str, int, list]]) -> ort.InferenceSession:
    """A graph whose output sums each input (cast to float): only the inputs it declares, as declared."""
    values = [helper.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in inputs]
    nodes, sums = [], []
    for name, _, _ in inputs:
        nodes += [
            helper.make_node("Cast", [name], [f"{name}_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", [f"{name}_f"], [f"{name}_s"], keepdims=0),
        ]
        sums.append(f"{name}_s")
    nodes.append(helper.make_node("Sum", sums, ["out"]))
    graph = helper.make_graph(nodes, "g", values, [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_feeds_follow_the_graphs_input_names_and_dtypes():
    ids = torch.tensor([[101, 7, 102]])
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    # a DistilBERT-like graph: no token_type_ids, so it gets none
    session = _session(
        [("input_ids", TensorProto.INT64, ["b", "s"]), ("attention_mask", TensorProto.INT64, ["b", "s"])]
    )
    fed = feeds(session, enc)
    assert set(fed) == {"input_ids", "attention_mask"} and fed["input_ids"].dtype == np.int64
    session.run(None, fed)
    # a graph that takes int32 ids and wants token_type_ids the inputs lack: cast, and made as zeros
    session = _session(
        [("input_ids", TensorProto.INT32, ["b", "s"]), ("token_type_ids", TensorProto.INT64, ["b", "s"])]
    )
    fed = feeds(session, {"input_ids": ids})
    assert fed["input_ids"].dtype == np.int32 and fed["token_type_ids"].tolist() == [[0, 0, 0]]
    # an image graph: pixel_values as float, nothing textual added
    session = _session([("pixel_values", TensorProto.FLOAT, ["batch_size", "num_channels", "height", "width"])])
    fed = feeds(session, {"pixel_values": torch.ones(2, 3, 4, 4, dtype=torch.float64)})
    assert set(fed) == {"pixel_values"} and fed["pixel_values"].dtype == np.float32
    with pytest.raises(FwsvdError, match="wants input 'input_ids'"):
        feeds(_session([("input_ids", TensorProto.INT64, ["b", "s"])]), {"pixel_values": torch.ones(1, 3)})


def test_timing_inputs_are_made_from_the_graph_and_the_model_config():
    config = SimpleNamespace(vocab_size=50, num_channels=3, image_size=32)
    text = _session([("input_ids", TensorProto.INT64, ["b", "s"]), ("attention_mask", TensorProto.INT64, ["b", "s"])])
    made = timing_inputs(text, config, "2x16")
    assert set(made) == {"input_ids"} and made["input_ids"].shape == (2, 16) and int(made["input_ids"].max()) < 50
    assert set(feeds(text, made)) == {"input_ids", "attention_mask"}  # the mask made by feeds, no token_type_ids
    image = _session([("pixel_values", TensorProto.FLOAT, ["batch_size", "num_channels", "height", "width"])])
    made = timing_inputs(image, config, "2x16")  # an image has no sequence: 16 is not used
    assert made["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(FwsvdError, match="cannot size axis 2"):
        timing_inputs(image, SimpleNamespace(num_channels=3), "1x8")


def test_batches_hold_only_what_the_forward_takes():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16)
    )
    assert {"input_ids", "attention_mask"} <= forward_inputs(model) and "token_type_ids" not in forward_inputs(model)
    ids = torch.ones(2, 3, dtype=torch.long)
    batch = Batch({"input_ids": ids, "attention_mask": ids, "token_type_ids": 0 * ids}, ids.bool(), torch.zeros(2))
    fitted = fit_batches([batch], model)[0]
    assert set(fitted.inputs) == {"input_ids", "attention_mask"} and fitted.samples == 2
    model(**fitted.inputs)


# --- a classifier whose forward takes no token_type_ids ----------------------------------------------------


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory, tokenizer):
    """A tiny random DistilBERT classifier with MiniLM's tokenizer, which returns token_type_ids."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    assert "token_type_ids" in tokenizer("a b")
    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(
        DistilBertConfig(
            vocab_size=tokenizer.vocab_size,
            dim=48,
            n_layers=2,
            n_heads=4,
            hidden_dim=96,
            max_position_embeddings=128,
            num_labels=2,
        )
    ).eval()
    folder = tmp_path_factory.mktemp("tiny-distilbert")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    texts = sentences(24, 5)
    with torch.no_grad():  # labelled with the model's own predictions: accuracy 1.0 dense
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        labels = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1).tolist()
    with (folder.parent / f"{folder.name}.jsonl").open("w") as f:
        f.writelines(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels))
    return folder


@pytest.mark.slow
def test_a_distilbert_classifier_runs_end_to_end(tmp_path, distilbert_dir):
    source = {"path": str(distilbert_dir.parent / f"{distilbert_dir.name}.jsonl"), "label_column": "label"}
    recipe = {
        "model": {"path": str(distilbert_dir), "task": "text-classification"},
        "data": {"calibration": source, "evaluation": source, "max_length": 32, "batch_size": 8},
        "compression": {"method": "fwsvd", "target": [r"transformer\.layer\.\d+\."], "ratio": 0.5},
        "validation": quick_validation(),
    }
    result, report = run_cli(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(tmp_path / "out" / "onnx" / "compressed" / "model.onnx"), load_external_data=False).graph
    assert {i.name for i in graph.input} == {"input_ids", "attention_mask"}
    assert report["graph"]["compressed"]["split_matmul_pairs_found"] == 12
    assert report["validation"]["providers"]["cpu"]["status"] == "passed"


# --- an image classifier: the preprocessor seam ------------------------------------------------------------

COLORS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (50, 60, 210)}


def _images(folder, n: int = 36) -> list[dict]:
    """Squares of a shaded colour, each with a grey patch somewhere: labelled by the colour."""
    from PIL import Image

    rng = random.Random(0)
    (folder / "images").mkdir()
    rows = []
    for i in range(n):
        name = list(COLORS)[i % len(COLORS)]
        image = Image.new("RGB", (40, 40), tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in COLORS[name]))
        x, y, size = rng.randint(0, 24), rng.randint(0, 24), rng.randint(8, 16)
        image.paste((rng.randint(60, 200),) * 3, (x, y, x + size, y + size))
        image.save(folder / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "label": name})
    with (folder / "images.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A tiny ViT image classifier built from a config, its ViTImageProcessor beside it, and coloured squares
    (images.jsonl beside the folder) it classifies by colour: each encoder weight is rank 4 plus 3% noise
    (what factorizing drops), and the head is a ridge-regression probe of the [CLS] features onto the
    colours, fitted in closed form (built, not trained: a second)."""
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    data = tmp_path_factory.mktemp("images")
    rows = _images(data)
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        num_labels=3,
        id2label=dict(enumerate(COLORS)),
        label2id={c: i for i, c in enumerate(COLORS)},
    )
    model = ViTForImageClassification(config).eval()
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    with torch.no_grad():
        for module in model.vit.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                out_f, in_f = module.weight.shape
                low = torch.randn(out_f, 4) @ torch.randn(4, in_f) / (4 * in_f) ** 0.5
                module.weight.copy_(low + 0.03 * torch.randn(out_f, in_f) / in_f**0.5)
        pixels = processor(images=[Image.open(data / r["image"]).convert("RGB") for r in rows], return_tensors="pt")[
            "pixel_values"
        ]
        features = model.vit(pixel_values=pixels).last_hidden_state[:, 0]
        centred = features - features.mean(0)
        labels = torch.tensor([config.label2id[r["label"]] for r in rows])
        targets = torch.nn.functional.one_hot(labels, 3).float() - 1 / 3
        probe = torch.linalg.solve(centred.T @ centred + torch.eye(centred.shape[1]), centred.T @ targets).T
        model.classifier.weight.copy_(probe)
        model.classifier.bias.copy_(-probe @ features.mean(0))
        assert model(pixel_values=pixels).logits.argmax(-1).tolist() == labels.tolist()
    folder = data / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def vit_recipe(vit_dir) -> dict:
    source = {"path": str(vit_dir.parent / "images.jsonl"), "label_column": "label"}
    return {
        "model": {"path": str(vit_dir), "task": "image-classification"},
        "data": {"calibration": dict(source, max_samples=24), "evaluation": source, "batch_size": 8},
        "compression": {"method": "fwsvd", "target": [r"encoder\.layer\.\d+\."], "ratio": 0.5},
        "validation": quick_validation(),
    }


@pytest.mark.slow
def test_a_vit_image_classifier_goes_from_statistics_to_a_validated_onnx_artifact(tmp_path, vit_dir):
    from optimum.onnxruntime import ORTModelForImageClassification
    from PIL import Image
    from transformers import AutoImageProcessor

    result, report = run_cli(tmp_path, vit_recipe(vit_dir))
    assert result.exit_code == 0, result.output
    assert report["model"]["task"] == "image-classification"
    assert report["graph"]["compressed"]["split_matmul_pairs_found"] == 12  # q, k, v, output, intermediate, output x 2
    assert report["graph"]["compressed"]["layers_missing_split"] == []
    validation = report["validation"]
    cpu = validation["providers"]["cpu"]
    assert cpu["status"] == "passed" and cpu["parity"]["passed"] and cpu["parity"]["max_abs_error"] < 1e-4
    assert validation["original_torch"] == 1.0 and cpu["metric_loss"] <= CLASSIFIER_MAX_LOSS
    assert cpu["latency"] and cpu["latency"][0]["compressed"]["median_ms"] > 0  # timed on pixel_values
    graph = tmp_path / "out" / "onnx" / "compressed"
    assert {i.name for i in onnx.load(str(graph / "model.onnx"), load_external_data=False).graph.input} == {
        "pixel_values"
    }
    # the folder is what optimum and transformers load: the graph, config.json and the image processor
    processor = AutoImageProcessor.from_pretrained(graph)
    inputs = processor(images=[Image.open(vit_dir.parent / "images" / "1.png").convert("RGB")], return_tensors="pt")
    logits = ORTModelForImageClassification.from_pretrained(graph)(**inputs).logits
    assert logits.argmax(-1).tolist() == [1]  # green


def test_an_image_the_data_names_but_that_is_missing_is_bad_input(tmp_path, vit_dir):
    rows = [{"image": "nowhere.png", "label": "red"}] * 2
    (tmp_path / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = vit_recipe(vit_dir)
    recipe["data"]["calibration"] = recipe["data"]["evaluation"] = {
        "path": str(tmp_path / "images.jsonl"),
        "label_column": "label",
    }
    result, _ = run_cli(tmp_path, recipe)
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'images.jsonl'}:1: cannot read image {tmp_path / 'nowhere.png'}" in result.output
