"""One forward+backward pass over calibration data that gathers what the methods need per Linear.

Statistics (accumulated in float32, whatever the model's dtype; the projected Grams below in float64):

- ``fisher``: the paper's row-wise Fisher importance. The per-sample gradient of the task loss with
  respect to W (out, in) is sum_t g_t x_t^T over the sample's tokens, with x the layer input and
  g = dL/dy. Its square, summed over outputs, is computed without materialising it:
  importance_i = sum_{t,t'} (g_t . g_t') x_ti x_t'i. The result is the mean over samples.
- ``input_gram``: mean over real tokens of x x^T (whitening, SVD-LLM; the input side of K-FAC).
- ``output_gram``: mean over real tokens of g g^T (the output side of K-FAC).
- ``input_abs``: mean over real tokens of |x| (activation-aware scaling, ASVD).

A Gram side wider than ``max_gram_size`` is gathered as its diagonal only (a vector). A side the
factorization never roots, the wider one, is needed only as seen through the weight (``lowrank.py``):
W C W^T, the Gram of the layer's own output before its bias, or W^T G W, the Gram of the gradient W^T g
that reaches the layer's input through it. Where that costs fewer multiplications per token
(``_projects``), the side is gathered so, as ``projected_input_gram`` or ``projected_output_gram`` beside
its diagonal (``input_gram`` / ``output_gram`` as vectors, for the damping): exactly the same
factorization, from a Gram of the narrower width. Accumulators live on the host, so a model on an
accelerator does not hold them in device memory. Layers that read the very same input tensor (q/k/v,
gate/up) and gather it in the same form share one input Gram, computed once.

Parameters never get gradients: the input embeddings' output is made to require grad instead, so
the pass holds one micro-batch of activations and the accumulators, never a set of weight gradients.
With ``checkpointing``, each transformer block keeps only its input and recomputes its activations
during the backward pass (non-reentrant ``torch.utils.checkpoint``); forward hooks then fire twice per
block, so statistics of the input are taken in the forward pass only, and the Fisher product meets
its layer input (from the recomputation) and its output gradient in whichever order they arrive.
For text pairs, a sample is the pair, and its "per-sample gradient" is the contribution of the
pair's own activations to the gradient of the in-batch contrastive loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from tqdm.auto import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer

from ..errors import FwsvdError
from . import heap
from .batch import Batch
from .lowrank import linear_weight


@dataclass
class LayerStats:
    """One layer's statistics (means), by name; ``stats.fisher`` reads one, None when not gathered."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0
    tokens: int = 0
    shares_input_with: str | None = None  # another layer whose input (and input statistics) this one reads

    def __getattr__(self, name: str) -> torch.Tensor | None:
        if name in STATISTICS:
            values: dict[str, torch.Tensor] = self.__dict__.get("values", {})
            return values.get(name)
        raise AttributeError(name)


class _State:
    """What the hooks need to know about the batch being processed."""

    mask: torch.Tensor
    real: int = 0  # the batch's real tokens
    padded: bool = False  # whether any token of the batch is padding
    groups: int = 1
    first_batch: bool = True
    in_backward: bool = False  # forward hooks firing now come from a checkpoint recomputation
    recomputed: frozenset[int] = frozenset()  # ids of the modules inside checkpointed blocks
    # (id(input tensor), the forms its statistics take) -> (tensor, the first layer that read it), for this batch;
    # the reference pins the id
    seen: dict[tuple[int, tuple[tuple[str, bool], ...]], tuple[torch.Tensor, _LayerCollector]]

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


def _masks(t: torch.Tensor, state: _State) -> bool:
    """Whether the batch's token mask lays over `t` (rows, tokens..., features) as over the input ids."""
    return state.mask.shape[0] == t.shape[0] and state.mask.numel() * t.shape[-1] == t.numel()


