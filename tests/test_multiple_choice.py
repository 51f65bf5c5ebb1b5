"""Zero-shot multiple choice for decoders (lm-evaluation-harness's acc and acc_norm): hand-worked scores,
lm-eval's tokenization, bad records, and a run whose ONNX artifacts choose as the compressed PyTorch model."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaForCausalLM

from fwsvd_export.cli import main
from fwsvd_export.config import DataSource
from fwsvd_export.core.batch import Batch
from fwsvd_export.errors import FwsvdError
from fwsvd_export.stages.tasks import TASKS, run_torch
from fwsvd_export.stages.tasks.multiple_choice import continuation, encode_pair, loglikelihoods, picks

from conftest import mc_recipe, write_recipe

SAMPLE = Path(__file__).resolve().parents[1] / "recipes" / "data" / "choice-sample.jsonl"
TASK = TASKS["multiple-choice"]


def rows_batch(lls: list[float], items: list[int], choices: list[int], sizes: list[int], labels: list[int]):
    return torch.tensor(lls, dtype=torch.float64), Batch(
        {"input_ids": torch.zeros(len(lls), 1, dtype=torch.long)},
        torch.ones(len(lls), 1, dtype=torch.bool),
        meta={"item": items, "choice": choices, "bytes": sizes, "label": labels},
    )


def test_acc_and_acc_norm_by_hand_where_the_lengths_change_the_choice():
    # Item 0: choices of 2 and 20 bytes, log-likelihoods -4 and -10: acc picks 0 (-4 > -10), acc_norm picks 1
    # (-10/20 = -0.5 > -4/2 = -2); label 1, so acc 0 and acc_norm 1.
    # Item 1 (its rows split over two batches, out of order): -1 (5 bytes), -3 (5), -2 (5): both pick 0 = label.
    # Item 2: -6 (3 bytes), -6 (6 bytes): a tie for acc goes to the first (0); acc_norm picks 1 (-1 > -2); label 0.
    first = rows_batch([-4.0, -10.0, -2.0], [0, 0, 1], [0, 1, 2], [2, 20, 5], [1, 1, 0])
    second = rows_batch([-1.0, -3.0, -6.0, -6.0], [1, 1, 2, 2], [0, 1, 0, 1], [5, 5, 3, 6], [0, 0, 0, 0])
    summaries, batches = [first[0], second[0]], [first[1], second[1]]
    assert picks(summaries, batches) == {0: (1, 0, 1), 1: (0, 0, 0), 2: (0, 0, 1)}
    assert TASK.score(summaries, batches, None) == {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(2 / 3)}
    # Items 1 and 2 alone: acc 1.0 (both 0), acc_norm 0.5.
    only = rows_batch([-1.0, -3.0, -2.0, -6.0, -6.0], [1, 1, 1, 2, 2], [0, 1, 2, 0, 1], [5, 5, 5, 3, 6], [0] * 5)
    assert TASK.score([only[0]], [only[1]], None) == {"acc": 1.0, "acc_norm": 0.5}


def test_the_choice_joins_the_context_as_lm_eval_joins_it(tokenizer):
    assert continuation("The sun rises in the", "east") == ("The sun rises in the", " east")
    assert continuation("The sun rises in the ", "east") == ("The sun rises in the", " east")
    assert continuation("Answer:", " Paris") == ("Answer:", " Paris")
    head, tail = encode_pair(tokenizer, "The sun rises in the", "east")
    assert tokenizer.decode(head) == "the sun rises in the" and tokenizer.decode(tail) == "east"


def test_loglikelihood_is_the_sum_over_the_choice_tokens_only(tokenizer):
    source = DataSource(path="x.jsonl")
    records = [{"context": "the river is quiet", "choices": ["morning", "silver window"], "label": 1}]
    batches = TASK.make_batches(records, source, tokenizer, 32, 8, False, None)
    (batch,) = batches
    assert batch.meta == {"item": [0, 0], "choice": [0, 1], "bytes": [7, 13], "label": [1, 1]}
    ids = batch.inputs["input_ids"]
    context = len(tokenizer("the river is quiet", add_special_tokens=False)["input_ids"])
    assert (batch.labels[:, :context] == -100).all()
    assert (
        batch.inputs["attention_mask"][0].sum() == context + 1
        and batch.inputs["attention_mask"][1].sum() == context + 2
    )
    torch.manual_seed(0)
    logits = torch.randn(2, ids.shape[1], tokenizer.vocab_size)
    logprobs = torch.log_softmax(logits, -1)
    expected = [
        float(logprobs[0, context - 1, ids[0, context]]),
        float(logprobs[1, context - 1, ids[1, context]] + logprobs[1, context, ids[1, context + 1]]),
    ]
    assert loglikelihoods(logits, batch).tolist() == pytest.approx(expected, abs=1e-5)
    calibration = TASK.make_batches(records, source, tokenizer, 32, 8, True, None)
    assert len(calibration) == 1 and calibration[0].inputs["input_ids"].shape[0] == 1  # the correct choice only
    assert (calibration[0].labels[0] == calibration[0].inputs["input_ids"][0]).all()  # every token: the LM loss


def test_a_long_context_loses_its_head_and_a_too_long_choice_is_refused(tokenizer):
    source = DataSource(path="x.jsonl")
    context = " ".join(["river"] * 40)
    (batch,) = TASK.make_batches(
        [{"context": context, "choices": ["stone", "market"], "label": 0}], source, tokenizer, 16, 8, False, None
    )
    assert batch.inputs["input_ids"].shape == (2, 16)
    with pytest.raises(FwsvdError, match="choice 1 is"):
        TASK.make_batches(
            [{"context": "a", "choices": ["b", " ".join(["stone"] * 20)], "label": 0}],
            source,
            tokenizer,
            16,
            8,
            False,
            None,
        )


@pytest.mark.parametrize(
    "line, message",
    [
        (
            {"context": "The sun rises in the", "choices": ["east", "west"], "label": 2},
            "label 2 in column 'label' is outside",
        ),
        ({"context": "The sun rises in the", "choices": [], "label": 0}, "at least two choices"),
        ({"context": "The sun rises in the", "choices": "east", "label": 0}, "must hold a list of strings"),
        ({"context": "The sun rises in the", "label": 0}, "no value in column 'choices'"),
    ],
)
def test_bad_records_are_exit_2_naming_file_and_line(tmp_path, llama_dir, line, message):
    data = tmp_path / "items.jsonl"
    good = {"context": "Bees make honey, and cows give us", "choices": ["milk", "wool"], "label": 0}
    data.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    recipe = write_recipe(tmp_path, mc_recipe(llama_dir, data))
    result = CliRunner().invoke(main, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"{data}:2" in result.output and message in result.output, result.output


def test_a_missing_column_is_exit_2_naming_the_file(tmp_path, llama_dir):
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps({"context": "The sun rises in the", "options": ["east", "west"], "label": 0}) + "\n")
    result = CliRunner().invoke(
        main, ["run", str(write_recipe(tmp_path, mc_recipe(llama_dir, data))), "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and f"{data}: no column 'choices'" in result.output, result.output


def item_choices(run, batches) -> list[int]:
    """acc's choice of every item, in order, from a model's summaries on the evaluation batches."""
    with torch.no_grad():
        chosen = picks([TASK.summary(run(b), b) for b in batches], batches)
    return [chosen[i][1] for i in sorted(chosen)]


@pytest.mark.slow
def test_multiple_choice_end_to_end_onnx_artifacts_choose_as_pytorch(tmp_path, llama_dir, tokenizer):
    """The sample's items labelled with the dense tiny Llama's own choices (a random model is at chance on
    the true answers): dense acc 1.0, and the compressed model's acc is its agreement with the original.
    Every ONNX artifact is then scored on the same batches, item by item, against the compressed PyTorch
    model the run saved."""
    from onnxruntime import InferenceSession

    from fwsvd_export.stages.validate import run_ort

    records = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    source = DataSource(path=str(SAMPLE))
    batches = TASK.make_batches(records, source, tokenizer, 48, 8, False, None)
    dense = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    own = item_choices(lambda b: run_torch(dense, TASK, b), batches)
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(dict(r, label=k)) + "\n" for r, k in zip(records, own)))
    recipe = mc_recipe(llama_dir, data, max_metric_loss=1.0, max_quantization_loss=1.0)
    recipe["export"] = {"precisions": ["fp32", "int8", "int4"]}
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(write_recipe(tmp_path, recipe)), "-o", str(out)])
    assert result.exit_code == 0, result.output  # parity compares the real tokens, not the right padding
    validation = json.loads((out / "report.json").read_text())["validation"]
    assert validation["metric"] == "acc"
    assert validation["providers"]["cpu"]["parity"]["max_abs_error"] < 1e-3
    assert validation["scores"]["original_torch"]["acc"] == 1.0
    torch_acc = validation["scores"]["compressed_torch"]["acc"]
    cpu = validation["providers"]["cpu"]
    assert (
        cpu["scores"]["acc"] == torch_acc
        and cpu["scores"]["acc_norm"] == validation["scores"]["compressed_torch"]["acc_norm"]
    )
    for precision in ("int8", "int4"):
        measured = validation["variants"][f"compressed-{precision}"]["cpu"]
        assert measured["status"] == "measured", measured
        # The target: within 1 point of PyTorch's acc (on 24 items, the same acc; measured: the same choice on every item)
        assert abs(measured["scores"]["acc"] - torch_acc) <= 0.01, (precision, measured["scores"])
    # Item by item: the saved compressed model in PyTorch and every ONNX artifact through ONNX Runtime.
    from fwsvd_export import load

    compressed = load(out / "compressed").eval()
    expected = item_choices(lambda b: run_torch(compressed, TASK, b), batches)
    assert sum(a == b for a, b in zip(expected, own)) / len(own) == pytest.approx(torch_acc)
    differ = {}
    for folder in ("compressed", "compressed-int8", "compressed-int4"):
        session = InferenceSession(str(out / "onnx" / folder / "model.onnx"), providers=["CPUExecutionProvider"])
        got = item_choices(partial(run_ort, session, TASK), batches)
        differ[folder] = sum(a != b for a, b in zip(got, expected))
    assert differ["compressed"] == 0, differ  # fp32: every item's choice the same
    assert differ["compressed-int8"] <= 1 and differ["compressed-int4"] <= 1, differ
    print(
        json.dumps(
            {
                "compressed_torch": validation["scores"]["compressed_torch"],
                "onnx_fp32": cpu["scores"],
                **{p: validation["variants"][f"compressed-{p}"]["cpu"]["scores"] for p in ("int8", "int4")},
                "items_differing_from_torch": differ,
            }
        )
    )
