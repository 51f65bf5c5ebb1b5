"""One forward+backward pass over calibration data that gathers what the methods need per Linear.

Statistics (all accumulated in float32, whatever the model's dtype):

- ``fisher``: the paper's row-wise Fisher importance. The per-sample gradient of the task loss with
  respect to W (out, in) is sum_t g_t x_t^T over the sample's tokens, with x the layer input and
  g = dL/dy. Its square, summed over outputs, is computed without materialising it:
  importance_i = sum_{t,t'} (g_t . g_t') x_ti x_t'i. The result is the mean over samples.
- ``input_gram``: mean over real tokens of x x^T (whitening, SVD-LLM; the input side of K-FAC).
- ``output_gram``: mean over real tokens of g g^T (the output side of K-FAC).
- ``input_abs``: mean over real tokens of |x| (activation-aware scaling, ASVD).

A Gram side wider than ``max_gram_size`` is gathered as its diagonal only (a vector). Accumulators
live on the host, so a model on an accelerator does not hold them in device memory. Layers that read
the very same input tensor (q/k/v, gate/up) share one input Gram, computed once.

Parameters never get gradients: the input embeddings' output is made to require grad instead, so
the pass holds one micro-batch of activations and the accumulators, never a set of weight gradients.
For text pairs, a sample is the pair, and its "per-sample gradient" is the contribution of the
pair's own activations to the gradient of the in-batch contrastive loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .factorize import linear_weight
from .tasks import Batch

STATISTICS = ("fisher", "input_gram", "output_gram", "input_abs")


@dataclass
class LayerStats:
    fisher: Optional[torch.Tensor] = None  # (in,)
    input_gram: Optional[torch.Tensor] = None  # (in, in)
    output_gram: Optional[torch.Tensor] = None  # (out, out)
    input_abs: Optional[torch.Tensor] = None  # (in,)
    samples: int = 0
    tokens: int = 0
    shares_input_with: Optional[str] = None  # another layer whose input (and input Gram) this one reads


class _State:
    """What the hooks need to know about the batch being processed."""

    mask: torch.Tensor
    groups: int = 1
    first_batch: bool = True
    seen: dict  # id(input tensor) -> (tensor, layer name), for this batch; the reference pins the id

    def __init__(self) -> None:
        self.seen = {}


def _per_sample(t: torch.Tensor, state: _State) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape a layer input/output to (samples, tokens, features) and a matching 0/1 token mask."""
    rows = t.shape[0]
    t = t.reshape(rows, -1, t.shape[-1]).float()
    mask = state.mask if state.mask.shape == t.shape[:2] else torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
    t = t * mask.unsqueeze(-1).to(t.dtype)
    if state.groups > 1 and rows % state.groups == 0:
        n = rows // state.groups
        t = t.view(state.groups, n, *t.shape[1:]).transpose(0, 1).reshape(n, -1, t.shape[-1])
        mask = mask.view(state.groups, n, -1).transpose(0, 1).reshape(n, -1)
    return t, mask


def _fisher_rows(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum over samples of sum_out (per-sample grad)^2, for x (n, T, in) and g (n, T, out)."""
    tokens, d_in, d_out = x.shape[1], x.shape[2], g.shape[2]
    if tokens * (d_in + d_out) <= d_in * d_out:
        gram = g @ g.transpose(1, 2)  # (n, T, T)
        return ((gram @ x) * x).sum((0, 1))
    return (g.transpose(1, 2) @ x).square().sum((0, 1))  # (n, out, in) materialised: cheaper once T (in + out) > in x out


def _gram(flat: torch.Tensor, full: bool) -> torch.Tensor:
    return flat.T @ flat if full else flat.square().sum(0)


class _LayerCollector:
    def __init__(self, name: str, module: nn.Module, needs: set[str], state: _State, max_gram_size: int) -> None:
        self.name, self.needs, self.state, self.stats = name, needs, state, LayerStats()
        out_features, in_features = linear_weight(module).shape
        self.full_in, self.full_out = in_features <= max_gram_size, out_features <= max_gram_size
        self._x: Optional[torch.Tensor] = None
        self.handle = module.register_forward_hook(self._forward)

    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.cpu()
        current = getattr(self.stats, name)
        setattr(self.stats, name, value if current is None else current.add_(value))

    def _forward(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        raw = args[0]
        if self.state.first_batch:
            owner = self.state.seen.get(id(raw))
            if owner is not None:
                self.stats.shares_input_with = owner[1].name
            else:
                self.state.seen[id(raw)] = (raw, self)
        x, mask = _per_sample(raw.detach(), self.state)
        flat = x.reshape(-1, x.shape[-1])[mask.reshape(-1)]
        self.stats.tokens += flat.shape[0]
        self.stats.samples += x.shape[0]
        if self.stats.shares_input_with is None:
            if "input_gram" in self.needs:
                self._add("input_gram", _gram(flat, self.full_in))
            if "input_abs" in self.needs:
                self._add("input_abs", flat.abs().sum(0))
        if {"fisher", "output_gram"} & self.needs and output.requires_grad:
            self._x = x
            output.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        g, mask = _per_sample(grad.detach(), self.state)
        if "fisher" in self.needs:
            self._add("fisher", _fisher_rows(self._x, g))
        if "output_gram" in self.needs:
            flat = g.reshape(-1, g.shape[-1])[mask.reshape(-1)]
            self._add("output_gram", _gram(flat, self.full_out))
        self._x = None

    def finish(self) -> LayerStats:
        """Means instead of sums."""
        self.handle.remove()
        s = self.stats
        tokens, samples = max(s.tokens, 1), max(s.samples, 1)
        result = LayerStats(
            fisher=None if s.fisher is None else s.fisher / samples,
            input_gram=None if s.input_gram is None else s.input_gram / tokens,
            output_gram=None if s.output_gram is None else s.output_gram / tokens,
            input_abs=None if s.input_abs is None else s.input_abs / tokens,
            samples=s.samples, tokens=s.tokens, shares_input_with=s.shares_input_with,
        )
        return result


def link_shared_inputs(stats: dict[str, LayerStats]) -> dict[str, LayerStats]:
    """Point each layer that shares its input at the owner's input statistics (one tensor, no copy)."""
    for s in stats.values():
        if s.shares_input_with in stats:
            owner = stats[s.shares_input_with]
            s.input_gram, s.input_abs = owner.input_gram, owner.input_abs
    return stats


def collect_statistics(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[Batch],
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    needs: set[str],
    progress: bool = True,
    max_gram_size: int = 8192,
) -> dict[str, LayerStats]:
    """Run the calibration pass and return each named layer's statistics."""
    unknown = needs - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}")
    if not needs:
        return {name: LayerStats() for name in layers}
    state = _State()
    collectors = {name: _LayerCollector(name, module, needs, state, max_gram_size) for name, module in layers.items()}
    backward = bool({"fisher", "output_gram"} & needs)
    flags = {p: p.requires_grad for p in model.parameters()}
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for p in flags:
            p.requires_grad_(False)
        batches = list(batches)
        for batch in tqdm(batches, desc="calibration statistics", unit="batch", disable=not progress):
            batch = batch.to(device)
            state.mask, state.groups = batch.token_mask, batch.groups
            if backward:
                loss_fn(model, batch).backward()
            else:
                with torch.no_grad():
                    loss_fn(model, batch)
            state.first_batch, state.seen = False, {}
    finally:
        hook.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
        stats = link_shared_inputs({name: c.finish() for name, c in collectors.items()})
    return stats
