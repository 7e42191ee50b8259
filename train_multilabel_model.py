"""AdaGC and the single-positive multi-label (SPML) baselines: AID-multilabel and BigEarthNet v2 scenes.

Paper: C. Liu, G. Perantoni, L. Bruzzone, X. X. Zhu, "Adaptive Gradient Calibration for Single-Positive
Multi-Label Learning in Remote Sensing Image Scene Classification", arXiv 2510.08269. Each training image
keeps one observed positive label (single positive, SPML); every other label is unobserved. The run ends
with the paper's test metrics on the full test labels: mAP, micro AP, macro / micro F1 at 0.5 and
per-class AP and F1.

This file holds every method, read top to bottom:
  - the baselines AdaGC is compared with: the full-label upper bound, AN, AN-LS, WAN, EPR, ROLE (Cole et
    al., CVPR 2021), EM, EM+APL (Zhou et al., ECCV 2022), LL-R, LL-Ct, LL-Cp (Kim et al., CVPR 2022): their
    losses and the label state some of them update (LL-Cp's flips, EM+APL's soft negatives, ROLE's label
    estimator);
  - AdaGC's steps as the paper describes them: (1) assume-negative warm-up; (2) two EMA teachers whose
    mean is the pseudo label; (3) the end of early learning detected from the teacher's agreement with
    the observed labels, and a rollback to it; (4) Gradient Calibration (pseudo labels as the unobserved
    targets); (5) mixup. Choices the paper does not pin down are marked "reconstructed"; each is a flag
    (docs/adagc.md lists them next to the differences from the reference code);
  - the classifier (ResNet-50 + Dense logits), the compiled training step every method shares, the epoch
    loop with AdaGC's trigger and rollback, and the selection of the reported model on the kept trajectory.
The dataset readers, the (images, row index) batches and the metrics are in common/spml/.

    python train_multilabel_model.py -c configs/adagc_aid_random.yaml
    python train_multilabel_model.py -c configs/an_benv2_dominant.yaml --batch_size 128
    python train_multilabel_model.py -c configs/adagc_aid_random.yaml --test_only
    python train_multilabel_model.py --demo                  # AdaGC on a generated AID-like set
    python train_multilabel_model.py --demo --method an      # any method, no config needed

Runtime: `--demo` (small CNN, 48 px, 480 generated images, 10 epochs) about 30 s on an idle 2-core CPU
(137 s at load average 10); a paper run (ResNet-50, 224 px, 30 epochs, batch 64) wants a GPU
(`--strategy mirrored` for all local GPUs, `--strategy multiworker` for several machines). The demo's
trigger fires at epoch 5 (checked at epoch 7, rolled back) and it ends with (one CPU run; the figures
depend on the CPU):
    test mAP 0.6869 | micro AP 0.5505 | macro F1 0.2305 | micro F1 0.4126 | method adagc | trigger epoch 5
    | epoch 10 (gc) | last epoch mAP 0.6869        (on one line; --method an: test mAP 0.7444)

    python train_multilabel_model.py --dataset features --features X.npz --backbone linear --method an

Outputs in results/train_multilabel_model/<config name>/ (demo_<method> for the demo): config.json,
log.csv, best_model.keras, metrics.json, per_class.csv, training_dynamics.png and checkpoints/ (per-epoch
state for --resume and the trigger's rollback).
"""

import functools
import math
import time
import warnings
from pathlib import Path

from common import cli
from common.spml import flags

# The trainer's flags, shared with test_multilabel_model.py and meta_parameters_tuning.py.
METHODS = flags.METHODS
FLAGS = flags.FLAGS
get_args_parser = flags.get_args_parser

# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from common import (
    atomic,
    checkpoints,
    fused_bn,
    optimizers,
    pipelines,
    plots,
    precision,
    progress,
    runs,
    tensorboard,
)
from common.errors import InputError, cli_entry, require, require_file, require_in_range
from common.spml import aid_multilabel, batches, bigearthnet, evaluation, features

SCRIPT_STEM = "train_multilabel_model"
# The settings a resumed run must share with the run it continues: every flag except where the run lives,
# how far it goes (--epochs) and how it is distributed (tests/test_train_multilabel_model.py checks that a
# new flag is listed here or among those). --test_only is always false here: it returns before training.
RESUME_SETTINGS = (
    "dataset",
    "features",
    "data_dir",
    "single_positive",
    "lmdb_path",
    "metadata",
    "class_fractions",
    "bands",
    "drop_snow_cloud",
    "val_fraction",
    "selection_labels",
    "backbone",
    "weights",
    "image_size",
    "augment",
    "optimizer",
    "optimizer_convention",
    "mixed_precision",
    "adam_epsilon",
    "learning_rate",
    "weight_decay",
    "batch_size",
    "method",
    "label_smoothing",
    "expected_num_positives",
    "role_lr_multiplier",
    "em_alpha",
    "apl_beta",
    "neg_proportion",
    "warmup_epoch",
    "delta_rel",
    "teacher_a_decay",
    "teacher_b_decay",
    "teacher_init",
    "teacher_ramp",
    "gc_target",
    "trigger",
    "trigger_ratio",
    "trigger_min_epochs",
    "trigger_patience",
    "trigger_dip",
    "rollback_window",
    "gc_start_epoch",
    "gc_mode",
    "mixup_alpha",
    "demo_images",
    "seed",
    "deterministic",
    "test_only",
)
# The training record's entries that metrics.json repeats.
SUMMARY_KEYS = (
    "best_epoch",
    "best_phase",
    "best_val_mAP",
    "trigger_epoch",
    "trigger_detected_at",
    "trigger_how",
)
# log.csv's columns; the teacher decays are AdaGC's only.
LOG_COLUMNS = (
    "epoch",
    "phase",
    "train_loss",
    "agreement",
    "val_mAP",
    "teacher_a_decay",
    "teacher_b_decay",
    "pseudo_precision",
    "pseudo_recall",
    "seconds",
)
# The last epoch's test metrics that metrics.json keeps next to the reported model's.
LAST_EPOCH_KEYS = ("mAP", "micro_AP", "macro_F1", "micro_F1")


# Upper bounds far above any sensible setting (the paper: 30 epochs, batch 64, 224 px): a typing slip is
# refused instead of training for ever or filling the memory.
MAX_EPOCHS, MAX_BATCH, MAX_IMAGE_SIZE, MAX_DEMO_IMAGES = 10_000, 1 << 20, 8192, 1_000_000


