"""Plain, slow transcriptions of both budget rules, for verification only.

:func:`reference_official` follows the published loop (``docs/algorithm.md``, "The official
rule") line by line: an explicit stable sort of every block's ``r * |B|`` keys, and every 4-column
step updating the whole rest of its block at once (no lazy batching). :func:`reference_default`
takes the default rule entry by entry (``docs/algorithm.md``, "The default rule"). The rules in
``safedelta.budget`` must agree with them (masks equal, weights close); nothing else should use
them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reference_official(W0: Tensor, W1: Tensor, H: Tensor, s: float, *, damp: float = 0.01,
                       block_size: int = 2048, sub_block: int = 4, exclude_fraction: float = 0.15,
                       reference_width: int = 4096) -> tuple[Tensor, Tensor]:
    """Returns ``(W, mask)``: the protected weight (fp32) and the selected entries (bool)."""
    W = W0.clone().float()
    W1 = W1.float()
    H = H.clone().float()
    rows, columns = W.shape

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.mean(torch.diag(H)) * torch.eye(columns, device=H.device)
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    U = torch.linalg.cholesky(H, upper=True)
    d = torch.diag(U)

    mask = torch.zeros(rows, columns, dtype=torch.bool, device=W.device)
    for b1 in range(0, columns, block_size):
        b2 = min(b1 + block_size, columns)
        count = b2 - b1
        W_B = W[:, b1:b2].clone()
        E_B = torch.zeros_like(W_B)
        d_B = d[b1:b2]

        cost = (W1[:, b1:b2] - W_B) ** 2 / d_B ** 2
        key = (1 / d_B ** 2).expand(rows, count)
        order = torch.sort(key.flatten(), stable=True).indices
        n_drop = int(exclude_fraction * (rows * count))
        order = order[:rows * count - n_drop]
        eps_B = float(key.mean()) * (s / 2) * (rows / reference_width)
        cumulative = torch.cumsum(cost.flatten()[order], 0)
        n_sel = int((cumulative <= eps_B).sum())  # cumulative is non-decreasing: a prefix
        mask_B = torch.zeros(rows * count, dtype=torch.bool, device=W.device)
        mask_B[order[:n_sel]] = True
        mask_B = mask_B.reshape(rows, count)

        for j1 in range(0, count, sub_block):
            j2 = min(j1 + sub_block, count)
            q = W_B[:, j1:j2].clone()
            q[mask_B[:, j1:j2]] = W1[:, b1 + j1:b1 + j2][mask_B[:, j1:j2]]
            e = (W_B[:, j1:j2] - q) / d_B[j1:j2]
            W_B[:, j2:] -= e @ U[b1 + j1:b1 + j2, b1 + j2:b2]
            W_B[:, j1:j2] = q
            E_B[:, j1:j2] = e

        W[:, b1:b2] = W_B
        W[:, b2:] -= E_B @ U[b1:b2, b2:]
        mask[:, b1:b2] = mask_B
    return W, mask


def reference_default(W0: Tensor, W1: Tensor, prep, s: float, E0: float, *,
                      exclude_fraction: float = 0.15) -> tuple[Tensor, Tensor, float]:
    """The default rule entry by entry (``docs/algorithm.md``, "The default rule"): columns in
    the key order of ``prep`` (a :class:`~safedelta.solver.PreparedHessian`), rows ascending; an
    entry is kept while the summed exact cost ``e^2/2`` stays within ``s * E0`` and fewer than
    the candidates are kept; each column's errors update every later column at once (no lazy
    blocks). Returns ``(W, kept, cost_used)``; ``safedelta.budget.DefaultBudget`` must agree."""
    W = W0.clone().float()
    W1 = W1.float()
    r, c = W.shape
    perm, U = prep.order, prep.U_order
    Wp, W1p = W[:, perm], W1[:, perm]
    kept = torch.zeros(r, c, dtype=torch.bool)
    eps = s * E0
    n_cand = r * c - int(exclude_fraction * (r * c))  # as the solver rounds it
    used, count, ended = 0.0, 0, False
    for j in range(c):
        e = (Wp[:, j] - W1p[:, j]) / U[j, j]
        for i in range(r):
            cost = 0.5 * float(e[i]) ** 2
            if count == n_cand or used + cost > eps:
                ended = True
                break
            used += cost
            count += 1
            kept[i, j] = True
        e = e * kept[:, j]
        Wp[:, j] = torch.where(kept[:, j], W1p[:, j], Wp[:, j])
        Wp[:, j + 1:] -= torch.outer(e, U[j, j + 1:])
        if ended:
            break
    W[:, perm] = Wp
    out = torch.empty_like(kept)
    out[:, perm] = kept
    return W, out, used
