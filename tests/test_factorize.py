"""The math: weighted factorization, its special cases, and its optimality."""

import pytest
import torch
from torch import nn

from fwsvd_export.core.lowrank import (
    GramSide,
    ProjectedSide,
    break_even_rank,
    factorize,
    low_rank_from_linear,
    nonfinite,
    pays_off,
    rank_for_ratio,
    weighted_eigen,
    weighted_spectrum,
)
from fwsvd_export.core.methods import METHODS, input_side
from fwsvd_export.core.statistics import LayerStats


def root(side):
    """P or Q of a side as methods give it (a Gram side is rooted here)."""
    return side.root() if isinstance(side, GramSide) else side


def weighted_error(w, approx, left=None, right=None):
    left, right = root(left), root(right)
    e = (w - approx).double()
    if left is not None:
        e = (left[:, None] * e) if left.dim() == 1 else left.double() @ e
    if right is not None:
        e = (e * right[None, :]) if right.dim() == 1 else e @ right.double()
    return float(e.norm())


def product(f):
    return f.second.double() @ f.first.double()


@pytest.fixture
def weight():
    torch.manual_seed(0)
    return torch.randn(24, 40, dtype=torch.float64)


def test_identity_weighting_is_plain_svd(weight):
    svd = factorize(weight, 6)
    fw = factorize(weight, 6, right=torch.ones(40, dtype=torch.float64))
    torch.testing.assert_close(product(svd), product(fw))
    u, s, vh = torch.linalg.svd(weight)
    torch.testing.assert_close(product(svd), u[:, :6] @ torch.diag(s[:6]) @ vh[:6])


def test_fwsvd_never_loses_to_svd_on_the_importance_weighted_error():
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        w = torch.randn(16, 30, generator=gen, dtype=torch.float64)
        importance = torch.rand(30, generator=gen, dtype=torch.float64) ** 3
        scale = importance.sqrt()
        for rank in (1, 4, 9):
            fw = weighted_error(w, product(factorize(w, rank, right=scale)), right=scale)
            plain = weighted_error(w, product(factorize(w, rank)), right=scale)
            assert fw <= plain + 1e-9, (trial, rank)


def test_factor_shapes_and_bias_on_second_factor():
    linear = nn.Linear(40, 24)
    module, _ = low_rank_from_linear(linear, 5)
    assert module.first.weight.shape == (5, 40) and module.first.bias is None
    assert module.second.weight.shape == (24, 5)
    torch.testing.assert_close(module.second.bias, linear.bias)


def test_full_rank_reproduces_the_layer():
    torch.manual_seed(0)
    linear = nn.Linear(12, 20).double()
    x = torch.randn(7, 12, dtype=torch.float64)
    for right in (None, torch.rand(12, dtype=torch.float64) + 0.1):
        module, _ = low_rank_from_linear(linear, 12, right=right)
        torch.testing.assert_close(module(x), linear(x))


def test_break_even_rank():
    assert break_even_rank(384, 1536) == pytest.approx(307.2)
    assert pays_off(384, 1536, 307) and not pays_off(384, 1536, 308)
    assert rank_for_ratio(384, 1536, 0.5) == 153
    assert rank_for_ratio(4, 4, 0.01) == 1


def test_zero_importance_features_give_finite_factors(weight):
    fisher = torch.rand(40, dtype=torch.float64)
    fisher[::3] = 0.0
    w = METHODS["fwsvd"].build(LayerStats({"fisher": fisher}), 1e-6)
    f = factorize(weight, 8, w.left, w.right)
    assert torch.isfinite(f.first).all() and torch.isfinite(f.second).all()
    assert any("floored" in n for n in w.notes)
    none = METHODS["fwsvd"].build(LayerStats({"fisher": torch.zeros(40)}), 1e-6)
    assert none.right is None and "plain SVD" in none.notes[0]


def _grams(n_in=40, n_out=24, tokens=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=gen, dtype=torch.float64) * torch.linspace(
        0.1, 3, n_in, dtype=torch.float64
    )
    g = torch.randn(tokens, n_out, generator=gen, dtype=torch.float64) * torch.linspace(
        0.2, 2, n_out, dtype=torch.float64
    )
    return x.T @ x / tokens, g.T @ g / tokens


