"""AdaGC and the single-positive multi-label (SPML) baselines: AID-multilabel and BigEarthNet v2 scenes.

Paper: C. Liu, G. Perantoni, L. Bruzzone, X. X. Zhu, "Adaptive Gradient Calibration for Single-Positive
Multi-Label Learning in Remote Sensing Image Scene Classification", arXiv 2510.08269. Each training image
keeps one observed positive. AdaGC's steps as the paper describes them: (1) assume-negative warm-up;
(2) two EMA teachers whose mean is the pseudo label; (3) the end of early learning detected from the
teacher's agreement with the observed labels, and a rollback to it; (4) Gradient Calibration (pseudo
labels as the unobserved targets); (5) mixup. Baselines and readers are in common/ (spml,
aid_multilabel, bigearthnet); the run ends with the paper's test metrics (mAP, micro AP, F1, per class).

    python train_multilabel_model.py --config configs/adagc_aid_random.yaml [--test_only]
    python train_multilabel_model.py --demo [--method an]     # about a minute on a laptop CPU

A paper run (ResNet-50, 224 px, 30 epochs) wants a GPU (`--strategy mirrored`). The demo's trigger fires at
epoch 6 (checked at 8, rolled back); it ends with (one CPU run; outputs and reconstructed choices: README):
    test mAP 0.6952 | micro AP 0.5849 | macro F1 0.2870 | micro F1 0.4695 | method adagc | trigger epoch 6
    | epoch 10 (gc) | last epoch mAP 0.6952        (on one line; --method an: test mAP 0.7467)
"""

import functools
import math
import time
import warnings
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import keras
import numpy as np
import tensorflow as tf

from common import (
    aid_multilabel,
    atomic,
    bigearthnet,
    checkpoints,
    cli,
    pipelines,
    plots,
    runs,
    spml,
    spml_evaluation,
)
from common.errors import cli_entry, require

SCRIPT_STEM = "train_multilabel_model"
METHODS = (*spml.BASELINES, "adagc")
# Flags that may change when a run is resumed: where it lives, how far it goes, how it is distributed.
RESUMABLE_CHANGES = ("config", "demo", "epochs", "overwrite", "resume", "results_dir", "run_name", "strategy")
SPML_MODES, FULL_OBS, GC_MODES = ("random", "dominant", "manual"), ("full", "observed"), ("target", "scale")
BACKBONES = ("resnet50", "small_cnn", "mlp")
SUMMARY_KEYS = ("best_epoch", "best_phase", "best_val_mAP", "trigger_epoch", "trigger_detected_at")
SUMMARY_KEYS += ("trigger_how",)
LOG_COLUMNS = ("epoch", "phase", "train_loss", "agreement", "val_mAP", "teacher_a_decay", "teacher_b_decay")
LOG_COLUMNS += ("seconds",)  # the decays: AdaGC only


