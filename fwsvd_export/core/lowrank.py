"""Weighted low-rank factorization of one Linear layer: the math shared by every method.

A PyTorch Linear computes y = W x + b with W of shape (out, in). Every method here minimises a
two-sided weighted error ||P (W - W') Q||_F over rank-r W', where P (out side) and Q (in side) are
invertible weights built from calibration statistics (see ``methods.py``). The minimiser is
W' = P^-1 [P W Q]_r Q^-1; with U S V^T = svd(P W Q) the layer becomes two Linears:

    first  (in -> r, no bias):   S_r V_r^T Q^-1
    second (r -> out, has b):    P^-1 U_r

In the paper's notation (W_paper = W^T, x as a row vector) the first factor is A = I^-1 U_r S_r and the
second is B = V_r^T, with Q = I = diag(sqrt(Fisher importance per input feature)) and P = identity.

The SVD is taken as the eigendecomposition of M^T M (when in <= out) or M M^T, M = P W Q, on the
narrower side: a k x k problem, k = min(in, out), at a fraction of an SVD's cost on wide layers. Only
the narrower side needs a root: with G = P^T P and C = Q Q^T,

    in <= out:  M^T M = Q^T (W^T G W) Q,   P^-1 U_r S_r = W Q V_r
    in > out:   M M^T = P (W C W^T) P^T,   S_r V_r^T Q^-1 = U_r^T P W

so a side given by its Gram (``GramSide``) is never rooted when it is the wider one, which skips the
costliest step on wide layers (a Cholesky of the 4864-wide MLP side on Qwen2.5-0.5B). The wider side
enters only as W^T G W or W C W^T, so it can be gathered as that narrow Gram to begin with
(``ProjectedSide``), which also skips its product with the weight. Squaring costs
precision only below sqrt(eps) x the top singular value: float64 keeps the spectrum's tail energy and the
kept subspace far below the factors' float32 rounding. All of it runs in float64 but a projected side's
damping term (``ProjectedSide.middle``); the factors are cast back to the layer's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# Layers that compute y = W x + b: nn.Linear, and GPT-2's Conv1D, which stores W transposed.
LINEAR_TYPES = (nn.Linear, Conv1D)


@dataclass
class GramSide:
    """A full side weight given by its Gram, G = P^T P (output side) or C = Q Q^T (input side): the calibration
    statistic itself, never copied (a check that keeps every layer's weighting holds no float64 side), with
    `shift` added to its diagonal (the damping). `make_root` takes the root P or Q of the shifted matrix when a
    factorization needs it, once: only on the layer's narrower side."""

    gram: torch.Tensor
    shift: float
    make_root: Callable[[torch.Tensor], torch.Tensor]
    _root: torch.Tensor | None = field(default=None, repr=False)

    def matrix(self) -> torch.Tensor:
        """The shifted Gram, a new float64 tensor."""
        shifted = self.gram.to(torch.float64, copy=True)
        shifted.diagonal().add_(self.shift)
        return shifted

    def times(self, m: torch.Tensor) -> torch.Tensor:
        """(gram + shift I) @ m, in float64."""
        return torch.addmm(m, self.gram.double(), m, beta=self.shift)

    def root(self) -> torch.Tensor:
        if self._root is None:
            self._root = self.make_root(self.matrix())
        return self._root


@dataclass
class ProjectedSide:
    """A layer's wider side as seen through its weight: `gram` is W C W^T (input side, in > out) or W^T G W
    (output side, in < out), gathered so by the statistics pass, and `shift` the damping of the side's own
    diagonal, which projects to shift x W W^T (or W^T W). All that a factorization needs of a side it never
    roots."""

    gram: torch.Tensor
    shift: float

    def middle(self, weight: torch.Tensor, input_side: bool) -> torch.Tensor:
        """W (C + shift I) W^T (input side) or W^T (G + shift I) W, in float64. The damping's W W^T (or
        W^T W), the costliest product of a wide layer's factorization, is taken in the weight's own precision
        (at least float32): exact inputs for a float32 layer, and float32 rounding of a term `damping` times
        smaller in the mean than the gathered Gram, which carries float32 rounding of its own."""
        w = weight if weight.dtype == torch.float64 else weight.float()
        a, b = (w, w.T) if input_side else (w.T, w)
        if self.gram.shape != (a.shape[0], b.shape[1]):
            raise ValueError(f"a projected side of shape {tuple(self.gram.shape)} for a {tuple(weight.shape)} weight")
        return self.gram.to(torch.float64, copy=True).add_(a @ b, alpha=self.shift)


# A side weight: None (identity), a vector (diagonal root), a square root matrix, a Gram, or a projected Gram.
Side = torch.Tensor | GramSide | ProjectedSide | None


class LowRankLinear(nn.Module):
    """A Linear replaced by two thinner ones; exports to ONNX as two MatMuls (plus the bias Add)."""

    def __init__(
        self,
        in_features: int,
        rank: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.rank, self.out_features = in_features, rank, out_features
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.second(self.first(x))  # nn.Module.__call__ is typed as returning Any
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}"


def balance_(module: LowRankLinear) -> None:
    """Rescale each rank component so its row of `first` and column of `second` have equal norms.
    The product is unchanged; weighted methods (G^-1/2, I^-1) can leave the factors orders of magnitude
    apart, which per-parameter optimizers such as Adam then update at very different relative rates."""
    with torch.no_grad():
        rows = module.first.weight.norm(dim=1)
        cols = module.second.weight.norm(dim=0)
        scale = torch.where((rows > 0) & (cols > 0), (cols / rows.clamp(min=1e-30)).sqrt(), torch.ones_like(rows))
        module.first.weight.mul_(scale[:, None])
        module.second.weight.div_(scale[None, :])


@dataclass
class Factors:
    first: torch.Tensor  # (rank, in)
    second: torch.Tensor  # (out, rank)
    singular_values: torch.Tensor  # full weighted spectrum, float64, for error estimates


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a Linear or a Conv1D (whose stored weight is (in, out))."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    weight = weight.detach()
    return weight.T if isinstance(module, Conv1D) else weight


def nonfinite(t: torch.Tensor) -> str:
    """'' when every value is finite, else how many are NaN and how many infinite: what every check that
    refuses a non-finite weight, statistic or factor says. A finite sum proves every value finite (a NaN or an
    infinity makes any sum NaN or infinite), at a twentieth of the cost of testing each value, which is
    left for a sum that overflowed or a tensor that holds one."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
        return ""
    nan = int(torch.isnan(t).sum())
    return f"{nan} NaN and {t.numel() - nan - int(torch.isfinite(t).sum())} infinite values"


def break_even_rank(in_features: int, out_features: int) -> float:
    """Ranks at or above this store at least as many weights as the dense matrix."""
    return in_features * out_features / (in_features + out_features)


def rank_for_ratio(in_features: int, out_features: int, ratio: float) -> int:
    """The largest rank whose two factors keep at most `ratio` of the dense weight count."""
    return max(1, int(ratio * in_features * out_features // (in_features + out_features)))


def pays_off(in_features: int, out_features: int, rank: int) -> bool:
    return rank < break_even_rank(in_features, out_features)


Root = torch.Tensor | None  # a side's root: None (identity), a vector (diagonal) or a square matrix


def _left_apply(side: Root, m: torch.Tensor) -> torch.Tensor:
    if side is None:
        return m
    return side[:, None] * m if side.dim() == 1 else side @ m


def _right_apply(m: torch.Tensor, side: Root) -> torch.Tensor:
    if side is None:
        return m
    return m * side[None, :] if side.dim() == 1 else m @ side


def _transposed(side: Root) -> Root:
    return side.T if side is not None and side.dim() == 2 else side


def _upper(side: torch.Tensor) -> bool | None:
    """True / False when a square side is upper / lower triangular (methods give Cholesky factors), else None."""
    if torch.equal(side, side.triu()):
        return True
    return False if torch.equal(side, side.tril()) else None


def _solve(side: torch.Tensor, m: torch.Tensor, left: bool) -> torch.Tensor:
    """side^-1 @ m (left) or m @ side^-1: a triangular solve for a Cholesky factor, else LU."""
    upper = _upper(side)
    solved: torch.Tensor  # torch's linalg bindings are typed as returning Any
    if upper is None:
        solved = torch.linalg.solve(side, m, left=left)
    else:
        solved = torch.linalg.solve_triangular(side, m, upper=upper, left=left)
    return solved


def _left_solve(side: Root, m: torch.Tensor) -> torch.Tensor:
    """side^-1 @ m"""
    if side is None:
        return m
    return m / side[:, None] if side.dim() == 1 else _solve(side, m, left=True)


def _right_solve(m: torch.Tensor, side: Root) -> torch.Tensor:
    """m @ side^-1"""
    if side is None:
        return m
    return m / side[None, :] if side.dim() == 1 else _solve(side, m, left=False)


def _root(side: Side) -> Root:
    if isinstance(side, ProjectedSide):
        raise ValueError("a projected side is the layer's wider side, which the factorization never roots")
    return side.root().double() if isinstance(side, GramSide) else _f64(side)


def _output_middle(weight: torch.Tensor, side: Side) -> torch.Tensor:
    """W^T G W with G = P^T P, from whichever form the output side has, in float64."""
    if isinstance(side, ProjectedSide):
        return side.middle(weight, input_side=False)
    w = weight.double()
    if isinstance(side, GramSide):
        return w.T @ side.times(w)
    root = _f64(side)
    return w.T @ _left_apply(_transposed(root), _left_apply(root, w))


def _input_middle(weight: torch.Tensor, side: Side) -> torch.Tensor:
    """W C W^T with C = Q Q^T, from whichever form the input side has, in float64."""
    if isinstance(side, ProjectedSide):
        return side.middle(weight, input_side=True)
    w = weight.double()
    if isinstance(side, GramSide):
        return side.times(w.T).T @ w.T  # C is symmetric
    root = _f64(side)
    return _right_apply(_right_apply(w, root), _transposed(root)) @ w.T


def _narrow_gram(weight: torch.Tensor, left: Side, right: Side) -> torch.Tensor:
    """M^T M (in <= out) or M M^T (in > out) for M = P W Q, rooting only the narrower side; `weight` in the
    layer's own dtype."""
    if weight.shape[1] <= weight.shape[0]:
        q = _root(right)
        return _right_apply(_left_apply(_transposed(q), _output_middle(weight, left)), q)
    p = _root(left)
    return _right_apply(_left_apply(p, _input_middle(weight, right)), _transposed(p))


def _singular_values(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Descending singular values from the ascending eigenvalues of M^T M (rounding can leave some below 0)."""
    return eigenvalues.clamp(min=0).sqrt().flip(0)


def weighted_spectrum(weight: torch.Tensor, left: Side = None, right: Side = None) -> torch.Tensor:
    """Singular values of P W Q: the tail beyond rank r is the weighted truncation error."""
    return _singular_values(torch.linalg.eigvalsh(_narrow_gram(weight.detach(), left, right)))


@dataclass
class Eigen:
    """The eigendecomposition of M^T M (in <= out) or M M^T: all that the factors of any rank still need
    besides the weight and the narrower side's root. Kept between a layer's spectrum and its factorizations,
    it saves the step that dominates them."""

    values: torch.Tensor  # ascending
    vectors: torch.Tensor

    @property
    def singular_values(self) -> torch.Tensor:
        return _singular_values(self.values)


def weighted_eigen(weight: torch.Tensor, left: Side = None, right: Side = None) -> Eigen:
    """Each eigenvector signed so that its largest entry is positive: the solver's sign is arbitrary and can
    flip under rounding-level changes of the statistics (two processes' sums against one's), and the factors
    would flip with it."""
    values, vectors = torch.linalg.eigh(_narrow_gram(weight.detach(), left, right))
    signs = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True)).sign()
    return Eigen(values, vectors * torch.where(signs == 0, 1.0, signs))


def factorize(
    weight: torch.Tensor, rank: int, left: Side = None, right: Side = None, eigen: Eigen | None = None
) -> Factors:
    """Best rank-`rank` approximation of `weight` (out, in) under the weighted norm ||P (W - W') Q||;
    `eigen`, from `weighted_eigen` with the same weight and sides, skips its computation."""
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank {rank} outside 1..{min(out_features, in_features)} for a {tuple(weight.shape)} weight")
    eigen = weighted_eigen(weight, left, right) if eigen is None else eigen
    w = weight.detach().double()
    s = eigen.singular_values
    top = eigen.vectors[:, -rank:].flip(1)  # V_r (in <= out) or U_r, leading first
    if in_features <= out_features:
        q = _root(right)
        # W Q V_r is P^-1 U_r S_r: S_r moves to the first factor. Flooring it keeps the column of a direction
        # in W's null space finite; the product is the same whatever the scale.
        scale = s[:rank].clamp(min=max(float(s[0]) * 1e-8, 1e-300))
        first = _right_solve(scale[:, None] * top.T, q)
        second = (w @ _left_apply(q, top)) / scale[None, :]
    else:
        p = _root(left)
        first = _left_apply(_transposed(p), top).T @ w
        second = _left_solve(p, top)
    return Factors(first=first.to(weight.dtype), second=second.to(weight.dtype), singular_values=s)


def low_rank_from_linear(
    linear: nn.Module, rank: int, left: Side = None, right: Side = None, eigen: Eigen | None = None
) -> tuple[LowRankLinear, Factors]:
    """Build the two-factor replacement of a Linear or Conv1D; the bias moves to the second factor unchanged."""
    factors = factorize(linear_weight(linear), rank, left, right, eigen)
    return low_rank_module(linear, factors, rank), factors


def low_rank_module(linear: nn.Module, factors: Factors, rank: int) -> LowRankLinear:
    """The replacement of `linear` by the leading `rank` components of `factors`: those of a larger rank hold
    every smaller rank's factors as their first rows and columns (each component is one eigenvector's)."""
    weight = linear_weight(linear)
    bias = getattr(linear, "bias", None)
    # Built on the meta device, then given empty storage: the factors overwrite it, so no random initialisation.
    module = LowRankLinear(
        weight.shape[1], rank, weight.shape[0], bias=bias is not None, dtype=weight.dtype, device="meta"
    )
    module = module.to_empty(device=weight.device)
    with torch.no_grad():
        module.first.weight.copy_(factors.first[:rank])
        module.second.weight.copy_(factors.second[:, :rank])
        if bias is not None:
            module.second.bias.copy_(bias.detach())
    return module


def _f64(side: Root) -> Root:
    return None if side is None else side.detach().double()
