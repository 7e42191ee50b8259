"""Every SPML method of train_multilabel_model.py on the same generated data and seeds: mean +- std.

Data: the script's --demo generator (`common/spml/aid_multilabel.write_demo`): the 17 AID classes in six
scenes whose classes co-occur, 2-7 true labels per image (mean 3.75), one of them observed per training
image (random single positive, drawn with the seed). Every method is trained by the script's own `main`
(small CNN) once per seed; the seed also draws the validation split, the initialisation and the batch
order, and the data are the same for every method. Reported per method: test mAP, micro AP, macro and
micro F1 at 0.5 of the reported model (best validation epoch on the kept trajectory). For AdaGC also its
final pseudo labels (mean of both teachers) on the unobserved training entries against the hidden full
labels: precision and recall at 0.5, and the mean pseudo label on hidden positives and on true negatives.
Variants (with --methods) isolate AdaGC's pieces: adagc_no_mixup, adagc_late_gc (Gradient Calibration
from the fixed epoch epochs - 3), adagc_at_trigger (teachers copied from the student at the rollback, then
the constant decays), adagc_aio2 (AIO2's trigger rule), an_observed and adagc_observed (best epoch
selected on the observed labels).

    python -m bench.spml_methods              # 60 runs: 13.4 minutes on 2 cores shared with other jobs
    python -m bench.spml_methods --epochs 8 --methods an adagc adagc_no_mixup adagc_late_gc
    python -m bench.spml_methods --regime memorisation

Two regimes. `underfitting` (the default above): the image demo at 6 epochs, where AN's test mAP is
still rising when training stops, so there is no memorisation for AdaGC to prevent. `memorisation`:
precomputed features (`common/spml/features.memorisation_task`, one seeded set for every run) under an
MLP head for 30 epochs, where AN's test mAP rises and then falls as it memorises the false negatives; per
seed AN's per-epoch test curve, its peak epoch, AdaGC's trigger (detected at, rolled back to), the reported
(best validation) and last-epoch test mAP of AN, AdaGC, EM, LL-R and full labels, AN and AdaGC again with
`--selection_labels observed`, and AdaGC's pseudo-label precision and recall.
Both print paired comparisons of AdaGC against each baseline (per-seed difference, mean with its 95 %
t interval, wins, Wilcoxon p): a method is better only where the interval excludes 0.

Writes <out>/table.md, table.csv, runs.csv and spml_methods.png; the last line is AdaGC's mAP against
AN's (the baseline measured in the same run): mean ratio and the seeds AdaGC wins.
"""

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np

import train_multilabel_model as tm
from common import atomic, parallel, pipelines, plots, reports
from common.spml import aid_multilabel, batches, evaluation, features

METRICS = ("mAP", "micro_AP", "macro_F1", "micro_F1")
PSEUDO = ("pseudo_precision", "pseudo_recall", "pseudo_on_hidden_positives", "pseudo_on_negatives")


MEMORISATION_METHODS = ("an", "adagc", "em", "ll_r", "full", "an_observed", "adagc_observed")


def variants(epochs):
    """AdaGC with one piece changed: the runs that say where its gain or loss comes from."""
    return {
        "adagc_no_mixup": ["--method", "adagc", "--mixup_alpha", "0"],
        "adagc_late_gc": ["--method", "adagc", "--gc_start_epoch", str(max(1, epochs - 3))],
        "adagc_at_trigger": [
            "--method",
            "adagc",
            "--teacher_init",
            "at_trigger",
            "--teacher_ramp",
            "constant",
        ],
        "adagc_aio2": ["--method", "adagc", "--trigger", "aio2"],
        "an_observed": ["--method", "an", "--selection_labels", "observed"],
        "adagc_observed": ["--method", "adagc", "--selection_labels", "observed"],
    }


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--regime",
        default="underfitting",
        choices=("underfitting", "memorisation"),
        help="underfitting: the image demo (AN still rising); memorisation: features, AN rises then falls.",
    )
    parser.add_argument("--methods", nargs="+", default=None, help="Methods and variants (default: all).")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="Seeds (>= 5 for the table)."
    )
    parser.add_argument(
        "--images", type=int, default=256, help="Generated images (a quarter are test images)."
    )
    parser.add_argument("--image_size", type=int, default=32, help="Model input size (generated at 64 px).")
    parser.add_argument(
        "--epochs",
        type=int,
        default=0,
        help="Training epochs of every run (0: 6 underfitting, 30 memorisation).",
    )
    parser.add_argument(
        "--feature_rows", type=int, default=600, help="memorisation: training rows (val half, test double)."
    )
    parser.add_argument("--val_fraction", type=float, default=0.15, help="Share of images_tr for selection.")
    parser.add_argument("--batch_size", type=int, default=16, help="Batch size of every run.")
    parser.add_argument("--workers", type=int, default=1, help="Runs in parallel processes.")
    parser.add_argument("--out", default="results/bench/spml_methods", help="Folder for the tables and plot.")
    return parser


