"""The kernel against the formulas of docs/algorithm.md and the plain reference loop."""

from __future__ import annotations

import math

import pytest
import torch

from safedelta._reference import reference_official
from safedelta.config import SafeDeltaConfig
from safedelta.errors import InvalidConfig, NonFiniteWeights, ShapeMismatch
from safedelta.solver import (MatrixResult, PreparedHessian, SafeDeltaLayer, prepare_hessian,
                              protect_matrix)


def make_problem(r, c, *, tokens=None, rho=0.05, dead=(), seed=0, scale=1.0):
    """Aligned W0 (std 0.02, the HF init), W1 = W0 + delta (relative size rho), H = (2/N) X X^T
    from activations with heterogeneous channel scales; ``dead`` input channels never fire."""
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or 2 * c + 8
    X = torch.randn(c, tokens, generator=g) * torch.exp(0.7 * torch.randn(c, 1, generator=g))
    X[list(dead)] = 0
    H = scale * 2 * X @ X.T / tokens
    W0 = 0.02 * torch.randn(r, c, generator=g)
    W1 = W0 + rho * 0.02 * torch.randn(r, c, generator=g)
    return W0, W1, H, X


def damped(prep: PreparedHessian) -> torch.Tensor:
    """The damped H the factors belong to (dead channels set to 1, damping added)."""
    Hd = prep.H.double().clone()
    Hd[prep.dead, prep.dead] = 1
    return Hd + prep.damp * torch.eye(Hd.shape[0], dtype=torch.float64)


def half_quad(A, H):
    A = A.double()
    return 0.5 * float(((A @ H.double()) * A).sum())


# ---------------------------------------------------------------------------------------------
# preparation


def test_prepare_hessian_factors_the_damped_inverse():
    _, _, H, _ = make_problem(3, 12, dead=(2, 7))
    prep = prepare_hessian(H, damp=0.05)
    Hd = damped(prep)
    assert prep.damp == pytest.approx(0.05 * float(torch.diag(Hd - prep.damp * torch.eye(12))
                                                   .mean()), rel=1e-5)
    Hinv = torch.linalg.inv(Hd)
    U = prep.U.double()
    assert torch.allclose(U.T @ U, Hinv, rtol=1e-4, atol=1e-6 * float(Hinv.abs().max()))
    assert torch.equal(prep.U, torch.triu(prep.U))
    assert torch.equal(prep.d, torch.diag(prep.U))
    assert torch.allclose(prep.hinv_diag.double(), torch.diag(Hinv), rtol=1e-4)
    assert prep.dead.tolist() == [m in (2, 7) for m in range(12)]
    # default order: key 1/[H^-1]_mm ascending, and U_order factors the permuted inverse
    key = 1 / prep.hinv_diag[prep.order]
    assert bool((key[1:] >= key[:-1]).all())
    P = prep.order
    Uo = prep.U_order.double()
    assert torch.allclose(Uo.T @ Uo, Hinv[P][:, P], rtol=1e-4,
                          atol=1e-6 * float(Hinv.abs().max()))
    assert prep.H.dtype == torch.float32 and torch.equal(prep.H, H)  # undamped copy kept


# ---------------------------------------------------------------------------------------------
# the OBS closed form


