"""Kernel benchmark: one 4096 x 4096 linear layer (the Llama-2-7B width the paper used), and
the solve time of both budget rules per matrix size beside the machine's matmul rate.

``python -m benchmarks.run kernel`` writes the section; ``SAFEDELTA_BENCH_DEVICE=cuda`` runs it
on a GPU; ``SAFEDELTA_BENCH_WIDTH`` changes the width (default 4096); ``BENCH_THREADS`` the CPU
threads (default 1); ``SAFEDELTA_BENCH_SIZES`` the solve-time sizes (``RxC,RxC...``, default
576x576,1024x1024,2048x2048,4096x4096,4096x11008); ``SAFEDELTA_BENCH_REPEATS`` the repeats whose
median is quoted (default 3).

The problem: aligned ``W0 ~ 0.02 N(0, 1)`` (the Hugging Face init scale); fine-tuned
``W1 = W0 + delta`` with a structured delta (rank-8 part plus noise, ``||delta|| = 0.05 ||W0||``);
``H = (2/T) X X^T`` from ``T = width`` random activations with a rank-32 shared component,
log-normal channel scales (outlier channels, as in LLM activations) and two dead channels.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch

from safedelta._reference import reference_official
from safedelta.budget import DEFAULT_S, budget_names, get_budget_rule
from safedelta.config import SafeDeltaConfig
from safedelta.solver import half_quadratic, prepare_hessian, protect_matrix

SEED = 0
REL_DELTA = 0.05


def make_layer(r: int, c: int, device: str, seed: int = SEED, tokens: int | None = None):
    g = torch.Generator().manual_seed(seed)
    T = tokens or c
    A = torch.randn(c, 32, generator=g) / math.sqrt(32)
    X = A @ torch.randn(32, T, generator=g) + 0.5 * torch.randn(c, T, generator=g)
    X *= torch.exp(torch.randn(c, 1, generator=g))
    X[[7, c // 2]] = 0  # dead channels
    X = X.to(device)
    H = 2 * X @ X.T / T
    W0 = 0.02 * torch.randn(r, c, generator=g)
    low = torch.randn(r, 8, generator=g) @ torch.randn(8, c, generator=g)
    delta = low / low.norm() + torch.randn(r, c, generator=g) / math.sqrt(r * c)
    delta *= REL_DELTA * W0.norm() / delta.norm()
    return W0.to(device), (W0 + delta).to(device), H


def _timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def _match_s(W0, W1, prep, target: float, field: str) -> float:
    """Smallest default-budget s (bisection in log s) whose stat ``field`` reaches ``target``."""
    lo, hi = -9.0, 0.0
    for _ in range(14):
        mid = (lo + hi) / 2
        st = protect_matrix(W0, W1, prep, s=10 ** mid).stats
        value = st.kept_fraction if field == "kept" else st.safety_loss / st.output_energy
        lo, hi = (mid, hi) if value < target else (lo, mid)
    return 10 ** hi


def _reference_factorisation(H):
    """The reference's own factorisation steps (the same calls as ``_reference.py``), timed
    apart so that its loop can be compared with the lazy loop alone."""
    H = H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += 0.01 * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], device=H.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def run() -> str:
    device = os.environ.get("SAFEDELTA_BENCH_DEVICE", "cpu")
    c = int(os.environ.get("SAFEDELTA_BENCH_WIDTH", "4096"))
    r = c
    # one thread by default, as the protect benchmark: on a shared machine several threads per
    # process mostly measure contention (BENCH_THREADS changes it)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    threads = torch.get_num_threads()
    torch.manual_seed(SEED)
    if device == "cuda":  # warm-up: CUDA context, cuBLAS/cuSOLVER handles
        w0, w1, h = make_layer(64, 256, device, seed=1)
        protect_matrix(w0, w1, h, budget="official")
        protect_matrix(w0, w1, h)
        reference_official(w0, w1, h, 0.1)
    (W0, W1, H), t_make = _timed(lambda: make_layer(r, c, device), device)
    prep, t_prep = _timed(lambda: prepare_hessian(H), device)
    s_off = DEFAULT_S["official"]
    off, t_off = _timed(lambda: protect_matrix(W0, W1, prep, s=s_off, budget="official"), device)
    # the lazy official loop alone (no stats: protect_matrix also computes two r c^2 quadratics,
    # E0 and the safety loss, which the reference does not)
    W_solve = W0.float().clone()
    _, t_solve = _timed(lambda: get_budget_rule("official").solve(
        W_solve, W1.float(), prep, s_off, SafeDeltaConfig(), 0.0), device)
    (W_ref, mask_ref), t_ref = _timed(lambda: reference_official(W0, W1, H, s_off), device)
    _, t_ref_fact = _timed(lambda: _reference_factorisation(H), device)
    t_ref_loop = t_ref - t_ref_fact
    s_def = DEFAULT_S["default"]
    dft, t_def = _timed(lambda: protect_matrix(W0, W1, prep, s=s_def), device)

    max_dw = float((off.weight.float() - W_ref).abs().max())
    agree = float((off.kept == mask_ref).float().mean())
    so, sd = off.stats, dft.stats

    # what default s matches the official setting at this width (on 512 rows, same problem)
    rows = slice(0, min(r, 512))
    sub_off = protect_matrix(W0[rows], W1[rows], prep, s=s_off, budget="official").stats
    rel_off = sub_off.safety_loss / sub_off.output_energy
    (s_kept, s_loss), t_cal = _timed(lambda: (
        _match_s(W0[rows], W1[rows], prep, sub_off.kept_fraction, "kept"),
        _match_s(W0[rows], W1[rows], prep, rel_off, "loss")), device)
    at_loss = protect_matrix(W0[rows], W1[rows], prep, s=s_loss).stats

    # width sweep: the same problem family at other widths, 512 rows, each rule's default s
    sweep = []
    for w in (576, 1024, 2048, 4096):
        if w > c:
            continue
        if w == c:
            a, b, p = W0[rows], W1[rows], prep
        else:
            a, b, h = make_layer(min(r, 512), w, device)
            p = prepare_hessian(h)
        sweep.append((w, protect_matrix(a, b, p, budget="official").stats.kept_fraction,
                      protect_matrix(a, b, p).stats.kept_fraction))

    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {threads} torch threads"
    lines = [
        f"## Kernel: one {r} x {c} layer ({dev})",
        "",
        "Aligned `W0 ~ 0.02 N(0,1)`; `W1 = W0 + delta`, delta = rank-8 part + noise, "
        f"`||delta|| = {REL_DELTA} ||W0||`; `H = (2/T) X X^T` from {c} random activations "
        "(rank-32 shared part, log-normal channel scales, 2 dead channels). "
        "Source: `benchmarks/bench_kernel.py`.",
        "",
        "| step | wall time (s) |",
        "|---|---:|",
        f"| build the problem (activations, `H`) | {t_make:.2f} |",
        f"| `prepare_hessian` (damping, `U`, default-order factor; once per aligned model) "
        f"| {t_prep:.2f} |",
        f"| official, lazy batched (`protect_matrix`, prepared `H`, stats included) "
        f"| {t_off:.2f} |",
        f"| official, lazy batched loop alone (`OfficialBudget.solve`, no stats) "
        f"| {t_solve:.2f} |",
        f"| official, plain reference (`safedelta/_reference.py`, its own factorisation "
        f"included) | {t_ref:.2f} |",
        f"| of which the reference's factorisation (the same calls, timed apart) "
        f"| {t_ref_fact:.2f} |",
        f"| default (`protect_matrix`, prepared `H`, stats included) | {t_def:.2f} |",
        "",
        f"- Speed-up of the lazy official loop over the plain transcription's loop (its total "
        f"minus its factorisation): **{t_ref_loop / t_solve:.1f}x**. Target: at least 5x "
        f"possible ({'met' if t_ref_loop / t_solve >= 5 else 'not met'}; both loops do the "
        "same cross-block products, the plain one adds a memory-bound rank-4 update of the rest "
        "of its 2048-column block per step, which bounds the ratio on a CPU). "
        f"Everything counted (factorisation + loop each side): "
        f"**{t_ref / (t_prep + t_solve):.1f}x** (`prepare_hessian` also builds the default "
        f"rule's factor); `protect_matrix` with its stats (two `r c^2` quadratics the "
        f"reference does not compute) plus `prepare_hessian`: **{t_ref / (t_prep + t_off):.1f}x**.",
        f"- The lazy loop's weights equal the full call's: "
        f"{'yes' if torch.equal(W_solve.to(off.weight.dtype), off.weight) else 'no'}.",
        f"- Agreement (official s = {s_off}): masks equal on **{agree:.6%}** of entries "
        f"({so.n_kept} vs {int(mask_ref.sum())} kept); max |weight difference| = "
        f"**{max_dw:.2e}** (weights are ~0.02).",
        "",
        "| budget rule | s | kept fraction | relative safety loss (`L / E0`) | "
        "`cost_predicted / L` | ‖delta kept‖ / ‖delta‖ |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, st in (("official", so), ("default", sd)):
        lines.append(
            f"| {name} | {st.s:g} | {st.kept_fraction:.4f} | "
            f"{st.safety_loss / st.output_energy:.3e} | "
            f"{st.cost_predicted / st.safety_loss if st.safety_loss else float('nan'):.3f} | "
            f"{st.delta_norm_kept / st.delta_norm:.3f} |")
    lines += [
        "",
        f"Default s matching the official s = {s_off} on this layer (first {rows.stop} rows, "
        f"bisection, {t_cal:.1f} s): same kept fraction ({sub_off.kept_fraction:.4f}) at "
        f"s = **{s_kept:.2e}**; same relative safety loss ({rel_off:.3e}) at s = "
        f"**{s_loss:.2e}**, where the default keeps {at_loss.kept_fraction:.4f} of the entries "
        f"(‖delta kept‖/‖delta‖ = {at_loss.delta_norm_kept / at_loss.delta_norm:.3f}, official "
        f"{sub_off.delta_norm_kept / sub_off.delta_norm:.3f}). "
        f"`DEFAULT_S[\"default\"] = {s_def:g}` was chosen from this match at width 4096 "
        "(see `DefaultBudget` in `safedelta/budget.py`).",
        "",
        f"Width sweep (same problem family, {min(r, 512)} rows, each rule at its default s: "
        f"official {s_off}, default {s_def:g}): the official kept fraction follows the width, "
        "the default's does not.",
        "",
        "| width | official kept fraction | default kept fraction |",
        "|---:|---:|---:|",
        *[f"| {w} | {ko:.4f} | {kd:.4f} |" for w, ko, kd in sweep],
        "",
        *solve_scaling(device),
    ]
    return "\n".join(lines)


def _median_time(fn, device, repeats: int) -> float:
    return statistics.median(_timed(fn, device)[1] for _ in range(repeats))


def solve_scaling(device: str) -> list[str]:
    """Solve time of every registered budget rule per matrix size, and the achieved FLOP rate
    of a full pass beside ``torch.matmul``'s on the same sizes (medians of a few repeats)."""
    sizes = [tuple(int(v) for v in rc.split("x")) for rc in os.environ.get(
        "SAFEDELTA_BENCH_SIZES",
        "576x576,1024x1024,2048x2048,4096x4096,4096x11008").split(",")]
    repeats = int(os.environ.get("SAFEDELTA_BENCH_REPEATS", "3"))
    full = SafeDeltaConfig(exclude_fraction=0.0)  # with s = 1e30: every column is processed
    rows = []
    for r, c in sizes:
        W0, W1, H = make_layer(r, c, device, seed=2, tokens=min(c, 2048))
        A, B = torch.randn(r, c, device=device), torch.randn(c, c, device=device)
        t_mm = _median_time(lambda: A @ B, device, repeats)
        del A, B
        E0 = half_quadratic(W0, H)
        for name in budget_names():
            rule = get_budget_rule(name)
            t_prep = _median_time(lambda: prepare_hessian(H, budget=name), device, repeats)
            prep = prepare_hessian(H, budget=name)
            t_s = _median_time(lambda: rule.solve(W0.clone(), W1, prep, rule.default_s,
                                                  SafeDeltaConfig(), E0), device, repeats)
            t_full = _median_time(lambda: rule.solve(W0.clone(), W1, prep, 1e30, full, E0),
                                  device, repeats)
            # nominal OBS work of a full pass: each column's r errors update every later column
            flops = r * c * (c - 1)
            rows.append(f"| {r} x {c} | {name} | {t_prep:.3f} | {t_s:.3f} | {t_full:.3f} | "
                        f"{flops / t_full / 1e9:.1f} | {2 * r * c * c / t_mm / 1e9:.1f} |")
            del prep
        del W0, W1, H
    threads = torch.get_num_threads()
    return [
        f"### Solve time per matrix size ({'GPU' if device == 'cuda' else 'CPU'}, "
        f"{threads} torch thread{'s' if threads != 1 else ''}, median of {repeats})",
        "",
        "Each rule's `solve` alone (no stats, prepared Hessian given), on the problem family "
        "above built from min(c, 2048) activations: at the rule's default s, and a full pass "
        "(s = 1e30, no exclusion: every column kept and compensated). `prepare_hessian` computes "
        "the factors the rule asks for (official: `U`; default: `U_order`). FLOP rate of the full "
        "pass: the nominal OBS work `r c (c-1)` (each column's errors update every later column) "
        "over its time; matmul: `torch.matmul` of an `r x c` by a `c x c` matrix, `2 r c^2` "
        "FLOPs over its median time. The machine is shared with other jobs: times are medians "
        "and still noisy.",
        "",
        "| r x c | rule | `prepare_hessian` (s) | solve at default s (s) | full-pass solve (s) "
        "| full pass GFLOP/s | matmul GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
    ]


if __name__ == "__main__":
    print(run())