# Defaults are the paper's values (README explains the reconstructed ones). Rows: flag, default, help, choices
FLAGS = {
    "data": (
        ("--dataset", "aid", "Dataset layout to read.", ("aid", "benv2")),
        ("--data_dir", "data/AID_multilabel", "Dataset folder (README, Data; --demo: the generated one)."),
        (
            "--single_positive",
            "random",
            "Observed positive: random, dominant (by area) or manual.",
            SPML_MODES,
        ),
        ("--lmdb_path", "", "BigEarthNet v2 LMDB (empty: <data_dir>/lmdb)."),
        ("--metadata", "", "BigEarthNet v2 metadata.parquet (empty: <data_dir>/metadata.parquet)."),
        ("--class_fractions", "", "Area fractions for dominant (empty: <data_dir>/class_fractions.csv)."),
        ("--bands", "B04,B03,B02,B08", "Sentinel-2 bands read from the LMDB; 20/60 m bands are resampled."),
        ("--drop_snow_cloud", True, "Drop BigEarthNet patches flagged with seasonal snow or cloud/shadow."),
        ("--val_fraction", 0.1, "AID: seeded share of images_tr that selects the best epoch."),
        (
            "--selection_labels",
            "full",
            "Validation labels of the best epoch (full: SPML protocol).",
            FULL_OBS,
        ),
    ),
    "model and optimisation": (
        (
            "--backbone",
            "resnet50",
            "resnet50 (the paper's), small_cnn (CPU demos), mlp (vectors).",
            BACKBONES,
        ),
        ("--weights", "", "Local Keras weights file for the backbone (empty: random initialisation)."),
        ("--image_size", 0, "Input size; 0 = the dataset's paper size: 224 AID, 120 BigEarthNet."),
        ("--augment", True, "Random flips and 90-degree rotations."),
        ("--optimizer", "adam", "Optimizer.", ("adam", "adamw")),
        ("--learning_rate", 1e-4, "Learning rate."),
        ("--weight_decay", 1e-4, "Weight decay (adamw only)."),
        ("--batch_size", 64, "Global batch size."),
        ("--epochs", 30, "Training epochs."),
    ),
    "method": (
        ("--method", "adagc", "Loss / training scheme.", METHODS),
        ("--label_smoothing", 0.1, "AN-LS smoothing (Cole et al.)."),
        (
            "--expected_num_positives",
            0.0,
            "EPR / ROLE prior: the data's mean positives per image (required).",
        ),
        ("--role_lr_multiplier", 10.0, "ROLE: learning-rate multiplier of the label estimator."),
        ("--em_alpha", 0.1, "EM: weight of the entropy term."),
        ("--apl_beta", 0.4, "EM+APL: weight of the pseudo-label term."),
        ("--neg_proportion", 0.9, "EM+APL: share of each class's unobserved labels made soft negatives."),
        ("--warmup_epoch", 5, "EM+APL: first epoch after which soft negatives are assigned."),
        (
            "--delta_rel",
            0.2,
            "LL-R/Ct/Cp: percent of unobserved labels added to the rejection set per epoch.",
        ),
    ),
    "AdaGC (reconstructed)": (
        ("--teacher_a_decay", 0.999, "Step 2: EMA decay of teacher A, updated every iteration."),
        ("--teacher_b_decay", 0.99, "Step 2: EMA decay of teacher B, updated every epoch."),
        (
            "--teacher_ramp",
            "mean_teacher",
            "Step 2: decay min(decay, (1+t)/(10+t)) (mean_teacher) or the decay as set (constant).",
            ("mean_teacher", "constant"),
        ),
        ("--trigger_ratio", 0.9, "Step 3: trigger once the fitted slope fell by this share of its peak."),
        ("--trigger_min_epochs", 3, "Step 3: epochs of agreement needed before the curve is fitted."),
        ("--trigger_patience", 2, "Step 3: later epochs that must confirm a detected end of early learning."),
        ("--rollback_window", 3, "Step 3: per-epoch warm-up checkpoints kept for the rollback."),
        ("--gc_start_epoch", 0, "Start Gradient Calibration after this epoch (0 = adaptive trigger)."),
        ("--gc_mode", "target", "Step 4: pseudo label as target, or AN gradient x (1 - pseudo).", GC_MODES),
        ("--mixup_alpha", 0.2, "Step 5: Beta(alpha, alpha) mixup during Gradient Calibration (0 = off)."),
    ),
}


def get_args_parser():
    parser = cli.Parser(description="AdaGC and the SPML baselines.", config_flag=True)
    cli.add_demo_argument(parser, "(an AID-like set; about a minute on a CPU).")
    parser.add_argument("--test_only", action="store_true", help="Re-evaluate the run's best model.")
    for title, rows in FLAGS.items():
        group = parser.add_argument_group(title)
        for flag, default, text, *choices in rows:
            kind = cli.str2bool if isinstance(default, bool) else type(default)
            choices = choices[0] if choices else None
            group.add_argument(flag, type=kind, default=default, choices=choices, help=text)
    cli.add_strategy_argument(parser)
    parser.add_argument("--demo_images", type=int, default=480, help="Images generated by --demo.")
    cli.add_run_arguments(parser)
    parser.demo_defaults(backbone="small_cnn", image_size=48, epochs=10, batch_size=16, learning_rate=3e-3)
    parser.demo_defaults(teacher_a_decay=0.99, rollback_window=2, expected_num_positives=3.75)
    return parser