def test_kfac_with_identity_output_gram_is_whitening(weight):
    c, _ = _grams()
    kfac = METHODS["kfac"].build(LayerStats({"input_gram": c, "output_gram": torch.eye(24, dtype=torch.float64)}), 1e-8)
    llm = METHODS["svd-llm"].build(LayerStats({"input_gram": c}), 1e-8)
    torch.testing.assert_close(
        product(factorize(weight, 7, kfac.left, kfac.right)), product(factorize(weight, 7, llm.left, llm.right))
    )


def test_kfac_with_diagonal_input_and_identity_output_is_fwsvd(weight):
    importance = torch.rand(40, dtype=torch.float64) + 0.05
    kfac = METHODS["kfac"].build(
        LayerStats({"input_gram": torch.diag(importance), "output_gram": torch.eye(24, dtype=torch.float64)}), 0.0
    )
    fw = METHODS["fwsvd"].build(LayerStats({"fisher": importance}), 0.0)
    torch.testing.assert_close(
        product(factorize(weight, 5, kfac.left, kfac.right)), product(factorize(weight, 5, fw.left, fw.right))
    )


def test_kfac_full_rank_reproduces_the_weight(weight):
    c, g = _grams()
    w = METHODS["kfac"].build(LayerStats({"input_gram": c, "output_gram": g}), 1e-6)
    torch.testing.assert_close(product(factorize(weight, 24, w.left, w.right)), weight)


def _symmetric_root(gram):
    values, vectors = torch.linalg.eigh(gram)
    return (vectors * values.sqrt()) @ vectors.T


def test_kfac_sides_are_cholesky_factors_and_truncate_as_the_symmetric_roots_do(weight):
    c, g = _grams()
    w = METHODS["kfac"].build(LayerStats({"input_gram": c, "output_gram": g}), 0.0)
    left, right = root(w.left), root(w.right)
    assert torch.equal(left, left.triu()) and torch.equal(right, right.tril())
    torch.testing.assert_close(left.T @ left, g.double())
    torch.testing.assert_close(right @ right.T, c.double())
    triangular = factorize(weight, 6, w.left, w.right)
    symmetric = factorize(weight, 6, _symmetric_root(g.double()), _symmetric_root(c.double()))
    torch.testing.assert_close(product(triangular), product(symmetric))
    torch.testing.assert_close(triangular.singular_values, symmetric.singular_values)


def test_kfac_is_optimal_against_random_rank_r_alternatives(weight):
    c, g = _grams()
    w = METHODS["kfac"].build(LayerStats({"input_gram": c, "output_gram": g}), 0.0)
    best = weighted_error(weight, product(factorize(weight, 6, w.left, w.right)), w.left, w.right)
    gen = torch.Generator().manual_seed(3)
    for other in (product(factorize(weight, 6)), product(factorize(weight, 6, right=w.right))):
        assert best <= weighted_error(weight, other, w.left, w.right) + 1e-9
    for _ in range(50):
        a = torch.randn(24, 6, generator=gen, dtype=torch.float64)
        b = torch.randn(6, 40, generator=gen, dtype=torch.float64)
        assert best < weighted_error(weight, product(factorize(weight, 6)) + 0.05 * a @ b, w.left, w.right)


def test_singular_grams_take_the_fallback_and_say_so(weight):
    x = torch.randn(10, 40, dtype=torch.float64)
    singular = x.T @ x  # rank 10 of 40, and undamped
    notes: list[str] = []
    side = input_side(singular - 1e-3 * torch.eye(40, dtype=torch.float64), 0.0, notes)
    assert torch.isfinite(root(side)).all() and "not positive definite" in notes[0]
    g = torch.zeros(24, 24, dtype=torch.float64)
    g[0, 0] = 1.0
    w = METHODS["kfac"].build(LayerStats({"input_gram": singular, "output_gram": g}), 0.0)
    f = factorize(weight, 6, w.left, w.right)
    assert torch.isfinite(f.first).all() and torch.isfinite(f.second).all()
    assert w.notes


def _reference(weight, rank, left, right):
    """P^-1 [P W Q]_r Q^-1 by a full SVD of P W Q: the definition the eigen route must reproduce."""
    p = torch.eye(weight.shape[0], dtype=torch.float64) if left is None else root(left)
    q = torch.eye(weight.shape[1], dtype=torch.float64) if right is None else root(right)
    p, q = (torch.diag(x) if x.dim() == 1 else x for x in (p, q))
    u, s, vh = torch.linalg.svd(p @ weight @ q)
    return torch.linalg.solve(p, u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(q), s


def _unrootable(side):
    def refuse(_):
        raise AssertionError("the wider side was rooted")

    return GramSide(side.gram, side.shift, refuse)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)], ids=["wide", "tall", "square"])
