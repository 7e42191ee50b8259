"""Result tables: mean +- std over folds or seeds, written as CSV (numbers) and markdown (to read)."""

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from common.atomic import write_csv, write_text


def mean_std(values: Sequence[float], ddof: int = 1) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1, the project's one convention; a single value has
    std 0). `ddof=0` gives the population std where a caller must match another tool's figures."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) <= ddof:
        return float(values.mean()), 0.0
    return float(values.mean()), float(values.std(ddof=ddof))


def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
    """`0.9190 +- 0.0123`."""
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def best_marks(
    rows: Sequence[Mapping], group_key: str, metrics: Sequence[str], lower_is_better: Collection[str] = ()
) -> set[tuple[int, str]]:
    """{(row index, metric)} of the best `<metric>_mean` within each group of rows (ties all marked);
    metrics in `lower_is_better` are minimised, the others maximised."""
    marks = set()
    for group in sorted({row[group_key] for row in rows}):
        members = [i for i, row in enumerate(rows) if row[group_key] == group]
        for metric in metrics:
            values = [rows[i][f"{metric}_mean"] for i in members]
            best = min(values) if metric in lower_is_better else max(values)
            marks.update((i, metric) for i, value in zip(members, values, strict=True) if value == best)
    return marks


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], align: str = "---") -> str:
    """A GitHub markdown table from a header and rows of cells (already formatted)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + f"{align}|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(path_stem, rows: Sequence[Mapping], columns: Sequence[str], markdown: str) -> None:
    """`<stem>.csv` with `columns` of `rows` and `<stem>.md` with the given markdown text."""
    path_stem = Path(path_stem)
    write_csv(path_stem.with_suffix(".csv"), rows, list(columns))
    write_text(path_stem.with_suffix(".md"), markdown)


# ---- paired comparisons: how sure a ranking is ----


def paired_difference(first: Sequence[float], second: Sequence[float], confidence: float = 0.95) -> dict:
    """How much `first` beats `second` when both were measured on the same folds or seeds.

    Args:
        first: one value per fold or seed (e.g. TG-MATL's R² on folds 1..8).
        second: the other method's values on the same folds or seeds, in the same order.
        confidence: level of the interval of the mean difference.

    Returns:
        A dict with `n`, `mean_diff` (mean of first - second), `ci_low` / `ci_high` (Student-t
        interval of the mean difference, from the sample std with ddof=1; nan for n < 2), `wins`,
        `losses`, `ties` (per fold or seed), `wilcoxon_p` (two-sided Wilcoxon signed-rank p value,
        exact for n <= 25 without ties or zeros; nan for n < 5 or when every difference is 0) and
        `sure` (True when the interval excludes 0).
    """
    from scipy import stats

    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"paired values need equal 1-D shapes, got {first.shape} and {second.shape}")
    differences = first - second
    n = len(differences)
    result = {
        "n": n,
        "mean_diff": float(differences.mean()) if n else float("nan"),
        "ci_low": float("nan"),
        "ci_high": float("nan"),
        "wins": int((differences > 0).sum()),
        "losses": int((differences < 0).sum()),
        "ties": int((differences == 0).sum()),
        "wilcoxon_p": float("nan"),
    }
    if n >= 2:
        half_width = stats.t.ppf(0.5 + confidence / 2, n - 1) * differences.std(ddof=1) / np.sqrt(n)
        result["ci_low"] = result["mean_diff"] - float(half_width)
        result["ci_high"] = result["mean_diff"] + float(half_width)
    if n >= 5 and np.any(differences != 0):
        result["wilcoxon_p"] = float(stats.wilcoxon(differences, zero_method="wilcox").pvalue)
    result["sure"] = bool(result["ci_low"] > 0 or result["ci_high"] < 0)
    return result


def format_paired(result: Mapping, digits: int = 4) -> str:
    """`+0.0123 [-0.0040, +0.0286], 6/8 wins, p 0.195` (the interval at the level it was computed)."""
    p_value = "p n/a" if np.isnan(result["wilcoxon_p"]) else f"p {result['wilcoxon_p']:.3g}"
    return (
        f"{result['mean_diff']:+.{digits}f} "
        f"[{result['ci_low']:+.{digits}f}, {result['ci_high']:+.{digits}f}], "
        f"{result['wins']}/{result['n']} wins, {p_value}"
    )


PAIRED_HEADER = (
    "comparison",
    "metric",
    "n",
    "mean difference",
    "95 % interval",
    "wins",
    "Wilcoxon p",
    "sure",
)


def paired_rows(
    values: Mapping[str, Mapping[str, Sequence[float]]],
    pairs: Sequence[tuple[str, str]],
    metrics: Sequence[str],
    lower_is_better: Collection[str] = (),
    digits: int = 4,
) -> list[list]:
    """Markdown cells of every pair and metric: `values[method][metric]` holds per-fold values.

    A pair (a, b) reads "a vs b": the difference is a - b, so a positive mean favours a, except for
    metrics in `lower_is_better`, where b - a is reported so that positive still favours a. "sure"
    is "yes" only when the interval excludes 0 (the only case where a table may call a method better).
    """
    rows = []
    for first, second in pairs:
        for metric in metrics:
            a, b = values[first][metric], values[second][metric]
            result = paired_difference(b, a) if metric in lower_is_better else paired_difference(a, b)
            p_value = "n/a" if np.isnan(result["wilcoxon_p"]) else f"{result['wilcoxon_p']:.3g}"
            rows.append(
                [
                    f"{first} vs {second}",
                    metric,
                    result["n"],
                    f"{result['mean_diff']:+.{digits}f}",
                    f"[{result['ci_low']:+.{digits}f}, {result['ci_high']:+.{digits}f}]",
                    f"{result['wins']}/{result['n']}",
                    p_value,
                    "yes" if result["sure"] else "no",
                ]
            )
    return rows
