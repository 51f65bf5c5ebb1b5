"""Recovery fine-tuning (the paper's "with fine-tuning" setting): a few epochs on the factorized model,
so the factors adapt to each other before export. The objective is the task loss, or distillation
from the dense model (no labels needed, so it works on any calibration text). By default only the
factors train; frozen weights get no gradients and no optimizer state."""

from __future__ import annotations

import random

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import FinetuneSpec
from ..core.batch import Batch
from ..core.lowrank import LowRankLinear, balance_
from ..errors import FwsvdError
from .tasks import Task, run_torch

_NORMS = (nn.LayerNorm,)


def trainable(model: nn.Module, what: str) -> list[nn.Parameter]:
    """The parameters `what` (factors | factors+norms | all) names; every other one is frozen."""
    chosen: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, LowRankLinear) or (
            what == "factors+norms" and (isinstance(module, _NORMS) or type(module).__name__.endswith("RMSNorm"))
        ):
            chosen += list(module.parameters(recurse=isinstance(module, LowRankLinear)))
    if what == "all":
        chosen = list(model.parameters())
    keep = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return chosen


def finetune_(
    model: nn.Module,
    task: Task,
    batches: list[Batch],
    spec: FinetuneSpec,
    seed: int = 0,
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> list[float]:
    """Train `model` in place; returns the mean per-sample loss of each epoch. Factor pairs are
    balanced first (same product, comparable scales), so the optimizer treats both factors alike.
    With ``objective: distill``, `teacher` (the dense model) gives the targets."""
    if spec.objective == "distill" and teacher is None:
        raise FwsvdError("finetune.objective 'distill' needs the dense model as teacher")
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            balance_(module)
    flags = {p: p.requires_grad for p in model.parameters()}
    params = trainable(model, spec.train)
    if not params:
        raise FwsvdError(f"finetune.train '{spec.train}' leaves nothing to train (no factorized layers)")
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    steps = spec.epochs * len(batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(steps, 1))
    order = random.Random(seed)
    history = []
    model.train(spec.objective == "task")  # distillation matches the teacher's deterministic outputs: no dropout
    try:
        with tqdm(
            total=steps, desc=f"recovery fine-tuning ({spec.objective})", unit="step", disable=not progress
        ) as bar:
            for _ in range(spec.epochs):
                total, samples = 0.0, 0
                for batch in order.sample(batches, len(batches)):
                    batch = batch.to(device)
                    loss = objective_loss(model, task, batch, spec, teacher)
                    if not bool(torch.isfinite(loss)):
                        raise FwsvdError(
                            f"recovery fine-tuning diverged: the loss became {loss.item()} in epoch "
                            f"{len(history) + 1}; lower finetune.learning_rate (now {spec.learning_rate:g})"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    (loss / batch.samples).backward()
                    optimizer.step()
                    schedule.step()
                    total += float(loss.detach())
                    samples += batch.samples
                    bar.update(1)
                history.append(total / max(samples, 1))
        _refuse_nonfinite_weights(model, spec)
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.eval()
    return history


def _refuse_nonfinite_weights(model: nn.Module, spec: FinetuneSpec) -> None:
    """A finite loss can still leave an inf or NaN in a weight (an overflowing step): refused, not exported."""
    diverged = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if diverged:
        raise FwsvdError(
            f"recovery fine-tuning left non-finite weights in '{diverged[0]}' ({len(diverged)} tensors); "
            f"lower finetune.learning_rate (now {spec.learning_rate:g})"
        )


def objective_loss(
    model: nn.Module, task: Task, batch: Batch, spec: FinetuneSpec, teacher: nn.Module | None
) -> torch.Tensor:
    """The fine-tuning loss of one batch, summed over its samples."""
    if spec.objective == "task":
        return task.loss(model, batch)
    with torch.no_grad():
        target = run_torch(teacher.eval(), task, batch)
    return task.distill(run_torch(model, task, batch), target, batch, spec.temperature)
