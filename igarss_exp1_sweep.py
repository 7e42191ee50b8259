"""TG-MATL experiment 1 sweep: TG-MATL projection heads over the top_percent x random_percent grid.

Paper: M. Zhou, A. Zare, "Task-Guided Multi-Annotation Triplet Learning for Remote Sensing
Representations", IGARSS 2026, arXiv 2604.03837 (selection-ratio study).

For every top_percent in {0.40, 0.50, 0.60, 0.70} and random_percent in {0.05, ..., 0.30}, and for
each embedding and fold, a TG-MATL head is trained exactly as in igarss_exp1.py (same data, folds,
losses and engine): 4 x 6 x 3 x 8 = 576 heads. Writes

    results/trained_models/exp1_emb_proj/{emb}/tp{T}_rp{R}/tg_matl_best_fold{k}.h5
    results/exp1_test_projections/{emb}/tp{T}_rp{R}/tg_matl_proj_val0.7_fold{k}.npy
    results/exp1_timings/timings_test0.7_sweep.csv   (experiment, fold, top_percent, random_percent, train_time)

with T, R in integer percent. An interrupted sweep re-run skips every finished head.

Commands:
    python igarss_exp1_sweep.py --margin 0.1 --batch_size 32 --test_size 0.7
    python igarss_exp1_sweep.py --demo        # synthetic data, 576 heads x 100 epochs, a few minutes
It ends with
    summary: best grid point tp{T}_rp{R}: test 5-NN accuracy 0.xxx (mean over 3 embeddings x 8 folds)
"""

import csv
import functools
from pathlib import Path

import numpy as np

import igarss_exp1
from common import awir
from common import atomic, runs
from common.errors import cli_entry
from common.stacked_training import run_side_by_side

PAPER_TOP_PERCENTS = [0.40, 0.50, 0.60, 0.70]
PAPER_RANDOM_PERCENTS = [0.05, 0.10, 0.15, 0.20, 0.25, 0.30]


def get_args_parser():
    parser = igarss_exp1.get_args_parser()
    parser.description = "TG-MATL experiment 1 sweep over top_percent x random_percent"
    parser.add_argument("--top_percents", type=float, nargs="+", default=PAPER_TOP_PERCENTS,
                        help="Grid of TG-MATL top_percent values (paper: 0.40 0.50 0.60 0.70).")
    parser.add_argument("--random_percents", type=float, nargs="+", default=PAPER_RANDOM_PERCENTS,
                        help="Grid of TG-MATL random_percent values (paper: 0.05 to 0.30 in steps of 0.05).")
    return parser


def grid_tag(top_percent, random_percent):
    return f"tp{round(top_percent * 100)}_rp{round(random_percent * 100)}"


@cli_entry
def main(args):
    runs.seed_everything(args.seed, args.deterministic)
    if args.demo:
        igarss_exp1.use_demo_data(args, demo_epochs=100)
    runs.print_args(args)

    # ---- data ----
    data = awir.load_awir(args.data, args.embeddings_dir, args.embeddings, args.results_dir, args.test_size)
    task_scores = igarss_exp1.fold_task_scores(data, args.seed)
    results_dir = Path(args.results_dir)
    config_path = results_dir / "trained_models" / "exp1_emb_proj" / "exp1_sweep_config.json"
    sweep_keys = [key for key in igarss_exp1.TRAINING_KEYS if key not in ("top_percent", "random_percent")]
    atomic.write_json(config_path, igarss_exp1.check_previous_run(config_path, args, args.overwrite, sweep_keys))
    grid = [(top, extra) for top in args.top_percents for extra in args.random_percents]
    print(f"grid {len(grid)} points x {len(args.embeddings)} embeddings x {awir.NUM_FOLDS} folds "
          f"= {len(grid) * len(args.embeddings) * awir.NUM_FOLDS} TG-MATL heads")

    # ---- train ----
    heads_by_embedding = {}
    for embedding_index, name in enumerate(args.embeddings):
        for grid_index, (top, extra) in enumerate(grid):
            tag = grid_tag(top, extra)
            for fold in range(1, awir.NUM_FOLDS + 1):
                paths = igarss_exp1.head_paths(results_dir, name, "tg_matl", fold, args.test_size, tag)
                if all(path.exists() for path in paths) and not args.overwrite:
                    continue
                heads_by_embedding.setdefault(name, []).append({
                    "method": "tg_matl", "fold": fold, "tag": tag, "paths": paths, "top_percent": top,
                    "random_percent": extra, "key": 100000 * (embedding_index + 1) + 100 * grid_index + fold})
    finished = len(grid) * len(args.embeddings) * awir.NUM_FOLDS - sum(map(len, heads_by_embedding.values()))
    if finished:
        print(f"{finished} finished heads reused (--overwrite retrains them)")
    timings_path = results_dir / "exp1_timings" / f"timings_test{args.test_size}_sweep.csv"
    columns = ["experiment", "fold", "top_percent", "random_percent", "train_time"]
    timings = {}
    if timings_path.exists() and not args.overwrite:
        with open(timings_path, newline="") as file:
            timings = {(r["experiment"], int(r["fold"]), float(r["top_percent"]), float(r["random_percent"])): r
                       for r in csv.DictReader(file)}
    accuracy = {}

    def record(job, result):
        name, embedding = job["embedding"], data["embeddings"][job["embedding"]]
        igarss_exp1.export_heads(result, embedding, embedding[data["test"]], [h["paths"] for h in result["heads"]])
        for index, head in enumerate(result["heads"]):
            timings[(name, head["fold"], head["top_percent"], head["random_percent"])] = {
                "experiment": name, "fold": head["fold"], "top_percent": head["top_percent"],
                "random_percent": head["random_percent"], "train_time": round(result["seconds"] / len(result["heads"]), 4)}
            # ---- evaluate ----
            train, _ = data["folds"][head["fold"] - 1]
            kernel, bias = result["params"]["kernel"][index], result["params"]["bias"][index]
            accuracy.setdefault(head["tag"], []).append(igarss_exp1.knn_accuracy(
                embedding[train] @ kernel + bias, data["class_label"][train],
                embedding[data["test"]] @ kernel + bias, data["class_label"][data["test"]]))
        atomic.write_csv(timings_path, [timings[key] for key in sorted(timings)], columns)
        print(f"  {job['label']}: {len(result['heads'])} heads in {result['seconds']:.1f}s")

    jobs = igarss_exp1.split_into_jobs(heads_by_embedding, data["embeddings"], args.workers)

    run = functools.partial(igarss_exp1.train_job, data=data, task_scores=task_scores, args=args)
    seconds = run_side_by_side(jobs, run, record, args.workers, args.deterministic)
    print(f"  all stacks done in {seconds:.1f}s")
    if accuracy:
        summary = {tag: float(np.mean(values)) for tag, values in accuracy.items()}
        atomic.write_json(results_dir / "exp1_test_projections" / "sweep_knn_summary.json", summary)
        best = max(summary, key=summary.get)
        print(f"summary: best grid point {best}: test 5-NN accuracy {summary[best]:.3f} "
              f"(mean over {len(accuracy[best])} heads)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