def test_single_kept_entry_gets_the_obs_closed_form_compensation():
    """One kept entry (i, m): the other weights of row i move by (delta/[H^-1]_mm) H^-1[:, m].

    That is the doc's ``-(delta'/[H^-1]_mm) H^-1[:, m]`` with ``delta' = W0 - W1``, the error
    being cancelled: it minimises 1/2 dw^T H dw subject to dw_m = delta. Other rows stay at W0.
    """
    r, c = 3, 9
    W0, _, H, X = make_problem(r, c, seed=3)
    prep = prepare_hessian(H)
    m = int(prep.order[0])  # the first entry of the default order: row 0, column m
    delta = 0.01
    W1 = W0.clone()
    W1[0, m] += delta
    hinv = torch.linalg.inv(damped(prep))
    cost = delta ** 2 / (2 * float(hinv[m, m]))
    E0 = half_quad(W0, prep.H)
    res = protect_matrix(W0, W1, prep, s=cost * (1 + 1e-4) / E0)
    # row 0 keeps only (0, m); zero-delta entries of other rows may be "kept" at no cost
    assert res.kept[0].sum() == 1 and bool(res.kept[0, m])
    assert res.weight[0, m] == W1[0, m]
    dw = (res.weight - W0).double()
    expected = delta / hinv[m, m] * hinv[:, m]
    assert torch.allclose(dw[0], expected, rtol=1e-3, atol=1e-7)
    assert torch.equal(res.weight[1:], W0[1:])
    assert res.stats.cost_used == pytest.approx(cost, rel=1e-3)
    assert res.stats.cost_predicted == pytest.approx(cost, rel=1e-3)

    # brute force: least squares over the free coordinates with X augmented by the damping
    N = X.shape[1]
    Xa = torch.cat([X.double() * math.sqrt(2 / N),
                    math.sqrt(prep.damp) * torch.eye(c, dtype=torch.float64)], 1)  # c x (N+c)
    free = [j for j in range(c) if j != m]
    # minimise ||(dw_free^T Xa_free + delta Xa_m)||^2 over dw_free
    sol = torch.linalg.lstsq(Xa[free].T, -delta * Xa[m], rcond=None).solution
    assert torch.allclose(dw[0, free], sol, rtol=1e-3, atol=1e-7)


def test_default_result_is_the_obs_optimum_for_its_kept_set_and_cost_is_exact():
    """GPTQ identity: the summed sequential cost equals the damped loss of the result, and the
    gradient of that loss vanishes on every not-kept coordinate (all of them compensated)."""
    W0, W1, H, _ = make_problem(6, 40, dead=(5,), seed=1)
    prep = prepare_hessian(H)
    res = protect_matrix(W0, W1, prep, s=3e-4)
    st = res.stats
    assert 0 < st.n_kept < st.n_candidates
    Hd = damped(prep)
    dW = (res.weight - W0).double()
    assert st.cost_used == pytest.approx(half_quad(dW, Hd), rel=1e-4)  # 1/2 sum e^2, factor 1/2
    grad = dW @ Hd  # r x c
    free = ~res.kept
    scale = float((W1 - W0).abs().max()) * float(Hd.abs().max())
    assert float(grad[free].abs().max()) < 1e-4 * scale
    assert torch.equal(res.weight[res.kept], W1[res.kept])
    assert st.safety_loss == pytest.approx(half_quad(dW, H), rel=1e-4)
    assert st.safety_loss <= st.cost_used <= st.budget
    assert st.budget == pytest.approx(3e-4 * half_quad(W0, H), rel=1e-5)
    assert st.output_energy == pytest.approx(half_quad(W0, H), rel=1e-5)


def test_independent_per_entry_costs_undercount_correlated_deltas_the_default_does_not():
    """Strongly correlated inputs and a same-sign delta: each entry alone is cheap (a neighbour
    compensates it), together they are not. Budgeting with the paper's independent per-entry
    cost would overrun eps many times; the exact sequential cost keeps the loss within it."""
    r, c = 4, 32
    idx = torch.arange(c)
    H = 0.95 ** (idx[:, None] - idx[None, :]).abs().float()
    W0 = 0.02 * torch.randn(r, c, generator=torch.Generator().manual_seed(0))
    W1 = W0 + 0.002
    res = protect_matrix(W0, W1, H, s=1e-3)
    st = res.stats
    assert 0 < st.n_kept < st.n_candidates
    assert st.safety_loss <= st.cost_used <= st.budget
    assert st.cost_predicted < 0.5 * st.safety_loss  # undercounted by more than 2x
    # a budget equal to the independent estimate of keeping (about) every candidate: the
    # real loss of keeping them all is larger, so the default keeps fewer and stays within it
    hinv = prepare_hessian(H).hinv_diag
    naive_all = 0.5 * float(((W1 - W0) ** 2 / hinv).sum()) * 0.85
    big = protect_matrix(W0, W1, H, s=naive_all / st.output_energy)
    assert big.stats.n_kept < big.stats.n_candidates
    assert big.stats.safety_loss <= big.stats.budget


