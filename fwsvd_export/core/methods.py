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
singular Grams never produce inf or NaN. A full Gram is handed on as gathered with its damping
(``GramSide``) and rooted only where the factorization needs it, on the layer's narrower side; when it
still is not positive definite there, an eigenvalue-clipped square root is used instead and the layer's
notes say so. A wider side the pass gathered through the weight (``ProjectedSide``) is never rooted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from ..errors import FwsvdError

if TYPE_CHECKING:  # torch is imported where a method runs: CompressionSpec (and a recipe) reads only the names
    import torch

    from .lowrank import Eigen, Factors, Side
    from .statistics import LayerStats

ASVD_ALPHA = 0.5


@dataclass
class Weighting:
    left: Side = None
    right: Side = None
    notes: list[str] = field(default_factory=list)
    eigen: Eigen | None = None  # set by whoever computes the layer's decomposition and keeps the weighting
    factors: Factors | None = None  # the allocation check's, at a rank at least the one shipped


@dataclass(frozen=True)
class Method:
    name: str
    needs: frozenset[str]
    build: Callable[[LayerStats, float], Weighting]
    summary: str
    # Multiplies a layer's weighted spectrum (given in, out features) so that tails compare across layers.
    spectrum_scale: Callable[[int, int], float] = lambda d_in, d_out: 1.0


def _diagonal(values: torch.Tensor, damping: float, what: str, power: float) -> Weighting:
    """Input side diag(v^power) from per-feature importances v, floored at damping x their mean."""
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
    return Weighting(right=values.clamp(min=floor).pow(power), notes=notes)


def _diagonal_of(gram: torch.Tensor) -> torch.Tensor:
    """A Gram's diagonal, whether it was gathered whole or as its diagonal."""
    return gram if gram.dim() == 1 else gram.diagonal()


def _shift(gram: torch.Tensor, damping: float) -> float:
    """What damping adds to a Gram's diagonal: `damping` x its mean diagonal (1 for an all-zero Gram)."""
    scale = float(_diagonal_of(gram).double().mean())
    return damping * (scale if scale > 0 else 1.0)


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


def _root(damped: torch.Tensor, damping: float, notes: list[str], what: str) -> torch.Tensor:
    """R with R R^T = C: the lower Cholesky factor, or an eigen fallback when C is not PD.
    Any such R gives the same truncation (||R^T M|| = ||C^1/2 M||), and Cholesky costs a small fraction
    of an eigendecomposition; a triangular R also makes the unwhitening a triangular solve (lowrank.py)."""
    import torch

    factor: torch.Tensor
    factor, info = torch.linalg.cholesky_ex(damped)  # torch's linalg bindings are typed as returning Any
    if int(info) == 0 and torch.isfinite(factor).all():
        return factor
    notes.append(f"{what} Gram not positive definite after damping; used eigenvalue-clipped square root")
    values, vectors, _ = _clipped_eigh(damped, damping)
    return vectors * values.sqrt()[None, :]


def _output_root(damped: torch.Tensor, damping: float, notes: list[str]) -> torch.Tensor:
    return _root(damped, damping, notes, "output-gradient").T


def _gram_side(
    gram: torch.Tensor,
    damping: float,
    notes: list[str],
    projected: torch.Tensor | None,
    side: str,
    make_root: Callable[[torch.Tensor], torch.Tensor],
) -> Side:
    """A side from its statistics: the projection W C W^T / W^T G W when the pass gathered it so (beside the
    side's diagonal, which sets the damping), a diagonal from a Gram gathered as its diagonal only, else the
    Gram and its damping, rooted by `make_root` when the factorization needs it (only on the narrower side)."""
    from .lowrank import GramSide, ProjectedSide

    if projected is not None:
        return ProjectedSide(projected, _shift(gram, damping))
    if gram.dim() == 1:
        return _diagonal_root(gram, damping, side, notes)
    return GramSide(gram, _shift(gram, damping), make_root)


def input_side(gram: torch.Tensor, damping: float, notes: list[str], projected: torch.Tensor | None = None) -> Side:
    """Q with Q Q^T = C (damped); a root is C's lower Cholesky factor."""
    root = partial(_root, damping=damping, notes=notes, what="input")
    return _gram_side(gram, damping, notes, projected, "input", root)


def output_side(gram: torch.Tensor, damping: float, notes: list[str], projected: torch.Tensor | None = None) -> Side:
    """P with P^T P = G (damped); a root is the transposed Cholesky factor, upper triangular."""
    return _gram_side(gram, damping, notes, projected, "output", partial(_output_root, damping=damping, notes=notes))


def _needed(stats: LayerStats, name: str) -> torch.Tensor:
    """A statistic the method reads: compress_ keeps dense a layer that lacks one; direct callers are told."""
    value = stats.values.get(name)
    if value is None:
        raise FwsvdError(f"the method needs the '{name}' statistic, which was not gathered for this layer")
    return value


def _svd(stats: LayerStats, damping: float) -> Weighting:
    return Weighting()


def _fwsvd(stats: LayerStats, damping: float) -> Weighting:
    return _diagonal(_needed(stats, "fisher"), damping, "Fisher", 0.5)


def _asvd(stats: LayerStats, damping: float) -> Weighting:
    return _diagonal(_needed(stats, "input_abs"), damping, "activation", ASVD_ALPHA)


def _svd_llm(stats: LayerStats, damping: float) -> Weighting:
    notes: list[str] = []
    return Weighting(right=_input(stats, damping, notes), notes=notes)


def _input(stats: LayerStats, damping: float, notes: list[str]) -> Side:
    return input_side(_needed(stats, "input_gram"), damping, notes, stats.projected_input_gram)


def _kfac(stats: LayerStats, damping: float) -> Weighting:
    notes: list[str] = []
    right = _input(stats, damping, notes)
    output_gram = _needed(stats, "output_gram")
    if float(_diagonal_of(output_gram).sum()) <= 0:
        notes.append("no output-gradient signal; input side only (svd-llm)")
        return Weighting(right=right, notes=notes)
    left = output_side(output_gram, damping, notes, stats.projected_output_gram)
    return Weighting(left=left, right=right, notes=notes)


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