def run_argv(name, seed, settings, root):
    """The trainer's command line of one (method or variant, seed) run on the shared data."""
    extra = variants(settings.epochs).get(name, ["--method", name])
    where = ["--results_dir", root / "results", "--run_name", f"{name}_{seed}"]
    if settings.regime == "memorisation":
        task = f"--dataset features --features {root / 'features.npz'} --backbone mlp --learning_rate 3e-3"
        sizes = f"--epochs {settings.epochs} --batch_size 32 --seed {seed} --expected_num_positives 3"
        return [str(item) for item in [*extra, *task.split(), *sizes.split(), *where]]
    sizes = (
        f"--image_size {settings.image_size} --epochs {settings.epochs} --batch_size {settings.batch_size}"
        f" --demo_images {settings.images} --seed {seed} --val_fraction {settings.val_fraction}"
    )
    where = ["--data_dir", root / "data", *where]
    return [str(item) for item in ["--demo", *extra, *sizes.split(), *where]]


def pseudo_label_quality(trainer, args):
    """AdaGC's final pseudo labels on the unobserved training entries against the hidden full labels."""
    data = tm.load_data(args)
    loader = tm.make_loader(data, args.image_size, pipelines.ReaderErrors())
    pseudo = []
    for images, _ in batches.make_dataset(data["train"]["sources"], loader, args.batch_size):
        pseudo.append(
            trainer.teachers.pseudo_labels(images, trainer.teachers.probabilities_a(images)).numpy()
        )
    pseudo, unobserved = np.concatenate(pseudo), data["train"]["observed"] == 0
    hidden = (data["train"]["full"] == 1) & unobserved
    negative = (data["train"]["full"] == 0) & unobserved
    predicted = (pseudo >= 0.5) & unobserved
    return {
        "pseudo_precision": float((predicted & hidden).sum() / max(predicted.sum(), 1)),
        "pseudo_recall": float((predicted & hidden).sum() / max(hidden.sum(), 1)),
        "pseudo_on_hidden_positives": float(pseudo[hidden].mean()),
        "pseudo_on_negatives": float(pseudo[negative].mean()),
    }


def run_one(job):
    """Train one (method, seed) with the script's main; returns its metrics row (with the per-epoch test
    mAP of the student as `test_curve`: after a rollback the calibrated epochs replace the undone ones)."""
    name, seed, settings, root = job
    import keras

    keras.backend.clear_session()
    captured, make_trainer, train_one_epoch = {}, tm.make_trainer, tm.train_one_epoch
    args = tm.get_args_parser().parse_args(run_argv(name, seed, settings, Path(root)))

    def capturing(*arguments, **keywords):
        captured["trainer"] = make_trainer(*arguments, **keywords)
        return captured["trainer"]

    def with_test_curve(run_args, trainer, data, *rest):
        row = train_one_epoch(run_args, trainer, data, *rest)
        if "test" not in captured:
            loader = tm.make_loader(data, run_args.image_size, pipelines.ReaderErrors())
            captured["test"] = batches.make_dataset(data["test"]["sources"], loader, run_args.batch_size)
            captured["curve"] = {}
        test = evaluation.evaluate(
            trainer.student, captured["test"], data["test"]["full"], data["class_names"]
        )
        captured["curve"][row["epoch"]] = round(test["mAP"], 4)
        return row

    started, tm.make_trainer, tm.train_one_epoch = time.perf_counter(), capturing, with_test_curve
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            metrics = tm.main(args)
            row = {"method": name, "seed": seed, **{key: metrics[key] for key in METRICS}}
            if args.method == "adagc":
                row.update(pseudo_label_quality(captured["trainer"], args))
                row.update(trigger_epoch=metrics["trigger_epoch"], selected_phase=metrics["best_phase"])
                row["trigger_detected_at"] = metrics["trigger_detected_at"]
    finally:
        tm.make_trainer, tm.train_one_epoch = make_trainer, train_one_epoch
    row["last_epoch_mAP"] = metrics["last_epoch"]["mAP"]
    row["test_curve"] = " ".join(f"{captured['curve'][e]:.4f}" for e in sorted(captured["curve"]))
    return {**row, "seconds": round(time.perf_counter() - started, 1)}


