"""The Safe Delta kernel: one linear layer, tensors in, tensors out (no I/O, no MLflow).

Notation (``docs/algorithm.md``, "Notation"): a linear weight ``W`` is ``r x c`` (rows = out
features, columns = in features); ``X`` its inputs on the safe calibration set (``c x tokens``);
``H = (2/N) sum_n X_n X_n^T`` (``c x c``, ``N`` = calibration samples, running mean as in
SparseGPT); ``W0`` the aligned weight, ``W1`` the fine-tuned one, ``delta = W1 - W0``. The safety
loss of a weight ``W`` is ``L(W) = 1/2 tr((W - W0) H (W - W0)^T)``: the mean over calibration
samples of ``||(W - W0) X_n||^2``. ``U`` is the upper Cholesky factor of the damped ``H^-1``
(``H^-1 = U^T U``) and ``d = diag(U)``.

A budget rule (:mod:`safedelta.budget`, a registry: ``"official"`` reproduces the published
code, ``"default"`` is the project's width-independent rule) chooses which delta entries are
*kept* (end exactly at ``W1``); every other entry ends at ``W0`` plus an Optimal-Brain-Surgeon
compensation that cancels, on the safe inputs, the effect of the kept ones. This module prepares
the Hessian (damping and the factors the rule asks for), checks inputs and outputs, dispatches
to the rule and reports what it did.

Everything is computed in fp32 (TF32 off for the duration of a solve) on the device of the
aligned weight, deterministically on CPU; results are cast back to the aligned weight's dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from safedelta.budget import FACTORS, BudgetRule, get_budget_rule
from safedelta.config import SafeDeltaConfig
from safedelta.errors import InvalidConfig, NonFiniteWeights, ShapeMismatch
from safedelta.numerics import all_finite
from safedelta.numerics import fp32_exact as _fp32_exact


@dataclass
class PreparedHessian:
    """``H`` and its factors, ready for any number of :func:`protect_matrix` calls.

    Attributes:
        H: ``c x c`` fp32, as accumulated (undamped, dead channels untouched): used for the
            output energy ``E0`` (unless given to :func:`protect_matrix`) and, for rules with
            ``needs_H``, the safety loss; ``None`` in a factorisation read back from the cache,
            which serves rules with ``cached_factors`` and a given output energy only.
        U: ``c x c`` upper Cholesky factor of the damped ``H^-1`` (natural column order); ``None``
            unless a rule asked for factor ``"U"`` (the official rule).
        d: ``c``, ``diag(U)``: the sequential inverse diagonal (``None`` with ``U``).
        hinv_diag: ``c``, ``diag(H^-1)`` of the damped ``H`` (the paper's ``[H^-1]_mm``).
        order: ``c`` long, the key order (key ``1/[H^-1]_mm`` ascending, stable).
        U_order: ``c x c`` upper Cholesky factor of the damped ``H^-1`` permuted to ``order``;
            ``None`` unless a rule asked for factor ``"U_order"`` (the default rule).
        damp: the damping added to the diagonal (``damp * mean(diag H)``).
        dead: ``c`` bool, input channels never active on the calibration set.
    """

    H: Tensor | None
    U: Tensor | None
    d: Tensor | None
    hinv_diag: Tensor
    order: Tensor
    U_order: Tensor | None
    damp: float
    dead: Tensor

    @property
    def columns(self) -> int:
        return self.hinv_diag.shape[0]

    def to(self, device: torch.device | str) -> PreparedHessian:
        """A copy on ``device`` (self when already there)."""
        if self.hinv_diag.device == torch.device(device):
            return self
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self).items()}
        return PreparedHessian(**moved)


@dataclass
class MatrixStats:
    """What one :func:`protect_matrix` call did.

    ``budget`` and ``cost_used`` are in the budget rule's units: official, the summed
    ``(W1 - W)^2 / d^2`` of the code (no 1/2); default, safety-loss units with the damped ``H``
    (``cost_used`` is then exactly the damped loss of the result). ``safety_loss`` and
    ``output_energy`` use the undamped ``H``; ``cost_predicted`` is the paper's independent
    per-entry estimate ``sum over kept of delta^2 / (2 [H^-1]_mm)`` (damped ``H^-1``), for
    comparison with ``safety_loss``. ``kept_fraction = n_kept / (rows * cols)``; entries whose
    delta is zero can count as kept (they are at their fine-tuned value at no cost).
    """

    rows: int
    cols: int
    n_candidates: int
    n_kept: int
    kept_fraction: float
    budget: float
    cost_used: float
    cost_predicted: float
    delta_norm: float
    delta_norm_kept: float
    safety_loss: float
    output_energy: float
    budget_rule: str
    s: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


@dataclass
class MatrixResult:
    """``weight``: ``r x c``, dtype and device of the aligned weight; ``kept``: ``r x c`` bool,
    the entries set to their fine-tuned value; ``stats``: :class:`MatrixStats`."""

    weight: Tensor
    kept: Tensor
    stats: MatrixStats


def _check_finite(name: str, t: Tensor) -> None:
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteWeights(
            f"{name} holds {bad} NaN/Inf value(s) (shape {tuple(t.shape)}); "
            "check the checkpoint or the calibration activations")


def prepare_hessian(H: Tensor, *, damp: float = 0.01,
                    budget: str | None = None) -> PreparedHessian:
    """Damp and factor an accumulated Hessian (``docs/algorithm.md``, "Damping and factors").

    Args:
        H: ``c x c`` as accumulated (``(2/N) sum X X^T``), before damping; any float dtype.
        damp: fraction of ``mean(diag H)`` added to the diagonal.
        budget: the budget rule the result will serve: only the factors it asks for
            (``BudgetRule.factors``) are computed; ``None`` computes every factor (``U`` and
            ``U_order``), usable by every shipped rule.

    Dead inputs (``diag(H) == 0``) get ``H[m, m] = 1``; then ``H += damp * mean(diag H) * I``;
    ``H^-1`` from the Cholesky factor of ``H``; ``U`` = upper Cholesky factor of ``H^-1``, as in
    SparseGPT/GPTQ; ``U_order`` = upper Cholesky factor of ``H^-1`` permuted to the key order.
    """
    factors = FACTORS if budget is None else get_budget_rule(budget).factors
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ShapeMismatch(f"Hessian must be square (c x c), got shape {tuple(H.shape)}")
    if not (damp > 0 and math.isfinite(damp)):
        raise InvalidConfig(f"damp must be a finite number > 0, got {damp!r}")
    _check_finite("Hessian", H)
    with _fp32_exact(H.device):
        H = H.detach().to(torch.float32).clone()
        c = H.shape[0]
        Hd = H.clone()
        dead = torch.diag(Hd) == 0
        Hd[dead, dead] = 1
        lam = damp * torch.mean(torch.diag(Hd))
        Hd.diagonal().add_(lam)
        try:
            Hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd))
            U = torch.linalg.cholesky(Hinv, upper=True) if "U" in factors else None
            hinv_diag = torch.diag(Hinv).clone()
            key = 1.0 / hinv_diag
            order = torch.sort(key, stable=True).indices
            U_order = (torch.linalg.cholesky(Hinv.index_select(0, order).index_select(1, order),
                                             upper=True) if "U_order" in factors else None)
        except torch.linalg.LinAlgError as e:  # H not positive definite even after damping
            raise InvalidConfig(
                f"the damped Hessian ({c}x{c}) is not positive definite ({e}); "
                f"increase damp (now {damp})") from e
    return PreparedHessian(H=H, U=U, d=None if U is None else torch.diag(U).clone(),
                           hinv_diag=hinv_diag, order=order,
                           U_order=U_order, damp=float(lam), dead=dead)


def half_quadratic(A: Tensor, H: Tensor) -> float:
    """``1/2 tr(A H A^T)`` in fp64 accumulation of an fp32 product."""
    return 0.5 * float(((A @ H) * A).sum(dtype=torch.float64))


def undamped_loss(dW: Tensor, damped_loss: float, prep: PreparedHessian) -> float:
    """``1/2 tr(dW H dW^T)`` (undamped ``H``) from a sequential solve's exact damped cost, in
    ``O(r c)`` instead of an ``r c^2`` product.

    The default rule's summed cost is the loss of its result under the damped Hessian
    ``H' = H + lambda I + diag(dead)`` (GPTQ identity: ``dW = -E U`` and ``U H' U^T = I``, so
    ``1/2 tr(dW H' dW^T) = 1/2 ||E||^2``). Subtracting what the damping adds leaves the loss under
    ``H``: ``cost - 1/2 lambda ||dW||^2 - 1/2 sum over dead m of ||dW[:, m]||^2`` (clamped at 0
    against rounding). It agrees with the direct quadratic to rounding (a test checks it).
    """
    if damped_loss == 0.0:
        return 0.0
    col_sq = (dW * dW).sum(0, dtype=torch.float64)  # c
    damping = prep.damp * float(col_sq.sum()) + float(col_sq[prep.dead].sum())
    return max(0.0, damped_loss - 0.5 * damping)


def _resolve(config: SafeDeltaConfig | None, s: float | None,
             budget: str | None) -> tuple[SafeDeltaConfig, float]:
    cfg = config if config is not None else SafeDeltaConfig()
    if not isinstance(cfg, SafeDeltaConfig):
        raise InvalidConfig(f"config must be a SafeDeltaConfig, got {type(cfg).__name__}")
    if budget is not None:
        cfg = cfg.model_copy(update={"budget": get_budget_rule(budget).name})
    if s is not None:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (
                0 <= s < float("inf")):
            raise InvalidConfig(f"s must be a finite number >= 0, got {s!r}")
        cfg = cfg.model_copy(update={"s": float(s)})
    return cfg, float(cfg.resolved_s)


def _check_prepared_for(rule: BudgetRule, prep: PreparedHessian,
                        output_energy: float | None) -> None:
    """Refuse a prepared Hessian that lacks what ``rule`` reads, saying how to prepare it."""
    if prep.H is None and (rule.needs_H or output_energy is None):
        raise InvalidConfig(
            f"this prepared Hessian has no H (a cached factorisation): budget rule {rule.name!r} "
            + ("needs H" if rule.needs_H else "needs H or a given output_energy"))
    missing = sorted(f for f in rule.factors if getattr(prep, f) is None)
    if missing:
        raise InvalidConfig(f"budget rule {rule.name!r} needs factor(s) {missing} that this "
                            f"prepared Hessian lacks; prepare it with budget={rule.name!r} "
                            "(or budget=None for every factor)")


def protect_matrix(aligned: Tensor, finetuned: Tensor, hessian: Tensor | PreparedHessian, *,
                   s: float | None = None, budget: str | None = None,
                   config: SafeDeltaConfig | None = None,
                   output_energy: float | None = None) -> MatrixResult:
    """Safe Delta on one linear weight.

    Args:
        aligned: ``W0``, ``r x c`` (out x in), any float dtype.
        finetuned: ``W1``, ``r x c``.
        hessian: ``H`` (``c x c``, accumulated, undamped) or a :class:`PreparedHessian`
            (then ``config.damp`` is not used: its damping is already in).
        s: safety budget; overrides ``config.s`` (``None``: the config's, else the rule's
            default, ``BudgetRule.default_s``).
        budget: a registered budget rule (``safedelta.budget.budget_names()``: ``"default"``,
            ``"official"``...); overrides ``config.budget``.
        config: the other settings (exclusion, damping, block sizes).
        output_energy: ``E0 = 1/2 tr(W0 H W0^T)`` when already known (it depends on the aligned
            model only: the pipeline caches it with the factorisation); ``None`` computes it
            from ``H`` (an ``r c^2`` product). A cached value must come from this very
            expression for the result to be bitwise that of a fresh call.

    Returns:
        :class:`MatrixResult`; ``weight`` has the dtype and device of ``aligned``.

    Raises:
        ShapeMismatch, InvalidConfig, NonFiniteWeights (inputs or result).
    """
    cfg, s_val = _resolve(config, s, budget)
    if aligned.ndim != 2 or aligned.shape != finetuned.shape:
        raise ShapeMismatch(f"aligned and fine-tuned weights must be matching 2-D matrices, got "
                            f"{tuple(aligned.shape)} and {tuple(finetuned.shape)}")
    r, c = aligned.shape
    hs = ((hessian.columns,) * 2 if isinstance(hessian, PreparedHessian)
          else tuple(hessian.shape))
    if hs != (c, c):
        raise ShapeMismatch(f"Hessian must be {c}x{c} for a {r}x{c} weight, got {hs}")
    _check_finite("aligned weight", aligned)
    _check_finite("fine-tuned weight", finetuned)
    device = aligned.device
    with _fp32_exact(device):
        rule = get_budget_rule(cfg.budget)
        prep = (hessian if isinstance(hessian, PreparedHessian)
                else prepare_hessian(hessian.to(device), damp=cfg.damp, budget=rule.name)
                ).to(device)
        _check_prepared_for(rule, prep, output_energy)
        # contiguous: results must not depend on the memory layout (Conv1D's transposed views)
        W0 = aligned.detach().to(torch.float32).contiguous()
        W1 = finetuned.detach().to(device=device, dtype=torch.float32).contiguous()
        W = W0.clone()
        E0 = half_quadratic(W0, prep.H) if output_energy is None else float(output_energy)
        sel = rule.solve(W, W1, prep, s_val, cfg, E0)
        kept, eps, cost, n_cand = sel.kept, sel.budget, sel.cost_used, sel.n_candidates
        loss = rule.safety_loss(W - W0, prep, sel)
        delta = W1 - W0
        n_kept = int(kept.sum())
        stats = MatrixStats(
            rows=r, cols=c, n_candidates=n_cand, n_kept=n_kept,
            kept_fraction=n_kept / (r * c) if r * c else 0.0, budget=eps, cost_used=cost,
            cost_predicted=0.5 * float((delta ** 2 / prep.hinv_diag)[kept].sum(
                dtype=torch.float64)),
            delta_norm=float(delta.norm()), delta_norm_kept=float(delta[kept].norm()),
            safety_loss=loss, output_energy=E0,
            budget_rule=cfg.budget, s=s_val)
        # entries equal to the aligned value keep the aligned bits (s=0 is bitwise W0)
        weight = torch.where(W == W0, aligned.detach(), W.to(aligned.dtype))
    _check_finite("protected weight (after the solve, in the aligned dtype)", weight)
    return MatrixResult(weight=weight, kept=kept, stats=stats)


class SafeDeltaLayer:
    """One linear layer: accumulates its Hessian from a forward hook, then solves.

    ``layer`` is an ``nn.Linear`` (weight ``out x in``) or a ``transformers`` ``Conv1D`` (weight
    stored ``in x out``, transposed on entry and exit). The layer's current weight is the aligned
    ``W0``; the layer is not modified: :meth:`solve` returns the protected weight in the layer's
    own storage layout, ready to be copied into it.
    """

    def __init__(self, layer: torch.nn.Module):
        from safedelta.hessian import HessianAccumulator
        from safedelta.modelwalk import in_features, is_conv1d

        self.layer = layer
        self.transposed = is_conv1d(layer)
        self.columns = in_features(layer)
        self.rows = layer.weight.numel() // self.columns
        self.hessian: HessianAccumulator | None = HessianAccumulator(self.columns,
                                                                     layer.weight.device)

    @property
    def H(self) -> Tensor | None:
        """``H = (2/N) sum_n X_n X_n^T`` so far (``None`` after :meth:`free`)."""
        return None if self.hessian is None else self.hessian.H

    @property
    def nsamples(self) -> int:
        return 0 if self.hessian is None else self.hessian.nsamples

    def add_batch(self, inp: Tensor, mask: Tensor | None = None) -> None:
        """Add inputs (``batch x tokens x c`` or ``tokens x c``; a 2-D input is one sample;
        ``mask``, ``batch x tokens``, true for real tokens) to ``H``: delegates to
        :class:`safedelta.hessian.HessianAccumulator`, the calibration pass's accumulator."""
        self.hessian.add(inp, mask)

    def solve(self, finetuned_weight: Tensor, config: SafeDeltaConfig | None = None, *,
              s: float | None = None, budget: str | None = None) -> MatrixResult:
        """:func:`protect_matrix` with the layer's weight as ``W0``; ``finetuned_weight`` and the
        result's ``weight``/``kept`` are in the layer's storage layout."""
        if self.nsamples == 0:
            raise InvalidConfig("no calibration inputs were added to this layer (add_batch)")
        W0 = self.layer.weight.detach()
        if finetuned_weight.shape != W0.shape:
            raise ShapeMismatch(f"fine-tuned weight has shape {tuple(finetuned_weight.shape)}, "
                                f"the layer's is {tuple(W0.shape)}")
        if self.transposed:
            W0, finetuned_weight = W0.t(), finetuned_weight.t()
        res = protect_matrix(W0, finetuned_weight, self.H, s=s, budget=budget, config=config)
        if self.transposed:
            res = MatrixResult(weight=res.weight.t().contiguous(), kept=res.kept.t().contiguous(),
                               stats=res.stats)
        return res

    def free(self) -> None:
        """Drop the Hessian."""
        self.hessian = None

