"""Data-parallel statistics on torch.distributed (gloo on CPU): two processes, each scoring half of the
calibration batches, end with the single-process statistics; under torchrun only rank 0 writes."""
import os
import socket
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from fwsvd_export.core import CompressionSpec, gather_statistics, plan_layers
from fwsvd_export.recipe import DataSource
from fwsvd_export.stages.tasks import TASKS

from conftest import sentences, write_recipe

NEEDS = {"fisher", "input_gram", "output_gram"}


def _setup(kind: str, folder: str):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if kind == "encoder":
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        task = TASKS["text-classification"]
        records = [{"text": t, "label": i % 3} for i, t in enumerate(sentences(40, 5))]
        batches = task.make_batches(records, DataSource(label_column="label"), tokenizer, 24, 8, True, model.config)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        task = TASKS["text-generation"]
        records = [{"text": t} for t in sentences(120, 6)]
        batches = task.make_batches(records, DataSource(), tokenizer, 24, 4, True, model.config)
    layers = {p.name: model.get_submodule(p.name) for p in plan_layers(model, CompressionSpec())}
    return model, layers, batches, task.loss


def _rank(rank: int, kind: str, folder: str, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        model, layers, batches, loss = _setup(kind, folder)
        stats, info = gather_statistics(model, layers, NEEDS, CompressionSpec(), batches, loss, False)
        torch.save({n: (s.values, s.samples, s.tokens) for n, s in stats.items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_two_gloo_processes_gather_the_single_process_statistics(tmp_path, kind, bert_dir, llama_dir):
    folder = str(bert_dir if kind == "encoder" else llama_dir)
    model, layers, batches, loss = _setup(kind, folder)
    assert len(batches) >= 4
    single, _ = gather_statistics(model, layers, NEEDS, CompressionSpec(), batches, loss, False)
    mp.spawn(_rank, args=(kind, folder, str(tmp_path / "rdv"), str(tmp_path / "stats")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"stats.{r}") for r in (0, 1)]
    for name, s in single.items():
        for values, samples, tokens in (r[name] for r in ranks):
            assert (samples, tokens) == (s.samples, s.tokens)
            for stat in NEEDS:
                error = (values[stat] - s.values[stat]).norm() / s.values[stat].norm()
                assert error <= 1e-5, (name, stat, float(error))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_run_writes_only_from_rank_0_and_matches_one_process(tmp_path, classifier_recipe):
    classifier_recipe["compression"]["method"] = "kfac"
    recipe = write_recipe(tmp_path, classifier_recipe)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "fwsvd_export", "run", str(recipe), "-o", str(tmp_path / "two"),
               "--quiet"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "fwsvd_export", "run", str(recipe), "-o", str(tmp_path / "one"), "--quiet"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "recipe.yaml", "two"]  # rank 1 wrote nothing
    a, b = (safetensors.torch.load_file(tmp_path / f / "compressed" / "model.safetensors") for f in ("two", "one"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