def _real_rows(t: torch.Tensor, state: _State) -> torch.Tensor:
    """The real tokens' rows (tokens, features) in float32: what a Gram or a mean over tokens reads. No
    per-sample layout and no masked copy, so the hook costs one gather at most."""
    flat = t.reshape(-1, t.shape[-1])
    if state.padded and _masks(t, state):
        flat = flat[state.mask.reshape(-1)]
    return flat.float()


def _samples(rows: int, state: _State) -> int:
    return rows // state.groups if state.groups > 1 and rows % state.groups == 0 else rows


def _into(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """Add a batch's part to the host accumulator (the part itself on the first batch)."""
    part = part.cpu()
    return part if total is None else total.add_(part)


def _fisher_rows(total: torch.Tensor | None, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum over samples of sum_out (per-sample grad)^2, for x (n, T, in) and g (n, T, out)."""
    tokens, d_in, d_out = x.shape[1], x.shape[2], g.shape[2]
    if tokens * (d_in + d_out) <= d_in * d_out:
        gram = g @ g.transpose(1, 2)  # (n, T, T)
        return _into(total, ((gram @ x) * x).sum((0, 1)))
    # (n, out, in) materialised: cheaper once T (in + out) > in x out
    return _into(total, (g.transpose(1, 2) @ x).square().sum((0, 1)))


def _block(d: int) -> int:
    """Rows per block of a Gram's triangle: few flops before the blocks' matmuls lose speed
    (benchmarks/statistics_profile.py)."""
    return 128 if d <= 2048 else 256


def _gram(total: torch.Tensor | None, flat: torch.Tensor, full: bool) -> torch.Tensor:
    """x^T x summed. On the host only its upper block triangle is multiplied, straight into the accumulator
    (no temporary): for k row blocks that is (k + 1) / 2k of the flops, where the Grams are most of the pass's
    cost. `_mirrored` completes it at the end; a full Gram (from a device) passes through that unchanged."""
    if not full:
        return _into(total, flat.square().sum(0))
    if flat.device.type != "cpu":
        return _into(total, flat.T @ flat)
    d = flat.shape[1]
    total, block = (flat.new_zeros(d, d) if total is None else total), _block(d)
    for i in range(0, d, block):
        total[i : i + block, i:].addmm_(flat[:, i : i + block].T, flat[:, i:])
    return total


def _gram64(total: torch.Tensor | None, flat: torch.Tensor, full: bool) -> torch.Tensor:
    """A projected Gram: each batch's in float32, summed over batches in float64. Its rows (the layer's output,
    or W^T g) carry float32 rounding of their largest direction's size in every direction, weak ones included,
    where projecting a whole Gram would have scaled it down; a float32 sum over batches would add rounding that
    depends on their order, and two processes' factors would differ in the weakly weighted directions. A batch's
    own Gram is the same in any process."""
    part = _gram(None, flat, full).double()
    return part if total is None else total.add_(part)


def _mirrored(total: torch.Tensor) -> torch.Tensor:
    """The whole symmetric Gram, in place: each block below the diagonal copied from its mirror image above
    (a diagonal-only side is returned as it is)."""
    if total.dim() == 2:
        d, block = total.shape[0], _block(total.shape[0])
        for i in range(0, d - block, block):
            total[i + block :, i : i + block] = total[i : i + block, i + block :].T
    return total


def _abs(total: torch.Tensor | None, flat: torch.Tensor, full: bool) -> torch.Tensor:
    return _into(total, flat.abs().sum(0))


def _as_is(total: torch.Tensor) -> torch.Tensor:
    return total


def _projects(side: str, d_in: int, d_out: int) -> bool:
    """Whether a layer's `side` Gram is gathered through its weight: when that costs fewer multiplications per
    token than the side's own Gram triangle. The input side when it is the wider one (the layer's output is
    already there: out^2 / 2 against in^2 / 2); the output side when out^2 / 2 > in out + in^2 / 2 (W^T g is
    one more product), i.e. out > (1 + sqrt 2) in, as on a transformer's up-projections."""
    if side == "input":
        return d_in > d_out
    return d_out * d_out > 2 * d_in * d_out + d_in * d_in