def test_default_selection_is_a_prefix_of_channel_order_with_exclusion():
    W0, W1, H, _ = make_problem(5, 30, seed=2)
    prep = prepare_hessian(H)
    for s in (1e-5, 1e-4, 1e-3, 1e9):
        res = protect_matrix(W0, W1, prep, s=s)
        flat = res.kept[:, prep.order].T.flatten()  # channel by channel, rows within
        k = int(flat.sum())
        assert bool(flat[:k].all()) and not bool(flat[k:].any())
        assert k <= 150 - int(0.15 * 150) == res.stats.n_candidates


# ---------------------------------------------------------------------------------------------
# s = 0 and huge s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("budget", ["default", "official"])
def test_s_zero_returns_the_aligned_weight_bitwise(dtype, budget):
    W0, W1, H, _ = make_problem(7, 21, seed=4)
    res = protect_matrix(W0.to(dtype), W1.to(dtype), H, s=0, budget=budget)
    assert res.weight.dtype == dtype
    assert torch.equal(res.weight.flatten().view(torch.uint8), W0.to(dtype).flatten().view(
        torch.uint8))
    assert res.stats.safety_loss == 0.0


@pytest.mark.parametrize("budget", ["default", "official"])
def test_huge_s_keeps_every_candidate(budget):
    W0, W1, H, _ = make_problem(6, 70, seed=5)
    cfg = SafeDeltaConfig(block_size=32)  # official: three blocks of 32, 32, 6 columns
    res = protect_matrix(W0, W1, H, s=1e12, budget=budget, config=cfg)
    st = res.stats
    if budget == "official":
        assert st.n_candidates == sum(6 * b - int(0.15 * 6 * b) for b in (32, 32, 6))
    else:
        assert st.n_candidates == 420 - int(0.15 * 420)
    assert st.n_kept == st.n_candidates
    assert torch.equal(res.weight[res.kept], W1[res.kept])


# ---------------------------------------------------------------------------------------------
# official mode


def _official_block_order(d_B: torch.Tensor, rows: int) -> torch.Tensor:
    key = (1 / d_B ** 2).expand(rows, -1)
    return torch.sort(key.flatten(), stable=True).indices


def test_official_never_selects_the_excluded_and_selects_a_prefix():
    W0, W1, H, _ = make_problem(8, 50, seed=6)
    prep = prepare_hessian(H)
    order = _official_block_order(prep.d, 8)
    n_drop = int(0.15 * 400)
    for s in (1e-3, 1e-2, 0.1, 1.0, 1e9):
        res = protect_matrix(W0, W1, prep, s=s, budget="official")
        flat = res.kept.flatten()[order]
        k = int(flat.sum())
        assert bool(flat[:k].all()) and not bool(flat[k:].any())
        assert not bool(flat[-n_drop:].any())
        assert res.stats.cost_used <= res.stats.budget
        assert torch.equal(res.weight[res.kept], W1[res.kept])
    assert k == 400 - n_drop  # the last, huge s keeps all candidates


