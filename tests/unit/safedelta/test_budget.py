"""Budget rules as registered objects, and the default rule's batched solve against the plain
entry-by-entry formula (``safedelta._reference.reference_default``)."""

from __future__ import annotations

import json

import pytest
import torch

from safedelta._reference import reference_default
from safedelta.budget import (DEFAULT_S, BudgetRule, Selection, budget_names, get_budget_rule,
                              register_budget_rule, unregister_budget_rule)
from safedelta.config import SafeDeltaConfig
from safedelta.errors import InvalidConfig
from safedelta.solver import half_quadratic, prepare_hessian, protect_matrix
from tests.unit.safedelta.test_solver import make_problem


class KeepLarge(BudgetRule):
    """A throw-away rule: keep every entry with ``|delta| > s``, no compensation, no factor."""

    name = "keep-large"
    default_s = 1e-3
    summary = "toy"
    s_help = "absolute delta threshold"

    def solve(self, W, W1, prep, s, cfg, E0):
        kept = (W1 - W).abs() > s
        W[kept] = W1[kept]
        return Selection(kept, budget=s, cost_used=0.0, n_candidates=W.numel())


def test_a_rule_is_one_class_and_one_registration():
    from mlflow_safedelta.policy import SelectS

    W0, W1, H, _ = make_problem(12, 20, seed=4)
    register_budget_rule(KeepLarge())
    try:
        assert "keep-large" in budget_names() and DEFAULT_S["keep-large"] == 1e-3
        prep = prepare_hessian(H, budget="keep-large")  # asks for no factor
        assert prep.U is None and prep.U_order is None
        res = protect_matrix(W0, W1, H, budget="keep-large", s=2e-4)
        want = (W1 - W0).abs() > 2e-4
        assert torch.equal(res.kept, want) and 0 < int(want.sum()) < want.numel()
        assert torch.equal(res.weight, torch.where(want, W1, W0))
        assert res.stats.budget_rule == "keep-large" and res.stats.s == 2e-4
        assert res.stats.safety_loss == pytest.approx(half_quadratic(res.weight - W0, H))
        cfg = SafeDeltaConfig(budget="keep-large")  # the config type follows the registry
        assert protect_matrix(W0, W1, H, config=cfg).stats.s == 1e-3
        schema = SafeDeltaConfig.model_json_schema()["properties"]["budget"]
        assert "keep-large" in schema["enum"]
        assert SelectS(budget="keep-large").search_range == pytest.approx((1e-5, 1e-2))
        assert "keep-large" in json.dumps(SelectS.model_json_schema())
    finally:
        unregister_budget_rule("keep-large")
    with pytest.raises(ValueError, match="unknown budget rule 'keep-large'; known: default"):
        SafeDeltaConfig(budget="keep-large")


@pytest.mark.parametrize("name, fix", [
    ("Keep", "lowercase"), ("keep_", "lowercase"), ("", "lowercase"), ("1st", "starting with"),
    ("default", "already registered"), ("official", "choose another name")])
def test_register_refuses_a_bad_or_taken_name_saying_what_to_change(name, fix):
    bad = type("Bad", (KeepLarge,), {"name": name})
    with pytest.raises(InvalidConfig, match=fix):
        register_budget_rule(bad())
    assert budget_names() == ["default", "official"]


def test_register_refuses_unusable_attributes():
    for attrs, msg in (({"default_s": -1.0}, "default_s must be a finite number"),
                       ({"default_s": float("inf")}, "default_s must be a finite number"),
                       ({"factors": frozenset({"L"})}, r"factors must be a subset of \['U'"),
                       ({"cached_factors": True}, "set cached_factors = False")):
        with pytest.raises(InvalidConfig, match=msg):
            register_budget_rule(type("Bad", (KeepLarge,), {"name": "bad", **attrs})())
    no_solve = type("NoSolve", (BudgetRule,), {"name": "nosolve"})
    with pytest.raises(InvalidConfig, match="does not implement solve"):
        register_budget_rule(no_solve())
    with pytest.raises(InvalidConfig, match="register a BudgetRule instance"):
        register_budget_rule(KeepLarge)  # the class, not an instance
    assert "bad" not in budget_names() and "nosolve" not in budget_names()