def test_every_side_form_and_shape_gives_the_svd_truncation_rooting_only_the_narrower_side(shape):
    out_f, in_f = shape
    weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    c, g = _grams(in_f, out_f)
    kfac = METHODS["kfac"].build(LayerStats({"input_gram": c, "output_gram": g}), 1e-3)
    wide_left, wide_right = in_f <= out_f, in_f > out_f
    sides = {
        "none": (None, None),
        "diagonal": (torch.rand(out_f, dtype=torch.float64) + 0.1, torch.rand(in_f, dtype=torch.float64) + 0.1),
        "roots": (root(kfac.left), root(kfac.right)),
        "grams": (
            _unrootable(kfac.left) if wide_left else kfac.left,
            _unrootable(kfac.right) if wide_right else kfac.right,
        ),
    }
    for form, (left, right) in sides.items():
        expected, spectrum = _reference(weight, 7, *(sides["roots"] if form == "grams" else (left, right)))
        f = factorize(weight, 7, left, right)
        torch.testing.assert_close(product(f), expected, msg=form)
        torch.testing.assert_close(f.singular_values, spectrum, msg=form)
        torch.testing.assert_close(weighted_spectrum(weight, left, right), spectrum, msg=form)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
def test_a_wider_side_gathered_through_the_weight_gives_the_same_factors_as_its_gram(shape, dtype):
    """The statistics pass gathers a layer's wider side as W C W^T or W^T G W beside its diagonal: the
    factorization, damping included, is the one its whole Gram gives, to the layer's precision (a float32
    layer's damping term is multiplied in float32)."""
    out_f, in_f = shape
    weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    c, g = _grams(in_f, out_f)
    w = weight.double()
    whole = METHODS["kfac"].build(LayerStats({"input_gram": c, "output_gram": g}), 1e-2)
    if in_f > out_f:
        stats = {"input_gram": c.diagonal(), "projected_input_gram": w @ c @ w.T, "output_gram": g}
    else:
        stats = {"input_gram": c, "output_gram": g.diagonal(), "projected_output_gram": w.T @ g @ w}
    projected = METHODS["kfac"].build(LayerStats(stats), 1e-2)
    assert isinstance(projected.right if in_f > out_f else projected.left, ProjectedSide)
    tolerance = {} if dtype == torch.float64 else {"rtol": 1.3e-6, "atol": 1e-5}  # float32's, on float32 factors
    for rank in (1, 7, 24):
        expected, f = (
            factorize(weight, rank, whole.left, whole.right),
            factorize(weight, rank, projected.left, projected.right),
        )
        torch.testing.assert_close(product(f), product(expected), **tolerance)
        torch.testing.assert_close(f.singular_values, expected.singular_values, **tolerance)
    narrow = ProjectedSide(torch.eye(min(shape), dtype=torch.float64), 0.0)  # on the side that must be rooted
    with pytest.raises(ValueError, match="never roots"):
        factorize(weight, 3, *((narrow, None) if in_f > out_f else (None, narrow)))


def test_gram_sides_hold_the_statistics_themselves_damped_on_the_diagonal_and_leave_them_unchanged(weight):
    c, g = (m.float() for m in _grams())
    before = c.clone(), g.clone()
    w = METHODS["kfac"].build(LayerStats({"input_gram": c, "output_gram": g}), 1e-2)
    assert w.left.gram is g and w.right.gram is c  # no copy, whatever number of layers a check keeps
    eye = torch.eye(40, dtype=torch.float64)
    torch.testing.assert_close(w.right.matrix(), c.double() + 1e-2 * float(c.diagonal().mean()) * eye)
    factorize(weight, 6, w.left, w.right)
    assert torch.equal(c, before[0]) and torch.equal(g, before[1])


