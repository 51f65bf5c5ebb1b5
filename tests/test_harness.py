"""lm-evaluation-harness on exported decoders (stages/harness.py, `fwsvd-export lm-eval`): the windows of
loglikelihood_rolling; the adapter against lm-eval's own Hugging Face model (HFLM) on the same dense tiny
Llama, request by request, and against the tool's own multiple-choice scoring of the same graph; greedy
generation through the key/value cache; the command on a run's folder and on bad input. Offline: the
tasks are YAML files over local JSONL files, written here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from transformers import AutoTokenizer, LlamaForCausalLM

from fwsvd_export.cli import main
from fwsvd_export.errors import FwsvdError
from fwsvd_export.stages.harness import OnnxLM, rolling_windows

from conftest import quick_validation, sentences, write_recipe

SAMPLE = Path(__file__).resolve().parents[1] / "recipes" / "data" / "choice-sample.jsonl"
RECORDS = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        yield


# --- the windows of loglikelihood_rolling (fast) ----------------------------------------------------------
def test_rolling_windows_score_every_token_once_with_the_most_context():
    # lm-eval's documented example: tokens 0..9, window 4: inputs P012 / 3456 / 5678, predicting 0123 / 4567 / 89.
    windows = rolling_windows(list(range(10)), -1, 4)
    assert [(w.context + w.continuation[:-1], w.continuation) for w in windows] == [
        ([-1, 0, 1, 2], [0, 1, 2, 3]),
        ([3, 4, 5, 6], [4, 5, 6, 7]),
        ([5, 6, 7, 8], [8, 9]),
    ]
    for n in range(0, 23):
        for window in range(1, 7):
            tokens = list(range(100, 100 + n))
            ours = rolling_windows(tokens, 7, window)
            assert [t for w in ours for t in w.continuation] == tokens  # each token scored once, in order
            assert all(len(w.context) + len(w.continuation) - 1 <= window and w.context for w in ours)
            theirs = [make_disjoint_window(p) for p in get_rolling_token_windows(tokens, 7, window, 1)]
            assert [(w.context, w.continuation) for w in ours] == [(list(a), list(b)) for a, b in theirs]


# --- bad input (fast) -------------------------------------------------------------------------------------
def test_bad_folders_are_exit_2_naming_them(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["lm-eval", str(tmp_path / "nope"), "--tasks", "arc_easy"])
    assert missing.exit_code == 2 and f"{tmp_path / 'nope'}: no such folder" in missing.output, missing.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no graph here")
    with pytest.raises(FwsvdError, match="no ONNX graph"):
        OnnxLM(tmp_path / "empty")
    zero = runner.invoke(main, ["lm-eval", str(tmp_path / "empty"), "--tasks", "arc_easy", "--batch-size", "0"])
    assert zero.exit_code == 2 and "--batch-size" in zero.output, zero.output


BLOCKED = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Refuse())
import fwsvd_export
from fwsvd_export.cli import main
main(["lm-eval", sys.argv[1], "--tasks", "arc_easy"])
"""


