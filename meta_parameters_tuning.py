"""Tune an SPML method's hyper-parameters with single positives only (the AdaGC repository's tuning script).

Paper: C. Liu, G. Perantoni, L. Bruzzone, X. X. Zhu, "Adaptive Gradient Calibration for Single-Positive
Multi-Label Learning in Remote Sensing Image Scene Classification", arXiv 2510.08269. Only single positives
are known when a method is tuned, so the objective never sees a full label:

    objective = observed-label validation mAP: per class, the average precision of the model's scores on
    the validation images with the observed (single) positives as positives and every unobserved entry
    counted as negative, averaged over the classes that have an observed validation positive; the best
    epoch of each trial (selection on the same observed labels).

Each trial trains train_multilabel_model.py's method on the training split with the trial's values (the
training and validation full labels are replaced by an empty matrix before any trial starts, see
`observed_only`). Optuna's TPE sampler (seeded) proposes values; the study lives in an SQLite file, so an
interrupted study resumes (a trial cut short is run again with the same values). The best configuration
is then trained once more by train_multilabel_model.py and its full-label test metrics are reported next
to the objective.

    python meta_parameters_tuning.py -c configs/ll_r_aid_random.yaml --n_trials 20
    python meta_parameters_tuning.py --demo     # 2 trials of 1 epoch + the final run of 2 epochs

Writes `results/meta_parameters_tuning/<run name>/`: study.db, study.json (the settings a re-run must
share), trials.csv, trials/trial_NNN/, best_config.yaml (accepted by `train_multilabel_model.py -c`),
optimization_history.png, summary.json and the final run under train_multilabel_model/best/. The demo
(64 generated images at 24 px, its own demo data) took 66 s on a 2-core CPU at load average 10 and
ended with the final run's summary line and (one CPU run; the figures depend on the CPU):
    best trial 0 | objective (observed-label val mAP) 0.4233 | test mAP 0.5423 (full labels) |
    trigger_ratio 0.747, mixup_alpha 0.7152, learning_rate 0.0006431        (on one line)
"""

import copy
import math
from pathlib import Path

from common import cli
from common.spml import flags


def get_args_parser():
    """The trainer's flags (so a training config is read as it is) plus the study's own."""
    parser = flags.get_args_parser()
    parser.description = "Tune an SPML method with single positives only (Optuna, SQLite storage)."
    group = parser.add_argument_group("tuning")
    group.add_argument("--n_trials", type=int, default=20, help="Trials of the study in total (resumes).")
    group.add_argument("--tune_epochs", type=int, default=0, help="Epochs per trial (0 = --epochs).")
    group.add_argument(
        "--params", default="", help="Comma list of flags to tune (empty: the method's, see SEARCH_SPACE)."
    )
    parser.demo_defaults(n_trials=2, tune_epochs=1, epochs=2, demo_images=64, image_size=24)
    return parser


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np
import yaml

import train_multilabel_model as trainer
from common import atomic, pipelines, plots, runs
from common.errors import cli_entry, require, require_in_range
from common.spml import batches

SCRIPT_STEM = "meta_parameters_tuning"
# Search space per method (flag: (low, high, log scale)); the learning rate is tuned for every method.
SEARCH_SPACE = {
    "an_ls": {"label_smoothing": (0.0, 0.3, False)},
    "epr": {"expected_num_positives": (1.0, 6.0, False)},
    "role": {"expected_num_positives": (1.0, 6.0, False)},
    "em": {"em_alpha": (0.01, 1.0, True)},
    "em_apl": {"em_alpha": (0.01, 1.0, True), "apl_beta": (0.1, 1.0, False)},
    "ll_r": {"delta_rel": (0.05, 0.5, False)},
    "ll_ct": {"delta_rel": (0.05, 0.5, False)},
    "ll_cp": {"delta_rel": (0.05, 0.5, False)},
    "adagc": {"trigger_ratio": (0.5, 0.95, False), "mixup_alpha": (0.0, 1.0, False)},
}
LEARNING_RATE = (1e-5, 1e-2, True)
MAX_TRIALS = 10_000  # far above any study (the paper's 20): a typing slip is refused, not run for ever
TRIAL_COLUMNS = ["number", "state", "objective", "seconds"]
# Flags of this script itself; all others are the trainer's and go to every trial.
OWN_FLAGS = ("n_trials", "tune_epochs", "params")
# Flags of the study's own run, not of the trained model: best_config.yaml leaves them out.
NOT_FOR_THE_FINAL_RUN = (
    "config",
    "print_config",
    "demo",
    "results_dir",
    "run_name",
    "resume",
    "overwrite",
    "test_only",
)
# The settings a resumed study must share with the study it continues (study.json): every flag but
# --n_trials (a re-run may ask for more trials), --overwrite, --print_config and what is only shown
# (--no_tensorboard, --progress), the trainer's resumable ones included
# (tests/test_meta_parameters_tuning.py checks that a new flag is listed here).
RESUME_SETTINGS = (
    *trainer.RESUME_SETTINGS,
    "config",
    "demo",
    "epochs",
    "resume",
    "results_dir",
    "run_name",
    "strategy",
    "tune_epochs",
    "params",
)


