"""Properties of the kernel over random shapes, dtypes and budgets (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safedelta._reference import reference_official
from safedelta.config import SafeDeltaConfig
from safedelta.solver import SafeDeltaLayer, protect_matrix

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FAST = settings(max_examples=20, deadline=None)


def problem(r, c, seed, *, tokens=None, n_dead=0):
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or c + 3
    X = torch.randn(c, tokens, generator=g) * torch.exp(0.7 * torch.randn(c, 1, generator=g))
    X[:n_dead] = 0
    H = 2 * X @ X.T / tokens
    W0 = 0.02 * torch.randn(r, c, generator=g)
    W1 = W0 + 0.002 * torch.randn(r, c, generator=g)
    return W0, W1, H


shapes = st.tuples(st.integers(1, 12), st.integers(1, 41))  # rectangular, tiny, c % 4 != 0
seeds = st.integers(0, 2 ** 16)
log_s_default = st.floats(-7, -1)
log_s_official = st.floats(-4, 1)


@FAST
@given(shape=shapes, seed=seeds, dtype=st.sampled_from(DTYPES), budget=st.sampled_from(
    ["default", "official"]), log_s=st.floats(-7, 1))
def test_invariants(shape, seed, dtype, budget, log_s):
    r, c = shape
    W0, W1, H = problem(r, c, seed, n_dead=seed % 3 if c > 3 else 0)
    W0, W1 = W0.to(dtype), W1.to(dtype)
    cfg = SafeDeltaConfig(block_size=16)  # several official blocks for c > 16
    res = protect_matrix(W0, W1, H, s=10 ** log_s, budget=budget, config=cfg)
    st_ = res.stats
    assert res.weight.dtype == dtype and res.weight.shape == (r, c)
    assert res.kept.shape == (r, c) and res.kept.dtype == torch.bool
    assert bool(torch.isfinite(res.weight).all())
    # kept entries end exactly at their fine-tuned value
    assert torch.equal(res.weight[res.kept], W1[res.kept])
    assert st_.n_kept == int(res.kept.sum()) <= st_.n_candidates <= r * c
    assert st_.cost_used <= st_.budget * (1 + 1e-6) + 1e-30
    if budget == "default":
        assert st_.safety_loss <= st_.cost_used * (1 + 1e-3) + 1e-12
    assert st_.delta_norm_kept <= st_.delta_norm + 1e-6
    # determinism: a second run is bit-identical
    again = protect_matrix(W0, W1, H, s=10 ** log_s, budget=budget, config=cfg)
    assert torch.equal(again.weight.view(torch.uint8), res.weight.view(torch.uint8))
    assert torch.equal(again.kept, res.kept) and again.stats == res.stats


@FAST
@given(shape=shapes, seed=seeds, log_s=log_s_official, block=st.integers(4, 24),
       sub_block=st.integers(1, 6), n_dead=st.integers(0, 2))
def test_official_equals_plain_reference(shape, seed, log_s, block, sub_block, n_dead):
    r, c = shape
    W0, W1, H = problem(r, c, seed, n_dead=min(n_dead, c - 1))
    cfg = SafeDeltaConfig(block_size=block, sub_block=sub_block)
    res = protect_matrix(W0, W1, H, s=10 ** log_s, budget="official", config=cfg)
    W_ref, mask_ref = reference_official(W0, W1, H, 10 ** log_s, block_size=block,
                                         sub_block=sub_block)
    assert torch.equal(res.kept, mask_ref)
    assert torch.allclose(res.weight, W_ref, rtol=1e-4, atol=1e-6)


@FAST
@given(shape=shapes, seed=seeds, dtype=st.sampled_from(DTYPES), budget=st.sampled_from(
    ["default", "official"]))
def test_layer_wrappers_equal_protect_matrix(shape, seed, dtype, budget):
    """nn.Linear (out x in) and transformers' Conv1D (in x out) give the protect_matrix result
    on the out x in matrix, with the Hessian accumulated from the layer's inputs."""
    from transformers.pytorch_utils import Conv1D

    r, c = shape
    g = torch.Generator().manual_seed(seed)
    W0 = (0.02 * torch.randn(r, c, generator=g)).to(dtype)
    W1 = (W0.float() + 0.002 * torch.randn(r, c, generator=g)).to(dtype)
    batches = [torch.randn(2, 5, c, generator=g), torch.randn(7, c, generator=g)]
    s = 1e-3 if budget == "default" else 0.3

    linear = torch.nn.Linear(c, r, bias=False).to(dtype)
    conv = Conv1D(r, c).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(W0)
        conv.weight.copy_(W0.t())
    results = []
    for layer, ft in ((linear, W1), (conv, W1.t().contiguous())):
        sd = SafeDeltaLayer(layer)
        assert (sd.rows, sd.columns) == (r, c)
        for b in batches:
            sd.add_batch(b.to(dtype))
        res = sd.solve(ft, budget=budget, s=s)
        assert res.weight.shape == layer.weight.shape and res.weight.dtype == dtype
        H = sd.H
        sd.free()
        assert sd.H is None
        results.append((res, H))
    (lin, H_lin), (cv, H_cv) = results
    assert torch.equal(H_lin, H_cv)
    direct = protect_matrix(W0, W1, H_lin, s=s, budget=budget)
    assert torch.equal(lin.weight, direct.weight) and torch.equal(lin.kept, direct.kept)
    assert torch.equal(cv.weight.t(), direct.weight) and torch.equal(cv.kept.t(), direct.kept)
    assert torch.equal(linear.weight, W0)  # the layer itself is left alone


@FAST
@given(c=st.integers(1, 20), sizes=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 6)),
                                            min_size=1, max_size=5), seed=seeds)
def test_add_batch_is_the_running_mean_of_2_x_xt(c, sizes, seed):
    """H = (2/N) sum over samples n of X_n X_n^T, N = samples (batch entries) seen so far."""
    g = torch.Generator().manual_seed(seed)
    sd = SafeDeltaLayer(torch.nn.Linear(c, 3))
    samples = []
    for batch, tokens in sizes:
        x = torch.randn(batch, tokens, c, generator=g, dtype=torch.float64)
        sd.add_batch(x.float())
        samples.extend(x)
    expected = 2 / len(samples) * sum(s_.T @ s_ for s_ in samples)  # s_: tokens x c
    assert sd.nsamples == len(samples)
    assert torch.allclose(sd.H.double(), expected, rtol=1e-5, atol=1e-5)


def test_add_batch_rejects_the_wrong_width():
    from safedelta.errors import ShapeMismatch

    sd = SafeDeltaLayer(torch.nn.Linear(4, 2))
    with pytest.raises(ShapeMismatch, match="4 features"):
        sd.add_batch(torch.randn(3, 5))
