"""Figures: matplotlib on the Agg backend, saved atomically; confusion matrices, curves, grouped bars.

`pyplot()` is the one place that selects the non-interactive backend (so scripts run on servers
without a display); every figure is written through `save`, which also closes it.
"""

from collections.abc import Mapping, Sequence

import numpy as np

from common.atomic import save_figure


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path, dpi: int = 120) -> None:
    """Write `figure` to `path` atomically and close it."""
    save_figure(figure, path, dpi=dpi)


def confusion_matrix(
    counts,
    class_names: Sequence[str],
    path,
    title: str,
    annotate: str = "recall",
    ylabel: str = "true (rows sum to 1)",
    fontsize: int = 8,
) -> None:
    """Row-normalised confusion matrix; cells show the recall (`annotate="recall"`) or the counts.

    Rows are the true classes; a row without samples stays blank.
    """
    plt = pyplot()
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = counts / counts.sum(axis=1, keepdims=True)
    size = max(6.0, 0.45 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(np.nan_to_num(recall), cmap="Blues", vmin=0, vmax=1)
    for (row, col), value in np.ndenumerate(recall):
        if not np.isfinite(value):
            continue
        text = f"{value:.2f}" if annotate == "recall" else str(int(counts[row, col]))
        colour = "white" if value > 0.5 else "black"
        axis.text(col, row, text, ha="center", va="center", fontsize=fontsize, color=colour)
    axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=fontsize)
    axis.set_yticks(range(len(class_names)), class_names, fontsize=fontsize)
    axis.set_xlabel("predicted")
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    figure.colorbar(image)
    save(figure, path)


def curves(
    path,
    panels: Mapping[str, Mapping[str, tuple[Sequence, Sequence]]],
    xlabel: str = "epoch",
    log_panels: Sequence[str] = (),
) -> None:
    """One panel per title, each with named (x, y) lines; panels in `log_panels` use a log y axis."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4), squeeze=False)
    for axis, (title, lines) in zip(axes[0], panels.items(), strict=True):
        for label, (x, y) in lines.items():
            (axis.semilogy if title in log_panels else axis.plot)(x, y, label=label)
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        if len(lines) > 1:
            axis.legend(fontsize=8)
    figure.tight_layout()
    save(figure, path)


def grouped_bars(
    axis,
    groups: Sequence[str],
    series: Mapping[str, tuple[Sequence, Sequence]],
    width_total: float = 0.8,
) -> None:
    """Bars of several series side by side per group, with error bars: series = {label: (means, stds)}.

    A NaN mean leaves its bar out.
    """
    width = width_total / max(len(series), 1)
    for offset, (label, (means, stds)) in enumerate(series.items()):
        positions = np.arange(len(groups)) + (offset - (len(series) - 1) / 2) * width
        means, stds = np.asarray(means, np.float64), np.asarray(stds, np.float64)
        shown = np.isfinite(means)
        axis.bar(
            positions[shown], means[shown], width, yerr=np.nan_to_num(stds[shown]), label=label, capsize=2
        )
    axis.set_xticks(range(len(groups)), groups)


def metric_bars(
    rows: Sequence[Mapping], path, group_key: str, series_key: str, metrics: Sequence[str]
) -> None:
    """One panel of grouped bars per metric: `<metric>_mean` with `<metric>_std` error bars of each
    series (e.g. method) in each group (e.g. embedding); a missing row leaves its bar out."""
    groups = sorted({row[group_key] for row in rows})
    series_names = list(dict.fromkeys(row[series_key] for row in rows))
    by_key = {(row[group_key], row[series_key]): row for row in rows}
    figure, axes = pyplot().subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        series = {}
        for name in series_names:
            found = [by_key.get((group, name)) for group in groups]
            means = [row[f"{metric}_mean"] if row else np.nan for row in found]
            series[name] = (means, [row[f"{metric}_std"] if row else np.nan for row in found])
        grouped_bars(axis, groups, series)
        axis.set_title(metric)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    save(figure, path)
