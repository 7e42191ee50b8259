"""TG-MATL experiment 2 over the exp1 sweep: task heads on every top_percent x random_percent model.

Paper: M. Zhou, A. Zare, "Task-Guided Multi-Annotation Triplet Learning for Remote Sensing
Representations", IGARSS 2026, arXiv 2604.03837.

`igarss_exp1_sweep.py` trains TG-MATL projection heads for top_percent in {0.40, 0.50, 0.60, 0.70} x
random_percent in {0.05, ..., 0.30} (3 embeddings x 8 folds each). This script trains the three task
heads of igarss_exp2.py (classifier, box-feature and box-location regressors) on each of those
projections, evaluates them on the fixed test set and summarises the grid. Writes

    results/trained_models/exp2_task_heads/{emb}/tg_matl_tp{T}_rp{R}/{class_head,...}_run{k}.h5
    results/exp2_results/{emb}/tg_matl_tp{T}_rp{R}_fold{k}_taskhead_metrics.npy   (+ .json twin)
    results/exp2_results/sweep_summary.csv, sweep_summary.md   (mean +- std over folds per config)
    results/exp2_results/sweep_heatmap_{metric}.png           (each metric over the grid, per embedding)
    results/exp2_results/sweep_best.json   (per metric: the validation-best grid point, its val and test)

Commands:
    python igarss_exp1_sweep.py && python igarss_exp2_sweep.py           # the paper's grid
    python igarss_exp1_sweep.py --demo && python igarss_exp2_sweep.py --demo

Finished (embedding, config, fold) sets are reused, so an interrupted sweep continues. The 24 grid
points give 3 x 24 x 8 x 3 = 1728 heads, about 5 times the work of igarss_exp2.py. It ends with one
line each for acc, r2_feat and r2_loc naming the grid point with the best validation mean (fold
means, then embeddings; results/exp2_results/sweep_best.json has every metric) and its test mean,
each closing with "(mean over 3 embeddings x 8 folds)"; the demo printed
  summary: best acc on validation at top_percent 0.70 random_percent 0.30: val 0.981, test 0.972
  summary: best r2_feat on validation at top_percent 0.50 random_percent 0.05: val 0.494, test 0.587
  summary: best r2_loc on validation at top_percent 0.60 random_percent 0.15: val -0.272, test -0.392
"""

import re
from pathlib import Path

from common import cli
from common.tgmatl import flags

TOP_PERCENTS = (0.40, 0.50, 0.60, 0.70)
RANDOM_PERCENTS = (0.05, 0.10, 0.15, 0.20, 0.25, 0.30)


def get_args_parser():
    parser = cli.Parser("TG-MATL experiment 2 over the exp1 sweep grid")
    flags.add_task_head_arguments(
        parser, "(the data of `igarss_exp1_sweep.py --demo`, same seed, and the grid points it trained)."
    )
    parser.add_argument(
        "--top_percents",
        type=float,
        nargs="+",
        default=list(TOP_PERCENTS),
        help="top_percent values of the exp1 sweep (paper grid: 0.40 0.50 0.60 0.70).",
    )
    parser.add_argument(
        "--random_percents",
        type=float,
        nargs="+",
        default=list(RANDOM_PERCENTS),
        help="random_percent values of the exp1 sweep (paper grid: 0.05 ... 0.30).",
    )
    return parser


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np

import igarss_exp2
from common import atomic, plots, runs
from common.errors import InputError, cli_entry, require
from common.tgmatl import awir

HEATMAP_METRICS = ("acc", "precision", "recall", "f1", "r2_feat", "r2_loc", "mse_feat", "mse_loc")
# The sweep's validation-best grid point of each metric is compared with these igarss_exp2.py methods.
BASELINES = ("matl", "dtl")
SWEEP_PAIRED_NOTE = (
    "Per metric, the grid point with the best validation mean (sweep_best.json) against the MATL and\n"
    "DTL task heads that igarss_exp2.py wrote into the same results tree (run it first to get them).\n\n"
)
# The settings a resume must match: those of igarss_exp2.py, whose task heads this script trains.
RESUME_SETTINGS = igarss_exp2.RESUME_SETTINGS


def trained_grid(results_dir, embedding_names):
    """Grid points the exp1 sweep has trained for every embedding (used by --demo)."""
    found = None
    for name in embedding_names:
        folder = Path(results_dir) / "trained_models" / "exp1_emb_proj" / name
        points = {
            (int(m.group(1)), int(m.group(2)))
            for d in folder.glob("tp*_rp*")
            if (m := re.fullmatch(r"tp(\d+)_rp(\d+)", d.name)) and any(d.glob("tg_matl_best_fold*.h5"))
        }
        found = points if found is None else found & points
    return sorted(found or [])


def sweep_grid(args, command):
    """The grid of this run: the points the demo's exp1 sweep trained, or the two flags' product."""
    if not args.demo:
        return [(t, r) for t in args.top_percents for r in args.random_percents]
    grid = [(t / 100, r / 100) for t, r in trained_grid(args.results_dir, args.embeddings)]
    if not grid:
        raise InputError(
            Path(args.results_dir) / "trained_models" / "exp1_emb_proj",
            "holds no exp1 sweep models (tp*_rp*/tg_matl_best_fold*.h5)",
            f"the models written by `{command}`; run it first",
        )
    return grid


def sweep_sources(grid, command):
    return [
        {
            "method": f"tg_matl_{awir.grid_tag(t, r)}",
            "exp1_tag": "tg_matl",
            "exp1_subdir": awir.grid_tag(t, r),
            "command": command,
            "top_percent": t,
            "random_percent": r,
        }
        for t, r in grid
    ]


