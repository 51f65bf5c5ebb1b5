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
from transformers import AutoModel, AutoTokenizer

from fwsvd_export.cli import guarded
from fwsvd_export.config import DataSource
from fwsvd_export.core import CompressionSpec, compress_, distributed, gather_statistics, plan_layers
from fwsvd_export.stages.tasks import TASKS

from conftest import RECIPES, TAGS, mc_recipe, ner_recipe, qa_recipe, recipe_for_classifier, sentences, write_recipe

pytestmark = pytest.mark.slow  # end to end: the fast subset (-m 'not slow') leaves it out

NEEDS = {"fisher", "input_gram", "output_gram"}


def _tagged(words: list[str]) -> dict:
    """A token-classification record whose tags spread over the model's labels (the loss's targets only)."""
    return {"tokens": words, "tags": [TAGS[(i * 3) % len(TAGS)] if i % 2 else "O" for i in range(len(words))]}


# Each kind of model the statistics are gathered for: its task, its calibration records, their columns, the
# batch size (each makes at least 4 batches, so each process scores several).
KINDS = {
    "encoder": (
        "text-classification",
        lambda: [{"text": t, "label": i % 3} for i, t in enumerate(sentences(40, 5))],
        DataSource(label_column="label"),
        8,
    ),
    "decoder": ("text-generation", lambda: [{"text": t} for t in sentences(120, 6)], DataSource(), 4),
    "tagger": ("token-classification", lambda: [_tagged(t.split()) for t in sentences(40, 5)], DataSource(), 8),
}


def _setup(kind: str, folder: str):
    torch.manual_seed(0)
    name, records, source, batch_size = KINDS[kind]
    task = TASKS[name]
    model = task.auto_class.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batches = task.make_batches(records(), source, tokenizer, 24, batch_size, True, model.config)
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


def _two_processes(rank: int, folders: dict[str, str], out: str) -> None:
    sys.stderr = open(f"{out}/stderr.{rank}", "w", buffering=1)
    _join(rank, f"{out}/rdv")
    encoder = folders["encoder"]
    try:
        for kind, folder in folders.items():
            model, layers, batches, loss = _setup(kind, folder)
            stats, _ = gather_statistics(model, layers, NEEDS, CompressionSpec(), batches, loss, False)
            torch.save({n: (s.values, s.samples, s.tokens) for n, s in stats.items()}, f"{out}/stats-{kind}.{rank}")
        for name, spec in _specs(f"{out}/cache").items():
            torch.save(_compress(spec, encoder), f"{out}/{name}.{rank}")
        _fault_in_shard_1(encoder)
    finally:  # the group is this function's to leave (the package leaves alone a group it did not make)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def folders(bert_dir, llama_dir, tagger) -> dict[str, str]:
    """The model folder of each of KINDS."""
    return {"encoder": str(bert_dir), "decoder": str(llama_dir), "tagger": str(tagger / "model")}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, folders) -> tuple[Path, list]:
    """One launch of two gloo processes (each start costs seconds): statistics of each of KINDS, the
    encoder compressed with each spec, then a fault in process 1's shard. The folder of their outputs,
    and their exit codes."""
    out = tmp_path_factory.mktemp("two-processes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FWSVD_COLLECTIVE_TIMEOUT_S", "20")  # a process left waiting fails after 20 s
        context = mp.spawn(_two_processes, args=(folders, str(out)), nprocs=2, join=False)
    for process in context.processes:
        process.join(300)
        if process.is_alive():
            process.kill()
    return out, [p.exitcode for p in context.processes]


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_gloo_processes_gather_the_single_process_statistics(two_processes, kind, folders):
    model, layers, batches, loss = _setup(kind, folders[kind])
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


# A recipe of each task run under torchrun, from the fixtures its own tests use (by name), with kfac's
# statistics (the ones gathered across processes) and the metric gate opened: equality is what is checked.
TORCHRUN = {
    "text-classification": lambda get: recipe_for_classifier(get("classifier_dir"), get("data_dir")),
    "token-classification": lambda get: ner_recipe(get("tagger"), max_metric_loss=1.0),
    "question-answering": lambda get: qa_recipe(get("qa_dir"), get("qa_data"), max_metric_loss=1.0),
    "multiple-choice": lambda get: mc_recipe(
        get("llama_dir"), RECIPES / "data" / "choice-sample.jsonl", max_metric_loss=1.0
    ),
}


def _run(tmp_path: Path, recipe: Path, out: str, *launcher: str) -> None:
    """`fwsvd_export run` of the recipe into tmp_path/out, under `launcher`'s python arguments (none: one
    process)."""
    run = ("-m", "fwsvd_export", "run", str(recipe), "-o", str(tmp_path / out), "--quiet")
    command = [sys.executable, *launcher, *run]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("task", list(TORCHRUN))
def test_torchrun_run_writes_only_from_rank_0_and_matches_one_process(tmp_path, request, task):
    recipe = TORCHRUN[task](request.getfixturevalue)
    recipe["compression"]["method"] = "kfac"
    path = write_recipe(tmp_path, recipe)
    port = str(_free_port())
    torchrun = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1")
    _run(tmp_path, path, "two", *torchrun, "--master-port", port)
    _run(tmp_path, path, "one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "recipe.yaml", "two"]  # rank 1 wrote nothing
    two, one = (json.loads((tmp_path / f / "report.json").read_text()) for f in ("two", "one"))
    factorization = two["compression"]["factorization"]
    assert factorization["processes"] == 2 and min(factorization["layers_per_process"]) >= 1
    assert one["compression"]["factorization"]["processes"] == 1
    a, b = (safetensors.torch.load_file(tmp_path / f / "compressed" / "model.safetensors") for f in ("two", "one"))
    assert a.keys() == b.keys() and any(k.endswith(".first.weight") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    scores = two["validation"]["scores"]
    assert scores.keys() == one["validation"]["scores"].keys()
    assert two["validation"]["metric"] in scores["compressed_torch"]
    for run, values in scores.items():
        assert values == pytest.approx(one["validation"]["scores"][run], rel=1e-3, abs=1e-4), run
