"""A model, statistic or factor that is not finite is refused with the place named (exit code 2), and
nothing non-finite is ever written."""

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaForCausalLM

from fwsvd_export.cli import main
from fwsvd_export.core import Batch, CompressionSpec, compress_
from fwsvd_export.errors import FwsvdError
from fwsvd_export.stages.tasks import TASKS

from conftest import write_recipe

TARGET = "model.layers.0.mlp.up_proj.weight"


def poisoned(source, folder, name: str, value: float):
    model = LlamaForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.get_parameter(name)[1, 2] = value
    model.save_pretrained(folder)
    for f in source.glob("tok*"):
        (folder / f.name).write_bytes(f.read_bytes())
    for f in source.glob("*vocab*"):
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, name, value",
    [
        ("kfac", TARGET, float("nan")),
        ("fwsvd", TARGET, float("nan")),
        ("svd", TARGET, float("nan")),
        ("svd", TARGET, float("inf")),
        ("fwsvd", TARGET, float("-inf")),
        ("kfac", "lm_head.weight", float("nan")),
        ("fwsvd", "lm_head.weight", float("nan")),
    ],
)
def test_a_non_finite_weight_is_refused_naming_it(tmp_path, llama_dir, lm_recipe, method, name, value):
    lm_recipe["model"]["path"] = str(poisoned(llama_dir, tmp_path / "model", name, value))
    lm_recipe["compression"]["method"] = method
    result = CliRunner().invoke(
        main, ["run", str(write_recipe(tmp_path, lm_recipe)), "-o", str(tmp_path / "out"), "--quiet"]
    )
    assert result.exit_code == 2, result.output
    kind = "NaN" if value != value else "infinite"
    assert f"'{name}' holds" in result.output and kind in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_float16_backward_overflow_is_refused_naming_the_layer_and_the_cause(llama_dir, lm_recipe, tokenizer):
    """The realistic source of non-finite statistics: logits that overflow float16 make the loss and
    every gradient NaN; compress_ stops before factorizing and says where and why."""
    model = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float16)
    with torch.no_grad():
        w = model.lm_head.weight
        w.copy_(w.float() * (6e4 / w.float().abs().max()))  # finite in float16 (max 65504); the logits are not
    task = TASKS["text-generation"]
    ids = tokenizer(["the red fox runs over the hill"] * 2, return_tensors="pt")["input_ids"]
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.ones_like(ids).bool(), ids.clone())
    assert not torch.isfinite(model(**batch.inputs).logits).all()  # the premise: the forward pass overflows
    with pytest.raises(
        FwsvdError, match=r"statistic '(input|output)_gram' of layer 'model\.layers\.\d\..*overflowed.*float32"
    ):
        compress_(model, CompressionSpec(method="kfac", ratio=0.5), [batch], task.loss, progress=False)
    assert not any(type(m).__name__ == "LowRankLinear" for m in model.modules())  # nothing was replaced


def test_recovery_fine_tuning_that_diverges_is_refused_and_writes_nothing(tmp_path, classifier_recipe):
    """A learning rate that blows the factors up must not reach the checkpoint."""
    classifier_recipe["finetune"] = {"epochs": 2, "learning_rate": 1e37, "train": "all"}
    result = CliRunner().invoke(
        main, ["compress", str(write_recipe(tmp_path, classifier_recipe)), "-o", str(tmp_path / "ckpt")]
    )
    assert result.exit_code == 2, result.output
    assert "recovery fine-tuning" in result.output and "finetune.learning_rate" in result.output
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt.partial-*"))
