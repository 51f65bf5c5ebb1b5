"""Recovery fine-tuning that converges (finetune.py): the learning-rate schedule, the held-out slice with
early stopping and the best weights restored, the task+distill objective and hidden-state matching,
gradient checkpointing, the keys' checks, and the curve in report.json and report.md. Tiny BERTs built
from configs, trained for real."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import BertConfig, BertForSequenceClassification

from fwsvd_export.cli import main
from fwsvd_export.config import FinetuneSpec
from fwsvd_export.core.batch import Batch
from fwsvd_export.errors import FwsvdError, SpecError
from fwsvd_export.loader import load_recipe
from fwsvd_export.pipeline import run
from fwsvd_export.stages.finetune import _checkpointing, finetune_, hidden_state_loss, objective_loss, split_holdout
from fwsvd_export.stages.tasks import get_task, run_torch

from conftest import write_recipe

TASK = get_task("text-classification")
LR = 1e-2


def tiny_bert(seed: int = 0, dropout: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config).eval()


def batches(count: int, seed: int = 0, label: int | None = None, rows: int = 4, length: int = 8) -> list[Batch]:
    """Random token batches, the last two tokens of the first row padding; labels random or all `label`."""
    gen = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(count):
        ids = torch.randint(1, 64, (rows, length), generator=gen)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[0, -2:] = 0
        labels = torch.randint(0, 3, (rows,), generator=gen) if label is None else torch.full((rows,), label)
        made.append(Batch({"input_ids": ids, "attention_mask": mask}, mask.bool(), labels))
    return made


def spec(**keys) -> FinetuneSpec:
    return FinetuneSpec(**{"epochs": 4, "learning_rate": LR, "train": "all", **keys})


def perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


# --- the schedule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, after_warmup",
    [
        ("cosine", [1.0, 0.75, 0.25, 0.0]),  # 4 of 16 steps warm up; then 0.5 * (1 + cos(pi * done))
        ("linear", [1.0, 2 / 3, 1 / 3, 0.0]),
        ("constant", [1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_the_learning_rate_warms_up_then_decays_per_step(schedule, after_warmup):
    recovery = finetune_(tiny_bert(), TASK, batches(4), spec(schedule=schedule, warmup=0.25, holdout=0), 0, False)
    assert recovery.learning_rate == pytest.approx([LR * f for f in after_warmup], abs=1e-12)
    warm = finetune_(tiny_bert(), TASK, batches(4), spec(schedule=schedule, warmup=0.5, holdout=0), 0, False)
    assert warm.learning_rate[0] == pytest.approx(LR * 5 / 8)  # step 4 of an 8-step warm-up: still rising
    assert warm.learning_rate[1] == pytest.approx(LR)  # the peak, where the warm-up ends
    assert len(recovery.train_loss) == 4 and recovery.heldout_loss == [] and recovery.best_epoch is None


# --- the held-out slice, early stopping, the best state ---------------------------------------------------------


def test_the_heldout_slice_is_seeded_skipped_on_few_batches_and_refused_when_nothing_would_train():
    data = batches(10)
    order = {id(b): i for i, b in enumerate(data)}

    def slice_of(seed: int, fraction: float = 0.2) -> tuple[list[int], list[int]]:
        train, held = split_holdout(data, fraction, seed)
        return [order[id(b)] for b in train], [order[id(b)] for b in held]

    train, held = slice_of(3)
    assert len(held) == 2 and slice_of(3) == (train, held)  # the same slice every time
    assert sorted(train + held) == list(range(10)) and train == sorted(train)
    assert slice_of(4)[1] != held  # another seed, another slice (for these seeds)
    assert slice_of(3, 0.0) == (list(range(10)), [])
    assert split_holdout(data[:4], 0.1, seed=0) == (data[:4], [])  # the default on 4 batches: none held out
    assert split_holdout(data[:5], 0.1, seed=0)[1] == [] and len(split_holdout(data[:6], 0.1, seed=0)[1]) == 1
    with pytest.raises(FwsvdError, match=r"'finetune\.holdout' 0\.9 of 2 fine-tuning batch"):
        split_holdout(data[:2], 0.9, seed=0)


def heldout_loss(model: torch.nn.Module, held: list[Batch], tune: FinetuneSpec) -> float:
    model.eval()
    with torch.no_grad():
        return sum(float(objective_loss(model, TASK, b, tune, None)) for b in held) / sum(b.samples for b in held)


def test_early_stopping_restores_the_best_epochs_weights():
    """A quarter of the held-out rows carry a label the training rows never do: learning the training label
    first lowers the held-out loss (towards predicting it 3 times in 4), then raises it (over-confidence), so
    epoch 2 is the best, training stops `patience` epochs later, and its weights come back."""
    tune = spec(epochs=12, holdout=0.25, patience=2, schedule="constant", warmup=0.0, learning_rate=3e-3)
    data = batches(16, label=0)
    _, held = split_holdout(data, tune.holdout, seed=0)
    for batch in held:  # the same objects finetune_ will hold out with this seed
        batch.labels[:1] = 2
    model = tiny_bert()
    recovery = finetune_(model, TASK, data, tune, 0, False)
    assert recovery.best_epoch == 2 and recovery.stopped_early and len(recovery.train_loss) == 4
    curve = recovery.heldout_loss
    assert recovery.start_loss > curve[0] > curve[1] and curve[3] > curve[2] > curve[1]
    assert recovery.heldout_batches == 4 and len(recovery.learning_rate) == 4
    assert heldout_loss(model, held, tune) == pytest.approx(curve[1], rel=1e-6)
    assert not model.training


def held_out_disagreeing(tune: FinetuneSpec) -> tuple[list[Batch], list[Batch]]:
    """Training rows all of one label, held-out rows all of another: every epoch raises the held-out loss."""
    data = batches(8, label=0)
    _, held = split_holdout(data, tune.holdout, seed=0)
    for batch in held:
        batch.labels = torch.full_like(batch.labels, 2)
    return data, held


def test_training_that_only_raises_the_heldout_loss_gives_back_the_weights_it_started_from():
    tune = spec(epochs=10, holdout=0.25, patience=2, schedule="constant", warmup=0.0)
    data, held = held_out_disagreeing(tune)
    model = tiny_bert()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    recovery = finetune_(model, TASK, data, tune, 0, False)
    assert recovery.best_epoch == 0 and recovery.stopped_early and len(recovery.train_loss) == 3
    assert recovery.heldout_loss[2] > recovery.heldout_loss[1] > recovery.heldout_loss[0] > recovery.start_loss
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    assert heldout_loss(model, held, tune) == pytest.approx(recovery.start_loss, rel=1e-6)


def test_patience_zero_runs_every_epoch_and_still_keeps_the_best():
    tune = spec(epochs=4, holdout=0.25, patience=0, schedule="constant", warmup=0.0)
    data, held = held_out_disagreeing(tune)
    model = tiny_bert()
    recovery = finetune_(model, TASK, data, tune, 0, False)
    assert len(recovery.train_loss) == 4 and not recovery.stopped_early and recovery.best_epoch == 0
    assert heldout_loss(model, held, tune) == pytest.approx(recovery.start_loss, rel=1e-6)


def test_recovery_is_reproducible_whatever_the_process_drew_before_and_leaves_its_generator_alone():
    """Dropout draws from `seed`, not from the process's random state (which torch seeds differently in every
    process): two runs after different draws train the same weights; the caller's generator goes on as if
    the training had not run."""
    curves, states = [], []
    for before in (1, 2):
        model = tiny_bert(dropout=0.3)  # the same weights each time
        torch.manual_seed(before)
        expected_next = torch.get_rng_state()
        recovery = finetune_(model, TASK, batches(8), spec(epochs=2, holdout=0.25), 7, False)
        assert torch.equal(torch.get_rng_state(), expected_next)
        curves.append(recovery.train_loss + recovery.heldout_loss)
        states.append(model.state_dict())
    assert curves[0] == curves[1]
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())


def test_a_converging_run_keeps_its_last_epoch():
    data = batches(8, label=1)  # one label everywhere: held-out loss falls with the training loss
    recovery = finetune_(tiny_bert(), TASK, data, spec(epochs=3, holdout=0.25), 0, False)
    assert recovery.best_epoch == 3 and not recovery.stopped_early
    assert recovery.heldout_loss[-1] < recovery.heldout_loss[0] and recovery.train_loss[-1] < recovery.train_loss[0]


# --- the objectives ---------------------------------------------------------------------------------------------


def test_task_plus_distill_is_the_weighted_sum_of_its_terms():
    teacher, student = tiny_bert(dropout=0.0), perturbed(tiny_bert(dropout=0.0))
    batch = batches(1)[0]
    tune = FinetuneSpec(objective="task+distill", distill_weight=0.3, temperature=2.0)
    combined = objective_loss(student, TASK, batch, tune, teacher)
    with torch.no_grad():
        target = run_torch(teacher, TASK, batch)
    task = TASK.loss(student, batch)
    distill = TASK.distill(run_torch(student, TASK, batch), target, batch, 2.0)
    assert float(task.detach()) > 0 and float(distill.detach()) > 0
    torch.testing.assert_close(combined, 0.7 * task + 0.3 * distill)
    combined.backward()  # one forward serves both terms, and gradients reach the student
    assert student.classifier.weight.grad is not None and teacher.classifier.weight.grad is None


def test_task_plus_distill_training_lowers_both_its_losses():
    """Trained on the combined objective, a student drawn away from its teacher gets closer to both the
    labels and the teacher: each term, measured alone on the training rows, ends lower than it began. The
    labels are the teacher's answers, given with confidence, as a dense model that is right about its rows.
    Either term alone would not do: trained on the task loss only, the distillation term grows (3.6x here); on
    distillation only, the task loss does (1.3x)."""
    teacher, data = tiny_bert(dropout=0.0), batches(6, seed=3)
    with torch.no_grad():
        teacher.classifier.weight.mul_(30)
        for b in data:
            b.labels = teacher(**b.inputs).logits.argmax(-1)
    student = perturbed(teacher, scale=0.2)

    def terms() -> tuple[float, float]:
        with torch.no_grad():
            task = sum(float(TASK.loss(student, b)) for b in data)
            distill = sum(
                float(TASK.distill(run_torch(student, TASK, b), run_torch(teacher, TASK, b), b, 2.0)) for b in data
            )
        return task, distill

    task_before, distill_before = terms()
    tune = spec(epochs=6, objective="task+distill", distill_weight=0.5, holdout=0.0)
    finetune_(student, TASK, data, tune, 0, False, teacher=teacher)
    task_after, distill_after = terms()
    assert task_after < 0.8 * task_before and distill_after < 0.5 * distill_before


def test_hidden_state_matching_is_zero_for_the_teacher_itself_and_positive_otherwise():
    teacher = tiny_bert(dropout=0.0)
    batch = batches(1)[0]
    with torch.no_grad():
        states = teacher(**batch.inputs, output_hidden_states=True).hidden_states[1:]
        other = perturbed(teacher)(**batch.inputs, output_hidden_states=True).hidden_states[1:]
    assert float(hidden_state_loss(states, states, batch)) == 0.0
    assert float(hidden_state_loss(other, states, batch)) > 0.0
    zero = tuple(torch.zeros_like(s) for s in states)  # relative to the teacher's: all wrong scores 1 per sample
    assert float(hidden_state_loss(zero, states, batch)) == pytest.approx(batch.samples)

    matched, plain = (
        FinetuneSpec(objective="distill", hidden_states=True),
        FinetuneSpec(objective="distill"),
    )
    same = copy.deepcopy(teacher)
    with torch.no_grad():
        assert float(objective_loss(same, TASK, batch, matched, teacher)) == pytest.approx(0.0, abs=1e-6)
        student = perturbed(teacher)
        added = objective_loss(student, TASK, batch, matched, teacher) - objective_loss(
            student, TASK, batch, plain, teacher
        )
    assert float(added) == pytest.approx(float(hidden_state_loss(other, states, batch)), rel=1e-5)


def test_distillation_objectives_need_the_teacher():
    with pytest.raises(FwsvdError, match="'task\\+distill' needs the dense model as teacher"):
        finetune_(tiny_bert(), TASK, batches(4), spec(objective="task+distill"), 0, False)


# --- gradient checkpointing ---------------------------------------------------------------------------------------


def _gradients(model: BertForSequenceClassification, tune: FinetuneSpec, batch: Batch) -> tuple[dict, int]:
    """The gradients of one batch's loss and how often the first encoder layer ran forward."""
    calls = []
    hook = model.bert.encoder.layer[0].register_forward_pre_hook(
        lambda *_: calls.append(1)
    )  # a recompute may stop early
    model.zero_grad(set_to_none=True)
    model.train()
    with _checkpointing(model, tune):
        objective_loss(model, TASK, batch, tune, None).backward()
        assert model.is_gradient_checkpointing == tune.gradient_checkpointing
    hook.remove()
    assert not model.is_gradient_checkpointing  # off again after the fine-tuning
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