def test_without_the_extra_the_package_imports_and_the_command_says_what_to_install(tmp_path):
    done = subprocess.run([sys.executable, "-c", BLOCKED, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pip install 'fwsvd-export[lm-eval]'" in done.stderr and "Traceback" not in done.stderr


# --- a run of the tool, and the models compared -----------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, llama_dir) -> Path:
    """The tool's multiple-choice run on the tiny Llama over the sample items: onnx/dense and onnx/compressed."""
    folder = tmp_path_factory.mktemp("harness-run")
    source = {"path": str(SAMPLE)}
    recipe = {
        "model": {"path": str(llama_dir), "task": "multiple-choice"},
        "data": {"calibration": source, "evaluation": source, "max_length": 48, "batch_size": 8},
        "compression": {"method": "kfac", "target": [r"layers\.\d+\.(self_attn|mlp)\."], "ratio": 0.5},
        "validation": quick_validation(max_metric_loss=1.0),
    }
    result = CliRunner().invoke(main, ["run", str(write_recipe(folder, recipe)), "-o", str(folder / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    return folder / "out"


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """Three lm-eval tasks over local JSONL files: multiple choice on the sample items, perplexity of long
    documents (loglikelihood_rolling) and greedy generation (generate_until)."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    docs = [" ".join(sentences(12, seed)) for seed in (5, 6, 7)]
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prompts = ["the river is", "once upon a time there was a quiet", "doctor music paper"]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "target": "x"}) + "\n" for p in prompts))
    common = {"dataset_path": "json", "test_split": "test"}

    def data(path: Path) -> dict:
        return {"dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": str(folder / "cache")}}

    tasks = {
        "local_choice": {
            **data(SAMPLE),
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        },
        "local_rolling": {
            **data(folder / "docs.jsonl"),
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        },
        "local_generate": {
            **data(folder / "prompts.jsonl"),
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{target}}",
            "generation_kwargs": {"until": ["zzz"], "max_gen_toks": 6, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        },
    }
    for name, body in tasks.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **common, **body}))
    return folder


@pytest.fixture(scope="module")
def hflm(llama_dir) -> HFLM:
    """lm-eval's own model class on the dense PyTorch model (no special tokens, as the adapter encodes)."""
    model = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(llama_dir), batch_size=3, add_bos_token=False)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def evaluate(model, tasks_dir: Path, tasks: list[str]) -> dict:
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return simple_evaluate(model=model, tasks=tasks, task_manager=manager, log_samples=True)


# --- loglikelihood: the tool's own scoring and lm-eval's HFLM ---------------------------------------------
def tool_loglikelihoods(graph: Path) -> dict[tuple[int, int], float]:
    """(item, choice) -> log-likelihood, as the tool's multiple-choice task scores the sample on `graph`."""
    from onnxruntime import InferenceSession

    from fwsvd_export.config import DataSource
    from fwsvd_export.stages.tasks import TASKS
    from fwsvd_export.stages.validate import run_ort

    task = TASKS["multiple-choice"]
    session = InferenceSession(str(graph / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(graph)
    rows = {}
    for batch in task.make_batches(RECORDS, DataSource(path=str(SAMPLE)), tokenizer, 48, 8, False, None):
        values = task.summary(run_ort(session, task, batch), batch).tolist()
        rows.update({(i, k): v for v, i, k in zip(values, batch.meta["item"], batch.meta["choice"])})
    return rows


@pytest.mark.slow
def test_multiple_choice_through_lm_eval_scores_as_the_tool_and_as_hflm(run_dir, tasks_dir, hflm):
    """acc and acc_norm through lm-eval on the compressed fp32 graph are the run's own (its report, ONNX
    Runtime on CPU), every choice's log-likelihood the tool's to 1e-4; on the dense graph, every request's
    log-likelihood and greedy flag are HFLM's on the dense PyTorch model."""
    graph = run_dir / "onnx" / "compressed"
    results = evaluate(OnnxLM(graph, batch_size=5), tasks_dir, ["local_choice"])
    scores = json.loads((run_dir / "report.json").read_text())["validation"]["providers"]["cpu"]["scores"]
    ours = results["results"]["local_choice"]
    assert (ours["acc,none"], ours["acc_norm,none"]) == pytest.approx((scores["acc"], scores["acc_norm"]))
    tool = tool_loglikelihoods(graph)
    samples = results["samples"]["local_choice"]
    assert len(samples) == len(RECORDS) and len(tool) == sum(len(r["choices"]) for r in RECORDS)
    for sample in samples:
        for k, (value, _) in enumerate(sample["filtered_resps"]):
            assert value == pytest.approx(tool[(sample["doc_id"], k)], abs=1e-4)

    args = [(r["context"], " " + c) for r in RECORDS for c in r["choices"]]
    args += [("", "the river is quiet"), ("a context ending in a space ", "stone"), ("river river", " river river")]
    dense = OnnxLM(run_dir / "onnx" / "dense", batch_size=5)
    got, expected = (
        dense.loglikelihood(requests("loglikelihood", args)),
        hflm.loglikelihood(requests("loglikelihood", args)),
    )
    assert [g[1] for g in got] == [e[1] for e in expected]
    assert max(abs(g[0] - e[0]) for g, e in zip(got, expected)) < 1e-4
    # A context of whitespace only is an empty one once its space moves onto the continuation (HFLM refuses it).
    assert dense.loglikelihood(requests("loglikelihood", [(" ", "stone")])) == dense.loglikelihood(
        requests("loglikelihood", [("", " stone")])
    )


@pytest.mark.slow
def test_rolling_and_generation_tasks_through_lm_eval_match_hflm(run_dir, tasks_dir, hflm):
    """In a window of 32 tokens (each document spans several), the perplexities lm-eval computes from the
    adapter's loglikelihood_rolling are HFLM's, document by document, and so are the generated texts."""
    dense = OnnxLM(run_dir / "onnx" / "dense", batch_size=2, max_length=32)
    reference = HFLM(pretrained=hflm.model, tokenizer=hflm.tokenizer, batch_size=2, max_length=32, add_bos_token=False)
    docs = [json.loads(line)["text"] for line in (tasks_dir / "docs.jsonl").read_text().splitlines()]
    assert min(len(dense.encode(d)) for d in docs) > 3 * 32
    got = dense.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in docs]))
    expected = reference.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in docs]))
    assert got == pytest.approx(expected, rel=1e-5)
    ours, theirs = (evaluate(m, tasks_dir, ["local_rolling", "local_generate"]) for m in (dense, reference))
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["local_rolling"][metric] == pytest.approx(
            theirs["results"]["local_rolling"][metric], rel=1e-5
        )
    texts = [s["filtered_resps"][0] for s in ours["samples"]["local_generate"]]
    assert texts == [s["filtered_resps"][0] for s in theirs["samples"]["local_generate"]] and all(texts)