def test_unknown_rule_names_the_known_ones():
    W0, W1, H, _ = make_problem(4, 6)
    with pytest.raises(InvalidConfig, match="unknown budget rule 'greedy'; known: default, "
                                            "official"):
        get_budget_rule("greedy")
    with pytest.raises(InvalidConfig, match="known: default, official"):
        protect_matrix(W0, W1, H, budget="greedy")


def test_a_rule_refuses_a_prepared_hessian_without_its_factor():
    W0, W1, H, _ = make_problem(8, 16, seed=2)
    with pytest.raises(InvalidConfig, match=r"'official' needs factor\(s\) \['U'\].*"
                                            "budget='official'"):
        protect_matrix(W0, W1, prepare_hessian(H, budget="default"), budget="official")
    with pytest.raises(InvalidConfig, match=r"\['U_order'\]"):
        protect_matrix(W0, W1, prepare_hessian(H, budget="official"), budget="default")


# ---------------------------------------------------------------------------------------------
# the default rule: lazy batched blocks == the entry-by-entry formula

#: stated tolerance: weights agree to this many units of max |W0| (fp32 rounding of a
#: triangular solve against rank-1 updates in another order); masks agree exactly.
WEIGHT_RTOL = 1e-5


@pytest.mark.parametrize("r, c, dead", [(7, 5, ()), (24, 130, (3,)), (40, 300, (0, 299)),
                                        (64, 257, ())])
@pytest.mark.parametrize("s", [0.0, 1e-6, 1e-4, 3e-3, 1e-1, 1e9])
def test_default_batched_solve_equals_the_entry_by_entry_formula(r, c, dead, s):
    W0, W1, H, _ = make_problem(r, c, dead=dead, seed=r + c)
    prep = prepare_hessian(H)
    got = protect_matrix(W0, W1, prep, s=s)
    W_ref, kept_ref, cost_ref = reference_default(W0, W1, prep, s, got.stats.output_energy)
    assert torch.equal(got.kept, kept_ref)
    assert float((got.weight - W_ref).abs().max()) <= WEIGHT_RTOL * float(W0.abs().max())
    assert got.stats.cost_used == pytest.approx(cost_ref, rel=1e-5, abs=1e-30)
    assert torch.equal(got.weight[got.kept], W1[got.kept])  # kept entries hold W1 exactly


def test_default_prefix_ending_mid_column_in_a_later_block():
    """A budget that ends the prefix inside a column of the third 128-column block: the kept
    set is exactly the reference's, entries after it in that column are compensated."""
    W0, W1, H, _ = make_problem(16, 400, seed=9)
    prep = prepare_hessian(H)
    E0 = protect_matrix(W0, W1, prep, s=0.0).stats.output_energy
    # the s whose prefix ends at entry 16 * 300 + 5 (column 300 in order, sixth row)
    costs = []
    Wp, W1p, U = W0[:, prep.order].clone(), W1[:, prep.order], prep.U_order
    for j in range(301):
        e = (Wp[:, j] - W1p[:, j]) / U[j, j]
        costs += (0.5 * e.double() ** 2).tolist()
        Wp[:, j] = W1p[:, j]
        Wp[:, j + 1:] -= torch.outer(e, U[j, j + 1:])
    target = sum(costs[:16 * 300 + 6])
    s = (target - 0.5 * costs[16 * 300 + 5]) / E0  # between entry 5's and 6's cumulative
    got = protect_matrix(W0, W1, prep, s=s, config=SafeDeltaConfig(exclude_fraction=0.0))
    _, kept_ref, _ = reference_default(W0, W1, prep, s, E0, exclude_fraction=0.0)
    assert torch.equal(got.kept, kept_ref)
    assert int(got.kept.sum()) == 16 * 300 + 5
    col = int(prep.order[300])
    assert got.kept[:5, col].all() and not got.kept[5:, col].any()
