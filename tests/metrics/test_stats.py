"""Wilson intervals and the exact McNemar test against known values and relations."""

import math

import pytest

from mixattn.metrics import stats
from mixattn.metrics.stats import fmt_cell, mcnemar, proportion, wilson


def test_wilson_known_values():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)  # Newcombe (1998), method 3
    assert wilson(0, 0) == (0.0, 1.0)


def test_wilson_relations():
    for n in (1, 7, 20, 200):
        for k in range(n + 1):
            lo, hi = wilson(k, n)
            assert 0 <= lo <= k / n <= hi <= 1
            assert (lo, hi) == pytest.approx((1 - wilson(n - k, n)[1], 1 - wilson(n - k, n)[0]))
    assert wilson(10, 20)[1] - wilson(10, 20)[0] > wilson(100, 200)[1] - wilson(100, 200)[0]
    with pytest.raises(ValueError, match="k <= n"):
        wilson(3, 2)


def test_mcnemar_exact_values():
    a = [True] * 6 + [False] * 4
    b = [False] * 6 + [False] * 4
    t = mcnemar(a, b)
    assert (t["a_only"], t["b_only"]) == (6, 0)
    assert t["p"] == pytest.approx(2 * 0.5**6)
    assert t["diff"] == pytest.approx(0.6)
    t = mcnemar([True, False, True], [False, True, True])
    assert t["p"] == 1.0


def test_mcnemar_relations():
    a = [True, True, True, False, False, True, False, True]
    b = [False, True, False, False, True, False, False, False]
    assert mcnemar(a, b)["p"] == pytest.approx(mcnemar(b, a)["p"])
    # concordant pairs carry no information in a paired test
    more = mcnemar(a + [True] * 10 + [False] * 10, b + [True] * 10 + [False] * 10)
    assert more["p"] == pytest.approx(mcnemar(a, b)["p"])
    assert mcnemar(a, a)["p"] == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar([True], [True, False])


def test_proportion_and_cell_text():
    c = proportion([True, False, True, True])
    assert (c["n"], c["k"], c["acc"]) == (4, 3, 0.75)
    assert fmt_cell(c).startswith("0.75 [") and fmt_cell(c).endswith("n=4")
    assert fmt_cell(proportion([])) == "–"


def test_paired_scores_known_values_and_symmetry():
    from mixattn.metrics.stats import paired_scores

    a, b = [1.0, 2.0, 3.5, -1.0, 0.5], [0.0, 1.5, 1.0, -4.0, -0.25]  # a higher on all 5 pairs
    t = paired_scores(a, b)
    # every difference positive: both exact tests give 2 / 2^5 (the two all-one-sign outcomes)
    assert (t["a_higher"], t["b_higher"]) == (5, 0)
    assert t["sign_p"] == pytest.approx(2 / 32) and t["wilcoxon_p"] == pytest.approx(2 / 32)
    assert t["median_diff"] == pytest.approx(1.0)  # differences 1, 0.5, 2.5, 3, 0.75
    s = paired_scores(b, a)  # swapping the methods mirrors everything
    assert (s["a_higher"], s["b_higher"]) == (0, 5) and s["median_diff"] == -t["median_diff"]
    assert s["sign_p"] == t["sign_p"] and s["wilcoxon_p"] == t["wilcoxon_p"]
    tied = paired_scores(a, a)
    assert tied["sign_p"] == tied["wilcoxon_p"] == 1.0 and tied["median_diff"] == 0.0
    # the signed-rank test weighs sizes: one large loss among small wins is not the same as no loss
    mixed = paired_scores([0.1, 0.2, 0.3, 0.4, -10.0], [0.0] * 5)
    assert mixed["a_higher"] == 4 and mixed["wilcoxon_p"] > 0.5  # ranks 1-4 for the wins, 5 for the loss
    with pytest.raises(ValueError, match="equal lengths"):
        paired_scores([1.0], [1.0, 2.0])


def test_paired_ratio_known_values_and_symmetry():
    a, b = [2.0, 3.0, 4.0], [1.9, 3.0, 3.8]  # differences 0.1, 0, 0.2: mean 0.1, sd 0.1
    r = stats.paired_ratio(a, b)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2)
    assert math.isclose(r["ratio"], math.exp(0.1)) and r["windows"] == 3 and r["a_higher"] == 2
    assert math.isclose(r["lo"], math.exp(0.1 - half)) and math.isclose(r["hi"], math.exp(0.1 + half))
    back = stats.paired_ratio(b, a)
    assert math.isclose(back["ratio"] * r["ratio"], 1.0) and math.isclose(back["hi"] * r["lo"], 1.0)
    one = stats.paired_ratio([2.0], [1.5])
    assert math.isclose(one["ratio"], math.exp(0.5)) and math.isnan(one["lo"])
    with pytest.raises(ValueError, match="equal"):
        stats.paired_ratio([1.0], [1.0, 2.0])
