"""common.reports: paired differences, their interval, win counts and Wilcoxon p on hand-made values."""

import numpy as np
import pytest
from scipy import stats

from common import reports


def test_paired_difference_equals_its_formula():
    first = [0.30, 0.35, 0.28, 0.40, 0.33, 0.31]
    second = [0.25, 0.36, 0.20, 0.30, 0.33, 0.29]
    result = reports.paired_difference(first, second)
    differences = np.array(first) - np.array(second)  # 0.05 -0.01 0.08 0.10 0 0.02
    half = stats.t.ppf(0.975, 5) * differences.std(ddof=1) / np.sqrt(6)
    assert result["n"] == 6
    assert result["mean_diff"] == pytest.approx(differences.mean())
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(
        (differences.mean() - half, differences.mean() + half)
    )
    assert (result["wins"], result["losses"], result["ties"]) == (4, 1, 1)
    assert result["wilcoxon_p"] == pytest.approx(stats.wilcoxon(differences).pvalue)
    assert result["sure"] is (result["ci_low"] > 0)


def test_direction_and_sureness():
    """The difference is first - second: swapping the pair flips the sign; a noisy gap is not sure."""
    better = [1.0, 1.1, 0.9, 1.2, 1.05]
    worse = [0.5, 0.6, 0.4, 0.7, 0.55]
    assert reports.paired_difference(better, worse)["sure"] is True
    assert reports.paired_difference(better, worse)["mean_diff"] == pytest.approx(0.5)
    assert reports.paired_difference(worse, better)["mean_diff"] == pytest.approx(-0.5)
    noisy = reports.paired_difference([0.31, 0.20, 0.45, 0.28], [0.30, 0.29, 0.33, 0.31])
    assert noisy["ci_low"] < 0 < noisy["ci_high"] and noisy["sure"] is False
    assert np.isnan(noisy["wilcoxon_p"])  # n < 5: no p value is printed


def test_small_samples_and_bad_shapes():
    single = reports.paired_difference([1.0], [0.0])
    assert single["n"] == 1 and np.isnan(single["ci_low"]) and single["sure"] is False
    with pytest.raises(ValueError, match="equal 1-D shapes"):
        reports.paired_difference([1.0, 2.0], [1.0])


def test_paired_rows_report_lower_is_better_as_a_gain():
    values = {
        "tg_matl": {"r2": [0.3, 0.4, 0.35, 0.38, 0.33], "mse": [1.0, 1.1, 0.9, 1.0, 1.2]},
        "matl": {"r2": [0.2, 0.3, 0.30, 0.28, 0.30], "mse": [2.0, 2.1, 1.9, 2.0, 2.2]},
    }
    rows = reports.paired_rows(values, [("tg_matl", "matl")], ["r2", "mse"], lower_is_better={"mse"})
    assert [row[:2] for row in rows] == [["tg_matl vs matl", "r2"], ["tg_matl vs matl", "mse"]]
    assert rows[1][3] == "+1.0000"  # lower MSE for tg_matl reads as a positive difference
    assert rows[0][5] == "5/5" and rows[0][7] == "yes"
    table = reports.markdown_table(reports.PAIRED_HEADER, rows)
    assert table.splitlines()[1] == "|---|---|---|---|---|---|---|---|"
    assert "[+" in reports.format_paired(reports.paired_difference([2.0, 3.0, 4.0], [1.0, 1.5, 2.0]))