@pytest.mark.parametrize("r,c,block_size,sub_block,dead", [
    (8, 10, 2048, 4, ()),
    (16, 130, 2048, 4, (0, 64)),  # width not a multiple of 4, dead channels
    (12, 97, 32, 4, (31, 32)),  # several blocks, last one partial
    (10, 75, 20, 3, (4,)),  # sub-blocks that do not divide the lazy block
    (4, 2054, 2048, 4, (1, 2050)),  # the published 2048-block size: a full block + 6 columns
])
def test_official_equals_the_plain_reference(r, c, block_size, sub_block, dead):
    W0, W1, H, _ = make_problem(r, c, dead=dead, seed=r + c, tokens=min(2 * c, 600))
    cfg = SafeDeltaConfig(block_size=block_size, sub_block=sub_block)
    prep = prepare_hessian(H)
    for s in ((0.1, 3.0) if c > 1000 else (1e-4, 1e-2, 0.1, 3.0)):  # each s: 1 reference chain
        res = protect_matrix(W0, W1, prep, s=s, budget="official", config=cfg)
        W_ref, mask_ref = reference_official(W0, W1, H, s, block_size=block_size,
                                             sub_block=sub_block)
        assert torch.equal(res.kept, mask_ref), (s, int(res.kept.sum()), int(mask_ref.sum()))
        assert torch.allclose(res.weight, W_ref, rtol=1e-4, atol=1e-6)
    assert 0 < int(res.kept.sum())


def test_official_ties_between_columns_follow_row_major_order():
    """Dead channels share one key exactly; with a large activation scale they come first, and
    the prefix ends inside their tie group, where the stable sort interleaves them row-major."""
    r, c = 5, 24
    dead = (3, 9, 10, 17)
    W0, W1, H, _ = make_problem(r, c, dead=dead, seed=7, scale=1e4)
    prep = prepare_hessian(H)
    assert len(set(prep.d[list(dead)].tolist())) == 1
    d0 = float(prep.d[3])
    # costs of the dead entries: delta^2 / d^2; keep about 9 of the 20
    cost = float(((W1 - W0)[:, list(dead)] ** 2).mean()) / d0 ** 2
    key_mean = float((1 / prep.d ** 2).mean())
    s = 9 * cost / (key_mean / 2 * r / 4096)
    res = protect_matrix(W0, W1, prep, s=s, budget="official")
    _, mask_ref = reference_official(W0, W1, H, s)
    assert torch.equal(res.kept, mask_ref)
    k = int(res.kept.sum())
    assert 2 <= k < 20 and not bool(res.kept[:, [m for m in range(c) if m not in dead]].any())
    # row-major inside the tie group: rows are filled in order, all tied columns per row
    rows_full = res.kept[:, list(dead)].sum(1)
    assert rows_full.tolist() == sorted(rows_full.tolist(), reverse=True)


# ---------------------------------------------------------------------------------------------
# width invariance of the default budget


def test_default_block_diagonal_copy_keeps_the_same_fraction_and_relative_loss():
    W0, W1, H, _ = make_problem(6, 40, seed=8)
    Z = torch.zeros_like(W0)
    W0_2 = torch.cat([torch.cat([W0, Z], 1), torch.cat([Z, W0], 1)])
    W1_2 = torch.cat([torch.cat([W1, Z], 1), torch.cat([Z, W1], 1)])
    H_2 = torch.block_diag(H, H)
    for s in (1e-5, 1e-4, 5e-4):
        a = protect_matrix(W0, W1, H, s=s).stats
        b = protect_matrix(W0_2, W1_2, H_2, s=s).stats
        assert 0 < a.kept_fraction < 0.85
        assert abs(a.kept_fraction - b.kept_fraction) <= 1 / 40  # one tie column at most
        assert b.output_energy == pytest.approx(2 * a.output_energy, rel=1e-5)
        assert b.safety_loss / b.output_energy == pytest.approx(
            a.safety_loss / a.output_energy, rel=0.15)
        assert b.safety_loss <= b.budget and a.safety_loss <= a.budget


