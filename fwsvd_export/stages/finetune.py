"""Recovery fine-tuning (the paper's "with fine-tuning" setting): a few epochs of the task loss on the
factorized model, so the factors adapt to each other before export."""
from __future__ import annotations

import random

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.batch import Batch
from ..core.factorize import LowRankLinear, balance_
from ..recipe import FinetuneSpec
from .tasks import Task


def finetune_(model: nn.Module, task: Task, batches: list[Batch], spec: FinetuneSpec, seed: int = 0,
              progress: bool = True) -> list[float]:
    """Train `model` in place; returns the mean per-sample loss of each epoch. Factor pairs are
    balanced first (same product, comparable scales), so the optimizer treats both factors alike."""
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            balance_(module)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=spec.learning_rate, weight_decay=spec.weight_decay)
    steps = spec.epochs * len(batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(steps, 1))
    order = random.Random(seed)
    history = []
    model.train()
    try:
        with tqdm(total=steps, desc="recovery fine-tuning", unit="step", disable=not progress) as bar:
            for _ in range(spec.epochs):
                total, samples = 0.0, 0
                for batch in order.sample(batches, len(batches)):
                    batch = batch.to(device)
                    loss = task.loss(model, batch)
                    optimizer.zero_grad(set_to_none=True)
                    (loss / batch.samples).backward()
                    optimizer.step()
                    schedule.step()
                    total += float(loss.detach())
                    samples += batch.samples
                    bar.update(1)
                history.append(total / max(samples, 1))
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return history