# ---- AdaGC: the paper's pieces ----


def ranking_agreement(probabilities, observed):
    """Step 3's signal: chance-corrected agreement with the observed labels over (positive, unobserved) pairs.

    For every observed positive p and unobserved label u of the same image the pair scores +1 when the model
    ranks p above u, -1 below and 0 on a tie (2 AUC - 1): 0 for an untrained model, rising while the model
    learns the classes, and creeping to 1 only as it memorises which true label happened to be observed.
    Returns (sum of pair scores, number of pairs).
    """
    positive = tf.cast(observed > 0, tf.float32)
    unobserved = tf.cast(tf.equal(observed, 0), tf.float32)
    weight = positive[:, :, None] * unobserved[:, None, :]
    order = tf.sign(probabilities[:, :, None] - probabilities[:, None, :])
    return tf.reduce_sum(weight * order), tf.reduce_sum(weight)


def saturating_curve(x, a, b, c):
    """Step 3: the agreement curve f(x) = a (1 - exp(-b x^c)) (AIO2-style early-learning model)."""
    return a * (1.0 - np.exp(-b * np.power(x, c)))


def saturating_slope(x, a, b, c):
    """f'(x) of `saturating_curve`."""
    return a * b * c * np.power(x, c - 1.0) * np.exp(-b * np.power(x, c))


def _first_flattened(slopes, ratio, offset, limit, positive_peak=False):
    peak = np.maximum.accumulate(np.maximum(slopes, 0.0) if positive_peak else slopes)
    flat = (peak - slopes) / np.maximum(peak, 1e-12) > ratio
    flattened = np.nonzero(((peak > 0) & flat) if positive_peak else flat)[0] + offset
    flattened = flattened[flattened <= limit]
    return int(flattened[0]) if flattened.size else None


def detect_early_learning_end(agreement, ratio=0.9, min_epochs=3, patience=2):
    """Step 3 (reconstructed after AIO2 / ADELE): (epoch, how, params) where the agreement flattened, or None.

    The per-epoch agreement y_1..y_T is fitted with f(x) = a (1 - exp(-b x^c)); early learning is over at
    the first epoch t whose slope f'(t) has fallen by `ratio` from the largest slope up to t. When the fit
    fails or does not describe the curve, the same test runs on the observed per-epoch gains. A detected
    epoch counts only once `patience` further epochs have been observed after it.
    """
    from scipy.optimize import curve_fit

    values = np.asarray(agreement, dtype=np.float64)
    if values.size < max(min_epochs, 3) or not np.all(np.isfinite(values)):
        return None, "waiting", None
    epochs = np.arange(1, values.size + 1, dtype=np.float64)
    limit = values.size - patience
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start, bounds = (max(values.max(), 1e-3), 0.5, 1.0), ([0.0, 1e-6, 0.1], [1.0, 50.0, 5.0])
            params, _ = curve_fit(saturating_curve, epochs, values, p0=start, bounds=bounds, maxfev=20000)
        residual = float(np.sqrt(np.mean((saturating_curve(epochs, *params) - values) ** 2)))
        if not np.all(np.isfinite(params)) or residual > 0.05:
            raise RuntimeError("poor fit")
        detected = _first_flattened(saturating_slope(epochs, *params), ratio, 1, limit)
        return detected, "curve_fit", [float(p) for p in params]
    except (RuntimeError, ValueError):
        return _first_flattened(np.diff(values), ratio, 2, limit, positive_peak=True), "slope", None