def _projected(name: str) -> str:
    """The statistic that stands for Gram side `name` when it is gathered through the weight."""
    return f"projected_{name}"


def gathered(needs: Iterable[str], d_in: int, d_out: int, max_gram_size: int) -> dict[str, bool]:
    """The accumulators a layer of (d_in, d_out) gathers for `needs`, each with whether it is a full matrix (else
    a diagonal): a Gram side wider than `max_gram_size` as its diagonal; a projected side as its diagonal and
    its projection."""
    forms: dict[str, bool] = {}
    for name in needs:
        side = _SIDES.get(name)
        if side is None:
            forms[name] = True
            continue
        width = d_in if side == "input" else d_out
        projected = width <= max_gram_size and _projects(side, d_in, d_out)
        forms[name] = width <= max_gram_size and not projected
        if projected:
            forms[_projected(name)] = True
    return forms


@dataclass(frozen=True)
class Statistic:
    """A per-layer calibration statistic. Its accumulator is a sum on the host (float32 unless said), divided at the
    end by the real tokens or the samples seen. `accumulate` gets the accumulator so far (None on the
    first batch) and, by what it `reads`: "input": the real tokens' inputs (tokens, in) and whether the
    Gram side is full; "output": the same for output gradients; "both": per-sample inputs (n, T, in) and
    output gradients (n, T, out). It returns the new accumulator, which `complete` turns into the statistic
    once the pass is over (the Grams keep one triangle until then)."""

    name: str
    # "input" / "output": the real tokens' inputs or output gradients (tokens, features); "layer_output": the
    # layer's output before its bias (tokens, out); "input_gradient": W^T g (tokens, in); "both": below
    reads: Literal["input", "output", "both", "layer_output", "input_gradient"]
    # (total so far, a tensor, a bool or a tensor by `reads`) -> the new total
    accumulate: Callable[[torch.Tensor | None, torch.Tensor, Any], torch.Tensor]
    per: Literal["token", "sample"]
    elements: Callable[[int, int, bool], int]  # accumulator size for (in, out, full)
    complete: Callable[[torch.Tensor], torch.Tensor] = _as_is  # the final sum -> the statistic the methods read
    itemsize: int = 4  # bytes per accumulated value


STATISTICS: dict[str, Statistic] = {
    s.name: s
    for s in (
        Statistic("fisher", "both", _fisher_rows, "sample", lambda i, o, f: i),
        Statistic("input_gram", "input", _gram, "token", lambda i, o, f: i * i if f else i, _mirrored),
        Statistic("output_gram", "output", _gram, "token", lambda i, o, f: o * o if f else o, _mirrored),
        Statistic("input_abs", "input", _abs, "token", lambda i, o, f: i),
        # gathered only beside input_gram / output_gram, where `gathered` projects them: W C W^T and W^T G W
        Statistic("projected_input_gram", "layer_output", _gram64, "token", lambda i, o, f: o * o, _mirrored, 8),
        Statistic("projected_output_gram", "input_gradient", _gram64, "token", lambda i, o, f: i * i, _mirrored, 8),
    )
}
_SIDES = {"input_gram": "input", "output_gram": "output"}


def with_projections(needs: Iterable[str]) -> set[str]:
    """`needs` and the projected Grams that may stand beside them: every statistic a layer of any shape can
    hold for them (what a finiteness check reads)."""
    return {*needs, *(_projected(n) for n in needs if n in _SIDES)}


def statistic_bytes(in_features: int, out_features: int, needs: Iterable[str], max_gram_size: int) -> int:
    """Host memory the accumulators of one layer take."""
    forms = gathered(needs, in_features, out_features, max_gram_size)
    return sum(
        STATISTICS[n].itemsize * STATISTICS[n].elements(in_features, out_features, full) for n, full in forms.items()
    )