def _ar_problem(r, c, seed):
    """Width-invariant random problem: AR(1)-correlated inputs with log-normal channel scales
    (local structure only), W0 ~ 0.02 N(0, 1), delta of the same relative size at every width."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(c)
    C = 0.6 ** (idx[:, None] - idx[None, :]).abs().float()
    D = torch.exp(0.5 * torch.randn(c, generator=g))
    W0 = 0.02 * torch.randn(r, c, generator=g)
    return W0, W0 + 0.05 * 0.02 * torch.randn(r, c, generator=g), D[:, None] * C * D[None, :]


def test_default_budget_is_width_independent_where_the_official_is_not():
    """Widths 576 (SmolLM2-135M) and 4096 (Llama-2-7B): same s, same relative delta size."""
    frac = {}
    for c in (576, 4096):
        W0, W1, H = _ar_problem(16, c, seed=c)
        prep = prepare_hessian(H)
        frac[c] = (protect_matrix(W0, W1, prep, s=3e-5).stats.kept_fraction,
                   protect_matrix(W0, W1, prep, s=0.1, budget="official").stats.kept_fraction)
    (d576, o576), (d4096, o4096) = frac[576], frac[4096]
    assert 0.05 < d576 < 0.8 and 0.05 < d4096 < 0.8
    assert 0.8 < d576 / d4096 < 1.25, frac
    assert o576 / o4096 > 2.0, frac  # the official constant is tied to the width


# ---------------------------------------------------------------------------------------------
# inputs, dtypes, errors


def test_output_follows_the_aligned_dtype_and_kept_entries_hold_w1():
    W0, W1, H, _ = make_problem(9, 33, seed=9)
    res = protect_matrix(W0.bfloat16(), W1.float(), H, s=1e-3)
    assert res.weight.dtype == torch.bfloat16 and res.weight.shape == (9, 33)
    assert res.kept.dtype == torch.bool
    assert torch.equal(res.weight[res.kept], W1.bfloat16()[res.kept])
    assert isinstance(res, MatrixResult)
    d = res.stats.as_dict()
    assert set(d) >= {"rows", "cols", "n_candidates", "n_kept", "kept_fraction", "budget",
                      "cost_used", "delta_norm", "delta_norm_kept", "safety_loss",
                      "output_energy", "budget_rule"}
    assert d["budget_rule"] == "default" and d["rows"] == 9 and d["cols"] == 33
    assert d["delta_norm"] == pytest.approx(float((W1 - W0.bfloat16().float()).norm()),
                                            rel=1e-5)
    assert d["delta_norm_kept"] <= d["delta_norm"]


def test_keyword_arguments_override_the_config():
    W0, W1, H, _ = make_problem(4, 16, seed=10)
    cfg = SafeDeltaConfig(budget="official", s=0.0)
    res = protect_matrix(W0, W1, H, config=cfg)
    assert res.stats.budget_rule == "official" and res.stats.s == 0.0
    assert torch.equal(res.weight, W0)
    res = protect_matrix(W0, W1, H, config=cfg, budget="default", s=1e9)
    assert res.stats.budget_rule == "default" and res.stats.s == 1e9
    assert res.stats.n_kept == res.stats.n_candidates
    res = protect_matrix(W0, W1, H)  # the default budget's default s
    from safedelta.config import DEFAULT_S
    assert res.stats.s == DEFAULT_S["default"]


def test_bad_inputs_raise_errors_that_name_the_problem():
    W0, W1, H, _ = make_problem(4, 8, seed=11)
    with pytest.raises(ShapeMismatch, match=r"\(4, 8\) and \(4, 7\)"):
        protect_matrix(W0, W1[:, :7], H)
    with pytest.raises(ShapeMismatch, match="8x8"):
        protect_matrix(W0, W1, H[:7, :7])
    with pytest.raises(InvalidConfig, match="s must be"):
        protect_matrix(W0, W1, H, s=-1.0)
    with pytest.raises(InvalidConfig, match="budget"):
        protect_matrix(W0, W1, H, budget="paper")
    bad = W1.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteWeights, match="fine-tuned"):
        protect_matrix(W0, bad, H)
    Hb = H.clone()
    Hb[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeights, match="Hessian"):
        protect_matrix(W0, W1, Hb)


def test_a_result_that_overflows_the_aligned_dtype_is_refused():
    W0, W1, H, _ = make_problem(4, 8, seed=12)
    W1 = W1.clone()
    W1[0, int(prepare_hessian(H).order[0])] = 1e6  # fits fp32, not fp16
    with pytest.raises(NonFiniteWeights, match="protected weight"):
        protect_matrix(W0.half(), W1, H, s=1e30)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("budget", ["default", "official"])
def test_cuda_matches_cpu(budget):
    W0, W1, H, _ = make_problem(64, 300, dead=(3,), seed=13)
    cpu = protect_matrix(W0, W1, H, s=1e-3 if budget == "default" else 0.5, budget=budget,
                         config=SafeDeltaConfig(block_size=128))
    gpu = protect_matrix(W0.cuda(), W1.cuda(), H.cuda(), s=cpu.stats.s, budget=budget,
                         config=SafeDeltaConfig(block_size=128))
    assert gpu.weight.device.type == "cuda"
    assert 0 < cpu.stats.n_kept
    # the selection may differ by an entry at the budget boundary (different summation order)
    assert abs(int(gpu.kept.sum()) - cpu.stats.n_kept) <= 2
    assert float((gpu.kept.cpu() != cpu.kept).float().mean()) < 1e-3
    assert torch.allclose(gpu.weight.cpu(), cpu.weight, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tf32_flag_is_restored():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        W0, W1, H, _ = make_problem(8, 20, seed=14)
        protect_matrix(W0.cuda(), W1.cuda(), H.cuda(), s=1e-3)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ---------------------------------------------------------------------------------------------
# the layer wrapper


def test_layer_solve_without_calibration_is_refused():
    layer = torch.nn.Linear(4, 3)
    with pytest.raises(InvalidConfig, match="add_batch"):
        SafeDeltaLayer(layer).solve(layer.weight.detach().clone())


@pytest.mark.parametrize("s", [1e-5, 3e-4, 1e-2, 1e3])
def test_default_safety_loss_from_the_damped_cost_equals_the_direct_quadratic(s):
    """The default reports the undamped loss as cost - damping terms (O(r c)); it must equal
    1/2 tr(dW H dW^T) computed directly, dead channels and damping included."""
    W0, W1, H, _ = make_problem(48, 96, dead=(3, 50), seed=7)
    prep = prepare_hessian(H)
    res = protect_matrix(W0, W1, prep, s=s)
    st = res.stats
    direct = half_quad(res.weight - W0, H)
    assert st.safety_loss == pytest.approx(direct, rel=1e-4, abs=1e-12 * st.output_energy)
    assert 0 <= st.safety_loss <= st.cost_used


def test_given_output_energy_and_default_only_factors_give_the_same_result():
    """The pipeline's cached E0 and a factorisation without H or U (default rule only) give
    the bitwise result of a fresh call with the raw Hessian."""
    W0, W1, H, _ = make_problem(32, 64, dead=(5,), seed=3)
    fresh = protect_matrix(W0, W1, H, s=1e-3)
    full = prepare_hessian(H)
    E0 = protect_matrix(W0, W1, full, s=0.0).stats.output_energy
    slim = prepare_hessian(H, budget="default")
    assert slim.U is None and slim.d is None
    slim.H = None  # as read back from the factor cache
    got = protect_matrix(W0, W1, slim, s=1e-3, output_energy=E0)
    assert torch.equal(got.weight, fresh.weight) and torch.equal(got.kept, fresh.kept)
    assert got.stats == fresh.stats
    with pytest.raises(InvalidConfig):
        protect_matrix(W0, W1, slim, s=1e-3)  # no H to compute E0 from
    with pytest.raises(InvalidConfig):
        protect_matrix(W0, W1, slim, s=1e-3, budget="official", output_energy=E0)