# ---- the baselines' losses ----
# Every loss takes logits and an `observed` matrix (1 observed positive, 0 unobserved; EM+APL stores a soft
# pseudo label s as -s) and returns `(loss_matrix (B, C), batch_regulariser)`. The training loss is the
# mean of the loss matrix over the B x C entries plus the regulariser, as in Cole et al.'s
# `compute_batch_loss`. All losses use the softplus forms of -log(sigmoid), never probabilities + eps.


def neg_log_sigmoid(logits):
    """-log(sigmoid(z)) = softplus(-z), exact for any z (no probabilities + eps)."""
    return tf.nn.softplus(-logits)


def neg_log_one_minus_sigmoid(logits):
    """-log(1 - sigmoid(z)) = softplus(z)."""
    return tf.nn.softplus(logits)


def loss_full(logits, full_labels):
    """Upper bound: BCE against the complete label vector."""
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=full_labels, logits=logits), 0.0


def loss_an(logits, observed):
    """Assume negative (Cole et al., Sec. 3): every unobserved label is a negative."""
    positive = tf.cast(observed > 0, logits.dtype)
    return positive * neg_log_sigmoid(logits) + (1 - positive) * neg_log_one_minus_sigmoid(logits), 0.0


def loss_an_ls(logits, observed, smoothing: float = 0.1):
    """AN with label smoothing: target 1 - eps for positives, eps for assumed negatives."""
    positive = tf.cast(observed > 0, logits.dtype)
    target = positive * (1 - smoothing) + (1 - positive) * smoothing
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits), 0.0


def loss_wan(logits, observed):
    """Weighted AN: assumed negatives weighted 1 / (C - 1)."""
    num_classes = tf.cast(tf.shape(logits)[1], logits.dtype)
    positive = tf.cast(observed > 0, logits.dtype)
    negative = (1 - positive) * neg_log_one_minus_sigmoid(logits) / (num_classes - 1)
    return positive * neg_log_sigmoid(logits) + negative, 0.0


def expected_positive_regulariser(probabilities, expected_num_positives: float):
    """R(f) = (mean over the batch of sum_c f_c - k)^2 (Cole et al., EPR, squared norm)."""
    return tf.square(tf.reduce_mean(tf.reduce_sum(probabilities, axis=1)) - expected_num_positives)


def loss_epr(logits, observed, expected_num_positives: float):
    """Positive BCE on observed positives + expected-positive regulariser / C^2."""
    num_classes = tf.cast(tf.shape(logits)[1], logits.dtype)
    positive = tf.cast(observed > 0, logits.dtype)
    regulariser = expected_positive_regulariser(tf.sigmoid(logits), expected_num_positives) / num_classes**2
    return positive * neg_log_sigmoid(logits), regulariser


def loss_role(logits, observed, estimator_logits, expected_num_positives: float):
    """ROLE: classifier and label estimator teach each other (each side sees the other detached)."""
    num_classes = tf.cast(tf.shape(logits)[1], logits.dtype)
    positive = tf.cast(observed > 0, logits.dtype)
    predictions, estimates = tf.sigmoid(logits), tf.sigmoid(estimator_logits)
    positive_classifier = positive * neg_log_sigmoid(logits)
    positive_estimator = positive * neg_log_sigmoid(estimator_logits)
    cross_classifier = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.stop_gradient(estimates), logits=logits
    )
    cross_estimator = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.stop_gradient(predictions), logits=estimator_logits
    )
    both_priors = expected_positive_regulariser(predictions, expected_num_positives) + (
        expected_positive_regulariser(estimates, expected_num_positives)
    )
    regulariser = 0.5 * both_priors / num_classes**2
    loss_matrix = 0.5 * (positive_classifier + positive_estimator) + 0.5 * (
        cross_classifier + cross_estimator
    )
    return loss_matrix, regulariser


def binary_entropy(logits):
    """H(sigmoid(z)) = p * softplus(-z) + (1 - p) * softplus(z)."""
    probabilities = tf.sigmoid(logits)
    return probabilities * neg_log_sigmoid(logits) + (1 - probabilities) * neg_log_one_minus_sigmoid(logits)


def loss_em(logits, observed, alpha: float):
    """EM (Zhou et al.): BCE on positives, maximise entropy on unobserved (-alpha * H)."""
    positive = tf.cast(observed > 0, logits.dtype)
    unobserved = tf.cast(tf.equal(observed, 0), logits.dtype)
    return positive * neg_log_sigmoid(logits) - alpha * unobserved * binary_entropy(logits), 0.0


def loss_em_apl(logits, observed, alpha: float, beta: float):
    """EM + APL: entries stored as -s (s in (0, 1]) carry a soft pseudo label s, weighted by beta."""
    loss_matrix, _ = loss_em(logits, observed, alpha)
    pseudo = tf.cast(observed < 0, logits.dtype)
    soft_label = tf.maximum(-observed, 0.0)
    pseudo_term = beta * tf.nn.sigmoid_cross_entropy_with_logits(labels=soft_label, logits=logits)
    return loss_matrix + pseudo * pseudo_term, 0.0


def large_loss_rate(method: str, clean_rate, delta_rel: float):
    """Share of a batch's B x C entries that LL modifies (Kim et al., CVPR 2022, Sec. 3.2).

    LL-R and LL-Ct: 1 - clean_rate, growing by delta_rel percent per epoch. LL-Cp corrects labels for
    good, so its rate stays fixed at delta_rel percent per batch once the first epoch is over.
    """
    if method == "ll_cp":
        return tf.where(clean_rate < 1.0, delta_rel / 100.0, 0.0)
    return 1.0 - clean_rate


def large_loss_selection(an_loss_matrix, observed, rate):
    """LL (Kim et al.): mask of the k largest AN losses among unobserved entries.

    k = ceil(B * C * rate) (`large_loss_rate`), capped at the number of unobserved entries, chosen by
    rank with top_k so that exactly k entries are selected even when losses tie at the threshold (the
    reference's `loss < kth_value` test rejects every tie, and selects observed positives once k exceeds
    the unobserved count).
    """
    unobserved = tf.equal(tf.reshape(observed, [-1]), 0)
    flat = tf.where(unobserved, tf.reshape(an_loss_matrix, [-1]), tf.fill(tf.shape(unobserved), -np.inf))
    total = tf.cast(tf.size(flat), tf.float32)
    k = tf.cast(tf.math.ceil(total * tf.cast(rate, tf.float32) - 1e-6), tf.int32)
    k = tf.clip_by_value(k, 0, tf.reduce_sum(tf.cast(unobserved, tf.int32)))
    top = tf.math.top_k(flat, k=k).indices
    selected = tf.scatter_nd(top[:, None], tf.ones_like(top, dtype=tf.bool), tf.shape(flat))
    return tf.reshape(selected, tf.shape(an_loss_matrix))