class _LayerCollector:
    def __init__(
        self, name: str, module: nn.Module, needs: set[str], state: _State, max_gram_size: int, weights: nn.Module
    ) -> None:
        self.name, self.state, self.stats = name, state, LayerStats()

        out_features, in_features = linear_weight(module).shape
        self.forms = gathered(needs, in_features, out_features, max_gram_size)

        def by_reads(reads: str) -> list[Statistic]:
            return [STATISTICS[n] for n in sorted(self.forms) if STATISTICS[n].reads == reads]

        self.on_input, self.on_output, self.on_both = by_reads("input"), by_reads("output"), by_reads("both")
        self.on_layer_output, self.on_input_gradient = by_reads("layer_output"), by_reads("input_gradient")
        # layers share an input's statistics only when they gather them in the same forms
        self.input_forms = tuple((s.name, self.forms[s.name]) for s in self.on_input)
        self.weights = weights  # whose weight and bias project a side
        self._x: torch.Tensor | None = None
        self._g: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._forward)

    def _add(self, stat: Statistic, a: torch.Tensor, b: Any) -> None:
        self.stats.values[stat.name] = stat.accumulate(self.stats.values.get(stat.name), a, b)

    def _add_rows(self, stats: list[Statistic], rows: torch.Tensor) -> None:
        for stat in stats:
            self._add(stat, rows, self.forms[stat.name])

    def _forward(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        raw = args[0]
        if self.state.in_backward:  # recomputation: the input again, for the input-and-gradient products only
            if self.on_both:
                self._x = raw.detach()
                self._pair_when_ready()
            return
        if self.state.first_batch:
            owner = self.state.seen.get((id(raw), self.input_forms))
            if owner is not None:
                self.stats.shares_input_with = owner[1].name
            else:
                self.state.seen[(id(raw), self.input_forms)] = (raw, self)
        self.stats.tokens += self.state.real if _masks(raw, self.state) else raw.numel() // raw.shape[-1]
        self.stats.samples += _samples(raw.shape[0], self.state)
        if self.stats.shares_input_with is None and self.on_input:
            self._add_rows(self.on_input, _real_rows(raw.detach(), self.state))
        if self.on_layer_output:
            self._add_rows(self.on_layer_output, self._without_bias(_real_rows(output.detach(), self.state)))
        if (self.on_output or self.on_both or self.on_input_gradient) and output.requires_grad:
            if id(module) not in self.state.recomputed:  # else the recomputation brings it back when needed
                self._x = raw.detach()  # a reference, not a copy: layers reading one input share it
            output.register_hook(self._backward)  # type: ignore[no-untyped-call]  # torch leaves it unannotated

    def _without_bias(self, rows: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.weights, "bias", None)
        return rows if bias is None else rows - bias.detach().to(rows.device, torch.float32)

    def _backward(self, grad: torch.Tensor) -> None:
        grad = grad.detach()
        if self.on_output or self.on_input_gradient:
            flat = _real_rows(grad, self.state)
            self._add_rows(self.on_output, flat)
            if self.on_input_gradient:  # g W: each token's W^T g, this layer's part of its input's gradient
                weight = linear_weight(self.weights).to(flat.device, torch.float32)
                self._add_rows(self.on_input_gradient, flat @ weight)
        if self.on_both:
            self._g = _per_sample(grad, self.state)[0]
            self._pair_when_ready()

    def _pair_when_ready(self) -> None:
        if self._x is not None and self._g is not None:
            x = _per_sample(self._x, self.state)[0]
            for stat in self.on_both:
                self._add(stat, x, self._g)
            self._x = self._g = None

    def finish(self) -> LayerStats:
        """Means instead of sums (in place: the sums are this collector's own)."""
        self.handle.remove()
        s = self.stats
        count = {"token": max(s.tokens, 1), "sample": max(s.samples, 1)}
        means = {n: STATISTICS[n].complete(t).div_(count[STATISTICS[n].per]) for n, t in s.values.items()}
        return LayerStats(means, s.samples, s.tokens, s.shares_input_with)


def link_shared_inputs(stats: dict[str, LayerStats]) -> dict[str, LayerStats]:
    """Point each layer that shares its input at the owner's input statistics (one tensor, no copy)."""
    for s in stats.values():
        if s.shares_input_with in stats:
            owner = stats[s.shares_input_with]
            s.values.update({n: v for n, v in owner.values.items() if STATISTICS[n].reads == "input"})
    return stats


def collect_statistics(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[Batch],
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    needs: set[str],
    progress: bool = True,
    max_gram_size: int = 8192,
    checkpointing: bool = False,
    weights: dict[str, nn.Module] | None = None,
) -> dict[str, LayerStats]:
    """Run the calibration pass and return each named layer's statistics. A projected side reads the weight
    and bias of `weights[name]` (the in-memory model's layer, when `model` is a copy offloaded by accelerate,
    whose layers hold theirs only while they run), else of the layer itself."""
    unknown = needs - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}")
    if not needs:
        return {name: LayerStats() for name in layers}
    state = _State()
    collectors = {
        name: _LayerCollector(name, module, needs, state, max_gram_size, (weights or {}).get(name, module))
        for name, module in layers.items()
    }
    backward = any(c.on_output or c.on_both or c.on_input_gradient for c in collectors.values())
    flags = {p: p.requires_grad for p in model.parameters()}
    embeddings = model.get_input_embeddings()  # type: ignore[operator]  # transformers' method, not nn.Module's
    hook = embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    was_training = model.training
    model.eval()
    device = input_device(model)
    try:
        for p in flags:
            p.requires_grad_(False)
        batches = list(batches)
        with _no_kv_cache(model), _checkpointed_blocks(model, checkpointing and backward) as state.recomputed:
            for batch in tqdm(batches, desc="calibration statistics", unit="batch", disable=not progress):
                batch = batch.to(device)
                state.mask, state.groups = batch.token_mask, batch.groups
                state.real = int(batch.token_mask.sum())
                state.padded = state.real < batch.token_mask.numel()
                if backward:
                    loss = loss_fn(model, batch)
                    state.in_backward = True
                    loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
                    state.in_backward = False
                else:
                    with torch.no_grad():
                        loss_fn(model, batch)
                state.first_batch, state.seen = False, {}
                heap.trim()  # this batch's activations, before the next batch scatters among them
    finally:
        hook.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
        stats = link_shared_inputs({name: c.finish() for name, c in collectors.items()})
    return stats


