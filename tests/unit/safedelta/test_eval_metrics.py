"""Rates with intervals, utility retention, task metrics, and choosing s by bisection."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from safedelta.errors import InvalidConfig
from safedelta.eval import (NoUtilityGain, UtilityError, bootstrap_ci, choose_s, rate_summary,
                            register_task_metric, utility_retention)
from safedelta.eval.utility import (TASK_METRICS, gsm8k_answer, gsm8k_metric, read_task_data,
                                    rouge_metric, task_metric)


# ------------------------------------------------------------------ rates and intervals

def test_rate_summary_on_a_known_table():
    m = rate_summary("asr.x", [1, 1, 1, 0], n_boot=2000, seed=0)
    assert m["asr.x"] == 0.75 and m["asr.x.n"] == 4
    assert 0.0 <= m["asr.x.ci_low"] <= 0.75 <= m["asr.x.ci_high"] <= 1.0
    assert m["asr.x.ci_low"] < m["asr.x.ci_high"]
    assert rate_summary("asr.x", [1, 1, 1, 0], n_boot=2000, seed=0) == m  # seeded


def test_bootstrap_interval_matches_the_normal_approximation():
    lo, hi = bootstrap_ci([1.0] * 100 + [0.0] * 100, n_boot=4000, seed=1)
    half = 1.96 * math.sqrt(0.25 / 200)  # 0.069
    assert abs(lo - (0.5 - half)) < 0.02 and abs(hi - (0.5 + half)) < 0.02


def test_degenerate_rates():
    assert bootstrap_ci([0, 0, 0]) == (0.0, 0.0)
    assert bootstrap_ci([1, 1]) == (1.0, 1.0)
    m = rate_summary("r", [])
    assert math.isnan(m["r"]) and m["r.n"] == 0
    assert rate_summary("r", [1.0, float("nan"), 0.0])["r.n"] == 2  # NaN rows are not counted


# ------------------------------------------------------------------ utility retention

@pytest.mark.parametrize("protected, expected", [
    (1.5, 0.5), (1.0, 1.0), (2.0, 0.0),
    (2.5, -0.5),   # worse than the aligned parent: negative
    (0.5, 1.5),    # better than the fine-tuned model: above 1
])
def test_utility_retention_arithmetic(protected, expected):
    assert utility_retention(2.0, 1.0, protected) == pytest.approx(expected)


@pytest.mark.parametrize("aligned, finetuned", [(1.0, 1.0), (1.0, 1.2), (1.0, 1.0 - 1e-9)])
def test_no_gain_is_a_clear_error(aligned, finetuned):
    with pytest.raises(NoUtilityGain, match="fine-tuning gained nothing"):
        utility_retention(aligned, finetuned, 0.9)


def test_non_finite_loss_is_named():
    with pytest.raises(UtilityError, match="protected model is not finite"):
        utility_retention(2.0, 1.0, float("nan"))


def test_task_data_formats(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"question": "c", "answer": "d"}\n')
    assert read_task_data(p) == [{"prompt": "a", "response": "b"},
                                 {"prompt": "c", "response": "d"}]
    p.write_text('{"text": "x"}\n')
    with pytest.raises(UtilityError, match="needs keys 'prompt' and 'response'"):
        read_task_data(p)


# ------------------------------------------------------------------ task metrics

def test_gsm8k_answer_extraction():
    assert gsm8k_answer("Janet sells 9 eggs.\n#### 18") == 18
    assert gsm8k_answer("So the answer is $1,234.") == 1234
    assert gsm8k_answer("5 apples, then 7 more") == 7
    assert gsm8k_answer("no numbers") is None
    out = gsm8k_metric(["The answer is 18", "#### 17", "nothing"], ["x\n#### 18"] * 3)
    assert out == {"gsm8k_accuracy": [1.0, 0.0, 0.0]}


def test_rouge_metric():
    out = rouge_metric(["the cat sat on the mat", "completely different words"],
                       ["the cat sat on the mat", "the cat sat on the mat"])
    assert out["rouge1"][0] == pytest.approx(1.0) and out["rougeL"][0] == pytest.approx(1.0)
    assert out["rouge1"][1] == 0.0 and set(out) == {"rouge1", "rouge2", "rougeL"}


def test_user_metric_hook():
    def longer(gens, refs):
        return {"long_enough": [float(len(g) >= len(r or "")) for g, r in zip(gens, refs)]}

    register_task_metric("long_enough", longer)
    try:
        assert task_metric("long_enough")(["abc", "a"], ["ab", "ab"]) == {
            "long_enough": [1.0, 0.0]}
        with pytest.raises(UtilityError, match="already registered"):
            register_task_metric("long_enough", lambda g, r: {})
    finally:
        TASK_METRICS.pop("long_enough", None)
    with pytest.raises(UtilityError, match="unknown task metric 'long_enough'"):
        task_metric("long_enough")


# ------------------------------------------------------------------ choosing s

def _synthetic(asr_of_s):
    calls: list[float] = []

    def protect_fn(s: float) -> Path:
        calls.append(s)
        return Path(f"/models/s_{s}")

    def evaluate_fn(path: Path) -> float:
        return asr_of_s(float(path.name[2:]))

    return protect_fn, evaluate_fn, calls


def test_choose_s_bisects_a_monotone_asr():
    protect_fn, evaluate_fn, calls = _synthetic(lambda s: min(1.0, s * s))  # ASR = s^2
    res = choose_s(protect_fn, evaluate_fn, max_asr=0.25, s_lo=0.0, s_hi=1.0, iters=10)
    assert res.met and res.s <= 0.5 and 0.5 - res.s < 2 ** -10 + 1e-12
    assert res.asr == pytest.approx(res.s ** 2) and res.asr <= 0.25
    assert res.path == Path(f"/models/s_{res.s}")
    assert len(calls) == 12 and calls[:2] == [1.0, 0.0]
    ss = [c[0] for c in res.curve]
    assert ss == sorted(ss) and len(ss) == 12
    assert all(a == pytest.approx(s * s) for s, a, _, _ in res.curve)


def test_choose_s_geometric_and_extras():
    protect_fn, _, _ = _synthetic(None)
    res = choose_s(protect_fn, lambda p: {"asr": float(p.name[2:]) * 10, "n": 100},
                   max_asr=0.05, s_lo=1e-4, s_hi=1.0, iters=20)
    assert res.s == pytest.approx(0.005, rel=1e-3) and res.s * 10 <= 0.05
    assert res.curve[0][3] == {"n": 100}
    assert res.to_dict()["curve"][0]["n"] == 100


def test_choose_s_ends_and_policy():
    protect_fn, evaluate_fn, calls = _synthetic(lambda s: s)
    res = choose_s(protect_fn, evaluate_fn, max_asr=1.0, s_lo=0.0, s_hi=0.5, iters=5)
    assert res.s == 0.5 and len(calls) == 1 and "already meets" in res.message
    protect_fn, evaluate_fn, calls = _synthetic(lambda s: 0.3 + s)
    res = choose_s(protect_fn, evaluate_fn, max_asr=0.1, s_lo=0.0, s_hi=1.0)
    assert res.s is None and not res.met and "even s_lo=0" in res.message
    # a policy can reject points the ASR alone would accept
    protect_fn, evaluate_fn, _ = _synthetic(lambda s: s / 10)
    res = choose_s(protect_fn, evaluate_fn, max_asr=1.0, s_lo=0.0, s_hi=1.0, iters=10,
                   policy=lambda asr, extra: asr <= 0.02)
    assert res.s == pytest.approx(0.2, abs=1e-3) and res.s <= 0.2


def test_choose_s_rejects_bad_ranges():
    protect_fn, evaluate_fn, _ = _synthetic(lambda s: s)
    with pytest.raises(InvalidConfig, match="s_lo < s_hi"):
        choose_s(protect_fn, evaluate_fn, max_asr=0.1, s_lo=1.0, s_hi=0.5)
    with pytest.raises(InvalidConfig, match="max_asr must be a rate"):
        choose_s(protect_fn, evaluate_fn, max_asr=5, s_lo=0.0, s_hi=0.5)


def test_choose_s_plot(tmp_path):
    protect_fn, evaluate_fn, _ = _synthetic(lambda s: s)
    res = choose_s(protect_fn, evaluate_fn, max_asr=0.3, s_lo=0.0, s_hi=1.0, iters=3)
    p = res.plot(tmp_path / "curve.png")
    assert p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"


def test_exact_binomial_interval_meets_its_definition():
    """Clopper-Pearson: closed forms at k=0 and k=n, and at the ends of any other interval the
    exact binomial tail equals (1 - level) / 2."""
    import math

    from safedelta.eval.stats import exact_binomial_ci

    a = 0.025
    lo, hi = exact_binomial_ci(0, 30)
    assert lo == 0.0 and math.isclose(hi, 1 - a ** (1 / 30), rel_tol=1e-9)  # 0.1157
    lo, hi = exact_binomial_ci(10, 10)
    assert hi == 1.0 and math.isclose(lo, a ** (1 / 10), rel_tol=1e-9)
    for k, n in [(1, 10), (5, 10), (28, 30), (17, 100)]:
        lo, hi = exact_binomial_ci(k, n)
        assert lo < k / n < hi
        ge = sum(math.comb(n, i) * lo ** i * (1 - lo) ** (n - i) for i in range(k, n + 1))
        le = sum(math.comb(n, i) * hi ** i * (1 - hi) ** (n - i) for i in range(0, k + 1))
        assert math.isclose(ge, a, rel_tol=1e-6) and math.isclose(le, a, rel_tol=1e-6)
    assert exact_binomial_ci(5, 10, level=0.5)[1] < exact_binomial_ci(5, 10)[1]
    assert all(math.isnan(v) for v in exact_binomial_ci(0, 0))
    with pytest.raises(ValueError, match="k must be between 0 and n"):
        exact_binomial_ci(11, 10)


def test_kept_fraction_plot_is_readable_at_real_values():
    """Real runs keep ~3e-4 of the delta per layer: the axis follows the data (not 0..1) and
    every bar carries its value in percent."""
    import matplotlib.pyplot as plt

    from safedelta.eval.report import kept_fraction_figure

    fig = kept_fraction_figure({0: 3.1e-4, 1: 2.4e-4, 2: 4.0e-4})
    try:
        ax = fig.axes[0]
        assert ax.get_ylim() == pytest.approx((0.0, 5.0e-4))
        labels = [t.get_text() for t in ax.texts]
        assert labels == ["0.031%", "0.024%", "0.040%"]
        fig.canvas.draw()
        assert all(t.get_text().endswith("%") for t in ax.get_yticklabels() if t.get_text())
    finally:
        plt.close(fig)
    whole = kept_fraction_figure({0: 0.5, 1: 0.9})
    assert whole.axes[0].get_ylim()[1] == pytest.approx(1.0)
    plt.close(whole)