def test_gradient_checkpointing_gives_the_same_gradients():
    model, batch = tiny_bert(dropout=0.0), batches(1)[0]
    plain, once = _gradients(model, spec(), batch)
    for p in model.parameters():  # frozen embeddings: the checkpointed blocks' inputs need no gradient
        p.requires_grad_(p is not model.bert.embeddings.word_embeddings.weight)
    checkpointed, twice = _gradients(model, spec(gradient_checkpointing=True), batch)
    assert (once, twice) == (1, 2)  # the layer ran again in the backward pass: checkpointing was on
    assert checkpointed.keys() == plain.keys() - {"bert.embeddings.word_embeddings.weight"}
    for name, grad in checkpointed.items():
        torch.testing.assert_close(grad, plain[name], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_is_refused_for_a_model_without_it():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(FwsvdError, match="'finetune.gradient_checkpointing' is true, but Sequential"):
        finetune_(model, TASK, batches(4), spec(gradient_checkpointing=True, holdout=0), 0, False)


def test_fine_tuning_with_checkpointing_trains_by_distillation():
    """Distillation without labels, checkpointed: the decoder setting, here on the tiny BERT."""
    teacher = tiny_bert()
    student = perturbed(teacher, 0.2)
    tune = spec(epochs=3, objective="distill", gradient_checkpointing=True, hidden_states=True)
    data = batches(8)
    for batch in data:
        batch.labels = None
    recovery = finetune_(student, TASK, data, tune, 0, False, teacher=teacher)
    assert recovery.best_epoch is not None and recovery.train_loss[-1] < recovery.train_loss[0]
    assert not student.is_gradient_checkpointing and not student.training


# --- the keys -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys, key",
    [
        ({"holdout": 1.0}, "holdout"),
        ({"holdout": -0.1}, "holdout"),
        ({"warmup": 1.0}, "warmup"),
        ({"distill_weight": 1.5}, "distill_weight"),
        ({"schedule": "exponential"}, "schedule"),
        ({"objective": "distil"}, "objective"),
        ({"patience": -1}, "patience"),
        ({"hidden_states": True}, "hidden_states"),  # with objective task: nothing to match
    ],
)
def test_bad_keys_are_spec_errors_naming_the_key(keys, key):
    with pytest.raises(SpecError) as caught:
        FinetuneSpec(**keys)
    assert caught.value.key == key


