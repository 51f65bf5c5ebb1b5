"""Data-parallel compression on torch.distributed (gloo on CPU): two processes, each scoring half of the
calibration batches, end with the single-process statistics; each factorizes part of the layers and
rank 0 ends with the single-process model; a fault in one process's shard stops both with its error;
under torchrun only rank 0 writes."""

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from fwsvd_export.cli import guarded
from fwsvd_export.config import DataSource
from fwsvd_export.core import CompressionSpec, compress_, distributed, gather_statistics, plan_layers
from fwsvd_export.stages.tasks import TASKS

from conftest import sentences, write_recipe

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out

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


def _join(rank: int, rendezvous: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2, timeout=distributed.collective_timeout()
    )


def _specs(cache: str) -> dict[str, CompressionSpec]:
    """Uniform ranks; a global budget with its allocation check; uniform again from a cache that the
    first of two runs stores and the second hits (rank 0 reads it and sends it on)."""
    return {
        "uniform": CompressionSpec(method="kfac", ratio=0.5),
        "budget": CompressionSpec(method="kfac", budget=0.5, rank_multiple=4),
        "store": CompressionSpec(method="kfac", ratio=0.5, cache_dir=cache),
        "hit": CompressionSpec(method="kfac", ratio=0.5, cache_dir=cache),
    }


def _compress(spec: CompressionSpec, folder: str) -> tuple[dict, dict]:
    model, _, batches, loss = _setup("encoder", folder)
    result = compress_(model, spec, batches, loss, progress=False).to_dict()
    return {k: v.clone() for k, v in model.state_dict().items()}, result


def _fault_in_shard_1(folder: str) -> None:
    """Feature extraction calibrates on text pairs; the second batch holds single texts, and only
    process 1 scores it. The command line's error handling ends the process."""
    model = AutoModel.from_pretrained(folder).eval()
    task = TASKS["feature-extraction"]
    records = [{"text": a, "pair": b} for a, b in zip(sentences(16, 7), sentences(16, 8))]
    batches = task.make_batches(
        records, DataSource(text_pair_column="pair"), AutoTokenizer.from_pretrained(folder), 24, 4, True, model.config
    )
    batches[1] = replace(batches[1], groups=1)
    guarded(compress_)(model, CompressionSpec(method="fwsvd"), batches, task.loss, progress=False)


def _two_processes(rank: int, encoder: str, decoder: str, out: str) -> None:
    sys.stderr = open(f"{out}/stderr.{rank}", "w", buffering=1)
    _join(rank, f"{out}/rdv")
    try:
        for kind, folder in (("encoder", encoder), ("decoder", decoder)):
            model, layers, batches, loss = _setup(kind, folder)
            stats, _ = gather_statistics(model, layers, NEEDS, CompressionSpec(), batches, loss, False)
            torch.save({n: (s.values, s.samples, s.tokens) for n, s in stats.items()}, f"{out}/stats-{kind}.{rank}")
        for name, spec in _specs(f"{out}/cache").items():
            torch.save(_compress(spec, encoder), f"{out}/{name}.{rank}")
        _fault_in_shard_1(encoder)
    finally:  # the group is this function's to leave (the package leaves alone a group it did not make)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, bert_dir, llama_dir) -> tuple[Path, list]:
    """One launch of two gloo processes (each start costs seconds): statistics of the encoder and the
    decoder, the encoder compressed with each spec, then a fault in process 1's shard. The folder of
    their outputs, and their exit codes."""
    out = tmp_path_factory.mktemp("two-processes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FWSVD_COLLECTIVE_TIMEOUT_S", "20")  # a process left waiting fails after 20 s
        context = mp.spawn(_two_processes, args=(str(bert_dir), str(llama_dir), str(out)), nprocs=2, join=False)
    for process in context.processes:
        process.join(300)
        if process.is_alive():
            process.kill()
    return out, [p.exitcode for p in context.processes]


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_two_gloo_processes_gather_the_single_process_statistics(two_processes, kind, bert_dir, llama_dir):
    model, layers, batches, loss = _setup(kind, str(bert_dir if kind == "encoder" else llama_dir))
    assert len(batches) >= 4
    single, _ = gather_statistics(model, layers, NEEDS, CompressionSpec(), batches, loss, False)
    ranks = [torch.load(two_processes[0] / f"stats-{kind}.{r}") for r in (0, 1)]
    for name, s in single.items():
        for values, samples, tokens in (r[name] for r in ranks):
            assert (samples, tokens) == (s.samples, s.tokens)
            for stat in NEEDS:
                error = (values[stat] - s.values[stat]).norm() / s.values[stat].norm()
                assert error <= 1e-5, (name, stat, float(error))