def loss_large_loss(logits, observed, clean_rate, mode: str, delta_rel: float = 0.0):
    """LL-R rejects (zero loss), LL-Ct / LL-Cp correct (target 1) the selected large-loss entries.

    Returns `(loss_matrix, selected)`: the selection mask takes the regulariser's place.
    """
    an_matrix, _ = loss_an(logits, observed)
    selected = large_loss_selection(an_matrix, observed, large_loss_rate(mode, clean_rate, delta_rel))
    replacement = tf.zeros_like(an_matrix) if mode == "ll_r" else neg_log_sigmoid(logits)
    return tf.where(selected, replacement, an_matrix), selected


def baseline_loss(
    method: str, logits, observed, settings, full_labels=None, estimator_logits=None, clean_rate=1.0
):
    """`(loss_matrix, regulariser, selected)` of one baseline; `selected` is the LL mask, else None.

    `settings` carries label_smoothing, expected_num_positives, em_alpha, apl_beta and delta_rel (the
    parsed flags).
    """
    if method == "full":
        return (*loss_full(logits, full_labels), None)
    if method == "an":
        return (*loss_an(logits, observed), None)
    if method == "an_ls":
        return (*loss_an_ls(logits, observed, settings.label_smoothing), None)
    if method == "wan":
        return (*loss_wan(logits, observed), None)
    if method == "epr":
        return (*loss_epr(logits, observed, settings.expected_num_positives), None)
    if method == "role":
        return (*loss_role(logits, observed, estimator_logits, settings.expected_num_positives), None)
    if method == "em":
        return (*loss_em(logits, observed, settings.em_alpha), None)
    if method == "em_apl":
        return (*loss_em_apl(logits, observed, settings.em_alpha, settings.apl_beta), None)
    if method in ("ll_r", "ll_ct", "ll_cp"):
        loss_matrix, selected = loss_large_loss(logits, observed, clean_rate, method, settings.delta_rel)
        return loss_matrix, 0.0, selected
    raise ValueError(f"unknown SPML baseline {method!r}")


# ---- the baselines' label state: LL's schedule and LL-Cp's flips, EM+APL's soft negatives, ROLE ----


def apl_negative_counts(original_observed: np.ndarray, neg_proportion: float, epochs: int, warmup: int):
    """EM+APL (Zhou et al., code `main.py`): entries of class c pseudo-labelled per epoch from the warm-up on,
    int(neg_proportion * U_c / (epochs - warmup)), U_c being the class's unobserved count at the start."""
    unobserved = (np.asarray(original_observed) == 0).sum(axis=0)
    return (neg_proportion * unobserved / max(epochs - warmup, 1)).astype(np.int64)


def apl_negative_pseudo_labels(observed: np.ndarray, predictions: np.ndarray, counts) -> np.ndarray:
    """EM+APL's asymmetric pseudo-labelling step: per class c, the counts[c] still-unobserved entries with
    the lowest predictions p get a soft negative label, stored as -p (the loss's target is p, weight beta).

    Entries chosen in earlier epochs are no longer 0, so the selection accumulates epoch by epoch. Ties
    go to the lower row (stable sort); p is floored at 1e-12 so that a chosen entry never reads as 0.
    """
    observed = np.asarray(observed, dtype=np.float32).copy()
    for column, count in enumerate(counts):
        unobserved = np.flatnonzero(observed[:, column] == 0)
        chosen = unobserved[np.argsort(predictions[unobserved, column], kind="stable")[:count]]
        observed[chosen, column] = -np.maximum(predictions[chosen, column], 1e-12)
    return observed


def role_initial_estimates(observed: np.ndarray, seed: int) -> np.ndarray:
    """ROLE estimator init (Cole et al.): observed positives at logit(0.995), others in +-logit(0.6)."""
    rng = np.random.default_rng(seed)
    bound = math.log(0.6 / 0.4)
    logits = (bound * (2 * rng.random(observed.shape) - 1)).astype(np.float32)
    logits[observed > 0] = math.log(0.995 / 0.005)
    return logits


class BaselineState:
    """What the baselines keep besides the model: the label matrix, the LL schedule, ROLE's estimator.

    The observed labels live on the device because LL-Cp (after every step) and EM+APL (after every
    epoch from its warm-up on) rewrite them; ROLE trains one logit per training image and class with its
    own optimizer. Create it inside the tf.distribute strategy's scope.
    """

    def __init__(self, method: str, settings, train_observed, train_full, make_optimizer=None):
        self.method, self.settings = method, settings
        self.observed_matrix = tf.Variable(
            train_observed.astype(np.float32), trainable=False, name="observed"
        )
        self.full_matrix = tf.constant(train_full.astype(np.float32))
        self.clean_rate = tf.Variable(1.0, trainable=False, name="clean_rate")
        if method == "em_apl":
            epochs, warmup = settings.epochs, settings.warmup_epoch
            self.apl_counts = apl_negative_counts(train_observed, settings.neg_proportion, epochs, warmup)
        self.estimator_logits, self.estimator_optimizer = None, None
        if method == "role":
            initial = role_initial_estimates(train_observed, settings.seed)
            self.estimator_logits = tf.Variable(initial, name="role")
            self.estimator_optimizer = make_optimizer(settings.learning_rate * settings.role_lr_multiplier)
            self.estimator_optimizer.build([self.estimator_logits])

    def loss(self, logits, observed, indices, method=None):
        """`(loss_matrix, regulariser, selected)` of `method` (default: this state's) for a batch of rows."""
        method = method or self.method
        full = tf.gather(self.full_matrix, indices) if method == "full" else None
        estimator = None if self.estimator_logits is None else tf.gather(self.estimator_logits, indices)
        return baseline_loss(method, logits, observed, self.settings, full, estimator, self.clean_rate)

    def start_epoch(self, epoch: int) -> None:
        """LL (Kim et al.): no modification in epoch 1, then delta_rel percent more labels per epoch."""
        self.clean_rate.assign(max(0.0, 1.0 - (epoch - 1) * self.settings.delta_rel / 100.0))

    def after_step(self, selected, indices) -> None:
        """LL-Cp: the corrected labels (float mask `selected` of rows `indices`) become observed positives."""
        if self.method == "ll_cp":
            self.observed_matrix.scatter_max(tf.IndexedSlices(selected, indices))

    def wants_predictions(self, epoch: int) -> bool:
        """EM+APL pseudo-labels after every epoch from `warmup_epoch` on (the reference's `>=`)."""
        return self.method == "em_apl" and epoch >= self.settings.warmup_epoch

    def end_epoch(self, predictions: np.ndarray) -> None:
        """EM+APL: the epoch's soft negative labels, from eval-mode predictions on the training images."""
        current = np.asarray(self.observed_matrix.numpy())
        self.observed_matrix.assign(apl_negative_pseudo_labels(current, predictions, self.apl_counts))

    def checkpoint_groups(self) -> list[tuple[str, list]]:
        """(group name, variables) pairs for `common.checkpoints.variable_arrays` / `assign_arrays`."""
        groups = [("labels", [self.observed_matrix])]
        if self.estimator_logits is not None:
            groups.append(("role", [self.estimator_logits]))
            groups.append(("role_optimizer", self.estimator_optimizer.variables))
        return groups


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
    """The first epoch (index + offset, at most `limit`) whose slope fell by `ratio` from the peak so far."""
    peak = np.maximum.accumulate(np.maximum(slopes, 0.0) if positive_peak else slopes)
    flat = (peak - slopes) / np.maximum(peak, 1e-12) > ratio
    flattened = np.nonzero(((peak > 0) & flat) if positive_peak else flat)[0] + offset
    flattened = flattened[flattened <= limit]
    return int(flattened[0]) if flattened.size else None