def search_space(args) -> dict:
    space = {**SEARCH_SPACE.get(args.method, {}), "learning_rate": LEARNING_RATE}
    if args.params:
        names = [name.strip() for name in args.params.split(",") if name.strip()]
        unknown = [name for name in names if name not in space]
        require(not unknown, "--params", f"cannot tune {', '.join(unknown)}", f"some of {', '.join(space)}")
        space = {name: space[name] for name in names}
    return space


def observed_only(data: dict) -> dict:
    """The data a trial may see: training and validation full labels replaced by zeros (never read)."""
    data = copy.copy(data)
    for part in ("train", "val"):
        data[part] = {**data[part], "full": np.zeros_like(data[part]["observed"])}
    return data


def run_trial(args, data, statistics, run_dir) -> float:
    """Train one configuration (trainer.fit) and return its best observed-label validation mAP."""
    band_mean, band_variance = statistics
    errors = pipelines.ReaderErrors()
    loader = trainer.make_loader(data, args.image_size, errors)
    build = trainer.model_builder(args, len(data["class_names"]), band_mean, band_variance)
    trainer_object = trainer.make_trainer(args, build, data["train"])
    train = data["train"]
    augment = args.augment and args.dataset != "features"  # flips and rotations are for images
    train_batches = batches.TrainBatches(train["sources"], loader, args.batch_size, args.seed, augment)
    val_dataset = batches.make_dataset(data["val"]["sources"], loader, args.batch_size)
    with errors.surface():
        state = trainer.fit(args, trainer_object, data, run_dir, train_batches, val_dataset)
    return float(state["best_val_mAP"])


def trial_arguments(args, params: dict):
    trial_args = copy.copy(args)
    vars(trial_args).update(params, selection_labels="observed", resume=False)
    trial_args.epochs = args.tune_epochs or args.epochs
    return trial_args


def make_study(args, run_dir, space):
    """The Optuna study in run_dir/study.db; a trial an interruption left RUNNING is failed and re-queued."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = runs.settings_of(args, RESUME_SETTINGS)
    settings["search_space"] = {name: list(bounds) for name, bounds in space.items()}
    runs.check_same_settings(run_dir / "study.json", settings, args.overwrite, "the study's trials")
    atomic.write_json(run_dir / "study.json", settings)
    sampler = optuna.samplers.TPESampler(seed=args.seed)
    storage = f"sqlite:///{(run_dir / 'study.db').resolve()}"
    study = optuna.create_study(
        study_name=args.run_name, storage=storage, direction="maximize", sampler=sampler, load_if_exists=True
    )
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params)
        print(f"trial {trial.number} was interrupted: queued again with the same values")
    return study


def write_outputs(run_dir, study, space) -> None:
    """trials.csv and optimization_history.png (objective per trial and the best so far)."""
    rows, best, history = [], -math.inf, []
    for trial in study.trials:
        done = trial.datetime_complete
        seconds = round((done - trial.datetime_start).total_seconds(), 2) if done else None
        row = {
            "number": trial.number,
            "state": trial.state.name,
            "objective": trial.value,
            "seconds": seconds,
        }
        rows.append({**row, **trial.params})
        if trial.value is not None:
            best = max(best, trial.value)
            history.append((trial.number, trial.value, best))
    atomic.write_csv(run_dir / "trials.csv", rows, TRIAL_COLUMNS + list(space))
    figure, axis = plots.pyplot().subplots(figsize=(5, 3.4))
    if history:
        numbers, values, bests = zip(*history, strict=True)
        axis.plot(numbers, values, "o", label="trial")
        axis.step(numbers, bests, where="post", label="best so far")
    axis.set(xlabel="trial", ylabel="observed-label val mAP", title="optimization history")
    axis.legend(fontsize=8)
    figure.tight_layout()
    plots.save(figure, run_dir / "optimization_history.png")


def write_best_config(args, run_dir, best_params) -> Path:
    """best_config.yaml: the study's config with the best values (train_multilabel_model.py -c reads it)."""
    config = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    if args.demo:
        config.update(
            dataset=args.dataset,
            data_dir=args.data_dir,
            backbone=args.backbone,
            image_size=args.image_size,
            batch_size=args.batch_size,
            method=args.method,
        )
    # The trainer flags typed for the study (e.g. --dataset features --features x.npz) hold for its final run.
    typed = sorted(set(cli.typed_flags(args)) - set(OWN_FLAGS) - set(NOT_FOR_THE_FINAL_RUN))
    config.update({key: getattr(args, key) for key in typed})
    config.update({key: float(value) for key, value in best_params.items()})
    config.update(selection_labels="observed", epochs=args.epochs, seed=args.seed)
    text = (
        "# Chosen by meta_parameters_tuning.py on observed labels only (objective: observed-label val mAP).\n"
    )
    atomic.write_text(run_dir / "best_config.yaml", text + yaml.safe_dump(config, sort_keys=True))
    return run_dir / "best_config.yaml"


