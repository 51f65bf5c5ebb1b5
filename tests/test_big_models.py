"""Models too big for one device: the calibration pass runs on a copy that accelerate spreads over
devices (here: host memory capped so that decoder layers go to disk), optionally with gradient
checkpointing, and the result equals a plain in-memory run."""

import pytest
import torch
from safetensors.torch import load_file

from fwsvd_export.errors import FwsvdError
from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import compress_only
from fwsvd_export.stages.models import load_for_statistics, model_location

from conftest import write_recipe

pytest.importorskip("accelerate")
CAP = (
    "700KB"  # the recipe's tiny decoder has 1 MB of weights: the embeddings fit, decoder layers and LM head go to disk
)


@pytest.fixture
def plain(lm_recipe, tiny_llama_dir) -> dict:
    return {**lm_recipe, "model": dict(lm_recipe["model"], path=str(tiny_llama_dir))}


def _capped(plain: dict, tmp_path) -> dict:
    """The embeddings fit in the capped host memory, the decoder layers do not."""
    recipe = {
        **plain,
        "model": dict(
            plain["model"], device_map="auto", max_memory={"cpu": CAP}, offload_folder=str(tmp_path / "offload")
        ),
    }
    recipe["compression"] = dict(plain["compression"], gradient_checkpointing=True)
    return recipe


@pytest.mark.slow
def test_offloaded_model_with_checkpointing_compresses_like_an_in_memory_one(tmp_path, plain):
    plain_path = write_recipe(tmp_path, plain, "plain.yaml")
    capped_path = write_recipe(tmp_path, _capped(plain, tmp_path), "capped.yaml")
    capped = load_recipe(capped_path)
    runner = load_for_statistics(capped, model_location(capped))
    assert "disk" in runner.hf_device_map.values() and runner.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    del runner

    plain_out, plain_info = compress_only(load_recipe(plain_path), tmp_path / "plain", progress=False)
    capped_out, capped_info = compress_only(capped, tmp_path / "capped", progress=False)
    assert [p["rank"] for p in capped_info["layers"]] == [p["rank"] for p in plain_info["layers"]]
    expected, got = load_file(plain_out / "model.safetensors"), load_file(capped_out / "model.safetensors")
    assert got.keys() == expected.keys() and any(k.endswith(".first.weight") for k in got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=1e-5)


def test_a_map_that_keeps_everything_in_host_memory_needs_no_second_copy(tmp_path, plain):
    loaded = load_recipe(write_recipe(tmp_path, {**plain, "model": dict(plain["model"], device_map="cpu")}))
    assert load_for_statistics(loaded, model_location(loaded)) is None


def test_placement_options_need_a_device_map(tmp_path, lm_recipe):
    recipe = {**lm_recipe, "model": dict(lm_recipe["model"], max_memory={"cpu": "6MB"})}
    with pytest.raises(FwsvdError, match="'model.max_memory' only applies with device_map"):
        load_recipe(write_recipe(tmp_path, recipe))


def test_a_cap_that_fits_no_layer_is_a_clear_load_error(tmp_path, plain):
    recipe = _capped(plain, tmp_path)
    recipe["model"]["max_memory"] = {"cpu": "1KB"}
    loaded = load_recipe(write_recipe(tmp_path, recipe))
    with pytest.raises(FwsvdError, match="could not load model .* fit on no device at all"):
        load_for_statistics(loaded, model_location(loaded))