def test_a_kept_decomposition_gives_the_same_factors_at_every_rank(weight):
    c, g = _grams()
    w = METHODS["kfac"].build(LayerStats({"input_gram": c, "output_gram": g}), 1e-3)
    eigen = weighted_eigen(weight, w.left, w.right)
    torch.testing.assert_close(eigen.singular_values, weighted_spectrum(weight, w.left, w.right))
    for rank in (1, 7, 24):
        kept, fresh = factorize(weight, rank, w.left, w.right, eigen), factorize(weight, rank, w.left, w.right)
        assert torch.equal(kept.first, fresh.first) and torch.equal(kept.second, fresh.second)


def test_factors_do_not_flip_sign_when_the_statistics_change_by_rounding(weight):
    """The eigensolver's signs are arbitrary; two processes' summed statistics differ from one's by rounding,
    and their factors must agree (tests/test_distributed.py compares whole runs)."""
    c, g = _grams()
    w = METHODS["kfac"].build(LayerStats({"input_gram": c, "output_gram": g}), 1e-3)
    eigen = weighted_eigen(weight, w.left, w.right)
    top = eigen.vectors.gather(0, eigen.vectors.abs().argmax(dim=0, keepdim=True))
    assert (top > 0).all()
    nudged = METHODS["kfac"].build(LayerStats({"input_gram": c * (1 + 1e-12), "output_gram": g}), 1e-3)
    a, b = factorize(weight, 7, w.left, w.right), factorize(weight, 7, nudged.left, nudged.right)
    torch.testing.assert_close(a.first, b.first)
    torch.testing.assert_close(a.second, b.second)


def test_a_rank_beyond_the_weights_own_gives_finite_factors_and_the_exact_weight():
    gen = torch.Generator().manual_seed(2)
    for out_f, in_f in ((30, 12), (12, 30)):
        weight = torch.randn(out_f, 3, generator=gen, dtype=torch.float64) @ torch.randn(
            3, in_f, generator=gen, dtype=torch.float64
        )  # rank 3: ranks 4..12 reach into its null space
        f = factorize(weight, 10, right=torch.rand(in_f, generator=gen, dtype=torch.float64) + 0.5)
        assert torch.isfinite(f.first).all() and torch.isfinite(f.second).all()
        torch.testing.assert_close(product(f), weight)
    zero = factorize(torch.zeros(8, 5, dtype=torch.float64), 2)
    assert torch.equal(product(zero), torch.zeros(8, 5, dtype=torch.float64))


def test_balancing_keeps_the_product_and_equalises_factor_scales():
    from fwsvd_export.core.lowrank import balance_

    torch.manual_seed(0)
    linear = nn.Linear(30, 20).double()
    module, _ = low_rank_from_linear(linear, 6, left=torch.rand(20, dtype=torch.float64) * 1e-4 + 1e-6)
    before = module.second.weight @ module.first.weight
    balance_(module)
    torch.testing.assert_close(module.second.weight @ module.first.weight, before)
    torch.testing.assert_close(module.first.weight.norm(dim=1), module.second.weight.norm(dim=0))


def test_small_layers_factorize_on_one_thread_and_torchs_setting_is_restored():
    from fwsvd_export.core.threads import threads_for

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads_for(1536, 384):  # MiniLM's feed-forward layer: a second thread gains little, and waits
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_large_layers_take_torchs_threads_up_to_the_cores_other_processes_leave_free():
    from fwsvd_export.core.threads import layer_work, wanted_threads

    down = layer_work(896, 4864)  # Qwen2.5-0.5B's down projection
    assert wanted_threads(down, threads=2, cores=2, others_busy=0.0) == 2
    assert wanted_threads(down, threads=2, cores=2, others_busy=0.7) == 1  # a neighbour sharing our cores
    assert wanted_threads(down, threads=16, cores=16, others_busy=3.2) == 13
    assert wanted_threads(down, threads=4, cores=16, others_busy=0.0) == 4  # never more than torch was given
    assert wanted_threads(down, threads=2, cores=2, others_busy=5.0) == 1
    assert wanted_threads(layer_work(384, 384), threads=16, cores=16, others_busy=0.0) == 1


def test_non_finite_values_are_counted_and_a_sum_that_overflows_is_not_one():
    big = torch.full((4,), 3e38)  # finite values whose float32 sum is infinite
    assert nonfinite(big) == "" and nonfinite(torch.arange(5)) == ""
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 3e38, 3e38])
    assert nonfinite(bad) == "1 NaN and 2 infinite values"
    assert nonfinite(torch.tensor([float("inf"), -float("inf")], dtype=torch.float16)) == "0 NaN and 2 infinite values"