def summary_rows(runs, names):
    rows = []
    for name in names:
        mine = [run for run in runs if run["method"] == name]
        row = {"method": name, "seeds": len(mine)}
        for key in (*METRICS, "last_epoch_mAP", *PSEUDO):
            values = [run[key] for run in mine if key in run]
            row[key] = reports.format_mean_std(*reports.mean_std(values), digits=3) if values else ""
        triggers = [str(run["trigger_epoch"]) for run in mine if "trigger_epoch" in run]
        row["trigger_epochs"] = " ".join(triggers)
        row["selected_in_gc"] = (
            f"{sum(run.get('selected_phase') == 'gc' for run in mine)}/{len(mine)}" if triggers else ""
        )
        rows.append(row)
    return rows


def save_plot(path, runs, names):
    figure, axis = plots.pyplot().subplots(figsize=(max(8, 0.75 * len(names)), 3.8))
    series = {}
    for key in ("mAP", "micro_F1"):
        stats = [reports.mean_std([run[key] for run in runs if run["method"] == name]) for name in names]
        series[key] = ([s[0] for s in stats], [s[1] for s in stats])
    plots.grouped_bars(axis, names, series)
    axis.set_ylabel("test score (mean +- std over seeds)")
    axis.tick_params(axis="x", labelrotation=45)
    axis.legend(fontsize=8)
    figure.tight_layout()
    plots.save(figure, path)


def per_seed_rows(runs, seeds):
    """Memorisation regime, per seed: AN's test peak, AdaGC's trigger, reported and last-epoch test mAP."""
    by = {(run["method"], run["seed"]): run for run in runs}
    rows = []
    for seed in seeds:
        an, adagc = by.get(("an", seed)), by.get(("adagc", seed))
        if an is None or adagc is None:
            continue
        curve = [float(value) for value in an["test_curve"].split()]
        peak = int(np.argmax(curve)) + 1
        trigger = adagc.get("trigger_epoch")
        rows.append(
            {
                "seed": seed,
                "AN peak epoch": peak,
                "AN peak mAP": f"{curve[peak - 1]:.4f}",
                "AdaGC detected at": adagc.get("trigger_detected_at"),
                "AdaGC rolled back to": trigger,
                "trigger before peak": "yes" if trigger is not None and trigger < peak else "no",
                "AN mAP": f"{an['mAP']:.4f}",
                "AdaGC mAP": f"{adagc['mAP']:.4f}",
                "AN last": f"{an['last_epoch_mAP']:.4f}",
                "AdaGC last": f"{adagc['last_epoch_mAP']:.4f}",
                "pseudo P / R": f"{adagc['pseudo_precision']:.3f} / {adagc['pseudo_recall']:.3f}",
            }
        )
    return rows