def loss_gradient_calibration(logits, observed, pseudo_labels, mode="target"):
    """Step 4, Gradient Calibration: observed positives keep target 1, unobserved ones the pseudo label.

    BCE against it gives dL/dz = sigmoid(z) - y_pseudo on unobserved logits instead of AN's sigmoid(z);
    mode 'scale' multiplies the AN gradient of unobserved logits by (1 - y_pseudo) instead.
    """
    if mode == "target":
        targets = tf.where(observed > 0, tf.ones_like(pseudo_labels), pseudo_labels)
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
    positive = tf.cast(observed > 0, logits.dtype)
    negative = (1 - positive) * (1 - pseudo_labels) * spml.neg_log_one_minus_sigmoid(logits)
    return positive * spml.neg_log_sigmoid(logits) + negative


def mixup_gradient_calibration(student, images, observed, pseudo_labels, args, seed):
    """Steps 4-5: the calibrated loss with one Beta(alpha, alpha) mixup draw per batch (stateless `seed`)."""
    calibrated = functools.partial(loss_gradient_calibration, mode=args.gc_mode)
    if args.mixup_alpha <= 0:
        return calibrated(student(images, training=True), observed, pseudo_labels)
    gamma_a = tf.random.stateless_gamma((), seed, alpha=args.mixup_alpha)
    gamma_b = tf.random.stateless_gamma((), seed + 1, alpha=args.mixup_alpha)
    lam = gamma_a / (gamma_a + gamma_b + 1e-12)
    permutation = tf.argsort(tf.random.stateless_uniform((tf.shape(images)[0],), seed + 2))
    logits = student(lam * images + (1 - lam) * tf.gather(images, permutation), training=True)
    # BCE is linear in its target, so this is the loss against the mixed targets (unpermuted term first).
    return lam * calibrated(logits, observed, pseudo_labels) + (1 - lam) * calibrated(
        logits, tf.gather(observed, permutation), tf.gather(pseudo_labels, permutation)
    )


class MeanTeachers:
    """Step 2: dual EMA teachers of the student; their mean sigmoid is the pseudo label. With `ramp`
    'mean_teacher' both follow min(decay, (1 + t) / (10 + t)) (Tarvainen & Valpola), t counting iterations
    for A and epochs for B, so that short runs still get a useful teacher; 'constant' uses the decays as set.
    """

    def __init__(self, build_model, student, decay_a, decay_b, ramp="mean_teacher"):
        self.student, self.decay_a, self.decay_b, self.ramp = student, decay_a, decay_b, ramp
        self.models = {"teacher_a": build_model(), "teacher_b": build_model()}
        for teacher in self.models.values():
            teacher.set_weights(student.get_weights())

    def probabilities_a(self, images):
        return tf.sigmoid(self.models["teacher_a"](images, training=False))

    def pseudo_labels(self, images, probabilities_a):
        """The mean of both teachers' sigmoid outputs, never differentiated."""
        probabilities_b = tf.sigmoid(self.models["teacher_b"](images, training=False))
        return tf.stop_gradient(0.5 * (probabilities_a + probabilities_b))

    def _follow(self, teacher, decay):
        for teacher_weight, student_weight in zip(teacher.weights, self.student.weights, strict=True):
            teacher_weight.assign(decay * teacher_weight + (1.0 - decay) * student_weight)

    def decay(self, decay, t):
        """The decay applied at iteration (A) or epoch (B) t; also what log.csv reports per epoch."""
        return decay if self.ramp == "constant" else min(decay, (1.0 + t) / (10.0 + t))

    def update_a(self, step):  # after every iteration, inside the compiled step
        step = tf.cast(step, tf.float32)
        ramped = tf.minimum(self.decay_a, (1.0 + step) / (10.0 + step))
        self._follow(self.models["teacher_a"], self.decay_a if self.ramp == "constant" else ramped)

    def update_b(self, epoch):  # after every epoch
        self._follow(self.models["teacher_b"], self.decay(self.decay_b, epoch))


def make_loader(data, image_size, reader_errors):
    """Sources -> float32 images: per image (AID JPEGs) or per batch (the LMDB reader, marked `.batched`)."""
    if data["reader"] == "aid":
        return lambda source: aid_multilabel.decode_image(source, image_size)
    return bigearthnet.batch_reader(data["lmdb_path"], data["bands"], image_size, reader_errors.wrap)