def regained_after_dip(values, dip=0.01):
    """The last epoch (1-based) at which the curve regained its running maximum after falling more than
    `dip` below it, or 0 when it never fell that far (a pause followed by a second rise)."""
    values, regained, low = np.asarray(values, dtype=np.float64), 0, False
    running = np.maximum.accumulate(values)
    for index in range(1, values.size):
        if values[index] < running[index - 1] - dip:
            low = True
        elif low and values[index] >= running[index - 1]:
            regained, low = index + 1, False
    return regained


def detect_early_learning_end(agreement, ratio=0.9, min_epochs=3, patience=2, dip=0.01):
    """Step 3 (reconstructed after AIO2 / ADELE): (epoch, how, params) where the agreement flattened, or None.

    The per-epoch agreement y_1..y_T is fitted with f(x) = a (1 - exp(-b x^c)); early learning is over at
    the first epoch t whose slope f'(t) has fallen by `ratio` from the largest slope up to t. When the fit
    fails or does not describe the curve, the same test runs on the observed per-epoch gains. A detected
    epoch counts only once `patience` further epochs have been observed after it. A fall of more than
    `dip` below the running maximum is a pause, not saturation: while the curve is below its maximum no
    epoch is detected, and once it rose again the end of early learning is at the earliest where it regained
    its maximum (no earlier than the start of the second rise).
    """
    from scipy.optimize import curve_fit

    values = np.asarray(agreement, dtype=np.float64)
    if values.size < max(min_epochs, 3) or not np.all(np.isfinite(values)):
        return None, "waiting", None
    epochs = np.arange(1, values.size + 1, dtype=np.float64)
    limit = values.size - patience
    if values[-1] < values.max() - dip:
        return None, "paused", None
    regained = regained_after_dip(values, dip)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start, bounds = (max(values.max(), 1e-3), 0.5, 1.0), ([0.0, 1e-6, 0.1], [1.0, 50.0, 5.0])
            params, _ = curve_fit(saturating_curve, epochs, values, p0=start, bounds=bounds, maxfev=20000)
        residual = float(np.sqrt(np.mean((saturating_curve(epochs, *params) - values) ** 2)))
        if not np.all(np.isfinite(params)) or residual > 0.05:
            raise RuntimeError("poor fit")
        detected = _first_flattened(saturating_slope(epochs, *params), ratio, 1, limit)
        how, params = "curve_fit", [float(p) for p in params]
    except (RuntimeError, ValueError):
        detected = _first_flattened(np.diff(values), ratio, 2, limit, positive_peak=True)
        how, params = "slope", None
    if detected is not None and regained:
        detected = max(detected, regained) if max(detected, regained) <= limit else None
    return detected, how, params


def _window_slope(values):
    """Least-squares slope of `values` against 1, 2, ..., floored at 0 (AIO2 bounds its line fit at 0)."""
    return max(float(np.polyfit(np.arange(len(values), dtype=np.float64), values, 1)[0]), 0.0)