def plot_heatmaps(rows, sources, embedding_names, directory):
    """One PNG per metric: a top_percent x random_percent grid of fold means, one panel per embedding."""
    tops = sorted({s["top_percent"] for s in sources})
    randoms = sorted({s["random_percent"] for s in sources})
    by_key = {(row["embedding"], row["method"]): row for row in rows}
    paths = []
    for metric in HEATMAP_METRICS:
        figure, axes = plots.pyplot().subplots(
            1, len(embedding_names), figsize=(4.5 * len(embedding_names), 3.8), squeeze=False
        )
        for axis, name in zip(axes[0], embedding_names, strict=True):
            grid = np.full((len(tops), len(randoms)), np.nan)
            for source in sources:
                if (name, source["method"]) in by_key:
                    position = tops.index(source["top_percent"]), randoms.index(source["random_percent"])
                    grid[position] = by_key[(name, source["method"])][f"{metric}_mean"]
            colours = "viridis_r" if metric in igarss_exp2.LOWER_IS_BETTER else "viridis"
            image = axis.imshow(grid, cmap=colours, aspect="auto")
            for (i, j), value in np.ndenumerate(grid):
                if np.isfinite(value):
                    axis.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7, color="w")
            axis.set_xticks(range(len(randoms)), [f"{r:.2f}" for r in randoms])
            axis.set_yticks(range(len(tops)), [f"{t:.2f}" for t in tops])
            axis.set_xlabel("random_percent")
            axis.set_ylabel("top_percent")
            axis.set_title(f"{name}: {metric}")
            figure.colorbar(image, ax=axis)
        figure.tight_layout()
        paths.append(Path(directory) / f"sweep_heatmap_{metric}.png")
        plots.save(figure, paths[-1])
    return paths


def best_grid_points(rows, sources, args):
    """Per metric, the grid point with the best validation mean, and its test mean.

    Means are over embeddings of the fold means; the validation metric of a fold is that of its 9
    held-out model-selection samples (igarss_exp2.py writes both). The point is chosen on
    validation (ties: the earlier grid point) and only then read on the test set, so the test
    figure is not the best of 24 test scores.
    """
    by_method = {s["method"]: s for s in sources}
    report = {}
    for metric in igarss_exp2.METRICS:

        def grid_mean(method, column):
            return float(np.mean([r[f"{column}_mean"] for r in rows if r["method"] == method]))

        validation = {s["method"]: grid_mean(s["method"], f"val_{metric}") for s in sources}
        pick = min if metric in igarss_exp2.LOWER_IS_BETTER else max
        best = pick(validation, key=validation.get)
        report[metric] = {
            "method": best,
            "val": validation[best],
            "test": grid_mean(best, metric),
            "top_percent": by_method[best]["top_percent"],
            "random_percent": by_method[best]["random_percent"],
        }
    for metric in ("acc", "r2_feat", "r2_loc"):
        best = report[metric]
        print(
            f"summary: best {metric} on validation at top_percent {best['top_percent']:.2f} "
            f"random_percent {best['random_percent']:.2f}: val {best['val']:.3f}, test {best['test']:.3f} "
            f"(mean over {len(args.embeddings)} embeddings x {len(args.folds)} folds)"
        )
    return report


def check_arguments(args) -> None:
    """Every flag in range and --results_dir writable, before anything is read or written."""
    awir.check_protocol_arguments(args)
    args.folds = awir.checked_folds(args.folds)
    for flag in ("top_percents", "random_percents"):
        bad = [value for value in getattr(args, flag) if not 0 <= value <= 1]
        require(not bad, f"--{flag}", f"has {bad}", "shares in [0, 1]")


@cli_entry
def main(args):
    check_arguments(args)
    command = igarss_exp2.exp1_command("igarss_exp1_sweep.py", args)
    if args.demo:
        args.data, args.embeddings_dir = awir.demo_inputs(args, "igarss_exp2_sweep")
    grid = sweep_grid(args, command)
    runs.print_args(args)
    sources = sweep_sources(grid, command)
    igarss_exp2.check_exp1_heads(args, sources)

    # ---- data ----
    data = awir.load_awir(
        args.data, args.embeddings_dir, args.embeddings, args.results_dir, args.test_size, args.batch_size
    )
    runs.seed_everything(args.seed, args.deterministic)  # after reading: bad inputs stop sooner
    print(
        f"samples {len(data['class_label'])}, test {len(data['test'])}, grid {len(grid)} points, "
        f"task heads {3 * len(args.embeddings) * len(sources) * len(args.folds)}"
    )

    # ---- train ----
    igarss_exp2.run_task_heads(data, sources, args, RESUME_SETTINGS, config_name="exp2_sweep_config.json")

    # ---- evaluate ----
    directory = Path(args.results_dir) / "exp2_results"
    methods = [s["method"] for s in sources]
    per_fold = igarss_exp2.per_fold_metrics(
        args.results_dir, args.embeddings, [*methods, *BASELINES], args.folds
    )
    rows = igarss_exp2.summarise(args.results_dir, args.embeddings, methods, args.folds, per_fold)
    by_method = {s["method"]: s for s in sources}
    for row in rows:
        row["top_percent"] = by_method[row["method"]]["top_percent"]
        row["random_percent"] = by_method[row["method"]]["random_percent"]
    plot_heatmaps(rows, sources, args.embeddings, directory)
    report = best_grid_points(rows, sources, args)
    comparisons = [(report[m]["method"], base, (m,)) for m in igarss_exp2.METRICS for base in BASELINES]
    igarss_exp2.write_summary(
        rows, directory, per_fold, comparisons, prefix="sweep_summary", comparisons_note=SWEEP_PAIRED_NOTE
    )
    atomic.write_json(directory / "sweep_best.json", report)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