class AdaGCTrainer(spml.SpmlTrainer):
    """AdaGC: AN warm-up (step 1), then Gradient Calibration with mixup (4-5); reports step 3's signal."""

    def __init__(self, settings, strategy, build_model, make_optimizer, train_observed, train_full):
        super().__init__(settings, strategy, build_model, make_optimizer, train_observed, train_full)
        with strategy.scope():
            decays = settings.teacher_a_decay, settings.teacher_b_decay, settings.teacher_ramp
            self.teachers = MeanTeachers(build_model, self.student, *decays)

    def checkpoint_groups(self):
        return [*super().checkpoint_groups(), *((n, t.variables) for n, t in self.teachers.models.items())]

    def batch_loss(self, images, indices, observed, phase, extra):
        teacher_a = self.teachers.probabilities_a(images)
        extra["agreed"], extra["agreement_pairs"] = ranking_agreement(teacher_a, observed)
        if phase == "warmup":
            logits = self.student(images, training=True)
            return self.baseline.loss(logits, observed, indices, "an")[:2]
        pseudo_labels = self.teachers.pseudo_labels(images, teacher_a)
        seed = tf.stack([tf.cast(self.settings.seed, tf.int64), self.step_counter])
        student, settings = self.student, self.settings
        return mixup_gradient_calibration(student, images, observed, pseudo_labels, settings, seed), 0.0

    def after_step(self):
        self.teachers.update_a(self.step_counter)

    def end_epoch(self, epoch):
        self.teachers.update_b(epoch)
        super().end_epoch(epoch)

    def effective_decays(self, epoch):
        """(teacher A's decay at the epoch's last iteration, teacher B's at its end), as applied."""
        teachers = self.teachers
        last_step = int(self.step_counter.numpy()) - 1
        return teachers.decay(teachers.decay_a, last_step), teachers.decay(teachers.decay_b, epoch)


def make_trainer(args, build_model, train, prediction_dataset=None):
    """The one place where AdaGC and the baselines part: AdaGC adds its teachers and its two phases.

    `prediction_dataset`: the training images in row order, unaugmented (EM+APL's eval-mode pass).
    """
    trainer_class = AdaGCTrainer if args.method == "adagc" else spml.SpmlTrainer
    strategy = runs.make_strategy(args.strategy)
    optimizer = functools.partial(spml.make_optimizer, args)
    trainer = trainer_class(args, strategy, build_model, optimizer, train["observed"], train["full"])
    trainer.prediction_dataset = prediction_dataset
    return trainer


def early_learning_trigger(args, agreement, epoch):
    """Step 3 with a fixed --gc_start_epoch or the adaptive detection: (epoch or None, how, fit params)."""
    if args.gc_start_epoch > 0:
        return (epoch if epoch >= args.gc_start_epoch else None), "fixed", None
    settings = args.trigger_ratio, args.trigger_min_epochs, args.trigger_patience
    return detect_early_learning_end(agreement, *settings)


def roll_back(trainer, checkpoint_dir, detected, epoch):
    """Step 3: restore the detected epoch's state (the oldest kept checkpoint if it is further back)."""
    saved = (checkpoints.read_state(checkpoint_dir) or {}).get("checkpoints", [])
    target = max(min(detected, epoch), min([int(name.split("_")[1]) for name in saved] + [epoch]))
    if target < epoch:
        name = f"epoch_{target:03d}"
        trainer.restore(checkpoints.load_arrays(checkpoint_dir, name), checkpoint_dir / f"{name}.npz")
    return target


def new_state(args):
    """The training record that checkpoints carry (state.json) and metrics.json summarises."""
    state = {"epoch": 0, "phase": "warmup" if args.method == "adagc" else "train", "trigger_epoch": None}
    state.update(trigger_detected_at=None, trigger_how=None, fit_params=None, best_epoch=None)
    return {**state, "best_val_mAP": -1.0, "best_phase": None, "log": [], "agreement": []}