@pytest.mark.parametrize(
    "setting, problem",
    [
        ("finetune.holdout=1.0", "'finetune.holdout' must be >= 0 and < 1"),
        ("finetune.distill_weight=1.5", "'finetune.distill_weight' must be between 0 and 1"),
        ("finetune.schedule=step", "'finetune.schedule' must be 'constant' | 'linear' | 'cosine'"),
    ],
)
def test_bad_keys_exit_2_before_anything_runs(tmp_path, classifier_recipe, setting, problem):
    classifier_recipe["finetune"] = {"epochs": 1}
    path = write_recipe(tmp_path, classifier_recipe)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(path), "-o", str(out), "--quiet", "--set", setting])
    assert result.exit_code == 2 and problem in result.output, result.output
    assert not out.exists()


def test_the_new_keys_are_described_in_the_schema():
    result = CliRunner().invoke(main, ["schema"])
    keys = json.loads(result.output)["$defs"]["FinetuneSpec"]["properties"]
    for key in ("schedule", "warmup", "holdout", "patience", "distill_weight", "hidden_states"):
        assert keys[key].get("description"), key
    assert keys["schedule"]["default"] == "cosine" and keys["objective"]["enum"] == ["task", "distill", "task+distill"]
    assert keys["gradient_checkpointing"]["default"] is False and keys["holdout"]["default"] == 0.1