def test_two_gloo_processes_factorize_parts_and_rank_0_gets_the_single_process_model(two_processes, bert_dir, tmp_path):
    """kfac with uniform ranks, with a checked global budget and from the statistics cache: each process
    factorizes some layers, rank 0 installs all of them and equals one process; the other's model stays dense."""
    out, _ = two_processes
    for name, spec in _specs(str(tmp_path / "cache")).items():
        single, plan = _compress(spec, str(bert_dir))
        (first, result), (second, lent) = (torch.load(out / f"{name}.{r}") for r in (0, 1))
        ranks = [(p["name"], p["rank"]) for p in plan["layers"]]
        assert [(p["name"], p["rank"]) for p in result["layers"]] == ranks
        assert [(p["name"], p["rank"]) for p in lent["layers"]] == ranks
        assert first.keys() == single.keys() and any(k.endswith(".first.weight") for k in first)
        for key in single:
            torch.testing.assert_close(first[key], single[key], rtol=1e-3, atol=1e-4, msg=f"{name} {key}")
        assert not any(k.endswith(".first.weight") for k in second)  # factorized for rank 0, installed there only
        for p, q in zip(result["layers"], plan["layers"]):
            assert p["notes"] == q["notes"]
            assert (p["weighted_error"] is None) == (q["weighted_error"] is None)
            if p["weighted_error"] is not None:
                assert abs(p["weighted_error"] - q["weighted_error"]) <= 1e-3 * q["weighted_error"] + 1e-6
        counts = result["factorization"]["layers_per_process"]
        assert result["factorization"]["processes"] == 2 and min(counts) >= 1
        assert sum(counts) == result["summary"]["compressed_layers"]
        assert plan["factorization"] == {"processes": 1, "layers_per_process": [plan["summary"]["compressed_layers"]]}
        if name == "budget":
            assert result["allocation"]["winner"] == plan["allocation"]["winner"]
        if name in ("store", "hit"):
            assert result["statistics"]["cache"].startswith(name if name == "hit" else "stored")


def test_a_fault_in_one_process_shard_stops_both_with_its_error(two_processes):
    out, exits = two_processes
    errors = [(out / f"stderr.{r}").read_text() for r in (0, 1)]
    assert exits == [2, 2], errors  # bad input, on both
    assert "error: feature-extraction calibration batches must hold text pairs" in errors[1]
    assert (
        "error: process 1 of 2, calibration statistics of its shard: feature-extraction calibration batches "
        "must hold text pairs"
    ) in errors[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_run_writes_only_from_rank_0_and_matches_one_process(tmp_path, classifier_recipe):
    classifier_recipe["compression"]["method"] = "kfac"
    recipe = write_recipe(tmp_path, classifier_recipe)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "fwsvd_export",
        "run",
        str(recipe),
        "-o",
        str(tmp_path / "two"),
        "--quiet",
    ]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "fwsvd_export", "run", str(recipe), "-o", str(tmp_path / "one"), "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "recipe.yaml", "two"]  # rank 1 wrote nothing
    factorization = json.loads((tmp_path / "two" / "report.json").read_text())["compression"]["factorization"]
    assert factorization["processes"] == 2 and min(factorization["layers_per_process"]) >= 1
    a, b = (safetensors.torch.load_file(tmp_path / f / "compressed" / "model.safetensors") for f in ("two", "one"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
