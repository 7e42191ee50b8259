"""TG-MATL experiment 1 sweep: TG-MATL projection heads over the top_percent x random_percent grid.

Paper: M. Zhou, A. Zare, "Task-Guided Multi-Annotation Triplet Learning for Remote Sensing
Representations", IGARSS 2026, arXiv 2604.03837 (selection-ratio study).

For every top_percent in {0.40, 0.50, 0.60, 0.70} and random_percent in {0.05, ..., 0.30}, and for
each embedding and fold, a TG-MATL head is trained exactly as in igarss_exp1.py (same data, folds,
losses and engine): 4 x 6 x 3 x 8 = 576 heads. Writes

    results/trained_models/exp1_emb_proj/{emb}/tp{T}_rp{R}/tg_matl_best_fold{k}.h5
    results/exp1_test_projections/{emb}/tp{T}_rp{R}/tg_matl_proj_val0.7_fold{k}.npy
    results/exp1_timings/timings_test0.7_sweep.csv
        (columns experiment, fold, top_percent, random_percent, train_time)

with T, R in integer percent. An interrupted sweep re-run skips every finished head.

Commands:
    python igarss_exp1_sweep.py --margin 0.1 --batch_size 32 --test_size 0.7
    python igarss_exp1_sweep.py --demo        # synthetic data, 576 heads x 100 epochs, 1-3 minutes
It ends with the grid point of the best mean validation 5-NN accuracy and its test accuracy; the
demo printed
    summary: best grid point on validation tp70_rp20: val 5-NN 0.986, test 5-NN 0.984 (mean over 24 heads)
"""

import functools
from pathlib import Path

from common import cli
from common.tgmatl import flags

PAPER_TOP_PERCENTS = [0.40, 0.50, 0.60, 0.70]
PAPER_RANDOM_PERCENTS = [0.05, 0.10, 0.15, 0.20, 0.25, 0.30]


def get_args_parser():
    parser = cli.Parser("TG-MATL experiment 1 sweep over top_percent x random_percent")
    flags.add_projection_head_arguments(parser, "and sweep the grid on it with 100 epochs (a few minutes).")
    parser.add_argument(
        "--top_percents",
        type=float,
        nargs="+",
        default=PAPER_TOP_PERCENTS,
        help="Grid of TG-MATL top_percent values (paper: 0.40 0.50 0.60 0.70).",
    )
    parser.add_argument(
        "--random_percents",
        type=float,
        nargs="+",
        default=PAPER_RANDOM_PERCENTS,
        help="Grid of TG-MATL random_percent values (paper: 0.05 to 0.30 in steps of 0.05).",
    )
    parser.demo_defaults(epochs=100)
    return parser


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np

import igarss_exp1
from common import atomic, runs
from common.errors import cli_entry, require
from common.tgmatl import awir, stacked_training

TIMING_COLUMNS = ["experiment", "fold", "top_percent", "random_percent", "train_time"]
# The settings a resume must match: igarss_exp1.py's, less top_percent and random_percent (the grid
# replaces them).
RESUME_SETTINGS = (
    "margin",
    "batch_size",
    "test_size",
    "box_weight",
    "extra_selection",
    "epochs",
    "learning_rate",
    "seed",
    "model_selection",
)


def heads_to_train(args, grid, results_dir):
    """{embedding: [TG-MATL head]} for every (embedding, grid point, fold) without finished files."""
    heads_by_embedding = {}
    for embedding_index, name in enumerate(args.embeddings):
        for grid_index, (top, extra) in enumerate(grid):
            tag = awir.grid_tag(top, extra)
            for fold in range(1, awir.NUM_FOLDS + 1):
                paths = igarss_exp1.head_paths(results_dir, name, "tg_matl", fold, args.test_size, tag)
                if all(path.exists() for path in paths) and not args.overwrite:
                    continue
                key = 100000 * (embedding_index + 1) + 100 * grid_index + fold
                head = {"method": "tg_matl", "fold": fold, "tag": tag, "paths": paths, "key": key}
                heads_by_embedding.setdefault(name, []).append(
                    dict(head, top_percent=top, random_percent=extra)
                )
    finished = len(grid) * len(args.embeddings) * awir.NUM_FOLDS - sum(map(len, heads_by_embedding.values()))
    if finished:
        print(f"{finished} finished heads reused (--overwrite retrains them)")
    return heads_by_embedding