def detect_early_learning_end_aio2(agreement, windows=(3, 4, 5)):
    """Step 3 with AIO2's trigger rule (Liu et al., zhu-xlab/AIO2, `early_learning_detection.py`).

    For each window size w the slope of a line fitted to the last w epochs is recorded every epoch. Once
    the slope rises again above its minimum so far, the window's end of the transition is the epoch where
    that minimum window ended, accepted only when more than mean(windows) epochs have followed it (the
    buffer that lets a pause followed by a second rise pass). When every window size has an accepted
    epoch, dep is their mean; the curve a (1 - exp(-b x^c)) is fitted to epochs 1..dep, `mid` counts the
    epochs whose fitted slope exceeds the fit's mean slope, and the trigger is (dep + mid) // 2.
    Returns (epoch, "aio2", params) or (None, "waiting", None).
    """
    from scipy.optimize import curve_fit

    values = np.asarray(agreement, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        return None, "waiting", None
    detected = np.zeros(len(windows))
    for count in range(1, values.size + 1):
        for position, width in enumerate(windows):
            if count < width:
                continue
            slopes = [_window_slope(values[end - width : end]) for end in range(width, count + 1)]
            minimum_end = int(np.argmin(slopes)) + width
            if min(slopes) < slopes[-1] and count - minimum_end > np.mean(windows):
                detected[position] = minimum_end
    if not (detected > 0).all():
        return None, "waiting", None
    end_of_transition = int(np.mean(detected))
    epochs = np.arange(1, end_of_transition + 1, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bounds = ([0.0, 0.0, 0.0], [1.0, np.inf, 1.0])
        params, _ = curve_fit(
            saturating_curve,
            epochs,
            values[:end_of_transition],
            p0=(1, 0.5, 0.5),
            method="trf",
            bounds=bounds,
        )
    fitted = saturating_curve(epochs, *params)
    threshold = (fitted[-1] - fitted[0]) / max(epochs[-1] - epochs[0], 1.0)
    middle = int(np.sum(saturating_slope(epochs, *params) > threshold))
    return max((end_of_transition + middle) // 2, 1), "aio2", [float(p) for p in params]


def loss_gradient_calibration(logits, observed, pseudo_labels, mode="target"):
    """Step 4, Gradient Calibration: observed positives keep target 1, unobserved ones the pseudo label.

    BCE against it gives dL/dz = sigmoid(z) - y_pseudo on unobserved logits instead of AN's sigmoid(z);
    mode 'scale' multiplies the AN gradient of unobserved logits by (1 - y_pseudo) instead.
    """
    if mode == "target":
        targets = tf.where(observed > 0, tf.ones_like(pseudo_labels), pseudo_labels)
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
    positive = tf.cast(observed > 0, logits.dtype)
    negative = (1 - positive) * (1 - pseudo_labels) * neg_log_one_minus_sigmoid(logits)
    return positive * neg_log_sigmoid(logits) + negative


def gc_targets(pseudo_labels, kind="soft"):
    """Step 4's unobserved targets: the teachers' mean (soft), 1 where it is >= 0.5 (hard), or sharpened
    with temperature 0.5: p^2 / (p^2 + (1 - p)^2)."""
    if kind == "hard":
        return tf.cast(pseudo_labels >= 0.5, pseudo_labels.dtype)
    if kind == "sharpen":
        return tf.square(pseudo_labels) / (tf.square(pseudo_labels) + tf.square(1.0 - pseudo_labels))
    return pseudo_labels


def mixup_gradient_calibration(student, images, observed, pseudo_labels, args, seed):
    """Steps 4-5: the calibrated loss with one Beta(alpha, alpha) mixup draw per batch (stateless `seed`)."""
    pseudo_labels = gc_targets(pseudo_labels, args.gc_target)
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
        # 1 while the ramp applies; `copy_student` (--teacher_init at_trigger) sets it to 0: decays as set.
        self.ramping = tf.Variable(1.0 if ramp == "mean_teacher" else 0.0, trainable=False, name="ramping")
        self.copy_student()
        self.ramping.assign(1.0 if ramp == "mean_teacher" else 0.0)

    def copy_student(self):
        """Both teachers become the student; from then on they follow it with the constant decays."""
        for teacher in self.models.values():
            teacher.set_weights(self.student.get_weights())
        self.ramping.assign(0.0)

    def probabilities_a(self, images):
        return tf.sigmoid(self.models["teacher_a"](images, training=False))

    def pseudo_labels(self, images, probabilities_a):
        """The mean of both teachers' sigmoid outputs, never differentiated."""
        probabilities_b = tf.sigmoid(self.models["teacher_b"](images, training=False))
        return tf.stop_gradient(0.5 * (probabilities_a + probabilities_b))

    def _follow(self, teacher, decay):
        """teacher <- decay * teacher + (1 - decay) * student: a step of (1 - decay) toward the student."""
        for teacher_weight, student_weight in zip(teacher.weights, self.student.weights, strict=True):
            teacher_weight.assign(decay * teacher_weight + (1.0 - decay) * student_weight)

    def decay(self, decay, t):
        """The decay applied at iteration (A) or epoch (B) t; also what log.csv reports per epoch."""
        return min(decay, (1.0 + t) / (10.0 + t)) if float(self.ramping.numpy()) else decay

    def update_a(self, step):  # after every iteration, inside the compiled step
        step = tf.cast(step, tf.float32)
        ramped = tf.minimum(self.decay_a, (1.0 + step) / (10.0 + step))
        self._follow(self.models["teacher_a"], tf.where(self.ramping > 0, ramped, self.decay_a))

    def update_b(self, epoch):  # after every epoch
        self._follow(self.models["teacher_b"], self.decay(self.decay_b, epoch))


# ---- the classifier ----


def small_cnn(input_shape):
    """Three conv-BN-ReLU-pool stages and a global average pool: the CPU demos' backbone."""
    image = x = keras.Input(input_shape)
    for width in (16, 32, 64):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.Activation("relu")(layers.BatchNormalization()(x))
        x = layers.MaxPooling2D()(x)
    return keras.Model(image, layers.GlobalAveragePooling2D()(x), name="small_cnn")


def build_classifier(backbone, input_shape, num_classes, band_mean=None, band_variance=None, weights=""):
    """Backbone + global average pool + Dense(C) logits; ResNet-50 in the paper. The first layer
    standardises each band with the training set's statistics; `weights` (a local Keras weights file,
    e.g. Keras's ImageNet ResNet-50 without top) is loaded into the backbone as it is."""
    inputs = features = keras.Input(input_shape, name="image")
    if band_mean is not None:
        normalize = layers.Normalization(mean=band_mean, variance=band_variance, name="band_normalization")
        features = normalize(inputs)
    if backbone == "resnet50":
        resnet = keras.applications.ResNet50
        base = resnet(include_top=False, weights=None, input_shape=input_shape, pooling="avg")
    elif backbone == "small_cnn":
        base = small_cnn(input_shape)
    elif backbone == "mlp":
        vector = keras.Input(input_shape)
        base = keras.Model(vector, layers.Dense(64, activation="relu")(vector), name="mlp")
    else:
        vector = keras.Input(input_shape)
        base = keras.Model(vector, vector, name="linear")  # a linear probe: Dense logits on the features
    if weights:
        weights_path = require_file(weights, "a Keras weights file for the backbone")
        try:
            base.load_weights(str(weights_path))
        except Exception as error:
            problem = f"weights do not fit the {backbone} backbone ({type(error).__name__})"
            expected = f"weights saved from a {backbone} with input {input_shape}"
            raise InputError(weights_path, problem, expected) from None
    # float32 logits (and so losses) under --mixed_precision as well.
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(base(features))
    model = keras.Model(inputs, logits, name=f"{backbone}_spml")
    fused_bn.fuse(model)  # TensorFlow's fused batch-norm kernel, same variables (common.fused_bn)
    return model


def model_builder(args, num_classes, band_mean, band_variance):
    """The classifier of the run as a function of no arguments: the student and AdaGC's teachers alike."""
    vectors = args.dataset == "features"
    shape = (len(band_mean),) if vectors else (args.image_size, args.image_size, len(band_mean))
    return functools.partial(
        build_classifier, args.backbone, shape, num_classes, band_mean, band_variance, args.weights
    )


def make_optimizer(settings, learning_rate):
    """Adam, or AdamW with `settings.weight_decay`, stepping as torch.optim does by default (the reference
    trains in PyTorch) with `settings.adam_epsilon` (torch's 1e-8; common.optimizers explains the two
    conventions)."""
    kwargs = {"epsilon": settings.adam_epsilon}
    if settings.optimizer == "adamw":
        kwargs["weight_decay"] = settings.weight_decay
    return optimizers.make_optimizer(
        settings.optimizer, learning_rate, convention=settings.optimizer_convention, **kwargs
    )


# ---- the compiled training step of every method ----


class SpmlTrainer:
    """The student, its optimizer, the baselines' state and the compiled step of one baseline.

    `batch_loss`, `after_step`, `end_epoch` and `checkpoint_groups` are the hooks a method with more
    state overrides (AdaGC's teachers, `AdaGCTrainer` below). `phase` names the step's graph.
    """

    def __init__(self, settings, strategy, build_model, make_optimizer, train_observed, train_full):
        self.settings, self.strategy = settings, strategy
        # The training images in row order, unaugmented: EM+APL's eval-mode prediction pass.
        self.prediction_dataset = None
        with strategy.scope():
            self.student = build_model()
            # Under mixed_float16 the student's optimizer scales the loss (common/precision.py).
            self.optimizer = precision.loss_scaled(make_optimizer(settings.learning_rate))
            self.optimizer.build(self.student.trainable_variables)
            self.baseline = BaselineState(
                settings.method, settings, train_observed, train_full, make_optimizer
            )
            self.step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_counter")
        self.estimator = self.baseline.estimator_logits
        self._steps = {}

    def checkpoint_groups(self) -> list[tuple[str, list]]:
        """(group, variables) of everything a checkpoint holds; keys are the variables' paths."""
        groups = [
            ("student", self.student.variables),
            ("optimizer", self.optimizer.variables),
            ("steps", [self.step_counter]),
        ]
        return groups + self.baseline.checkpoint_groups()

    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for group, variables in self.checkpoint_groups():
            arrays.update(checkpoints.variable_arrays(group, variables))
        return arrays

    def restore(self, arrays, source) -> None:
        for group, variables in self.checkpoint_groups():
            checkpoints.assign_arrays(arrays, group, variables, source)

    def batch_loss(self, images, indices, observed, phase, extra):
        """(loss matrix, regulariser); `extra` collects sums to report."""
        logits = self.student(images, training=True)
        loss_matrix, regulariser, selected = self.baseline.loss(logits, observed, indices)
        if selected is not None:
            extra["corrected"] = tf.cast(selected, tf.float32)
        return loss_matrix, regulariser

    def after_step(self) -> None:
        """Called once per step, in cross-replica context, before the step counter moves on."""

    def _replica_step(self, images, indices, phase):
        observed = tf.gather(self.baseline.observed_matrix, indices)
        variables = list(self.student.trainable_variables)
        extra = {}
        with tf.GradientTape() as tape:
            loss_matrix, regulariser = self.batch_loss(images, indices, observed, phase, extra)
            loss = tf.nn.compute_average_loss(tf.reduce_mean(loss_matrix, axis=1))
            loss += regulariser / self.strategy.num_replicas_in_sync
            if self.estimator is not None:
                variables.append(self.estimator)
            # Under mixed_float16 the loss scaling is recorded by the tape too (else no gradients).
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        if self.estimator is not None:
            # ROLE's estimator has an optimizer of its own: its gradient is unscaled here, and left at 0
            # on a step whose float16 gradients overflowed (the student's optimizer skips that step).
            estimator_gradient = gradients[-1] / self.optimizer.scale_loss(tf.constant(1.0))
            finite = tf.reduce_all(tf.math.is_finite(estimator_gradient))
            estimator_gradient = tf.where(finite, estimator_gradient, tf.zeros_like(estimator_gradient))
            self.optimizer.apply_gradients(zip(gradients[:-1], variables[:-1], strict=True))
            self.baseline.estimator_optimizer.apply_gradients([(estimator_gradient, self.estimator)])
        else:
            self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return loss, indices, extra

    def _distributed_step(self, images, indices, phase):
        strategy = self.strategy
        loss, indices, extra = strategy.run(self._replica_step, args=(images, indices, phase))
        corrected = extra.pop("corrected", None)
        sums = {
            key: strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for key, value in extra.items()
        }
        all_indices = tf.concat(strategy.experimental_local_results(indices), axis=0)
        if corrected is not None:
            all_corrected = tf.concat(strategy.experimental_local_results(corrected), axis=0)
            self.baseline.after_step(all_corrected, all_indices)
        self.after_step()
        self.step_counter.assign_add(1)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None), sums

    def train_epoch(self, dataset, phase: str, epoch: int) -> tuple[float, float]:
        """One epoch of compiled steps; returns (mean loss, agreed / agreement_pairs sums or NaN)."""
        self.baseline.start_epoch(epoch)
        distributed = self.strategy.experimental_distribute_dataset(dataset)
        if phase not in self._steps:
            # One graph per phase for full and partial batches (the signature leaves the batch size open);
            # no tensor-dependent Python control flow, so autograph is skipped (it costs seconds).
            self._steps[phase] = tf.function(
                lambda images, indices: self._distributed_step(images, indices, phase),
                input_signature=list(distributed.element_spec),
                autograph=False,
            )
        losses, self.epoch_sums = [], {}
        for images, indices in distributed:
            loss, sums = self._steps[phase](images, indices)
            losses.append(float(loss))
            for key, value in sums.items():
                self.epoch_sums[key] = self.epoch_sums.get(key, 0.0) + float(value)
        agreed, pairs = self.epoch_sums.get("agreed", 0.0), self.epoch_sums.get("agreement_pairs", 0.0)
        return float(np.mean(losses)), (agreed / pairs if pairs else float("nan"))

    def end_epoch(self, epoch: int) -> None:
        if self.baseline.wants_predictions(epoch):
            predictions = evaluation.predict_probabilities(self.student, self.prediction_dataset)
            self.baseline.end_epoch(predictions)


class AdaGCTrainer(SpmlTrainer):
    """AdaGC: AN warm-up (step 1), then Gradient Calibration with mixup (4-5); reports step 3's signal."""

    def __init__(self, settings, strategy, build_model, make_optimizer, train_observed, train_full):
        super().__init__(settings, strategy, build_model, make_optimizer, train_observed, train_full)
        with strategy.scope():
            decays = settings.teacher_a_decay, settings.teacher_b_decay, settings.teacher_ramp
            self.teachers = MeanTeachers(build_model, self.student, *decays)

    def checkpoint_groups(self):
        teachers = [(name, teacher.variables) for name, teacher in self.teachers.models.items()]
        return super().checkpoint_groups() + teachers + [("teacher_ramp", [self.teachers.ramping])]

    def batch_loss(self, images, indices, observed, phase, extra):
        teacher_a = self.teachers.probabilities_a(images)
        extra["agreed"], extra["agreement_pairs"] = ranking_agreement(teacher_a, observed)
        pseudo_labels = self.teachers.pseudo_labels(images, teacher_a)
        # Pseudo-label precision and recall at 0.5 on the unobserved entries, against the hidden labels.
        hidden = tf.gather(self.baseline.full_matrix, indices) * tf.cast(tf.equal(observed, 0), tf.float32)
        predicted = tf.cast(pseudo_labels >= 0.5, tf.float32) * tf.cast(tf.equal(observed, 0), tf.float32)
        extra["pseudo_true"] = tf.reduce_sum(predicted * hidden)
        extra["pseudo_predicted"], extra["pseudo_hidden"] = tf.reduce_sum(predicted), tf.reduce_sum(hidden)
        if phase == "warmup":
            logits = self.student(images, training=True)
            return self.baseline.loss(logits, observed, indices, "an")[:2]
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
    trainer_class = AdaGCTrainer if args.method == "adagc" else SpmlTrainer
    strategy = runs.make_strategy(args.strategy)
    optimizer = functools.partial(make_optimizer, args)
    trainer = trainer_class(args, strategy, build_model, optimizer, train["observed"], train["full"])
    trainer.prediction_dataset = prediction_dataset
    return trainer


# ---- the reported model: selection on the kept trajectory ----


def improves(row, best_val_map):
    """The selection rule: a higher validation mAP, or every epoch when there is no validation (NaN)."""
    return not np.isfinite(row["val_mAP"]) or row["val_mAP"] > best_val_map


def best_row(rows):
    """The row `improves` selects last among `rows` (in training order): the reported epoch."""
    best, best_val = None, -1.0
    for row in rows:
        if improves(row, best_val):
            best, best_val = row, (row["val_mAP"] if np.isfinite(row["val_mAP"]) else -1.0)
    return best


def kept_log(state):
    """The epochs that lead to the final model: after a rollback, warm-up up to the trigger, then GC."""
    trigger = state["trigger_epoch"]
    return [r for r in state["log"] if r["phase"] != "warmup" or trigger is None or r["epoch"] <= trigger]


def keep_warmup_bests(checkpoint_dir, state):
    """Keep best_<epoch>.keras for the best epoch as of each epoch a rollback can return to, no others."""
    names = (checkpoints.read_state(checkpoint_dir) or {}).get("checkpoints", [])
    targets = [int(name.split("_")[1]) for name in names] if state["phase"] == "warmup" else []
    needed = {best_row([r for r in state["log"] if r["epoch"] <= target])["epoch"] for target in targets}
    for path in checkpoint_dir.glob("best_*.keras"):
        if int(path.stem.split("_")[1]) not in needed:
            path.unlink()


def select_on_kept_trajectory(state, run_dir, target):
    """After a rollback to `target` the reported model is the best of warm-up epochs 1..target, not an
    undone warm-up epoch (an AN model); GC epochs then compete with it."""
    best = best_row([row for row in state["log"] if row["epoch"] <= target])
    if best["epoch"] != state["best_epoch"]:
        saved = run_dir / "checkpoints" / f"best_{best['epoch']:03d}.keras"
        atomic.write_bytes(run_dir / "best_model.keras", saved.read_bytes())
    best_val = best["val_mAP"] if np.isfinite(best["val_mAP"]) else -1.0
    state.update(best_epoch=best["epoch"], best_phase="warmup", best_val_mAP=best_val)


# ---- the epoch loop: warm-up, trigger and rollback, Gradient Calibration ----


def early_learning_trigger(args, agreement, epoch):
    """Step 3 with a fixed --gc_start_epoch or the adaptive detection: (epoch or None, how, fit params)."""
    if args.gc_start_epoch > 0:
        return (epoch if epoch >= args.gc_start_epoch else None), "fixed", None
    if args.trigger == "aio2":
        return detect_early_learning_end_aio2(agreement)
    settings = args.trigger_ratio, args.trigger_min_epochs, args.trigger_patience, args.trigger_dip
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
    return {
        "epoch": 0,
        "phase": "warmup" if args.method == "adagc" else "train",
        "trigger_epoch": None,
        "trigger_detected_at": None,
        "trigger_how": None,
        "fit_params": None,
        "best_epoch": None,
        "best_val_mAP": -1.0,
        "best_phase": None,
        "log": [],
        "agreement": [],
    }


def train_one_epoch(args, trainer, data, train_batches, val_dataset, state, epoch):
    """One epoch of the state's phase and its validation mAP; returns the log row (also printed)."""
    started = time.perf_counter()
    phase = "gc" if state["phase"] == "gc" else "warmup"
    train_loss, agreement = trainer.train_epoch(train_batches.for_epoch(epoch), phase, epoch)
    trainer.end_epoch(epoch)
    val_map, val, decays = float("nan"), data["val"], ""
    if val_dataset is not None:
        labels = val["full"] if args.selection_labels == "full" else val["observed"]
        val_map = evaluation.evaluate(trainer.student, val_dataset, labels, data["class_names"])["mAP"]
    row = dict(zip(LOG_COLUMNS[:5], (epoch, state["phase"], train_loss, agreement, val_map), strict=True))
    if args.method == "adagc":
        row["teacher_a_decay"], row["teacher_b_decay"] = trainer.effective_decays(epoch)
        sums = trainer.epoch_sums
        row["pseudo_precision"] = sums["pseudo_true"] / max(sums["pseudo_predicted"], 1.0)
        row["pseudo_recall"] = sums["pseudo_true"] / max(sums["pseudo_hidden"], 1.0)
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
    scalars = tensorboard.ScalarLog(run_dir, enabled=not args.no_tensorboard)
    bar = progress.bar(total=args.epochs, initial=epoch, desc="epochs", enabled=args.progress, unit="epoch")
    while epoch < args.epochs:
        epoch += 1
        row = train_one_epoch(args, trainer, data, train_batches, val_dataset, state, epoch)
        state["log"].append(row)
        scalars.write(epoch, row)
        if improves(row, state["best_val_mAP"]):
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
                fitted = "" if params is None else " a b c " + " ".join(f"{p:.4g}" for p in params)
                message = (
                    f"early learning ended at epoch {detected} ({how}{fitted}, checked at epoch {epoch}); "
                )
                print(message + f"Gradient Calibration starts after epoch {target}", flush=True)
                state.update(phase="gc", trigger_epoch=target, trigger_detected_at=epoch, trigger_how=how)
                state["fit_params"], epoch = params, target
                if args.teacher_init == "at_trigger":
                    trainer.teachers.copy_student()
                select_on_kept_trajectory(state, run_dir, target)
        state["epoch"] = epoch
        # The warm-up keeps its last rollback_window + 1 epochs for the trigger's rollback.
        keep = args.rollback_window + 1 if state["phase"] == "warmup" else 1
        checkpoints.save(checkpoint_dir, f"epoch_{epoch:03d}", trainer.state_arrays(), state, keep=keep)
        keep_warmup_bests(checkpoint_dir, state)
        atomic.write_csv(run_dir / "log.csv", state["log"], [c for c in LOG_COLUMNS if c in state["log"][0]])
        # A rollback returns to an earlier epoch: the bar follows the epoch counter.
        bar.update(epoch - bar.n)
    bar.close()
    return state


def save_dynamics_plot(path, state):
    """Agreement curve (with fit and trigger) and the loss / val mAP of the epochs that were kept."""
    agreement, trigger, fit_params = state["agreement"], state["trigger_epoch"], state["fit_params"]
    # After a rollback the warm-up epochs past the trigger were replaced by Gradient Calibration epochs.
    kept = kept_log(state)
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
    require_in_range(args, "epochs", 1, MAX_EPOCHS)
    require_in_range(args, "batch_size", 1, MAX_BATCH)
    require_in_range(args, "image_size", 0, MAX_IMAGE_SIZE)
    require_in_range(args, "demo_images", 1, MAX_DEMO_IMAGES)
    require_in_range(args, "learning_rate", 0, 10, low_open=True)
    require_in_range(args, "adam_epsilon", 0, 1, low_open=True)
    require_in_range(args, "weight_decay", 0, 1)
    require(0 <= args.seed < 2**32, "--seed", f"{args.seed} is out of range", "an integer in [0, 2**32)")
    vectors = args.dataset == "features"
    require(not vectors or args.features, "--features", "not set", "a .npz of features (--dataset features)")
    fits = vectors == (args.backbone in ("mlp", "linear"))
    require(
        fits, "--backbone", f"{args.backbone} with --dataset {args.dataset}", "mlp/linear for features only"
    )
    require(0 <= args.val_fraction < 1, "--val_fraction", f"{args.val_fraction}", "a share in [0, 1)")
    silent_an = args.method == "adagc" and args.teacher_ramp == "constant" and args.teacher_init == "start"
    why = "teachers that start random with decays 0.999 / 0.99 barely move, so AdaGC never triggers (= AN)"
    require(not silent_an, "--teacher_ramp constant", why, "--teacher_init at_trigger, or the ramp")
    apl_ok = args.method != "em_apl" or 0 <= args.warmup_epoch < args.epochs
    require(apl_ok, "--warmup_epoch", f"{args.warmup_epoch} with --epochs {args.epochs}", "0 <= it < epochs")
    if not args.run_name:
        demo_name = f"demo_{args.method}" + ("" if args.dataset == "aid" else f"_{args.dataset}")
        default_name = demo_name if args.demo else f"{args.method}_{args.dataset}_{args.single_positive}"
        args.run_name = Path(args.config).stem if args.config else default_name
    return args


def load_data(args):
    """The dataset's three splits (the demo writes its generated copy first)."""
    if args.dataset == "features":
        return features.load(args.features, args.single_positive, args.seed)
    reader = aid_multilabel if args.dataset == "aid" else bigearthnet
    if args.demo:
        reader.write_demo(args.data_dir, args.demo_images, seed=12345)
    if args.dataset == "aid":
        return aid_multilabel.load(args.data_dir, args.single_positive, args.seed, args.val_fraction)
    benv2_settings = (
        "single_positive",
        "seed",
        "image_size",
        "bands",
        "lmdb_path",
        "metadata",
        "class_fractions",
        "drop_snow_cloud",
    )
    return bigearthnet.load(args.data_dir, **runs.settings_of(args, benv2_settings))


def make_loader(data, image_size, reader_errors):
    """Sources -> float32 images: per image (AID JPEGs) or per batch (the LMDB reader, marked `.batched`)."""
    if data["reader"] == "features":
        return lambda source: source
    if data["reader"] == "aid":
        return lambda source: aid_multilabel.decode_image(source, image_size)
    return bigearthnet.batch_reader(data["lmdb_path"], data["bands"], image_size, reader_errors.wrap)


def record_run(args, run_dir, data, band_mean, band_variance):
    """config.json; a resumed run must have the settings of the run it continues (RESUME_SETTINGS)."""
    if args.resume:
        settings = runs.settings_of(args, RESUME_SETTINGS)
        runs.check_same_settings(
            run_dir / "config.json", settings, args.overwrite, "checkpoints", section="args"
        )
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
    with reader_errors.surface():
        # A seeded random sample of up to 256 training images gives the bands' statistics.
        sample = pipelines.sample_indices(len(train["sources"]), 256, args.seed)
        statistics_batches = batches.make_dataset([train["sources"][i] for i in sample], loader, 32)
        band_mean, band_variance = pipelines.band_statistics(statistics_batches, floor=1e-6)
    print("weights: " + (args.weights or "none (random initialisation)"))

    # ---- model: the student (and AdaGC's two EMA teachers) ----
    precision.apply(args.mixed_precision)
    build = model_builder(args, len(data["class_names"]), band_mean, band_variance)
    in_order = None
    if args.method == "em_apl":
        in_order = batches.make_dataset(train["sources"], loader, args.batch_size)
    trainer = make_trainer(args, build, train, in_order)
    # The run folder is made once every input (the --weights file included) has been read.
    run_dir = runs.prepare_run_dir(args.results_dir, SCRIPT_STEM, args.run_name, args.overwrite, args.resume)
    record_run(args, run_dir, data, band_mean, band_variance)
    augment = args.augment and args.dataset != "features"  # flips and rotations are for images
    train_batches = batches.TrainBatches(train["sources"], loader, args.batch_size, args.seed, augment)
    val_dataset = None
    if len(val["sources"]):
        val_dataset = batches.make_dataset(val["sources"], loader, args.batch_size)
    else:
        print("no validation images: the last epoch is the reported model")
    test_dataset = batches.make_dataset(test["sources"], loader, args.batch_size)

    # ---- train: warm-up -> end of early learning -> rollback -> Gradient Calibration (AdaGC) ----
    with reader_errors.surface():
        state = fit(args, trainer, data, run_dir, train_batches, val_dataset)

    # ---- evaluate: the best validation epoch of the kept trajectory on the full-label test set ----
    with reader_errors.surface():
        best_model = keras.models.load_model(run_dir / "best_model.keras")
        metrics = evaluation.evaluate_and_write(run_dir, best_model, test_dataset, data)
        last = evaluation.evaluate(trainer.student, test_dataset, test["full"], data["class_names"])
    metrics.update({key: state.get(key) for key in SUMMARY_KEYS})
    metrics.update(
        last_epoch={
            "epoch": state["epoch"],
            "phase": state["phase"],
            **{k: last[k] for k in LAST_EPOCH_KEYS},
        },
        method=args.method,
        dataset=args.dataset,
        single_positive=args.single_positive,
        epochs=args.epochs,
    )
    save_dynamics_plot(run_dir / "training_dynamics.png", state)
    atomic.write_json(run_dir / "metrics.json", metrics)
    print(evaluation.summary_line(metrics))
    return metrics


def test_only(args, run_dir):
    """--test_only: the re-evaluation that test_multilabel_model.py runs (common.spml.evaluation)."""
    return evaluation.evaluate_run(args, run_dir, load_data, make_loader)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
