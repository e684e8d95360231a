"""The on-disk factor store (safedelta.cache.FactorStore) serves budget rules by their factors."""

import torch

from safedelta.cache import FactorStore, factor_store_path
from safedelta.solver import prepare_hessian


def _hessian(c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(c, 3 * c, generator=g)
    return 2 * X @ X.T / X.shape[1]


def test_default_rule_factors_round_trip_bitwise_with_their_layout(tmp_path):
    prep = prepare_hessian(_hessian(9, 0), budget="default")
    store = FactorStore(factor_store_path(tmp_path, "cpu", 0.01))
    store.save("w", prep)
    back = store.load("w", frozenset({"U_order"}))
    assert back is not None and back.H is None and back.U is None
    assert torch.equal(back.U_order, prep.U_order)
    assert back.U_order.stride() == prep.U_order.stride()  # same rounding in the solve
    assert torch.equal(back.order, prep.order) and torch.equal(back.hinv_diag, prep.hinv_diag)
    assert torch.equal(back.dead, prep.dead) and back.damp == prep.damp


def test_factorisation_without_a_factor_is_stored_but_not_served_to_a_rule_needing_it(tmp_path):
    prep = prepare_hessian(_hessian(7, 1), budget="default")
    prep.U_order = None  # what a cached rule asking for no factor prepares
    store = FactorStore(tmp_path / "f")
    store.save("w", prep)
    assert store.load("w", frozenset({"U_order"})) is None  # factored afresh, then saved over
    back = store.load("w", frozenset())
    assert back is not None and back.U_order is None
    assert torch.equal(back.hinv_diag, prep.hinv_diag)
    assert store.load("missing", frozenset()) is None