# --- the curve in the report -------------------------------------------------------------------------------------


def recovered_run(tmp_path, recipe: dict, ratio: float):
    """A recipe run with recovery on 40 evaluation rows (2 of 5 batches held out) after a cut at `ratio`."""
    recipe["compression"]["ratio"] = ratio
    recipe["data"]["finetune"] = dict(recipe["data"]["evaluation"], max_samples=40)
    recipe["finetune"] = {
        "epochs": 3,
        "learning_rate": 3e-3,
        "train": "all",
        "objective": "task+distill",
        "hidden_states": True,
        "holdout": 0.4,
        "warmup": 0.2,
    }
    return run(load_recipe(write_recipe(tmp_path, recipe)), tmp_path / "out", progress=False)


@pytest.mark.slow
def test_a_recipe_run_writes_the_curve_into_the_report(tmp_path, classifier_recipe):
    result = recovered_run(tmp_path, classifier_recipe, 0.05)  # below the classifier's true rank: a real loss
    tune = json.loads((result.output / "report.json").read_text())["finetune"]
    ran = len(tune["epoch_loss"])
    assert tune["batches"] == 5 and tune["heldout_batches"] == 2  # 40 rows of 8, 0.4 of them held out
    assert len(tune["heldout_loss"]) == len(tune["learning_rate"]) == ran and 1 <= tune["best_epoch"] <= ran
    assert all(math.isfinite(v) for v in tune["epoch_loss"] + tune["heldout_loss"])
    losses = [tune["start_loss"], *tune["heldout_loss"]]  # the weights before training compete too
    assert tune["best_epoch"] == min(range(ran + 1), key=losses.__getitem__)
    text = (result.output / "report.md").read_text()
    assert "## Recovery fine-tuning" in text and "| epoch | train loss (task+distill) | held-out loss |" in text
    assert f"| 0 | - | {tune['start_loss']:.4g} | - |" in text
    assert f"| {tune['best_epoch']} | " in text and "| best |" in text
    assert f"epoch {tune['best_epoch']}'s weights kept" in text and "(2 of 5 batches held out)" in text
    card = (result.output / "README.md").read_text()
    assert f"epoch {tune['best_epoch']}'s weights kept" in card
    assert result.report.to_dict()["validation"]["providers"]["cpu"]["parity"]["passed"]


@pytest.mark.slow
def test_a_run_whose_training_only_hurts_ships_the_weights_it_started_from(tmp_path, classifier_recipe):
    """At ratio 0.3 the cut keeps the classifier's true rank: the compressed model already matches the dense
    one, and no epoch lowers the held-out loss below where it started; the report says what was kept."""
    result = recovered_run(tmp_path, classifier_recipe, 0.3)
    tune = json.loads((result.output / "report.json").read_text())["finetune"]
    assert tune["best_epoch"] == 0 and len(tune["heldout_loss"]) == 3
    assert tune["start_loss"] < min(tune["heldout_loss"])
    kept = "3 of 3 epochs ran and none lowered the held-out loss below where it started: the weights before training"
    assert kept in (result.output / "report.md").read_text() and kept in (result.output / "README.md").read_text()
    assert f"best held-out loss {tune['start_loss']:.4g}" in (result.output / "README.md").read_text()
