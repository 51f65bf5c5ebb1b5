"""The method registry: each method turns a layer's calibration statistics into the two side weights
P (output side) and Q (input side) of the weighted factorization in ``lowrank.py``.

| method  | minimises                         | statistics          | reference |
|---------|-----------------------------------|---------------------|-----------|
| svd     | ||W - W'||                        | none                | Eckart-Young |
| fwsvd   | ||(W - W') diag(sqrt(fisher))||   | per-sample Fisher   | Hsu et al., ICLR 2022 |
| asvd    | ||(W - W') diag(mean|x|^alpha)||  | input magnitudes    | Yuan et al., 2023 (ASVD) |
| svd-llm | ||(W - W') L||, C = L L^T         | input Gram C        | Wang et al., 2024 (SVD-LLM) |
| kfac    | ||R^T (W - W') L||, G = R R^T     | input and output-gradient Grams | Kronecker-factored Fisher |

kfac contains the others: G = I gives svd-llm; a diagonal input side with G = I gives fwsvd.
Every weight is damped by `damping` times its mean diagonal, so zero-importance features and
singular Grams never produce inf or NaN; when a Gram still is not positive definite, an
eigenvalue-clipped square root is used instead and the layer's notes say so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import FwsvdError

if TYPE_CHECKING:  # torch is imported where a method runs: CompressionSpec (and a recipe) reads only the names
    import torch

    from .lowrank import Side
    from .statistics import LayerStats

ASVD_ALPHA = 0.5


@dataclass
class Weighting:
    left: Side = None
    right: Side = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Method:
    name: str
    needs: frozenset[str]
    build: Callable[[LayerStats, float], Weighting]
    summary: str
    # Multiplies a layer's weighted spectrum (given in, out features) so that tails compare across layers.
    spectrum_scale: Callable[[int, int], float] = lambda d_in, d_out: 1.0


def _diagonal(values: torch.Tensor, damping: float, what: str) -> Weighting:
    import torch

    values = values.double().clamp(min=0)
    mean = float(values.mean())
    if not torch.isfinite(values).all():  # compress_ refuses such statistics first; direct callers get told too
        raise FwsvdError(f"the {what} statistics hold NaN or infinite values")
    if mean <= 0:
        return Weighting(notes=[f"no {what} signal; plain SVD"])
    floor = damping * mean
    notes = []
    low = int((values < floor).sum())
    if low:
        notes.append(f"{low} input features with {what} below {damping:g} x mean were floored")
    return Weighting(right=values.clamp(min=floor), notes=notes)


def _damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    import torch

    gram = gram.double()
    gram = (gram + gram.T) / 2
    scale = float(gram.diagonal().mean())
    if scale <= 0:
        scale = 1.0
    return gram + damping * scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def _clipped_eigh(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Eigen-decomposition with eigenvalues below damping x their mean raised to that floor."""
    import torch

    values, vectors = torch.linalg.eigh(gram)
    floor = max(damping * float(values.clamp(min=0).mean()), 1e-12)
    return values.clamp(min=floor), vectors, bool((values < floor).any())


def _diagonal_root(diag: torch.Tensor, damping: float, side: str, notes: list[str]) -> torch.Tensor:
    notes.append(f"{side} side wider than max_gram_size: diagonal weighting")
    diag = diag.double().clamp(min=0)
    return (diag + damping * max(float(diag.mean()), 1e-12)).sqrt()


def _root(gram: torch.Tensor, damping: float, notes: list[str], what: str) -> torch.Tensor:
    """R with R R^T = C (damped): the lower Cholesky factor, or an eigen fallback when C is not PD.
    Any such R gives the same truncation (||R^T M|| = ||C^1/2 M||), and Cholesky costs a small fraction
    of an eigendecomposition; a triangular R also makes the unwhitening a triangular solve (lowrank.py)."""
    import torch

    damped = _damped(gram, damping)
    factor: torch.Tensor
    factor, info = torch.linalg.cholesky_ex(damped)  # torch's linalg bindings are typed as returning Any
    if int(info) == 0 and torch.isfinite(factor).all():
        return factor
    notes.append(f"{what} Gram not positive definite after damping; used eigenvalue-clipped square root")
    values, vectors, _ = _clipped_eigh(damped, damping)
    return vectors * values.sqrt()[None, :]


def input_root(gram: torch.Tensor, damping: float, notes: list[str]) -> torch.Tensor:
    """Q with Q Q^T = C (damped): lower triangular, or a diagonal from a Gram gathered as its diagonal."""
    if gram.dim() == 1:
        return _diagonal_root(gram, damping, "input", notes)
    return _root(gram, damping, notes, "input")


def output_root(gram: torch.Tensor, damping: float, notes: list[str]) -> torch.Tensor:
    """P with P^T P = G (damped): upper triangular (the transposed Cholesky factor), or a diagonal."""
    if gram.dim() == 1:
        return _diagonal_root(gram, damping, "output", notes)
    return _root(gram, damping, notes, "output-gradient").T


def _needed(stats: LayerStats, name: str) -> torch.Tensor:
    """A statistic the method reads: compress_ keeps dense a layer that lacks one; direct callers are told."""
    value = stats.values.get(name)
    if value is None:
        raise FwsvdError(f"the method needs the '{name}' statistic, which was not gathered for this layer")
    return value


def _svd(stats: LayerStats, damping: float) -> Weighting:
    return Weighting()


def _fwsvd(stats: LayerStats, damping: float) -> Weighting:
    w = _diagonal(_needed(stats, "fisher"), damping, "Fisher")
    if w.right is not None:
        w.right = w.right.sqrt()
    return w


def _asvd(stats: LayerStats, damping: float) -> Weighting:
    w = _diagonal(_needed(stats, "input_abs"), damping, "activation")
    if w.right is not None:
        w.right = w.right.pow(ASVD_ALPHA)
    return w


def _svd_llm(stats: LayerStats, damping: float) -> Weighting:
    notes: list[str] = []
    return Weighting(right=input_root(_needed(stats, "input_gram"), damping, notes), notes=notes)


def _kfac(stats: LayerStats, damping: float) -> Weighting:
    notes: list[str] = []
    right = input_root(_needed(stats, "input_gram"), damping, notes)
    output_gram = _needed(stats, "output_gram")
    out_diag = output_gram if output_gram.dim() == 1 else output_gram.diagonal()
    if float(out_diag.sum()) <= 0:
        notes.append("no output-gradient signal; input side only (svd-llm)")
        return Weighting(right=right, notes=notes)
    return Weighting(left=output_root(output_gram, damping, notes), right=right, notes=notes)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("svd", frozenset(), _svd, "plain truncated SVD"),
        # The row importance sums the Fisher over outputs; its mean over outputs estimates the loss.
        Method(
            "fwsvd",
            frozenset({"fisher"}),
            _fwsvd,
            "the paper's row-wise Fisher weighting",
            lambda d_in, d_out: d_out**-0.5,
        ),
        Method("asvd", frozenset({"input_abs"}), _asvd, "activation-magnitude input scaling"),
        Method("svd-llm", frozenset({"input_gram"}), _svd_llm, "input whitening with the Cholesky factor of X^T X"),
        Method("kfac", frozenset({"input_gram", "output_gram"}), _kfac, "two-sided Kronecker-factored Fisher"),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise FwsvdError(f"unknown compression method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