def record_stack(job, result, data, timings, timings_path, accuracy):
    """Export a finished stack, add its timings and its test and validation accuracies.

    Every head of a sweep stack is a TG-MATL head of the same width, so the joint wall time is
    divided evenly (the selection's cost does not depend on the percentages).
    """
    test_accuracies, val_accuracies = igarss_exp1.export_and_evaluate(job, result, data)
    seconds_per_head = round(result["seconds"] / len(result["heads"]), 4)
    for head, test_accuracy, val_accuracy in zip(
        result["heads"], test_accuracies, val_accuracies, strict=True
    ):
        grid_point = (head["top_percent"], head["random_percent"])
        timings[(job["embedding"], head["fold"], *grid_point)] = {
            "experiment": job["embedding"],
            "fold": head["fold"],
            "top_percent": head["top_percent"],
            "random_percent": head["random_percent"],
            "train_time": seconds_per_head,
        }
        accuracy.setdefault(head["tag"], []).append((test_accuracy, val_accuracy))
    atomic.write_csv(timings_path, [timings[key] for key in sorted(timings)], TIMING_COLUMNS)
    print(f"  {job['label']}: {len(result['heads'])} heads in {result['seconds']:.1f}s")


def check_arguments(args) -> None:
    """igarss_exp1.py's checks and every grid value a share in [0, 1], before anything is written."""
    igarss_exp1.check_arguments(args)
    for flag in ("top_percents", "random_percents"):
        bad = [value for value in getattr(args, flag) if not 0 <= value <= 1]
        require(not bad, f"--{flag}", f"has {bad}", "shares in [0, 1]")


@cli_entry
def main(args):
    check_arguments(args)
    if args.demo:
        args.data, args.embeddings_dir = awir.demo_inputs(args, "igarss_exp1")
    runs.print_args(args)
    results_dir = Path(args.results_dir)

    # ---- data ----
    data = awir.load_awir(
        args.data, args.embeddings_dir, args.embeddings, results_dir, args.test_size, args.batch_size
    )
    runs.seed_everything(args.seed, args.deterministic)  # after reading: bad inputs stop sooner
    task_scores = igarss_exp1.fold_task_scores(data, args.seed)
    igarss_exp1.check_training_settings(results_dir, "exp1_sweep_config.json", args, RESUME_SETTINGS)
    grid = [(top, extra) for top in args.top_percents for extra in args.random_percents]
    print(
        f"grid {len(grid)} points x {len(args.embeddings)} embeddings x {awir.NUM_FOLDS} folds "
        f"= {len(grid) * len(args.embeddings) * awir.NUM_FOLDS} TG-MATL heads"
    )

    # ---- train ----
    timings_path = results_dir / "exp1_timings" / f"timings_test{args.test_size}_sweep.csv"
    timings = igarss_exp1.read_timings(
        timings_path,
        args.overwrite,
        lambda r: (r["experiment"], int(r["fold"]), float(r["top_percent"]), float(r["random_percent"])),
    )
    accuracy = {}
    record = functools.partial(
        record_stack, data=data, timings=timings, timings_path=timings_path, accuracy=accuracy
    )
    jobs = igarss_exp1.split_into_jobs(
        heads_to_train(args, grid, results_dir), data["embeddings"], args.workers
    )
    run = functools.partial(igarss_exp1.train_job, data=data, task_scores=task_scores, args=args)
    seconds = stacked_training.run_side_by_side(jobs, run, record, args.workers, args.deterministic)
    print(f"  all stacks done in {seconds:.1f}s")

    # ---- evaluate ----
    if accuracy:
        return report_best_grid_point(accuracy, results_dir)


def report_best_grid_point(accuracy, results_dir):
    """The grid point with the best mean validation 5-NN accuracy, and its test accuracy.

    The point is chosen on the validation splits (ties: the earlier grid point) and only then
    evaluated on the test set, so the test figure is not the maximum of 24 test scores.
    """
    summary = {
        tag: {
            "val_knn5_accuracy": float(np.mean([val for _, val in values])),
            "test_knn5_accuracy": float(np.mean([test for test, _ in values])),
            "heads": len(values),
        }
        for tag, values in accuracy.items()
    }
    atomic.write_json(results_dir / "exp1_test_projections" / "sweep_knn_summary.json", summary)
    best = max(summary, key=lambda tag: summary[tag]["val_knn5_accuracy"])
    chosen = summary[best]
    print(
        f"summary: best grid point on validation {best}: val 5-NN {chosen['val_knn5_accuracy']:.3f}, "
        f"test 5-NN {chosen['test_knn5_accuracy']:.3f} (mean over {chosen['heads']} heads)"
    )
    return {"best": best, **summary[best]}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
