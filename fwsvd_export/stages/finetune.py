"""Recovery fine-tuning (the paper's "with fine-tuning" setting): a few epochs on the factorized model,
so the factors adapt to each other before export. The objective is the task loss, distillation from the
dense model (no labels needed, so it works on any calibration text), or both. By default only the factors
train; frozen weights get no gradients and no optimizer state.

A fixed short schedule neither converges nor knows when to stop, so the learning rate warms up and then
decays per optimizer step, a seeded held-out slice of the batches is scored after every epoch, training
stops once that score stalls for `patience` epochs, and the best epoch's weights are the ones kept."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import FinetuneSpec
from ..core.batch import Batch
from ..core.lowrank import LowRankLinear, balance_
from ..errors import FwsvdError
from .tasks import Task, run_torch

_NORMS = (nn.LayerNorm,)


@dataclass
class Recovery:
    """What recovery fine-tuning did, epoch by epoch: whether it converged and where it stopped."""

    train_loss: list[float] = field(default_factory=list)  # mean per-sample training loss of each epoch
    heldout_loss: list[float] = field(default_factory=list)  # the same objective on the held-out slice (eval mode)
    learning_rate: list[float] = field(default_factory=list)  # at each epoch's end
    # 1-based: the epoch whose weights were kept; 0: none scored below the start, whose weights were kept
    # (None: no held-out slice, the last epoch's)
    best_epoch: int | None = None
    stopped_early: bool = False  # the held-out loss stalled for `patience` epochs before the last
    heldout_batches: int = 0
    start_loss: float | None = None  # the held-out loss before the first epoch (None: no held-out slice)

    @property
    def epochs_run(self) -> int:
        return len(self.train_loss)


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


def lr_factor(spec: FinetuneSpec, steps: int) -> Callable[[int], float]:
    """The learning rate of optimizer step `step` (0-based) as a fraction of `spec.learning_rate`: a linear
    rise over the warm-up's steps, then `spec.schedule`'s decay to 0 at the last step (constant: none)."""
    warm = round(spec.warmup * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        done = min(1.0, (step - warm) / max(steps - warm, 1))
        if spec.schedule == "linear":
            return 1.0 - done
        if spec.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * done))
        return 1.0

    return factor


def split_holdout(batches: list[Batch], fraction: float, seed: int) -> tuple[list[Batch], list[Batch]]:
    """(training, held-out) batches: `fraction` of them, rounded, drawn by `seed` (the same every run), held
    out; the training batches keep their order. Where the fraction rounds to no batch (the default 0.1 of
    fewer than 6) nothing is held out, so a small recipe still trains (its report says nothing was held out)."""
    count = round(fraction * len(batches))
    if not count:
        return list(batches), []
    if count >= len(batches):
        raise FwsvdError(
            f"'finetune.holdout' {fraction:g} of {len(batches)} fine-tuning batch(es) leaves none to train on: "
            "lower it, set it to 0, or give more rows (data.finetune)"
        )
    held = set(random.Random(f"holdout {seed}").sample(range(len(batches)), count))
    return [b for i, b in enumerate(batches) if i not in held], [b for i, b in enumerate(batches) if i in held]


def finetune_(
    model: nn.Module,
    task: Task,
    batches: list[Batch],
    spec: FinetuneSpec,
    seed: int = 0,
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> Recovery:
    """Train `model` in place and return its curve. Factor pairs are balanced first (same product,
    comparable scales), so the optimizer treats both factors alike. Objectives with distillation need
    `teacher` (the dense model) for their targets. `seed` decides the held-out slice, the batch order and
    the dropout masks: the same call trains the same weights, whatever ran before it in the process."""
    if spec.objective != "task" and teacher is None:
        raise FwsvdError(f"finetune.objective '{spec.objective}' needs the dense model as teacher")
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            balance_(module)
    flags = {p: p.requires_grad for p in model.parameters()}
    params = trainable(model, spec.train)
    if not params:
        raise FwsvdError(f"finetune.train '{spec.train}' leaves nothing to train (no factorized layers)")
    train, heldout = split_holdout(batches, spec.holdout, seed)
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    run = _Run(model, task, spec, teacher, params, optimizer, spec.epochs * len(train))
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with (
            torch.random.fork_rng(devices=cuda),  # dropout drawn from `seed`; the caller's generators untouched
            _checkpointing(model, spec),
            tqdm(
                total=run.steps, desc=f"recovery fine-tuning ({spec.objective})", unit="step", disable=not progress
            ) as bar,
        ):
            torch.manual_seed(seed)
            recovery = run.epochs(train, heldout, random.Random(seed), bar.update)
        _refuse_nonfinite_weights(model, spec)
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.eval()
    return recovery


@dataclass
class _Run:
    """One fine-tuning: the model, what it trains and how; `steps` optimizer steps planned in all."""

    model: nn.Module
    task: Task
    spec: FinetuneSpec
    teacher: nn.Module | None
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    steps: int

    def __post_init__(self) -> None:
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(self.spec, self.steps))
        self.device = next(self.model.parameters()).device

    def epochs(
        self, train: list[Batch], heldout: list[Batch], order: random.Random, tick: Callable[[int], Any]
    ) -> Recovery:
        """Up to `spec.epochs` epochs, stopping once the held-out loss has not improved for `spec.patience`;
        the best epoch's trainable weights (kept on the CPU) are put back at the end. The weights before the
        first epoch compete at the end, not in the patience: training that never gets the held-out loss below
        where it started gives back what it was given, and a first epoch above the start (the warm-up's peak
        learning rate) does not stop a run that is still improving."""
        recovery, best, kept = Recovery(heldout_batches=len(heldout)), math.inf, None
        start = [p.detach().to("cpu", copy=True) for p in self.params] if heldout else None
        if heldout:
            recovery.start_loss = self.score(heldout)
        for epoch in range(1, self.spec.epochs + 1):
            recovery.train_loss.append(self.train_epoch(order.sample(train, len(train)), epoch, tick))
            recovery.learning_rate.append(self.schedule.get_last_lr()[0])
            if not heldout:
                continue
            loss = self.score(heldout)
            recovery.heldout_loss.append(loss)
            if loss < best:
                best, recovery.best_epoch = loss, epoch
                kept = [p.detach().to("cpu", copy=True) for p in self.params]
            elif self.spec.patience and epoch - (recovery.best_epoch or 0) >= self.spec.patience:
                recovery.stopped_early = epoch < self.spec.epochs
                break
        if recovery.start_loss is not None and recovery.start_loss <= best:
            recovery.best_epoch, kept = 0, start
        if kept is not None:
            with torch.no_grad():
                for p, value in zip(self.params, kept, strict=True):
                    p.copy_(value)
        return recovery

    def train_epoch(self, batches: list[Batch], epoch: int, tick: Callable[[int], Any]) -> float:
        """One pass over `batches`, one optimizer and schedule step each; the mean per-sample loss."""
        _student_mode(self.model, self.spec)
        total, samples = 0.0, 0
        for batch in batches:
            batch = batch.to(self.device)
            loss = objective_loss(self.model, self.task, batch, self.spec, self.teacher)
            if not bool(torch.isfinite(loss)):
                raise FwsvdError(
                    f"recovery fine-tuning diverged: the loss became {loss.item()} in epoch {epoch}; "
                    f"lower finetune.learning_rate (now {self.spec.learning_rate:g})"
                )
            self.optimizer.zero_grad(set_to_none=True)
            (loss / batch.samples).backward()
            self.optimizer.step()
            self.schedule.step()
            total += float(loss.detach())
            samples += batch.samples
            tick(1)
        return total / max(samples, 1)

    def score(self, batches: list[Batch]) -> float:
        """The mean per-sample objective on `batches`, in eval mode (no dropout) and without gradients."""
        self.model.eval()
        total, samples = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(self.device)
                total += float(objective_loss(self.model, self.task, batch, self.spec, self.teacher))
                samples += batch.samples
        return total / max(samples, 1)


def _student_mode(model: nn.Module, spec: FinetuneSpec) -> None:
    """Training mode for the task loss (its dropout regularizes). Distillation alone matches the teacher's
    deterministic outputs, so no dropout; transformers checkpoints only in training mode, so with
    gradient checkpointing the model trains with its dropout modules switched off instead."""
    model.train(spec.objective != "distill" or spec.gradient_checkpointing)
    if spec.objective == "distill":
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.eval()


@contextlib.contextmanager
def _checkpointing(model: nn.Module, spec: FinetuneSpec) -> Iterator[None]:
    """Gradient checkpointing for the fine-tuning only, where `spec` asks and the model supports it
    (non-reentrant: frozen embeddings give the checkpointed blocks inputs that need no gradient)."""
    if not spec.gradient_checkpointing:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise FwsvdError(
            f"'finetune.gradient_checkpointing' is true, but {type(model).__name__} does not support "
            "gradient checkpointing: set it to false"
        )
    was_on = bool(getattr(model, "is_gradient_checkpointing", False))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    try:
        yield
    finally:
        if not was_on:
            model.gradient_checkpointing_disable()  # type: ignore[operator]


def _refuse_nonfinite_weights(model: nn.Module, spec: FinetuneSpec) -> None:
    """A finite loss can still leave an inf or NaN in a weight (an overflowing step): refused, not exported."""
    diverged = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if diverged:
        raise FwsvdError(
            f"recovery fine-tuning left non-finite weights in '{diverged[0]}' ({len(diverged)} tensors); "
            f"lower finetune.learning_rate (now {spec.learning_rate:g})"
        )


class _Replay(nn.Module):
    """Stands in for the model where a task reads its outputs (Task.loss, run_torch): one forward of the
    student serves the task term, the distillation term and the hidden states."""

    def __init__(self, outputs: Any) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, **_: Any) -> Any:
        return self.outputs


def objective_loss(
    model: nn.Module, task: Task, batch: Batch, spec: FinetuneSpec, teacher: nn.Module | None
) -> torch.Tensor:
    """The fine-tuning loss of one batch, summed over its samples: the task loss, the distillation loss
    (plus the hidden-state term where asked), or (1 - distill_weight) * task + distill_weight * distill."""
    if spec.objective == "task":
        return task.loss(model, batch)
    assert teacher is not None  # finetune_ refuses a distillation without one
    outputs = model(**batch.inputs, output_hidden_states=spec.hidden_states)
    with torch.no_grad():
        target = teacher.eval()(**batch.inputs, output_hidden_states=spec.hidden_states)
    student = run_torch(_Replay(outputs), task, batch)
    loss = task.distill(student, run_torch(_Replay(target), task, batch), batch, spec.temperature)
    if spec.hidden_states:
        loss = loss + hidden_state_loss(outputs.hidden_states[1:], target.hidden_states[1:], batch)
    if spec.objective == "task+distill":
        loss = (1 - spec.distill_weight) * task.loss(_Replay(outputs), batch) + spec.distill_weight * loss
    return loss


def hidden_state_loss(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], batch: Batch
) -> torch.Tensor:
    """Per sample, the mean over layers of the squared error of the student's hidden states (over the real
    tokens) relative to the teacher's squared norm there, summed over samples: 0 where they agree, 1 where
    the student's states are zero, whatever each layer's scale."""
    total = torch.zeros((), device=student[0].device)
    for s, t in zip(student, teacher, strict=True):
        error, norm = (s.float() - t.float()).pow(2), t.float().pow(2)
        mask = batch.token_mask.to(s.device)
        if error.dim() >= 2 and tuple(error.shape[:2]) == tuple(mask.shape):  # tokens: padding does not count
            weights = mask.reshape(*mask.shape, *[1] * (error.dim() - 2)).to(error.dtype)
            error, norm = error * weights, norm * weights
        total = total + (error.flatten(1).sum(1) / norm.flatten(1).sum(1).clamp(min=1e-12)).sum()
    return total / (len(student) * batch.groups)