def train_one_epoch(args, trainer, data, train_batches, val_dataset, state, epoch):
    """One epoch of the state's phase and its validation mAP; returns the log row (also printed)."""
    started = time.perf_counter()
    phase = "gc" if state["phase"] == "gc" else "warmup"
    train_loss, agreement = trainer.train_epoch(train_batches.for_epoch(epoch), phase, epoch)
    trainer.end_epoch(epoch)
    val_map, val, decays = float("nan"), data["val"], ""
    if val_dataset is not None:
        labels = val["full"] if args.selection_labels == "full" else val["observed"]
        val_map = spml.evaluate(trainer.student, val_dataset, labels, data["class_names"])["mAP"]
    row = dict(zip(LOG_COLUMNS[:5], (epoch, state["phase"], train_loss, agreement, val_map), strict=True))
    if args.method == "adagc":
        row["teacher_a_decay"], row["teacher_b_decay"] = trainer.effective_decays(epoch)
        decays = f"decays A {row['teacher_a_decay']:.4f} B {row['teacher_b_decay']:.4f} "
    row["seconds"] = round(time.perf_counter() - started, 2)
    line = f"epoch {epoch:3d} [{state['phase']}] loss {train_loss:.4f} agreement {agreement:.4f} {decays}"
    print(line + f"val mAP {val_map:.4f} ({row['seconds']:.1f} s)", flush=True)
    return row


def fit(args, trainer, data, run_dir, train_batches, val_dataset):
    """The epoch loop of every method; AdaGC: warm-up, trigger and rollback, then Gradient Calibration.

    Writes log.csv, best_model.keras and checkpoints/ (state.json names the newest) every epoch.
    """
    checkpoint_dir, state = run_dir / "checkpoints", new_state(args)
    loaded = checkpoints.load(checkpoint_dir) if args.resume else None
    if loaded:
        state, arrays = loaded
        trainer.restore(arrays, checkpoint_dir / f"{state['checkpoint']}.npz")
        print(f"resumed from epoch {state['epoch']} ({state['phase']})")
    epoch = state["epoch"]
    while epoch < args.epochs:
        epoch += 1
        row = train_one_epoch(args, trainer, data, train_batches, val_dataset, state, epoch)
        state["log"].append(row)
        if spml.improves(row, state["best_val_mAP"]):
            best_val = row["val_mAP"] if np.isfinite(row["val_mAP"]) else -1.0
            state.update(best_val_mAP=best_val, best_epoch=epoch, best_phase=state["phase"])
            atomic.save_keras(trainer.student, run_dir / "best_model.keras")
            if state["phase"] == "warmup":  # a rollback may return to it after a later warm-up best
                atomic.save_keras(trainer.student, checkpoint_dir / f"best_{epoch:03d}.keras")
        if state["phase"] == "warmup":
            state["agreement"].append(row["agreement"])
            detected, how, params = early_learning_trigger(args, state["agreement"], epoch)
            if detected is not None:
                target = roll_back(trainer, checkpoint_dir, detected, epoch)
                message = f"early learning ended at epoch {detected} (fit: {how}, checked at epoch {epoch}); "
                print(message + f"Gradient Calibration starts after epoch {target}", flush=True)
                state.update(phase="gc", trigger_epoch=target, trigger_detected_at=epoch, trigger_how=how)
                state["fit_params"], epoch = params, target
                spml.select_on_kept_trajectory(state, run_dir, target)
        state["epoch"] = epoch
        # The warm-up keeps its last rollback_window + 1 epochs for the trigger's rollback.
        keep = args.rollback_window + 1 if state["phase"] == "warmup" else 1
        checkpoints.save(checkpoint_dir, f"epoch_{epoch:03d}", trainer.state_arrays(), state, keep=keep)
        spml.keep_warmup_bests(checkpoint_dir, state)
        atomic.write_csv(run_dir / "log.csv", state["log"], [c for c in LOG_COLUMNS if c in state["log"][0]])
    return state