def save_curve_plot(path, runs, seeds):
    """AN's per-epoch test mAP per seed, AdaGC's trigger (rollback target) marked on each."""
    figure, axis = plots.pyplot().subplots(figsize=(7, 4))
    by = {(run["method"], run["seed"]): run for run in runs}
    for seed in seeds:
        if ("an", seed) not in by:
            continue
        curve = [float(value) for value in by[("an", seed)]["test_curve"].split()]
        line = axis.plot(range(1, len(curve) + 1), curve, label=f"AN seed {seed}")[0]
        trigger = by.get(("adagc", seed), {}).get("trigger_epoch")
        if trigger:
            axis.axvline(trigger, color=line.get_color(), linestyle=":")
    axis.set(xlabel="epoch", ylabel="test mAP", title="AN (lines) and AdaGC's trigger (dotted)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    plots.save(figure, path)


def paired_table(runs, names):
    """AdaGC against each other method on the same seeds: test mAP at the reported and the last epoch."""
    seeds = sorted({run["seed"] for run in runs if run["method"] == "adagc"})
    values = {}
    for name in names:
        mine = {run["seed"]: run for run in runs if run["method"] == name}
        if all(seed in mine for seed in seeds):
            values[name] = {key: [mine[seed][key] for seed in seeds] for key in ("mAP", "last_epoch_mAP")}
    pairs = [("adagc", name) for name in values if name != "adagc"] if "adagc" in values else []
    rows = reports.paired_rows(values, pairs, ("mAP", "last_epoch_mAP"))
    return reports.markdown_table(reports.PAIRED_HEADER, rows) if rows else ""


def main(args):
    memorisation = args.regime == "memorisation"
    args.epochs = args.epochs or (30 if memorisation else 6)
    epochs_variants = variants(args.epochs)
    names = args.methods or list(MEMORISATION_METHODS if memorisation else tm.METHODS)
    unknown = [name for name in names if name not in tm.METHODS and name not in epochs_variants]
    if unknown:
        raise SystemExit(f"error: --methods: unknown {', '.join(unknown)}; expected {', '.join(tm.METHODS)}")
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as root:
        # The data once, before the runs: every method and seed reads these files.
        if memorisation:
            counts = (args.feature_rows, args.feature_rows // 2, 2 * args.feature_rows)
            features.memorisation_task(Path(root) / "features.npz", seed=12345, counts=counts)
        else:
            aid_multilabel.write_demo(Path(root) / "data", args.images, seed=12345)
        jobs = [(name, seed, args, root) for seed in args.seeds for name in names]
        size = (
            f"{args.feature_rows} feature rows"
            if memorisation
            else f"{args.images} images, {args.image_size} px"
        )
        print(
            f"{args.regime} regime: {len(jobs)} runs: {len(names)} methods x {len(args.seeds)} seeds, "
            f"{size}, {args.epochs} epochs",
            flush=True,
        )
        runs = []

        def report(job, row):
            runs.append(row)
            print(
                f"{row['method']:22s} seed {row['seed']}  mAP {row['mAP']:.4f}  ({row['seconds']:.1f} s)",
                flush=True,
            )

        seconds = parallel.run_jobs(run_one, jobs, args.workers, on_result=report)
    columns = ["method", "seeds", *METRICS, "last_epoch_mAP", *PSEUDO, "trigger_epochs", "selected_in_gc"]
    rows = summary_rows(runs, names)
    markdown = reports.markdown_table(columns, [[row[key] for key in columns] for row in rows])
    reports.write_table(out / "table", rows, columns, markdown)
    atomic.write_csv(out / "runs.csv", runs, sorted({key for run in runs for key in run}, key=str))
    save_plot(out / "spml_methods.png", runs, names)
    print(markdown)
    if memorisation:
        seeds_rows = per_seed_rows(runs, args.seeds)
        if seeds_rows:
            seed_markdown = reports.markdown_table(
                list(seeds_rows[0]), [list(r.values()) for r in seeds_rows]
            )
            reports.write_table(out / "per_seed", seeds_rows, list(seeds_rows[0]), seed_markdown)
            print(seed_markdown)
            for run in runs:
                if run["method"] == "an":
                    print(f"AN test mAP per epoch, seed {run['seed']}: {run['test_curve']}")
        save_curve_plot(out / "an_curve_trigger.png", runs, args.seeds)
    paired = paired_table(runs, names)
    if paired:
        atomic.write_text(out / "paired.md", paired + "\n")
        print("AdaGC vs each method, paired over seeds (AdaGC - other; sure: the interval excludes 0):")
        print(paired)
    print(f"{len(runs)} runs in {seconds / 60:.1f} min; tables and plot in {out}")
    an = {run["seed"]: run["mAP"] for run in runs if run["method"] == "an"}
    adagc = {run["seed"]: run["mAP"] for run in runs if run["method"] == "adagc"}
    shared = sorted(set(an) & set(adagc))
    if shared:
        ratio = np.mean([adagc[seed] / an[seed] for seed in shared])
        wins = sum(adagc[seed] > an[seed] for seed in shared)
        print(f"AdaGC / AN test mAP: {ratio:.3f}x (AdaGC higher on {wins} of {len(shared)} seeds)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