# --- generate_until: greedy, through the cache --------------------------------------------------------------
@pytest.mark.slow
def test_generate_until_is_greedy_through_the_cache_and_stops_where_told(run_dir, hflm):
    dense = OnnxLM(run_dir / "onnx" / "dense", batch_size=3)
    assert dense.cached and any(n.startswith("past_key_values.") for n in dense.model.input_names)
    calls: list[tuple[int, bool]] = []
    forward = dense.model.forward

    def recording(**kwargs):  # the real graph run, its inputs noted: how many tokens, and whether a cache came
        calls.append((kwargs["input_ids"].shape[1], kwargs.get("past_key_values") is not None))
        return forward(**kwargs)

    dense.model.forward = recording
    prompts = ["the river is", "once upon a time there was a quiet", "doctor"]

    def generate(model, until: list[str], tokens: int, only: list[str] = prompts) -> list[str]:
        calls.clear()
        return model.generate_until(
            requests("generate_until", [(p, {"until": until, "max_gen_toks": tokens}) for p in only])
        )

    expected = generate(hflm, [], 10)  # HFLM first: `calls` then holds the adapter's runs
    free = generate(dense, [], 10)
    assert free == expected and all(len(t.split()) >= 3 for t in free)
    # One run over the three prompts padded on the left, then one token at a time with the cache fed back.
    width = max(len(dense.encode(p)) for p in prompts)
    assert calls == [(width, False)] + [(1, True)] * 9
    expected = generate(hflm, [], 3)
    short = generate(dense, [], 3)
    assert calls == [(width, False), (1, True), (1, True)]  # max_gen_toks: three tokens, three runs
    assert short == expected and all(f.startswith(s) and len(s) < len(f) for s, f in zip(short, free))
    stop = free[1].split()[3]
    expected = generate(hflm, ["never appears", stop], 10, prompts[1:2])
    cut = generate(dense, ["never appears", stop], 10, prompts[1:2])
    assert cut == [free[1][: free[1].index(stop)]] == expected
    assert 1 < len(calls) < 10  # it stopped when the stop string appeared, before max_gen_toks


# --- the command ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_command_scores_a_runs_recommended_graph_and_refuses_bad_input(run_dir, tasks_dir, tmp_path):
    runner = CliRunner()
    saved = tmp_path / "results.json"
    args = ["--include-path", str(tasks_dir), "--limit", "8", "--batch-size", "4"]
    result = runner.invoke(
        main, ["lm-eval", str(run_dir), "--tasks", "local_choice,local_rolling", *args, "--output", str(saved)]
    )
    assert result.exit_code == 0, result.output
    assert (
        f"scored {run_dir / 'onnx' / 'compressed'}: compressed-fp32, which the run's report recommends" in result.output
    )
    for shown in ("|local_choice", "|acc_norm", "|local_rolling", "|word_perplexity", f"results: {saved}"):
        assert shown in result.output, result.output
    results = json.loads(saved.read_text())
    assert (
        results["n-samples"]["local_choice"]["effective"] == 8
        and 0 <= results["results"]["local_choice"]["acc,none"] <= 1
    )
    unknown = runner.invoke(main, ["lm-eval", str(run_dir), "--tasks", "local_choice,no_such_task", *args])
    assert unknown.exit_code == 2 and "unknown lm-eval task 'no_such_task'" in unknown.output, unknown.output
    nowhere = runner.invoke(
        main, ["lm-eval", str(run_dir), "--tasks", "local_choice", "--include-path", str(tmp_path / "x")]
    )
    assert nowhere.exit_code == 2 and f"--include-path {tmp_path / 'x'}: no such" in nowhere.output, nowhere.output


@pytest.mark.slow
def test_a_classifier_graph_is_refused_naming_what_it_is(tmp_path, classifier_dir):
    from transformers import BertForSequenceClassification

    from fwsvd_export.stages.export import export_onnx

    model = BertForSequenceClassification.from_pretrained(classifier_dir).eval()
    export_onnx(model, AutoTokenizer.from_pretrained(classifier_dir), tmp_path / "graph", "text-classification")
    with pytest.raises(FwsvdError, match="not a text-generation graph"):
        OnnxLM(tmp_path / "graph")