def input_device(model: nn.Module) -> torch.device:
    """Where batches go: the input embeddings' device, or their execution device when accelerate
    keeps their weights offloaded (device_map)."""
    embeddings = model.get_input_embeddings()  # type: ignore[operator]  # transformers' method, not nn.Module's
    hook = getattr(embeddings, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    # a token embedding's weight, or a vision model's patch embedding's first parameter (a convolution)
    return torch.device(device) if device is not None else next(embeddings.parameters()).device


@contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """A scoring pass needs no key/value cache, and a recomputed block must not append to one."""
    config = getattr(model, "config", None)
    saved = getattr(config, "use_cache", None)
    if config is None or saved is None:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = saved


@contextmanager
def _checkpointed_blocks(model: nn.Module, enabled: bool) -> Iterator[frozenset[int]]:
    """Run every transformer block under non-reentrant activation checkpointing, in eval mode
    (transformers' own switch only acts in training mode, where dropout would perturb the statistics).
    Yields the ids of the modules inside those blocks."""
    if not enabled:
        yield frozenset()
        return
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise FwsvdError(
            f"gradient checkpointing: {type(model).__name__} has no transformer blocks that "
            "transformers marks as checkpointable"
        )
    patched = []
    for block in blocks:
        own = block.__dict__.get("forward")  # accelerate installs its hooks as an instance attribute
        inner = block.forward

        def forward(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
            with set_checkpoint_early_stop(False):  # every forward hook must fire again in the recomputation
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        patched.append((block, own))
    try:
        yield frozenset(id(m) for block in blocks for m in block.modules())
    finally:
        for block, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own
