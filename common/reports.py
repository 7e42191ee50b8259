"""Result tables: mean +- std over folds or seeds, written as CSV (numbers) and markdown (to read)."""

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from common.atomic import write_csv, write_text


def mean_std(values: Sequence[float], ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation; with `ddof=1` (sample std) a single value has std 0."""
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