def save_dynamics_plot(path, state):
    """Agreement curve (with fit and trigger) and the loss / val mAP of the epochs that were kept."""
    agreement, trigger, fit_params = state["agreement"], state["trigger_epoch"], state["fit_params"]
    # After a rollback the warm-up epochs past the trigger were replaced by Gradient Calibration epochs.
    kept = spml.kept_log(state)
    epochs = [row["epoch"] for row in kept]
    figure, (left, right) = plots.pyplot().subplots(1, 2, figsize=(10, 3.6))
    if agreement:
        left.plot(range(1, len(agreement) + 1), agreement, "o-", label="teacher agreement (warm-up)")
    else:
        left.plot(epochs, [row["agreement"] for row in kept], "o-", label="agreement")
    if fit_params:
        grid = np.linspace(1, max(len(agreement), 1), 200)
        left.plot(grid, saturating_curve(grid, *fit_params), "--", label="fit a(1-exp(-b x^c))")
    for axis in (left, right) if trigger else ():
        axis.axvline(trigger, color="red", linestyle=":", label=f"trigger (epoch {trigger})")
    left.set(xlabel="epoch", ylabel="agreement with observed positives")
    right.plot(epochs, [row["train_loss"] for row in kept], "o-", label="train loss")
    right.plot(epochs, [row["val_mAP"] for row in kept], "s-", label="val mAP")
    right.set(xlabel="epoch")
    for axis in (left, right):
        axis.legend(fontsize=8)
    figure.tight_layout()
    plots.save(figure, path)


# ---- the run ----


def resolve_derived(args, demo_owner: str = SCRIPT_STEM):
    """Values derived after parsing: the demo's data folder (that of the script `demo_owner`, so that
    demos generating different data do not share one), the dataset's image size, the run name."""
    if args.demo and "data_dir" not in cli.typed_flags(args):
        args.data_dir = str(cli.demo_data_dir(args, demo_owner) / args.dataset)
    args.image_size = args.image_size or (224 if args.dataset == "aid" else 120)
    needed = args.method not in ("epr", "role") or args.expected_num_positives > 0
    require(needed, "--expected_num_positives", "not set", "the mean positives per image (EPR and ROLE)")
    positive = args.epochs >= 1 and args.batch_size >= 1
    require(positive, "--epochs/--batch_size", "must be positive", "integers >= 1")
    require(0 <= args.val_fraction < 1, "--val_fraction", f"{args.val_fraction}", "a share in [0, 1)")
    apl_ok = args.method != "em_apl" or 0 <= args.warmup_epoch < args.epochs
    require(apl_ok, "--warmup_epoch", f"{args.warmup_epoch} with --epochs {args.epochs}", "0 <= it < epochs")
    if not args.run_name:
        demo_name = f"demo_{args.method}" + ("" if args.dataset == "aid" else f"_{args.dataset}")
        default_name = demo_name if args.demo else f"{args.method}_{args.dataset}_{args.single_positive}"
        args.run_name = Path(args.config).stem if args.config else default_name
    return args


def load_data(args):
    """The dataset's three splits (the demo writes its generated copy first)."""
    reader = aid_multilabel if args.dataset == "aid" else bigearthnet
    if args.demo:
        reader.write_demo(args.data_dir, args.demo_images, seed=12345)
    if args.dataset == "aid":
        return aid_multilabel.load(args.data_dir, args.single_positive, args.seed, args.val_fraction)
    keys = ("single_positive", "seed", "image_size", "bands", "lmdb_path", "metadata", "class_fractions")
    return bigearthnet.load(args.data_dir, **{key: getattr(args, key) for key in (*keys, "drop_snow_cloud")})


def record_run(args, run_dir, data, band_mean, band_variance):
    """config.json; a resumed run must have the settings of the run it continues."""
    if args.resume:
        settings = {key: value for key, value in vars(args).items() if key not in RESUMABLE_CHANGES}
        config = run_dir / "config.json"
        runs.check_same_settings(config, settings, args.overwrite, "checkpoints", section="args")
    sizes = {f"num_{part}": len(data[part]["sources"]) for part in ("train", "val", "test")}
    statistics = {"band_mean": band_mean, "band_variance": band_variance}
    runs.write_config(run_dir, args, class_order=list(data["class_names"]), **statistics, **sizes)