def check_arguments(args):
    """The trainer's checks (and derived values) plus the study's own, before anything is written."""
    args = trainer.resolve_derived(args, SCRIPT_STEM)
    require(args.method != "full", "--method", "full needs full labels", "a single-positive method")
    require_in_range(args, "n_trials", 1, MAX_TRIALS)
    require_in_range(args, "tune_epochs", 0, trainer.MAX_EPOCHS)
    return args


@cli_entry
def main(args):
    args = check_arguments(args)
    space = search_space(args)
    runs.seed_everything(args.seed, args.deterministic)
    runs.print_args(args)
    run_dir = Path(args.results_dir) / SCRIPT_STEM / args.run_name
    if args.overwrite and run_dir.exists():
        runs.prepare_run_dir(args.results_dir, SCRIPT_STEM, args.run_name, overwrite=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    # ---- data: loaded once, full training / validation labels hidden from every trial ----
    data = observed_only(trainer.load_data(args))
    errors = pipelines.ReaderErrors()
    loader = trainer.make_loader(data, args.image_size, errors)
    with errors.surface():
        first = batches.make_dataset(list(data["train"]["sources"][:256]), loader, 32)
        statistics = pipelines.band_statistics(first, floor=1e-6)

    # ---- study: resumable, seeded TPE ----
    study = make_study(args, run_dir, space)

    def objective(trial):
        params = {}
        for name, (low, high, log) in space.items():
            params[name] = trial.suggest_float(name, low, high, log=log)
        trial_dir = run_dir / "trials" / f"trial_{trial.number:03d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        value = run_trial(trial_arguments(args, params), data, statistics, trial_dir)
        print(f"trial {trial.number}: objective {value:.4f} | {params}", flush=True)
        return value

    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(finished) < args.n_trials:
        study.optimize(objective, n_trials=args.n_trials - len(finished), catch=())
    write_outputs(run_dir, study, space)

    # ---- the chosen configuration, trained and tested on full labels ----
    best_config = write_best_config(args, run_dir, study.best_params)
    final_argv = ["-c", str(best_config), "--results_dir", str(run_dir), "--run_name", "best"]
    if (run_dir / trainer.SCRIPT_STEM / "best" / "metrics.json").exists():
        final_argv.append("--resume")  # already trained: evaluated again, never overwritten
    final_args = trainer.get_args_parser().parse_args(final_argv)
    test = trainer.main(final_args)
    summary = {
        "best_trial": study.best_trial.number,
        "objective": study.best_value,
        "best_params": study.best_params,
        "objective_estimator": "observed-label val mAP (unobserved = negative)",
        "test": test,
    }
    atomic.write_json(run_dir / "summary.json", summary)
    values = ", ".join(f"{key} {value:.4g}" for key, value in study.best_params.items())
    line = f"best trial {study.best_trial.number} | objective (observed-label val mAP) {study.best_value:.4f}"
    print(line + f" | test mAP {test['mAP']:.4f} (full labels) | {values}")
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
