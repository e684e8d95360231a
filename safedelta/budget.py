"""Budget rules: which delta entries one linear layer keeps, as registered objects.

A budget rule (``docs/algorithm.md``, "Budget rules") decides, given the aligned weight ``W0``,
the fine-tuned ``W1`` and the factored Hessian, which entries are *kept* (end exactly at ``W1``)
and compensates the rest (OBS). Each rule is one :class:`BudgetRule` subclass, registered by name
with :func:`register_budget_rule`; everything that names a rule (``SafeDeltaConfig.budget``, the
CLI's ``--budget`` choice and help, the policy schema, the pipeline's choice of factorisations)
reads this registry, so adding a rule is one class and one registration::

    class Greedy(BudgetRule):
        name = "greedy"
        default_s = 1e-5
        s_help = "..."
        def solve(self, W, W1, prep, s, cfg, E0): ...
    register_budget_rule(Greedy())

The two shipped rules are :class:`OfficialBudget` (the published code) and :class:`DefaultBudget`
(the project's width-independent rule). Importing this module does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator

from safedelta._registry import NamedRegistry
from safedelta.errors import InvalidConfig

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from safedelta.config import SafeDeltaConfig
    from safedelta.solver import PreparedHessian

#: the optional factors of :class:`~safedelta.solver.PreparedHessian` a rule may ask for:
#: ``U`` (upper Cholesky factor of the damped ``H^-1``, natural column order, with ``d =
#: diag(U)``) and ``U_order`` (the same factor permuted to the key order ``order``).
FACTORS = frozenset({"U", "U_order"})

#: columns per lazy batched update (GPTQ's trick).
LAZY_BLOCK = 128


@dataclass
class Selection:
    """What a rule's :meth:`BudgetRule.solve` returns.

    Attributes:
        kept: ``r x c`` bool, the entries set to their fine-tuned value.
        budget: the budget ``eps`` in the rule's units (summed over blocks for a per-block rule).
        cost_used: the summed cost of the kept entries, in the same units.
        n_candidates: entries the rule could have kept (after the exclusion fraction).
    """

    kept: Tensor
    budget: float
    cost_used: float
    n_candidates: int


class BudgetRule:
    """A budget rule. Subclasses set the class attributes and implement :meth:`solve`.

    Attributes:
        name: the registry key (lowercase letters and digits, single ``-``/``_`` between them).
        default_s: ``s`` when none is given.
        summary: a few words: what the rule is (CLI help).
        s_help: a few words: what ``s`` means under this rule (CLI help).
        factors: which optional factors of the prepared Hessian :meth:`solve` reads (a subset of
            :data:`FACTORS`); :func:`~safedelta.solver.prepare_hessian` computes only these.
        needs_H: whether the undamped ``H`` must be present (for :meth:`safety_loss`); a
            factorisation read back from the cache has none.
        cached_factors: whether the pipeline may keep this rule's factorisation on disk (the
            factor cache stores ``U_order``, ``order``, ``hinv_diag`` and ``dead`` only).
    """

    name: ClassVar[str] = ""
    default_s: ClassVar[float] = 0.0
    summary: ClassVar[str] = ""
    s_help: ClassVar[str] = ""
    factors: ClassVar[frozenset[str]] = frozenset()
    needs_H: ClassVar[bool] = True
    cached_factors: ClassVar[bool] = False

    def solve(self, W: Tensor, W1: Tensor, prep: PreparedHessian, s: float,
              cfg: SafeDeltaConfig, E0: float) -> Selection:
        """Select and compensate, in place on ``W`` (``r x c`` fp32, starts at ``W0``).

        Args:
            W: the weight being protected; on return kept entries hold ``W1`` exactly and the
                others ``W0`` plus the compensation.
            W1: the fine-tuned weight, ``r x c`` fp32.
            prep: the prepared Hessian (holding at least :attr:`factors`).
            s: the budget constant.
            cfg: the other settings (exclusion fraction, block sizes...).
            E0: the aligned layer's output energy ``1/2 tr(W0 H W0^T)``.
        """
        raise NotImplementedError

    def safety_loss(self, dW: Tensor, prep: PreparedHessian, sel: Selection) -> float:
        """``1/2 tr(dW H dW^T)`` with the undamped ``H`` (``dW = W - W0``); a rule may use
        what its solve already knows instead of the ``r c^2`` product."""
        from safedelta.solver import half_quadratic

        return half_quadratic(dW, prep.H)


# --------------------------------------------------------------------------------------------
# the registry

#: name -> rule; filled by :func:`register_budget_rule` (the two shipped rules at the end of
#: this module).
BUDGET_RULES: NamedRegistry[BudgetRule] = NamedRegistry("budget rule", InvalidConfig)


def register_budget_rule(rule: BudgetRule) -> BudgetRule:
    """Add ``rule`` to the registry; returns it. Raises :class:`InvalidConfig` saying what to
    change when the name is malformed or taken, or the rule's attributes are unusable."""
    if not isinstance(rule, BudgetRule):
        raise InvalidConfig(f"register a BudgetRule instance, got {type(rule).__name__}; "
                            "subclass safedelta.budget.BudgetRule")
    name = rule.name
    s = rule.default_s
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0 <= s < math.inf):
        raise InvalidConfig(f"budget rule {name!r}: default_s must be a finite number >= 0, "
                            f"got {s!r}")
    unknown = set(rule.factors) - FACTORS
    if unknown:
        raise InvalidConfig(f"budget rule {name!r}: unknown factor(s) {sorted(unknown)}; "
                            f"factors must be a subset of {sorted(FACTORS)}")
    if rule.cached_factors and (rule.needs_H or "U" in rule.factors):
        raise InvalidConfig(f"budget rule {name!r}: the factor cache holds neither H nor U; "
                            "set cached_factors = False")
    if type(rule).solve is BudgetRule.solve:
        raise InvalidConfig(f"budget rule {name!r} does not implement solve()")
    return BUDGET_RULES.add(name, rule)