@cli_entry
def main(args):
    # MultiWorkerMirroredStrategy must exist before the first TensorFlow op; only its chief keeps files.
    strategy = runs.make_strategy(args.strategy)
    args.results_dir = runs.chief_results_dir(strategy, args.results_dir)
    args = resolve_derived(args)
    runs.seed_everything(args.seed, args.deterministic)
    runs.print_args(args)
    if args.test_only:
        return test_only(args, Path(args.results_dir) / SCRIPT_STEM / args.run_name)

    # ---- data ----
    data, reader_errors = load_data(args), pipelines.ReaderErrors()
    loader = make_loader(data, args.image_size, reader_errors)
    train, val, test = data["train"], data["val"], data["test"]
    print(
        f"classes {len(data['class_names'])} | train {len(train['sources'])} | val {len(val['sources'])} "
        f"| test {len(test['sources'])} | steps/epoch {math.ceil(len(train['sources']) / args.batch_size)}"
    )
    run_dir = runs.prepare_run_dir(args.results_dir, SCRIPT_STEM, args.run_name, args.overwrite, args.resume)
    with reader_errors.surface():
        # A seeded random sample of up to 256 training images gives the bands' statistics.
        sample = pipelines.sample_indices(len(train["sources"]), 256, args.seed)
        statistics_batches = spml.make_dataset([train["sources"][i] for i in sample], loader, 32)
        band_mean, band_variance = pipelines.band_statistics(statistics_batches, floor=1e-6)
    record_run(args, run_dir, data, band_mean, band_variance)
    print("weights: " + (args.weights or "none (random initialisation)"))

    # ---- model: the student (and AdaGC's two EMA teachers) ----
    shape, num_classes = (args.image_size, args.image_size, len(band_mean)), len(data["class_names"])
    build = functools.partial(
        spml.build_classifier, args.backbone, shape, num_classes, band_mean, band_variance
    )
    in_order = (
        spml.make_dataset(train["sources"], loader, args.batch_size) if args.method == "em_apl" else None
    )
    trainer = make_trainer(args, functools.partial(build, args.weights), train, in_order)
    batches = spml.TrainBatches(train["sources"], loader, args.batch_size, args.seed, args.augment)
    val_dataset = spml.make_dataset(val["sources"], loader, args.batch_size) if len(val["sources"]) else None
    if val_dataset is None:
        print("no validation images: the last epoch is the reported model")
    test_dataset = spml.make_dataset(test["sources"], loader, args.batch_size)

    # ---- train: warm-up -> end of early learning -> rollback -> Gradient Calibration (AdaGC) ----
    with reader_errors.surface():
        state = fit(args, trainer, data, run_dir, batches, val_dataset)

    # ---- evaluate: the best validation epoch of the kept trajectory on the full-label test set ----
    with reader_errors.surface():
        best_model = keras.models.load_model(run_dir / "best_model.keras")
        metrics = spml_evaluation.evaluate_and_write(run_dir, best_model, test_dataset, data)
        last = spml.evaluate(trainer.student, test_dataset, data["test"]["full"], data["class_names"])
    metrics.update({key: state.get(key) for key in SUMMARY_KEYS})
    last = {key: last[key] for key in ("mAP", "micro_AP", "macro_F1", "micro_F1")}
    metrics["last_epoch"] = {"epoch": state["epoch"], "phase": state["phase"], **last}
    metrics.update(method=args.method, dataset=args.dataset, single_positive=args.single_positive)
    metrics["epochs"] = args.epochs
    save_dynamics_plot(run_dir / "training_dynamics.png", state)
    atomic.write_json(run_dir / "metrics.json", metrics)
    print(spml_evaluation.summary_line(metrics))
    return metrics


def test_only(args, run_dir):
    """--test_only: the shared re-evaluation that test_multilabel_model.py runs (common.spml_evaluation)."""
    return spml_evaluation.evaluate_run(args, run_dir, load_data, make_loader)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
