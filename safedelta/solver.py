"""The Safe Delta kernel: one linear layer, tensors in, tensors out (no I/O, no MLflow).

Notation (``docs/safe-delta-algorithm.md``): a linear weight ``W`` is ``r x c`` (rows = out
features, columns = in features); ``X`` its inputs on the safe calibration set (``c x tokens``);
``H = (2/N) sum_n X_n X_n^T`` (``c x c``, ``N`` = calibration samples, running mean as in
SparseGPT); ``W0`` the aligned weight, ``W1`` the fine-tuned one, ``delta = W1 - W0``. The safety
loss of a weight ``W`` is ``L(W) = 1/2 tr((W - W0) H (W - W0)^T)``: the mean over calibration
samples of ``||(W - W0) X_n||^2``. ``U`` is the upper Cholesky factor of the damped ``H^-1``
(``H^-1 = U^T U``) and ``d = diag(U)``.

Two budget rules choose which delta entries are *kept* (end exactly at ``W1``); every other entry
ends at ``W0`` plus an Optimal-Brain-Surgeon compensation that cancels, on the safe inputs, the
effect of the kept ones.

``budget="official"`` reproduces the authors' published code (doc step 3): blocks of
``block_size`` (2048) columns; in each block ``cost = (W1 - W)^2 / d^2`` and ``key = 1/d^2`` per
entry; the ``exclude_fraction`` (15 %) of entries with the largest key are never candidates; the
selection is the longest prefix of the stable key order whose summed cost stays within
``eps_B = mean(key over B) * s/2 * r/reference_width``; compensation runs in ``sub_block`` (4)
column steps with none inside a step. Its ``s`` is tied to the width the constant was tuned for
(Llama-2-7B, 4096): another model needs another ``s``.

``budget="default"`` is width independent; it is defined as follows.

* **Budget.** ``eps = s * E0`` with ``E0 = 1/2 tr(W0 H W0^T)``, the aligned layer's mean output
  energy on the safe inputs. ``s`` is the tolerated safety loss *relative to the layer's own
  output energy*: it does not depend on the width, on the scale of ``X`` or of ``W``, and a layer
  and its k-fold block-diagonal copy get the same kept fraction and relative loss.
* **Order.** Input channels are sorted by the paper's key ``1/[H^-1]_mm`` ascending (stable,
  least safety-sensitive first; the plain diagonal of the damped inverse, independent of column
  order). Entries are ordered channel by channel in that order, rows ascending within a channel;
  the last ``int(exclude_fraction * r * c)`` entries of that order are never candidates.
* **Selection and compensation together.** Columns are processed in that order with full
  sequential OBS (GPTQ-style, column by column, lazy batched updates) using the upper Cholesky
  factor of ``H^-1`` permuted to that order. When a column is reached, the exact cost of keeping
  entry ``(i, m)`` given everything already kept and compensated is ``(W[i,m] - W1[i,m])^2 /
  (2 d_m^2)`` (``W`` the current, compensated weight); the selection is the longest prefix of the
  order whose summed *exact* cost stays within ``eps``. Because the kept entries are a prefix of
  every row's processing order, every not-kept coordinate of the row is free when compensation
  is computed: the result is the OBS optimum for the kept set (kept entries fixed at ``W1``, the
  rest minimising the safety loss), and the summed cost *is* its safety loss under the damped
  ``H`` (GPTQ identity). Hence ``safety_loss <= cost_used <= eps`` always holds: the budget
  bounds the safety loss plus the damping term ``1/2 lambda ||W - W0||^2`` (and, for dead input
  channels, ``1/2 ||W[:, m] - W0[:, m]||^2``), a conservative bound. The paper's independent per-entry estimate
  ``sum delta^2 / (2 [H^-1]_mm)`` over kept entries is reported as ``cost_predicted``; it
  misjudges the real loss when deltas are correlated in the ``H`` metric, which is why the
  default accounts with the exact sequential cost instead.

Everything is computed in fp32 (TF32 off for the duration of a solve) on the device of the
aligned weight, deterministically on CPU; results are cast back to the aligned weight's dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from safedelta.config import SafeDeltaConfig
from safedelta.errors import InvalidConfig, NonFiniteWeights, ShapeMismatch
from safedelta.numerics import all_finite
from safedelta.numerics import fp32_exact as _fp32_exact

BudgetRule = Literal["default", "official"]

#: columns per lazy batched update (GPTQ's trick); results are identical for any value.
LAZY_BLOCK = 128


@dataclass
class PreparedHessian:
    """``H`` and its factors, ready for any number of :func:`protect_matrix` calls.

    Attributes:
        H: ``c x c`` fp32, as accumulated (undamped, dead channels untouched): used for the
            output energy ``E0`` (unless given to :func:`protect_matrix`) and the official
            mode's safety loss; ``None`` in a factorisation read back from a cache, which serves
            the default rule only.
        U: ``c x c`` upper Cholesky factor of the damped ``H^-1`` (natural column order), the
            official mode's; ``None`` when prepared with ``official=False``.
        d: ``c``, ``diag(U)``: the sequential inverse diagonal of the official mode (or ``None``).
        hinv_diag: ``c``, ``diag(H^-1)`` of the damped ``H`` (the paper's ``[H^-1]_mm``).
        order: ``c`` long, the default mode's processing order (key ``1/[H^-1]_mm`` ascending).
        U_order: ``c x c`` upper Cholesky factor of the damped ``H^-1`` permuted to ``order``.
        damp: the damping added to the diagonal (``damp * mean(diag H)``).
        dead: ``c`` bool, input channels never active on the calibration set.
    """

    H: Tensor | None
    U: Tensor | None
    d: Tensor | None
    hinv_diag: Tensor
    order: Tensor
    U_order: Tensor
    damp: float
    dead: Tensor

    @property
    def columns(self) -> int:
        return self.U_order.shape[0]

    def to(self, device: torch.device | str) -> PreparedHessian:
        """A copy on ``device`` (self when already there)."""
        if self.U_order.device == torch.device(device):
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


def prepare_hessian(H: Tensor, *, damp: float = 0.01, official: bool = True) -> PreparedHessian:
    """Damp and factor an accumulated Hessian (doc step 3, first three bullets).

    Args:
        H: ``c x c`` as accumulated (``(2/N) sum X X^T``), before damping; any float dtype.
        damp: fraction of ``mean(diag H)`` added to the diagonal.
        official: also factor for the official rule (``U``, ``d``); ``False`` skips that
            Cholesky when only the default rule will use the result (``U = d = None``).

    Dead inputs (``diag(H) == 0``) get ``H[m, m] = 1``; then ``H += damp * mean(diag H) * I``;
    ``U`` = upper Cholesky factor of ``H^-1`` (Cholesky of ``H``, inverse from it, upper Cholesky
    of the inverse), as in SparseGPT/GPTQ. The default mode's permuted factor is computed here
    too, from the same inverse (one more Cholesky).
    """
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
            U = torch.linalg.cholesky(Hinv, upper=True) if official else None
            hinv_diag = torch.diag(Hinv).clone()
            key = 1.0 / hinv_diag
            order = torch.sort(key, stable=True).indices
            U_order = torch.linalg.cholesky(Hinv.index_select(0, order).index_select(1, order),
                                           upper=True)
        except torch.linalg.LinAlgError as e:  # H not positive definite even after damping
            raise InvalidConfig(
                f"the damped Hessian ({c}x{c}) is not positive definite ({e}); "
                f"increase damp (now {damp})") from e
    return PreparedHessian(H=H, U=U, d=None if U is None else torch.diag(U).clone(),
                           hinv_diag=hinv_diag, order=order,
                           U_order=U_order, damp=float(lam), dead=dead)


# --------------------------------------------------------------------------------------------
# official budget: the published code, with lazy batched updates


def _official_select(cost: Tensor, key_cols: Tensor, exclude_fraction: float,
                     eps: float) -> Tensor:
    """Mask (``r x b``) of the longest prefix of the stable key order within ``eps``.

    The order is that of a stable ascending sort of the row-major flattened ``key`` (constant
    per column): columns by key, and among columns with the *same* key, row-major. It is built
    without sorting ``r * b`` values: position of entry ``(i, p)`` (``p`` = rank of its column)
    is ``r * g0 + i * gsize + (p - g0)`` for the tie group ``[g0, g0 + gsize)`` holding ``p``.
    """
    r, b = cost.shape
    n = r * b
    n_cand = n - int(exclude_fraction * n)
    col_rank = torch.sort(key_cols, stable=True).indices  # sorted position p -> column
    ks = key_cols[col_rank]
    new_group = torch.ones(b, dtype=torch.bool, device=cost.device)
    new_group[1:] = ks[1:] != ks[:-1]
    if bool(new_group.all()):  # no tied keys: the order is simply column by column
        cum = torch.cumsum(cost[:, col_rank].t().reshape(-1)[:n_cand], 0)
        count = int(torch.searchsorted(cum, torch.tensor([eps], dtype=cum.dtype,
                                                         device=cum.device), right=True))
        p = torch.arange(b, device=cost.device)
        i = torch.arange(r, device=cost.device)[:, None]
        mask = torch.zeros(r, b, dtype=torch.bool, device=cost.device)
        mask[:, col_rank] = r * p + i < count
        return mask
    gid = torch.cumsum(new_group.long(), 0) - 1
    starts = torch.nonzero(new_group).flatten()
    sizes = torch.diff(starts, append=torch.tensor([b], device=cost.device))
    g0, gsize = starts[gid], sizes[gid]  # per sorted position
    p = torch.arange(b, device=cost.device)
    i = torch.arange(r, device=cost.device)[:, None]
    pos = r * g0 + i * gsize + (p - g0)  # r x b, flat position in the order
    flat = torch.empty(n, dtype=cost.dtype, device=cost.device)
    flat[pos.flatten()] = cost[:, col_rank].flatten()
    cum = torch.cumsum(flat[:n_cand], 0)
    count = int(torch.searchsorted(cum, torch.tensor([eps], dtype=cum.dtype,
                                                     device=cum.device), right=True))
    mask = torch.zeros(r, b, dtype=torch.bool, device=cost.device)
    mask[:, col_rank] = pos < count
    return mask


def _solve_official(W: Tensor, W1: Tensor, prep: PreparedHessian, s: float,
                    cfg: SafeDeltaConfig) -> tuple[Tensor, float, float, int]:
    """In place on ``W`` (``r x c`` fp32, starts at ``W0``); returns mask, eps, cost, n_cand."""
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
        # mean over the r x |B| key matrix, as the published code (same rounding as _reference)
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
    return kept, eps_total, cost_total, n_cand


# --------------------------------------------------------------------------------------------
# default budget: width independent, exact sequential cost


def _solve_default(W: Tensor, W1: Tensor, prep: PreparedHessian, s: float,
                   cfg: SafeDeltaConfig, E0: float) -> tuple[Tensor, float, float, int]:
    """In place on ``W`` (``r x c`` fp32, starts at ``W0``); returns mask, eps, cost, n_cand."""
    r, c = W.shape
    perm, U = prep.order, prep.U_order
    d = torch.diag(U)
    eps = s * E0
    n = r * c
    n_cand = n - int(cfg.exclude_fraction * n)
    Wp, W1p = W[:, perm], W1[:, perm]  # columns in processing order
    kept = torch.zeros(r, c, dtype=torch.bool, device=W.device)
    # selection state stays on the device (no host sync per column): budget used so far and
    # how many more entries may be kept (0 once the prefix has ended inside a column)
    used = torch.zeros(1, dtype=torch.float64, device=W.device)
    left = torch.full((1,), n_cand, dtype=torch.long, device=W.device)
    eps_t = torch.tensor([eps], dtype=torch.float64, device=W.device)
    rows = torch.arange(r, device=W.device)
    # once the prefix has ended nothing more is kept and nothing moves: stop there. Checking
    # costs a host sync, free on CPU; on an accelerator only every few columns
    check_every = 1 if W.device.type == "cpu" else 16
    for i1 in range(0, c, LAZY_BLOCK):
        if int(left) == 0:
            break
        i2 = min(i1 + LAZY_BLOCK, c)
        W_l, U_l = Wp[:, i1:i2].clone(), U[i1:i2, i1:i2]  # r x k, k x k
        E_l = torch.zeros(r, i2 - i1, device=W.device)
        done = i2 - i1  # columns of this lazy block processed
        for j in range(i2 - i1):
            if j % check_every == 0 and j > 0 and int(left) == 0:
                done = j
                break
            e = (W_l[:, j] - W1p[:, i1 + j]) / d[i1 + j]  # r: exact cost of keeping is e^2/2
            cum = used + torch.cumsum(0.5 * e.double() ** 2, 0)
            k = torch.minimum(torch.searchsorted(cum, eps_t, right=True), left)  # 1
            keep = rows < k  # r: the first k rows of this column
            used = torch.where(k > 0, cum[(k - 1).clamp(min=0)], used)
            left = torch.where(k < r, 0, left - k)  # a column kept in part ends the prefix
            e = e * keep
            W_l[:, j] = torch.where(keep, W1p[:, i1 + j], W_l[:, j])
            W_l[:, j + 1:].addr_(e, U_l[j, j + 1:], alpha=-1)  # OBS compensation
            E_l[:, j] = e
            kept[:, i1 + j] = keep
        Wp[:, i1:i2] = W_l
        Wp[:, i2:] -= E_l[:, :done] @ U[i1:i1 + done, i2:]
    W[:, perm] = Wp
    out_kept = torch.empty_like(kept)
    out_kept[:, perm] = kept
    return out_kept, eps, float(used), n_cand


# --------------------------------------------------------------------------------------------


def _half_quadratic(A: Tensor, H: Tensor) -> float:
    """``1/2 tr(A H A^T)`` in fp64 accumulation of an fp32 product."""
    return 0.5 * float(((A @ H) * A).sum(dtype=torch.float64))


def _undamped_loss(dW: Tensor, damped_loss: float, prep: PreparedHessian) -> float:
    """``1/2 tr(dW H dW^T)`` (undamped ``H``) from the default solve's exact damped cost, in
    ``O(r c)`` instead of an ``r c^2`` product.

    The default solve's summed cost is the loss of its result under the damped Hessian
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
        if budget not in ("default", "official"):
            raise InvalidConfig(f"budget must be 'default' or 'official', got {budget!r}")
        cfg = cfg.model_copy(update={"budget": budget})
    if s is not None:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (
                0 <= s < float("inf")):
            raise InvalidConfig(f"s must be a finite number >= 0, got {s!r}")
        cfg = cfg.model_copy(update={"s": float(s)})
    return cfg, float(cfg.resolved_s)


def protect_matrix(aligned: Tensor, finetuned: Tensor, hessian: Tensor | PreparedHessian, *,
                   s: float | None = None, budget: BudgetRule | None = None,
                   config: SafeDeltaConfig | None = None,
                   output_energy: float | None = None) -> MatrixResult:
    """Safe Delta on one linear weight.

    Args:
        aligned: ``W0``, ``r x c`` (out x in), any float dtype.
        finetuned: ``W1``, ``r x c``.
        hessian: ``H`` (``c x c``, accumulated, undamped) or a :class:`PreparedHessian`
            (then ``config.damp`` is not used: its damping is already in).
        s: safety budget; overrides ``config.s`` (``None``: the config's, else the rule's
            default, ``safedelta.config.DEFAULT_S``).
        budget: ``"default"`` or ``"official"``; overrides ``config.budget``.
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
    hs = tuple(hessian.U_order.shape if isinstance(hessian, PreparedHessian) else hessian.shape)
    if hs != (c, c):
        raise ShapeMismatch(f"Hessian must be {c}x{c} for a {r}x{c} weight, got {hs}")
    _check_finite("aligned weight", aligned)
    _check_finite("fine-tuned weight", finetuned)
    device = aligned.device
    with _fp32_exact(device):
        prep = (hessian if isinstance(hessian, PreparedHessian)
                else prepare_hessian(hessian.to(device), damp=cfg.damp,
                                     official=cfg.budget == "official")).to(device)
        # contiguous: results must not depend on the memory layout (Conv1D's transposed views)
        W0 = aligned.detach().to(torch.float32).contiguous()
        W1 = finetuned.detach().to(device=device, dtype=torch.float32).contiguous()
        W = W0.clone()
        if prep.H is None and (cfg.budget == "official" or output_energy is None):
            raise InvalidConfig("this prepared Hessian has no H (a cached factorisation): it "
                                "serves the default budget with a given output_energy only")
        if cfg.budget == "official" and prep.U is None:
            raise InvalidConfig("the official budget needs a Hessian prepared with official=True")
        E0 = _half_quadratic(W0, prep.H) if output_energy is None else float(output_energy)
        if cfg.budget == "official":
            kept, eps, cost, n_cand = _solve_official(W, W1, prep, s_val, cfg)
            loss = _half_quadratic(W - W0, prep.H)
        else:
            kept, eps, cost, n_cand = _solve_default(W, W1, prep, s_val, cfg, E0)
            loss = _undamped_loss(W - W0, cost, prep)
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
              s: float | None = None, budget: BudgetRule | None = None) -> MatrixResult:
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