def unregister_budget_rule(name: str) -> None:
    """Remove a rule (for tests that register a throw-away one)."""
    BUDGET_RULES.remove(name)


def budget_names() -> list[str]:
    """The registered rule names, in registration order."""
    return BUDGET_RULES.names()


def get_budget_rule(name: str) -> BudgetRule:
    """The rule registered as ``name``; the error lists the known names."""
    return BUDGET_RULES.get(name)


def check_budget_name(name: str) -> str:
    """``name`` if registered (pydantic validators raise ``ValueError`` for a clean message)."""
    try:
        return get_budget_rule(name).name
    except InvalidConfig as exc:
        raise ValueError(str(exc)) from None


def add_budget_enum(schema: dict) -> None:
    """``json_schema_extra`` for a budget-name field: the registered names as its ``enum``."""
    schema["enum"] = budget_names()


def rules_help() -> str:
    """One clause per rule for CLI help: its name and what it is."""
    return "; ".join(f"'{r.name}': {r.summary}" for r in BUDGET_RULES.values())


def default_s_help() -> str:
    """One sentence per rule for CLI help: what ``s`` means and its default."""
    return " ".join(f"Budget '{r.name}': {r.s_help} (default {r.default_s:g})."
                    for r in BUDGET_RULES.values())


class _DefaultS(Mapping):
    """``DEFAULT_S[name]``: the registered rule's ``default_s`` (a live view)."""

    def __getitem__(self, name: str) -> float:
        if name not in BUDGET_RULES:
            raise KeyError(name)
        return BUDGET_RULES.get(name).default_s

    def __iter__(self) -> Iterator[str]:
        return iter(BUDGET_RULES)

    def __len__(self) -> int:
        return len(BUDGET_RULES)


#: rule name -> its default ``s`` (read from the registry).
DEFAULT_S: Mapping[str, float] = _DefaultS()


# --------------------------------------------------------------------------------------------
# official: the published code, with lazy batched updates


class OfficialBudget(BudgetRule):
    """The authors' published rule (``docs/algorithm.md``, "The official rule").

    Blocks of ``block_size`` columns; per entry ``cost = (W1 - W)^2 / d^2`` and ``key = 1/d^2``;
    the ``exclude_fraction`` of each block's entries with the largest key are never candidates;
    the longest prefix of the stable key order within ``eps_B = mean(key) * s/2 *
    r/reference_width`` is kept; compensation in ``sub_block`` column steps.
    """

    name = "official"
    default_s = 0.1
    summary = "the authors' code, tuned for width 4096"
    s_help = "the paper's constant"
    factors = frozenset({"U"})
    needs_H = True
    cached_factors = False

    def solve(self, W, W1, prep, s, cfg, E0) -> Selection:
        import torch

        r, c = W.shape
        U, d = prep.U, prep.d
        kept = torch.zeros(r, c, dtype=torch.bool, device=W.device)
        eps_total, cost_total, n_cand = 0.0, 0.0, 0
        sb = cfg.sub_block
        lazy = max(sb, LAZY_BLOCK // sb * sb)  # lazy blocks end on sub-block boundaries
        for b1 in range(0, c, cfg.block_size):
            b2 = min(b1 + cfg.block_size, c)
            key_cols = 1 / d[b1:b2] ** 2  # |B|
            cost = (W1[:, b1:b2] - W[:, b1:b2]) ** 2 / d[b1:b2] ** 2  # r x |B|
            # mean over the r x |B| key matrix, as the published code (same rounding as
            # _reference)
            eps_B = float(key_cols.expand(r, -1).mean()) * (s / 2) * (r / cfg.reference_width)
            mask = _official_select(cost, key_cols, cfg.exclude_fraction, eps_B)
            kept[:, b1:b2] = mask
            eps_total += eps_B
            cost_total += float(cost[mask].sum())
            nb = r * (b2 - b1)
            n_cand += nb - int(cfg.exclude_fraction * nb)  # as _official_select
            E_B = torch.zeros(r, b2 - b1, device=W.device)  # the block's errors, all of them
            for i1 in range(b1, b2, lazy):  # lazy block: sub-block steps touch only its columns
                i2 = min(i1 + lazy, b2)
                W_l, U_l, d_l = W[:, i1:i2].clone(), U[i1:i2, i1:i2], d[i1:i2]  # r x k, k x k, k
                E_l = E_B[:, i1 - b1:i2 - b1]
                for j1 in range(0, i2 - i1, sb):
                    j2 = min(j1 + sb, i2 - i1)
                    q = torch.where(mask[:, i1 - b1 + j1:i1 - b1 + j2], W1[:, i1 + j1:i1 + j2],
                                    W_l[:, j1:j2])
                    e = (W_l[:, j1:j2] - q) / d_l[j1:j2]  # r x |S|
                    W_l[:, j1:j2] = q
                    W_l[:, j2:] -= e @ U_l[j1:j2, j2:]
                    E_l[:, j1:j2] = e
                W[:, i1:i2] = W_l
                W[:, i2:b2] -= E_l @ U[i1:i2, i2:b2]  # the rest of the block
            W[:, b2:] -= E_B @ U[b1:b2, b2:]  # the blocks after it, once per block (as published)
        return Selection(kept, eps_total, cost_total, n_cand)


def _official_select(cost: Tensor, key_cols: Tensor, exclude_fraction: float,
                     eps: float) -> Tensor:
    """Mask (``r x b``) of the longest prefix of the stable key order within ``eps``.

    The order is that of a stable ascending sort of the row-major flattened ``key`` (constant
    per column): columns by key, and among columns with the *same* key, row-major. It is built
    without sorting ``r * b`` values: position of entry ``(i, p)`` (``p`` = rank of its column)
    is ``r * g0 + i * gsize + (p - g0)`` for the tie group ``[g0, g0 + gsize)`` holding ``p``.
    """
    import torch

    r, b = cost.shape
    n = r * b
    n_cand = n - int(exclude_fraction * n)
    col_rank = torch.sort(key_cols, stable=True).indices  # sorted position p -> column
    ks = key_cols[col_rank]
    new_group = torch.ones(b, dtype=torch.bool, device=cost.device)
    new_group[1:] = ks[1:] != ks[:-1]
    p = torch.arange(b, device=cost.device)
    i = torch.arange(r, device=cost.device)[:, None]
    mask = torch.zeros(r, b, dtype=torch.bool, device=cost.device)
    if bool(new_group.all()):  # no tied keys: the order is simply column by column
        cum = torch.cumsum(cost[:, col_rank].t().reshape(-1)[:n_cand], 0)
        mask[:, col_rank] = r * p + i < _count_within(cum, eps)
        return mask
    gid = torch.cumsum(new_group.long(), 0) - 1
    starts = torch.nonzero(new_group).flatten()
    sizes = torch.diff(starts, append=torch.tensor([b], device=cost.device))
    g0, gsize = starts[gid], sizes[gid]  # per sorted position
    pos = r * g0 + i * gsize + (p - g0)  # r x b, flat position in the order
    flat = torch.empty(n, dtype=cost.dtype, device=cost.device)
    flat[pos.flatten()] = cost[:, col_rank].flatten()
    mask[:, col_rank] = pos < _count_within(torch.cumsum(flat[:n_cand], 0), eps)
    return mask


def _count_within(cum: Tensor, eps: float) -> int:
    """How many leading entries of the non-decreasing ``cum`` are ``<= eps``."""
    import torch

    return int(torch.searchsorted(cum, torch.tensor([eps], dtype=cum.dtype, device=cum.device),
                                  right=True))


# --------------------------------------------------------------------------------------------
# default: width independent, exact sequential cost


class DefaultBudget(BudgetRule):
    """The project's width-independent rule (``docs/algorithm.md``, "The default rule").

    ``eps = s * E0``; entries ordered channel by channel by the key ``1/[H^-1]_mm`` ascending
    (rows ascending within a channel), the last ``exclude_fraction`` never candidates; the
    longest prefix whose summed *exact* sequential OBS cost stays within ``eps`` is kept.
    """

    name = "default"
    default_s = 4e-6
    summary = "width-independent"
    s_help = "tolerated safety loss as a fraction of each layer's output energy"
    factors = frozenset({"U_order"})
    needs_H = False
    cached_factors = True

    def solve(self, W, W1, prep, s, cfg, E0) -> Selection:
        """Lazy batched blocks: within a block, the errors of keeping *every* entry solve one
        triangular system ``E U_l = W_l - W1_l`` (a kept entry's error depends only on the
        entries kept before it, all of them kept when the prefix has not ended); the prefix is
        then found on the block's summed costs, the errors past it are zeroed, and one product
        updates the block and one the columns after it. Equal to the column-by-column loop
        (``safedelta._reference.reference_default``) up to fp32 rounding."""
        import torch

        r, c = W.shape
        perm, U = prep.order, prep.U_order
        n = r * c
        n_cand = n - int(cfg.exclude_fraction * n)
        eps = s * E0
        Wp, W1p = W[:, perm], W1[:, perm]  # columns in processing order
        kept = torch.zeros(r, c, dtype=torch.bool, device=W.device)
        used, left = 0.0, n_cand  # budget used so far; entries that may still be kept
        for i1 in range(0, c, LAZY_BLOCK):
            i2 = min(i1 + LAZY_BLOCK, c)
            k = i2 - i1
            U_l = U[i1:i2, i1:i2]
            E = torch.linalg.solve_triangular(U_l, Wp[:, i1:i2] - W1p[:, i1:i2], upper=True,
                                              left=False)  # r x k: errors if all are kept
            # entries in processing order: column by column, rows ascending; exact cost e^2/2
            cum = used + torch.cumsum(0.5 * E.t().reshape(-1).double() ** 2, 0)
            count = min(_count_within(cum, eps), left)
            if count > 0:
                used = float(cum[count - 1])
            left -= count
            if count == r * k:  # the whole block is kept
                Wp[:, i1:i2] = W1p[:, i1:i2]
                kept[:, i1:i2] = True
                Wp[:, i2:].addmm_(E, U[i1:i2, i2:], alpha=-1)
                continue
            # the prefix ends in this block: errors past it are zero, nothing after it moves
            keep = (torch.arange(k, device=W.device) * r
                    + torch.arange(r, device=W.device)[:, None]) < count  # r x k
            E = E * keep
            Wp[:, i1:i2].addmm_(E, torch.triu(U_l, diagonal=1), alpha=-1)
            Wp[:, i1:i2] = torch.where(keep, W1p[:, i1:i2], Wp[:, i1:i2])
            kept[:, i1:i2] = keep
            Wp[:, i2:].addmm_(E, U[i1:i2, i2:], alpha=-1)
            break
        W[:, perm] = Wp
        out_kept = torch.empty_like(kept)
        out_kept[:, perm] = kept
        return Selection(out_kept, eps, used, n_cand)

    def safety_loss(self, dW, prep, sel) -> float:
        """From the exact damped cost (GPTQ identity), in ``O(r c)``: see
        :func:`safedelta.solver.undamped_loss`."""
        from safedelta.solver import undamped_loss

        return undamped_loss(dW, sel.cost_used, prep)


register_budget_rule(DefaultBudget())
register_budget_rule(OfficialBudget())

__all__ = ["BUDGET_RULES", "DEFAULT_S", "FACTORS", "BudgetRule", "DefaultBudget",
           "OfficialBudget", "Selection", "budget_names", "default_s_help", "get_budget_rule",
           "register_budget_rule", "rules_help", "unregister_budget_rule"]
