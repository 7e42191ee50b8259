"""Single-positive multi-label scene classification: AdaGC and the SPML baselines.

Paper: C. Liu, G. Perantoni, L. Bruzzone, X. X. Zhu, "Adaptive Gradient Calibration for
Single-Positive Multi-Label Learning in Remote Sensing Image Scene Classification", arXiv 2510.08269.

Each training image carries one observed positive label (single positive, SPML); every other label is
unobserved. This script trains AdaGC (warm-up with assume-negative BCE and two EMA teachers, an
adaptive early-learning trigger with rollback, then Gradient Calibration with mixup) and the SPML
baselines it is compared with (AN, AN-LS, WAN, EPR, ROLE, EM, EM+APL, LL-R, LL-Ct, LL-Cp) plus the
full-label upper bound, on AID-multilabel (random / manual single positives) and BigEarthNet v2
(reBEN LMDB; random / dominant single positives), and ends with the full-label test evaluation: mAP,
micro AP, macro/micro F1 and per-class AP/F1 (the paper's tables).

Commands:
    python train_multilabel_model.py -c configs/adagc_aid_random.yaml
    python train_multilabel_model.py -c configs/an_benv2_dominant.yaml --batch_size 128
    python train_multilabel_model.py -c configs/adagc_aid_random.yaml --test_only
    python train_multilabel_model.py --demo                  # AdaGC on a generated AID-like set
    python train_multilabel_model.py --demo --method an      # any method, no config needed

Runtime: `--demo` about a minute on a laptop CPU; a paper run (ResNet-50, 224 px, 30 epochs) wants a
GPU (`--strategy mirrored` for several). The demo's warm-up agreement saturates, the trigger fires at
epoch 5 (checked at epoch 7, rolled back), and it ends with (numbers from one CPU run):
    test mAP 0.6347 | micro AP 0.5706 | macro F1 0.1409 | micro F1 0.2431 | method adagc | trigger epoch 5

Outputs in results/train_multilabel_model/<config name>/: config.json, log.csv, best_model.keras,
metrics.json, per_class.csv, training_dynamics.png, checkpoints/ (per-epoch state for --resume and
the trigger's rollback). Parts of AdaGC that the paper does not pin down are marked "reconstructed"
below; each is a config key.
"""

import argparse
import csv
import math
import os
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import yaml
from keras import layers

from common import atomic, cli, runs
from common.errors import InputError, cli_entry, require, require_dir, require_file

SCRIPT_STEM = "train_multilabel_model"
AID_CLASSES = (
    "airplane",
    "bare-soil",
    "buildings",
    "cars",
    "chaparral",
    "court",
    "dock",
    "field",
    "grass",
    "mobile-home",
    "pavement",
    "sand",
    "sea",
    "ship",
    "tanks",
    "trees",
    "water",
)
# The 19-class BigEarthNet nomenclature in its usual order; column j of every label matrix is class j.
BEN_CLASSES = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)
S2_BAND_SIZES = {
    "B02": 120,
    "B03": 120,
    "B04": 120,
    "B08": 120,
    "B05": 60,
    "B06": 60,
    "B07": 60,
    "B8A": 60,
    "B11": 60,
    "B12": 60,
    "B01": 20,
    "B09": 20,
}
METHODS = ("full", "an", "an_ls", "wan", "epr", "role", "em", "em_apl", "ll_r", "ll_ct", "ll_cp", "adagc")
META_KEYS = ("config", "demo", "test_only", "help")
LMDB_ERROR_MARK = "[lmdb-input-error]"


def str2bool(value):
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class ConfigArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that remembers which flags were typed, so they can override the YAML config."""

    def parse_args(self, args=None, namespace=None):
        unset = object()
        probe = argparse.Namespace(**{a.dest: unset for a in self._actions if a.dest != "help"})
        parsed = super().parse_args(args, probe)
        explicit = []
        for action in self._actions:
            if action.dest == "help":
                continue
            if getattr(parsed, action.dest) is unset:
                setattr(parsed, action.dest, action.default)
            else:
                explicit.append(action.dest)
        parsed.explicit_args = sorted(explicit)
        return parsed


def get_args_parser():
    parser = ConfigArgumentParser(
        description="AdaGC and single-positive multi-label baselines (AID-multilabel, BigEarthNet v2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        help="YAML file whose keys are these flag names; flags typed on the command line win.",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="Generate a small AID-like dataset under <results_dir>/demo_data/ and train on it.",
    )
    parser.add_argument(
        "--test_only",
        action="store_true",
        help="Re-evaluate the saved best model of this run on the test set.",
    )
    # ---- data ----
    parser.add_argument("--dataset", default="aid", choices=("aid", "benv2"), help="Dataset layout to read.")
    parser.add_argument(
        "--data_dir",
        default="data/AID_multilabel",
        help="AID: folder with images_tr/, images_test/ and the label CSVs. BigEarthNet v2: "
        "folder with metadata.parquet, the LMDB and the *_single_labels.npy files.",
    )
    parser.add_argument(
        "--single_positive",
        default="random",
        choices=("random", "dominant", "manual"),
        help="How the one observed positive per training image is chosen: random true positive, "
        "dominant class by area (BigEarthNet), or manual (AID CSV). Generated choices are "
        "seeded and saved next to the data.",
    )
    parser.add_argument("--lmdb_path", default=None, help="BigEarthNet v2 LMDB (default <data_dir>/lmdb).")
    parser.add_argument(
        "--metadata",
        default=None,
        help="BigEarthNet v2 metadata.parquet (default <data_dir>/metadata.parquet).",
    )
    parser.add_argument(
        "--class_fractions",
        default=None,
        help="Per-patch class area fractions (CSV or parquet: patch_id + one column per class) "
        "for dominant single positives (default <data_dir>/class_fractions.csv).",
    )
    parser.add_argument(
        "--bands",
        default="B04,B03,B02,B08",
        help="Sentinel-2 bands read from the LMDB; 20 m / 60 m bands are resampled to 120 px.",
    )
    parser.add_argument(
        "--drop_snow_cloud",
        type=str2bool,
        default=True,
        help="Drop BigEarthNet patches flagged with seasonal snow or cloud/shadow.",
    )
    parser.add_argument(
        "--val_fraction",
        type=float,
        default=0.1,
        help="AID only: seeded share of images_tr held out to select the best epoch "
        "(BigEarthNet uses its validation split).",
    )
    parser.add_argument(
        "--selection_labels",
        default="full",
        choices=("full", "observed"),
        help="Labels of the validation images used to pick the best epoch: full labels as in the "
        "public SPML protocol, or only the single positives.",
    )
    # ---- model ----
    parser.add_argument(
        "--backbone",
        default="resnet50",
        choices=("resnet50", "small_cnn", "mlp"),
        help="ResNet-50 is the paper's; small_cnn is for CPU demos; mlp takes feature vectors.",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="Local Keras weights file for the backbone; random initialisation when omitted "
        "(nothing is downloaded).",
    )
    parser.add_argument(
        "--image_size", type=int, default=None, help="Input size (default 224 AID, 120 BigEarthNet)."
    )
    parser.add_argument(
        "--augment", type=str2bool, default=True, help="Random flips and 90-degree rotations."
    )
    # ---- optimisation ----
    parser.add_argument("--optimizer", default="adam", choices=("adam", "adamw"), help="Optimizer.")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Learning rate.")
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="Weight decay (adamw only).")
    parser.add_argument("--batch_size", type=int, default=64, help="Global batch size.")
    parser.add_argument("--epochs", type=int, default=30, help="Training epochs.")
    parser.add_argument(
        "--strategy",
        default="default",
        choices=("default", "mirrored", "multiworker"),
        help="tf.distribute strategy (mirrored = all local GPUs).",
    )
    # ---- method ----
    parser.add_argument("--method", default="adagc", choices=METHODS, help="Loss / training scheme.")
    parser.add_argument("--label_smoothing", type=float, default=0.1, help="AN-LS smoothing (Cole et al.).")
    parser.add_argument(
        "--expected_num_positives",
        type=float,
        default=None,
        help="EPR / ROLE prior: expected positives per image (mean label count of the data).",
    )
    parser.add_argument(
        "--role_lr_multiplier",
        type=float,
        default=10.0,
        help="ROLE: learning-rate multiplier of the label estimator.",
    )
    parser.add_argument("--em_alpha", type=float, default=0.1, help="EM: weight of the entropy term.")
    parser.add_argument(
        "--apl_beta", type=float, default=0.4, help="EM+APL: weight of the pseudo-label term."
    )
    parser.add_argument(
        "--apl_theta",
        type=float,
        default=0.05,
        help="EM+APL (reconstructed): per class, share of unobserved entries with the highest "
        "predictions given a soft pseudo-positive label after each epoch.",
    )
    parser.add_argument(
        "--delta_rel",
        type=float,
        default=0.2,
        help="LL-R/Ct/Cp: percent of unobserved labels added to the rejection set per epoch.",
    )
    # ---- AdaGC (reconstructed parts, see the module docstring) ----
    parser.add_argument(
        "--teacher_a_decay", type=float, default=0.999, help="AdaGC: per-iteration EMA teacher."
    )
    parser.add_argument("--teacher_b_decay", type=float, default=0.99, help="AdaGC: per-epoch EMA teacher.")
    parser.add_argument(
        "--trigger_ratio",
        type=float,
        default=0.9,
        help="AdaGC: early learning ends when the fitted curve's slope fell by this share of "
        "its largest value.",
    )
    parser.add_argument(
        "--trigger_min_epochs",
        type=int,
        default=3,
        help="AdaGC: epochs of agreement needed before the curve is fitted.",
    )
    parser.add_argument(
        "--trigger_patience",
        type=int,
        default=2,
        help="AdaGC: observed epochs after the detected epoch that must confirm it (a fit on the "
        "newest points alone extrapolates saturation too eagerly).",
    )
    parser.add_argument(
        "--rollback_window",
        type=int,
        default=3,
        help="AdaGC: per-epoch checkpoints kept during warm-up for the trigger's rollback.",
    )
    parser.add_argument(
        "--gc_start_epoch",
        type=int,
        default=0,
        help="AdaGC: start Gradient Calibration after this epoch instead of the adaptive "
        "trigger (0 = adaptive).",
    )
    parser.add_argument(
        "--gc_mode",
        default="target",
        choices=("target", "scale"),
        help="AdaGC: unobserved target becomes the pseudo label (target), or the AN gradient is "
        "multiplied by 1 - pseudo label (scale).",
    )
    parser.add_argument(
        "--mixup_alpha",
        type=float,
        default=0.2,
        help="AdaGC: Beta(alpha, alpha) mixup during Gradient Calibration (0 = off).",
    )
    # ---- demo sizes (small on purpose) ----
    parser.add_argument("--demo_images", type=int, default=480, help="Images generated by --demo.")
    cli.add_run_arguments(parser)
    return parser


# ---- configuration ----


def apply_config(args, parser):
    """Fill every flag the user did not type from the YAML config; unknown keys and bad values are errors."""
    if not args.config:
        return args
    path = require_file(args.config, "a YAML config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise InputError(
            path, f"not valid YAML ({str(error).splitlines()[0]})", "a mapping of flag names to values"
        )
    data = data or {}
    require(isinstance(data, dict), path, "top level is not a mapping", "flag names mapped to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in META_KEYS}
    unknown = sorted(set(data) - set(actions))
    require(
        not unknown,
        path,
        f"unknown key(s): {', '.join(map(str, unknown))}",
        "only the flag names listed by --help",
    )
    explicit = set(getattr(args, "explicit_args", []))
    for key, value in data.items():
        action = actions[key]
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if value is not None and action.type is not None:
            try:
                value = action.type(value) if action.type is str2bool else action.type(str(value))
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                raise InputError(path, f"key {key}: cannot read {value!r}", f"a {action.type.__name__} value")
        if action.choices is not None and value not in action.choices:
            what = "method" if key == "method" else f"value for {key}"
            raise InputError(
                path, f"unknown {what} {value!r}", f"one of {', '.join(map(str, action.choices))}"
            )
        if key not in explicit:
            setattr(args, key, value)
    return args


# ---- losses (all from logits; observed: 1 observed positive, 0 unobserved) ----
# Each returns (loss_matrix [B, C], batch_regulariser scalar); the training loss is the mean of the loss
# matrix over B x C entries plus the regulariser, as in Cole et al. (CVPR 2021) `compute_batch_loss`.


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
    """Assume negative: every unobserved label is a negative."""
    positive = tf.cast(observed > 0, logits.dtype)
    return positive * neg_log_sigmoid(logits) + (1 - positive) * neg_log_one_minus_sigmoid(logits), 0.0


def loss_an_ls(logits, observed, smoothing=0.1):
    """AN with label smoothing: target 1 - eps for positives, eps for assumed negatives."""
    positive = tf.cast(observed > 0, logits.dtype)
    target = positive * (1 - smoothing) + (1 - positive) * smoothing
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits), 0.0


def loss_wan(logits, observed):
    """Weighted AN: assumed negatives weighted 1 / (C - 1)."""
    num_classes = tf.cast(tf.shape(logits)[1], logits.dtype)
    positive = tf.cast(observed > 0, logits.dtype)
    return (
        positive * neg_log_sigmoid(logits)
        + (1 - positive) * neg_log_one_minus_sigmoid(logits) / (num_classes - 1)
    ), 0.0


def expected_positive_regulariser(probabilities, expected_num_positives):
    """R(f) = (mean over the batch of sum_c f_c - k)^2 (Cole et al., Eq. for EPR, squared norm)."""
    return tf.square(tf.reduce_mean(tf.reduce_sum(probabilities, axis=1)) - expected_num_positives)


def loss_epr(logits, observed, expected_num_positives):
    """Positive BCE on observed positives + expected-positive regulariser / C^2."""
    num_classes = tf.cast(tf.shape(logits)[1], logits.dtype)
    positive = tf.cast(observed > 0, logits.dtype)
    regulariser = expected_positive_regulariser(tf.sigmoid(logits), expected_num_positives) / num_classes**2
    return positive * neg_log_sigmoid(logits), regulariser


def loss_role(logits, observed, estimator_logits, expected_num_positives):
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
    regulariser = (
        0.5
        * (
            expected_positive_regulariser(predictions, expected_num_positives)
            + expected_positive_regulariser(estimates, expected_num_positives)
        )
        / num_classes**2
    )
    loss_matrix = 0.5 * (positive_classifier + positive_estimator) + 0.5 * (
        cross_classifier + cross_estimator
    )
    return loss_matrix, regulariser


def binary_entropy(logits):
    """H(sigmoid(z)) = p * softplus(-z) + (1 - p) * softplus(z)."""
    probabilities = tf.sigmoid(logits)
    return probabilities * neg_log_sigmoid(logits) + (1 - probabilities) * neg_log_one_minus_sigmoid(logits)


def loss_em(logits, observed, alpha):
    """EM (Zhou et al., ECCV 2022): BCE on positives, maximise entropy on unobserved (-alpha * H)."""
    positive = tf.cast(observed > 0, logits.dtype)
    unobserved = tf.cast(tf.equal(observed, 0), logits.dtype)
    return positive * neg_log_sigmoid(logits) - alpha * unobserved * binary_entropy(logits), 0.0


def loss_em_apl(logits, observed, alpha, beta):
    """EM + APL: entries stored as -s (s in (0, 1]) carry a soft pseudo label s, weighted by beta."""
    loss_matrix, _ = loss_em(logits, observed, alpha)
    pseudo = tf.cast(observed < 0, logits.dtype)
    soft_label = tf.maximum(-observed, 0.0)
    pseudo_term = beta * tf.nn.sigmoid_cross_entropy_with_logits(labels=soft_label, logits=logits)
    return loss_matrix + pseudo * pseudo_term, 0.0


def large_loss_selection(an_loss_matrix, observed, clean_rate):
    """LL (Kim et al., CVPR 2022): mask of the k largest AN losses among unobserved entries.

    k = ceil(B * C * (1 - clean_rate)), capped at the number of unobserved entries, chosen by rank with
    top_k so that exactly k entries are selected even when losses tie at the threshold (the reference's
    `loss < kth_value` test rejects every tie, and selects observed positives once k exceeds the
    unobserved count).
    """
    unobserved = tf.equal(tf.reshape(observed, [-1]), 0)
    flat = tf.where(unobserved, tf.reshape(an_loss_matrix, [-1]), tf.fill(tf.shape(unobserved), -np.inf))
    total = tf.cast(tf.size(flat), tf.float32)
    k = tf.cast(tf.math.ceil(total * (1.0 - clean_rate) - 1e-6), tf.int32)
    k = tf.clip_by_value(k, 0, tf.reduce_sum(tf.cast(unobserved, tf.int32)))
    top = tf.math.top_k(flat, k=k).indices
    selected = tf.scatter_nd(top[:, None], tf.ones_like(top, dtype=tf.bool), tf.shape(flat))
    return tf.reshape(selected, tf.shape(an_loss_matrix))


def loss_large_loss(logits, observed, clean_rate, mode):
    """LL-R rejects (zero loss), LL-Ct / LL-Cp correct (target 1) the selected large-loss entries."""
    an_matrix, _ = loss_an(logits, observed)
    selected = large_loss_selection(an_matrix, observed, clean_rate)
    replacement = tf.zeros_like(an_matrix) if mode == "ll_r" else neg_log_sigmoid(logits)
    return tf.where(selected, replacement, an_matrix), selected


def calibrated_targets(observed, pseudo_labels):
    """AdaGC Gradient Calibration: observed positives keep target 1, unobserved ones the pseudo label.

    BCE against this target gives dL/dz = sigmoid(z) - y_pseudo on unobserved logits instead of AN's
    sigmoid(z).
    """
    return tf.where(observed > 0, tf.ones_like(pseudo_labels), pseudo_labels)


def loss_gradient_calibration(logits, observed, pseudo_labels, mode="target"):
    """AdaGC loss matrix; mode 'scale' multiplies the AN gradient of unobserved logits by (1 - y_pseudo)."""
    if mode == "target":
        return tf.nn.sigmoid_cross_entropy_with_logits(
            labels=calibrated_targets(observed, pseudo_labels), logits=logits
        )
    positive = tf.cast(observed > 0, logits.dtype)
    return positive * neg_log_sigmoid(logits) + (1 - positive) * (
        1 - pseudo_labels
    ) * neg_log_one_minus_sigmoid(logits)


def ranking_agreement(probabilities, observed):
    """Chance-corrected agreement of a model with the observed labels, over (positive, unobserved) pairs.

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


# ---- early-learning detection (AdaGC step 3, reconstructed after AIO2 / ADELE) ----


def saturating_curve(x, a, b, c):
    return a * (1.0 - np.exp(-b * np.power(x, c)))


def saturating_slope(x, a, b, c):
    return a * b * c * np.power(x, c - 1.0) * np.exp(-b * np.power(x, c))


def detect_early_learning_end(agreement, ratio=0.9, min_epochs=3, patience=2):
    """Return (epoch, how, params): the first epoch where the agreement curve has flattened, or None.

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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = curve_fit(
                saturating_curve,
                epochs,
                values,
                p0=(max(values.max(), 1e-3), 0.5, 1.0),
                bounds=([0.0, 1e-6, 0.1], [1.0, 50.0, 5.0]),
                maxfev=20000,
            )
        residual = float(np.sqrt(np.mean((saturating_curve(epochs, *params) - values) ** 2)))
        if not np.all(np.isfinite(params)) or residual > 0.05:
            raise RuntimeError("poor fit")
        slopes = saturating_slope(epochs, *params)
        peak = np.maximum.accumulate(slopes)
        flattened = np.nonzero((peak - slopes) / np.maximum(peak, 1e-12) > ratio)[0] + 1
        flattened = flattened[flattened <= values.size - patience]
        return (int(flattened[0]) if flattened.size else None), "curve_fit", [float(p) for p in params]
    except (RuntimeError, ValueError):
        gains = np.diff(values)
        peak = np.maximum.accumulate(np.maximum(gains, 0.0))
        flattened = np.nonzero((peak > 0) & ((peak - gains) / np.maximum(peak, 1e-12) > ratio))[0] + 2
        flattened = flattened[flattened <= values.size - patience]
        return (int(flattened[0]) if flattened.size else None), "slope", None


# ---- data: AID-multilabel ----


def read_label_csv(path, class_names, one_positive=False):
    """Read `image name, <class columns>` with 0/1 entries; return (names, uint8 matrix in class order)."""
    path = require_file(path, "a CSV with an image-name column and one 0/1 column per class")
    with open(path, newline="", encoding="utf-8-sig") as file:
        rows = list(csv.reader(file))
    require(len(rows) >= 2, path, "no data rows", "a header and one row per image")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in class_names if c not in header[1:]]
    require(
        not missing,
        path,
        f"class column(s) missing: {', '.join(missing)}",
        f"columns {', '.join(class_names)} after the image-name column",
    )
    columns = [header.index(c) for c in class_names]
    names, matrix = [], np.zeros((len(rows) - 1, len(class_names)), np.uint8)
    for row_number, row in enumerate(rows[1:], start=2):
        require(len(row) == len(header), path, f"row {row_number} has {len(row)} fields", f"{len(header)}")
        try:
            values = [int(float(row[i])) for i in columns]
        except ValueError:
            raise InputError(
                path, f"row {row_number} has a non-numeric label", "0 or 1 in every class column"
            )
        require(all(v in (0, 1) for v in values), path, f"row {row_number} has a label outside 0/1", "0 or 1")
        if one_positive:
            require(
                sum(values) == 1,
                path,
                f"row {row_number} has {sum(values)} positives",
                "exactly one observed positive per image",
            )
        names.append(Path(row[0].strip()).stem)
        matrix[row_number - 2] = values
    return names, matrix


def list_aid_images(folder):
    return {p.stem: p for p in sorted(Path(folder).glob("*/*")) if p.suffix.lower() in (".jpg", ".jpeg")}


def single_positive_random(full_labels, seed):
    """One uniformly drawn true positive per row (seeded). Rows without positives stay all-unobserved."""
    rng = np.random.default_rng(seed)
    observed = np.zeros_like(full_labels, dtype=np.uint8)
    for row, labels in enumerate(full_labels):
        positives = np.flatnonzero(labels)
        if positives.size:
            observed[row, rng.choice(positives)] = 1
    return observed


def single_positive_dominant(full_labels, fractions):
    """The true positive with the largest area fraction."""
    masked = np.where(full_labels > 0, fractions, -np.inf)
    observed = np.zeros_like(full_labels, dtype=np.uint8)
    has_positive = full_labels.sum(1) > 0
    observed[np.flatnonzero(has_positive), np.argmax(masked, axis=1)[has_positive]] = 1
    return observed


def check_single_positives(observed, full_labels, path):
    require(
        observed.shape == full_labels.shape, path, f"shape {observed.shape}", f"shape {full_labels.shape}"
    )
    wrong = np.flatnonzero(((observed > 0) & (full_labels == 0)).any(1))
    require(
        wrong.size == 0,
        path,
        f"row {wrong[0] if wrong.size else 0} marks a label that is not a true positive",
        "one true positive per row (delete the file to regenerate it)",
    )


def load_aid(args):
    root = require_dir(
        args.data_dir,
        "the AID-multilabel folder with images_tr/, images_test/ and multilabel_correct_final.csv",
    )
    labels_csv = root / "multilabel_correct_final.csv"
    names, matrix = read_label_csv(labels_csv, AID_CLASSES)
    train_images = list_aid_images(require_dir(root / "images_tr", "images_tr/<SceneClass>/*.jpg"))
    test_images = list_aid_images(require_dir(root / "images_test", "images_test/<SceneClass>/*.jpg"))
    labelled = dict(zip(names, matrix))
    missing = [n for n in names if n not in train_images and n not in test_images]
    require(
        not missing,
        labels_csv,
        f"{len(missing)} row(s) have no image (first: {missing[0] if missing else ''})",
        "a .jpg in images_tr/ or images_test/ for every CSV row",
    )
    for stem, image_path in list(train_images.items()) + list(test_images.items()):
        require(
            stem in labelled, image_path, "image has no row in multilabel_correct_final.csv", "a label row"
        )
        with open(image_path, "rb") as file:
            require(file.read(2) == b"\xff\xd8", image_path, "not a JPEG file", "a JPEG image")
    train_names, test_names = sorted(train_images), sorted(test_images)
    train_full = np.stack([labelled[n] for n in train_names])

    # ---- single positives for images_tr (generated ones are saved next to the data and reused) ----
    if args.single_positive == "manual":
        manual_csv = root / "single_positive_labels_manual.csv"
        manual_names, manual = read_label_csv(manual_csv, AID_CLASSES, one_positive=True)
        lookup = dict(zip(manual_names, manual))
        absent = [n for n in train_names if n not in lookup]
        require(
            not absent,
            manual_csv,
            f"no row for training image {absent[0] if absent else ''}",
            "a row for every image in images_tr/",
        )
        train_observed = np.stack([lookup[n] for n in train_names])
        check_single_positives(train_observed, train_full, manual_csv)
    elif args.single_positive == "random":
        generated_csv = root / f"single_positive_labels_random_seed{args.seed}.csv"
        if generated_csv.exists():
            generated_names, generated = read_label_csv(generated_csv, AID_CLASSES, one_positive=False)
            lookup = dict(zip(generated_names, generated))
            require(
                all(n in lookup for n in train_names),
                generated_csv,
                "rows do not cover images_tr/",
                "one row per training image (delete the file to regenerate it)",
            )
            train_observed = np.stack([lookup[n] for n in train_names])
            check_single_positives(train_observed, train_full, generated_csv)
        else:
            train_observed = single_positive_random(train_full, args.seed)
            write_label_csv(generated_csv, train_names, train_observed, AID_CLASSES)
    else:
        raise InputError(
            "--single_positive",
            "dominant needs class area fractions, which AID does not have",
            "random or manual for AID",
        )

    # ---- seeded validation split of images_tr ----
    order = np.random.default_rng(args.seed).permutation(len(train_names))
    num_val = int(round(args.val_fraction * len(train_names)))
    val_rows, train_rows = np.sort(order[:num_val]), np.sort(order[num_val:])
    paths = [str(train_images[n]) for n in train_names]
    return {
        "class_names": AID_CLASSES,
        "train": {
            "sources": [paths[i] for i in train_rows],
            "full": train_full[train_rows],
            "observed": train_observed[train_rows],
        },
        "val": {
            "sources": [paths[i] for i in val_rows],
            "full": train_full[val_rows],
            "observed": train_observed[val_rows],
        },
        "test": {
            "sources": [str(test_images[n]) for n in test_names],
            "full": np.stack([labelled[n] for n in test_names]),
        },
        "reader": "aid",
    }


def write_label_csv(path, names, matrix, class_names):
    atomic.write_csv(
        path,
        [
            dict(zip(("image",) + tuple(class_names), [n] + [int(v) for v in row]))
            for n, row in zip(names, matrix)
        ],
        ("image",) + tuple(class_names),
    )


def decode_aid_image(path, image_size):
    """JPEG -> float32 [0, 1] at image_size x image_size (bilinear with antialiasing)."""
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    return image / 255.0


# ---- data: BigEarthNet v2 (reBEN LMDB) ----

_LMDB_ENVIRONMENTS = {}


def open_lmdb(path):
    """One read-only LMDB environment per process and path, shared by tf.data's reader threads.

    LMDB environments are thread-safe for readers, and LMDB forbids opening the same environment twice
    in one process, so the parallel map's threads share it; each read uses its own short transaction.
    """
    import lmdb

    key = (os.getpid(), str(path))
    if key not in _LMDB_ENVIRONMENTS:
        _LMDB_ENVIRONMENTS[key] = lmdb.open(
            str(path),
            readonly=True,
            lock=False,
            readahead=False,
            max_readers=2048,
            subdir=Path(path).is_dir(),
        )
    return _LMDB_ENVIRONMENTS[key]


def decode_ben_value(value, bands, image_size, out=None):
    """safetensors bytes (dict band -> 2-D uint16) -> float32 reflectance (H, W, bands) at image_size.

    Writes into `out` when given (one preallocated batch array, no per-image stacking copies).
    """
    import cv2
    from safetensors.numpy import load as load_safetensors

    arrays = load_safetensors(value)
    if out is None:
        out = np.empty((image_size, image_size, len(bands)), np.float32)
    for channel, band in enumerate(bands):
        if band not in arrays:
            raise KeyError(f"band {band} missing (has {', '.join(sorted(arrays))})")
        array = arrays[band]
        if array.ndim != 2:
            raise ValueError(f"band {band} has shape {array.shape}")
        if array.shape != (image_size, image_size):
            array = cv2.resize(
                array.astype(np.float32), (image_size, image_size), interpolation=cv2.INTER_LINEAR
            )
        out[..., channel] = array
    out *= np.float32(1e-4)
    return out


def read_ben_patches(lmdb_path, patch_ids, bands, image_size):
    """Read and decode a batch of patches in one read transaction -> float32 (N, H, W, bands)."""
    out = np.empty((len(patch_ids), image_size, image_size, len(bands)), np.float32)
    with open_lmdb(lmdb_path).begin(buffers=False) as transaction:
        for row, patch_id in enumerate(patch_ids):
            value = transaction.get(patch_id.encode("utf-8"))
            if value is None:
                raise ValueError(
                    f"{LMDB_ERROR_MARK}{lmdb_path}: key {patch_id} missing|an LMDB record per patch"
                )
            try:
                decode_ben_value(value, bands, image_size, out[row])
            except Exception as error:  # any decoding failure of user data is reported as one line
                raise ValueError(
                    f"{LMDB_ERROR_MARK}{lmdb_path}: value of key {patch_id} is undecodable ({error})"
                    f"|a safetensors dict of 2-D Sentinel-2 band arrays"
                ) from None
    return out


def read_ben_patch(lmdb_path, patch_id, bands, image_size):
    return read_ben_patches(lmdb_path, [patch_id], bands, image_size)[0]


def load_benv2(args):
    import pandas as pd

    root = require_dir(args.data_dir, "the BigEarthNet v2 folder with metadata.parquet and the LMDB")
    metadata_path = require_file(args.metadata or root / "metadata.parquet", "the reBEN metadata.parquet")
    lmdb_path = Path(args.lmdb_path or root / "lmdb")
    require(lmdb_path.exists(), lmdb_path, "LMDB not found", "the reBEN LMDB (folder with data.mdb)")
    try:
        metadata = pd.read_parquet(metadata_path)
    except Exception as error:
        raise InputError(
            metadata_path, f"unreadable parquet ({type(error).__name__})", "the reBEN metadata.parquet"
        )
    for column in ("patch_id", "labels", "split"):
        require(
            column in metadata.columns,
            metadata_path,
            f"column {column!r} missing",
            "columns patch_id, labels, split",
        )
    if args.drop_snow_cloud:
        for flag in ("contains_seasonal_snow", "contains_cloud_or_shadow"):
            if flag in metadata.columns:
                metadata = metadata[~metadata[flag].astype(bool)]
    class_index = {name: i for i, name in enumerate(BEN_CLASSES)}
    full = np.zeros((len(metadata), len(BEN_CLASSES)), np.uint8)
    for row, labels in enumerate(metadata["labels"]):
        for label in labels:
            require(
                label in class_index,
                metadata_path,
                f"patch {metadata['patch_id'].iloc[row]} has unknown label {label!r}",
                "one of the 19 BigEarthNet classes",
            )
            full[row, class_index[label]] = 1
    bands = [b.strip() for b in args.bands.split(",") if b.strip()]
    unknown = [b for b in bands if b not in S2_BAND_SIZES]
    require(
        bands and not unknown,
        "--bands",
        f"unknown band(s) {', '.join(unknown)}",
        f"a comma list of {', '.join(S2_BAND_SIZES)}",
    )
    split = metadata["split"].astype(str).to_numpy()
    patch_ids = metadata["patch_id"].astype(str).to_numpy()
    parts = {name: np.flatnonzero(split == name) for name in ("train", "validation", "test")}
    for name, rows in parts.items():
        require(rows.size, metadata_path, f"no {name!r} rows", "train, validation and test splits")

    # Every key must exist before training starts; a sample of values must decode.
    with open_lmdb(lmdb_path).begin() as transaction:
        keys = {bytes(k).decode("utf-8", "replace") for k in transaction.cursor().iternext(values=False)}
    absent = [p for p in patch_ids if p not in keys]
    require(
        not absent,
        lmdb_path,
        f"{len(absent)} patch id(s) missing as keys (first: {absent[0] if absent else ''})",
        "one record per metadata.parquet patch_id",
    )
    image_size = args.image_size
    for rows in parts.values():
        for patch_id in patch_ids[rows[:16]]:
            try:
                read_ben_patch(lmdb_path, patch_id, bands, image_size)
            except ValueError as error:
                raise lmdb_input_error(str(error))

    train_full = full[parts["train"]]
    labels_path = root / f"train_{args.single_positive}_single_labels.npy"
    if labels_path.exists():
        try:
            observed = np.load(labels_path, allow_pickle=False)
        except ValueError as error:
            raise InputError(labels_path, f"unreadable .npy ({error})", "a numeric array")
        if (
            observed.ndim == 1
            and np.issubdtype(observed.dtype, np.integer)
            and observed.size == len(train_full)
        ):
            require(
                observed.min() >= 0 and observed.max() < len(BEN_CLASSES),
                labels_path,
                "class index out of range",
                "indices 0..18",
            )
            observed = np.eye(len(BEN_CLASSES), dtype=np.uint8)[observed]
        require(
            observed.shape == train_full.shape,
            labels_path,
            f"shape {observed.shape}",
            f"shape {train_full.shape} (training patches x 19 classes, +1 observed / 0 unobserved)",
        )
        require(
            np.isin(observed, (0, 1)).all(),
            labels_path,
            "values outside 0/1",
            "+1 observed positive, 0 unobserved",
        )
        observed = observed.astype(np.uint8)
        check_single_positives(observed, train_full, labels_path)
    elif args.single_positive == "random":
        observed = single_positive_random(train_full, args.seed)
        save_labels_npy(labels_path, observed)
    elif args.single_positive == "dominant":
        observed = single_positive_dominant(
            train_full, read_class_fractions(args, root, patch_ids[parts["train"]])
        )
        save_labels_npy(labels_path, observed)
    else:
        raise InputError(
            "--single_positive",
            "manual single positives exist only for AID",
            "random or dominant for BigEarthNet v2",
        )
    return {
        "class_names": BEN_CLASSES,
        "train": {"sources": list(patch_ids[parts["train"]]), "full": train_full, "observed": observed},
        "val": {
            "sources": list(patch_ids[parts["validation"]]),
            "full": full[parts["validation"]],
            "observed": single_positive_random(full[parts["validation"]], args.seed),
        },
        "test": {"sources": list(patch_ids[parts["test"]]), "full": full[parts["test"]]},
        "reader": "benv2",
        "lmdb_path": str(lmdb_path),
        "bands": bands,
    }


def save_labels_npy(path, observed):
    with atomic.atomic_path(path) as temporary:
        np.save(temporary, observed.astype(np.uint8), allow_pickle=False)


def read_class_fractions(args, root, train_ids):
    import pandas as pd

    path = require_file(
        args.class_fractions or root / "class_fractions.csv",
        "a class-fraction table (patch_id + one column per class) for dominant single positives",
    )
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = [c for c in ("patch_id",) + BEN_CLASSES if c not in table.columns]
    require(
        not missing, path, f"column(s) missing: {', '.join(missing[:3])}", "patch_id + the 19 class names"
    )
    table = table.set_index(table["patch_id"].astype(str))
    absent = [p for p in train_ids if p not in table.index]
    require(
        not absent,
        path,
        f"no row for training patch {absent[0] if absent else ''}",
        "a row per training patch",
    )
    return table.loc[list(train_ids), list(BEN_CLASSES)].to_numpy(np.float64)


def lmdb_input_error(message):
    """Turn a reader's marked message `MARK<file>: <problem>|<expected>` into an InputError."""
    body = message.split(LMDB_ERROR_MARK, 1)[1].split("\n")[0]
    location, _, rest = body.partition(": ")
    problem, _, expected = rest.partition("|")
    return InputError(location, problem.strip(), expected.strip() or None)


# ---- tf.data pipelines ----


def make_loader(data, image_size):
    """Function sources -> float32 images: per image (AID JPEGs) or per batch (LMDB, marked `.batched`)."""
    if data["reader"] == "aid":
        return lambda source: decode_aid_image(source, image_size)
    lmdb_path, bands = data["lmdb_path"], data["bands"]

    def read_numpy(patch_ids):
        # One Python call per batch: the per-call cost of py_function would otherwise dominate small patches.
        return read_ben_patches(lmdb_path, [p.decode("utf-8") for p in patch_ids.numpy()], bands, image_size)

    def read(patch_ids):
        images = tf.py_function(read_numpy, [patch_ids], tf.float32)
        return tf.ensure_shape(images, (None, image_size, image_size, len(bands)))

    read.batched = True
    return read


def augment_batch(images, seed):
    """Random flips and 90-degree rotations per image (stateless: the same for a given epoch and batch)."""
    count = tf.shape(images)[0]
    draws = tf.random.stateless_uniform(tf.stack([count, 3]), seed)
    images = tf.where((draws[:, 0] < 0.5)[:, None, None, None], tf.reverse(images, [2]), images)
    images = tf.where((draws[:, 1] < 0.5)[:, None, None, None], tf.reverse(images, [1]), images)
    turns = tf.cast(draws[:, 2] * 4, tf.int32)
    rotations = tf.stack([tf.image.rot90(images, k) for k in range(4)])
    return tf.gather_nd(rotations, tf.stack([turns, tf.range(count)], axis=1))


def load_batches(indices, sources, loader, batch_size):
    """Map a dataset of row indices to (images, indices) batches with parallel reads."""
    batched = getattr(loader, "batched", False)
    loader = tf.autograph.experimental.do_not_convert(loader)
    sources = tf.constant(np.asarray(sources))

    def load(index):
        return loader(tf.gather(sources, index)), index

    if batched:
        # The LMDB decode runs in Python under the GIL: a few reader threads overlap its I/O and the GIL-free
        # parts (cv2, numpy casts); many threads only contend (measured by bench/multilabel_input_speed.py).
        threads = min(4, os.cpu_count() or 1)
        return indices.batch(batch_size).map(load, num_parallel_calls=threads)
    return indices.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)


def make_dataset(sources, loader, batch_size):
    """(images, row indices) batches in row order, for validation, test and prediction."""
    indices = tf.data.Dataset.range(len(sources))
    return load_batches(indices, sources, loader, batch_size).prefetch(tf.data.AUTOTUNE)


class TrainBatches:
    """Shuffled, augmented training batches; built once, re-ordered per epoch through two small variables.

    `for_epoch(e)` sets the order to a permutation seeded by (seed, e) and the augmentation seeds to e, so an
    epoch's batches are the same whether the run was interrupted and resumed or not, and the map functions
    are traced once instead of once per epoch.
    """

    def __init__(self, sources, loader, batch_size, seed, augment_images):
        self.seed, self.count = seed, len(sources)
        self.order = tf.Variable(np.arange(self.count, dtype=np.int64), trainable=False)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        indices = tf.data.Dataset.range(self.count).map(lambda position: tf.gather(self.order, position))
        dataset = load_batches(indices, sources, loader, batch_size)
        if augment_images:

            def augment(images, index):
                seed = tf.stack([tf.cast(self.seed, tf.int64) * 1000 + self.epoch, index[0]])
                return augment_batch(images, seed), index

            dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        self.dataset = dataset.prefetch(tf.data.AUTOTUNE)

    def for_epoch(self, epoch):
        self.order.assign(np.random.default_rng([self.seed, epoch]).permutation(self.count))
        self.epoch.assign(epoch)
        return self.dataset


def band_statistics(sources, loader, limit=256):
    """Per-band mean and variance over up to `limit` training images (stored in the model's first layer)."""
    count, total, total_square = 0, 0.0, 0.0
    for images, _ in make_dataset(list(sources[:limit]), loader, 32):
        values = tf.reshape(images, (-1, images.shape[-1])).numpy().astype(np.float64)
        count += len(values)
        total = total + values.sum(0)
        total_square = total_square + (values**2).sum(0)
    mean = total / count
    return mean, np.maximum(total_square / count - mean**2, 1e-6)


# ---- model ----


def build_classifier(backbone, input_shape, num_classes, band_mean=None, band_variance=None, weights=None):
    """Backbone + global average pool + Dense(C) logits; the first layer standardises each band."""
    inputs = keras.Input(input_shape, name="image")
    features = inputs
    if band_mean is not None:
        features = layers.Normalization(mean=band_mean, variance=band_variance, name="band_normalization")(
            features
        )
    if backbone == "resnet50":
        base = keras.applications.ResNet50(
            include_top=False, weights=None, input_shape=input_shape, pooling="avg"
        )
    elif backbone == "small_cnn":
        image = keras.Input(input_shape)
        x = image
        for width in (16, 32, 64):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.Activation("relu")(x)
            x = layers.MaxPooling2D()(x)
        base = keras.Model(image, layers.GlobalAveragePooling2D()(x), name="small_cnn")
    else:
        vector = keras.Input(input_shape)
        base = keras.Model(vector, layers.Dense(64, activation="relu")(vector), name="mlp")
    if weights:
        weights_path = require_file(weights, "a Keras weights file for the backbone")
        try:
            base.load_weights(str(weights_path))
        except Exception as error:
            raise InputError(
                weights_path,
                f"weights do not fit the {backbone} backbone ({type(error).__name__})",
                f"weights saved from a {backbone} with input {input_shape}",
            )
    logits = layers.Dense(num_classes, name="logits")(base(features))
    return keras.Model(inputs, logits, name=f"{backbone}_spml")


# ---- training ----


class SpmlTrainer:
    """Holds the student, the optional teachers / label estimator / label matrix, and the compiled steps."""

    def __init__(self, args, strategy, build_model, train_observed, train_full):
        self.args, self.strategy = args, strategy
        self.method = args.method
        with strategy.scope():
            self.student = build_model()
            self.optimizer = make_optimizer(args, args.learning_rate)
            self.optimizer.build(self.student.trainable_variables)
            # Observed labels live on the device: LL-Cp and APL rewrite them between steps.
            self.observed_matrix = tf.Variable(
                train_observed.astype(np.float32), trainable=False, name="observed"
            )
            self.full_matrix = tf.constant(train_full.astype(np.float32))
            self.clean_rate = tf.Variable(1.0, trainable=False, name="clean_rate")
            self.step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_counter")
            self.teachers = []
            if self.method == "adagc":
                for _ in ("teacher_a", "teacher_b"):
                    teacher = build_model()
                    teacher.set_weights(self.student.get_weights())
                    self.teachers.append(teacher)
            self.estimator_logits = None
            if self.method == "role":
                self.estimator_logits = tf.Variable(
                    role_initial_estimates(train_observed, args.seed), name="role"
                )
                self.estimator_optimizer = make_optimizer(args, args.learning_rate * args.role_lr_multiplier)
                self.estimator_optimizer.build([self.estimator_logits])
        self.train_predictions = np.zeros(train_observed.shape, np.float32)
        self._steps = {}

    # -- state for checkpoints, rollback and --resume --
    def state_arrays(self):
        arrays = {f"student/{i}": w for i, w in enumerate(self.student.get_weights())}
        for t, teacher in enumerate(self.teachers):
            arrays.update({f"teacher{t}/{i}": w for i, w in enumerate(teacher.get_weights())})
        arrays.update({f"optimizer/{i}": v.numpy() for i, v in enumerate(self.optimizer.variables)})
        arrays["observed"] = self.observed_matrix.numpy()
        arrays["step_counter"] = self.step_counter.numpy()
        if self.estimator_logits is not None:
            arrays["role"] = self.estimator_logits.numpy()
            arrays.update(
                {f"role_optimizer/{i}": v.numpy() for i, v in enumerate(self.estimator_optimizer.variables)}
            )
        return arrays

    def save_state(self, path):
        with atomic.atomic_path(path) as temporary, open(temporary, "wb") as file:
            np.savez(file, **self.state_arrays())

    def load_state(self, path):
        with np.load(path, allow_pickle=False) as arrays:

            def collect(prefix):
                return [
                    arrays[f"{prefix}/{i}"]
                    for i in range(sum(k.startswith(prefix + "/") for k in arrays.files))
                ]

            self.student.set_weights(collect("student"))
            for t, teacher in enumerate(self.teachers):
                teacher.set_weights(collect(f"teacher{t}"))
            for variable, value in zip(self.optimizer.variables, collect("optimizer")):
                variable.assign(value)
            self.observed_matrix.assign(arrays["observed"])
            self.step_counter.assign(arrays["step_counter"])
            if self.estimator_logits is not None:
                self.estimator_logits.assign(arrays["role"])
                for variable, value in zip(self.estimator_optimizer.variables, collect("role_optimizer")):
                    variable.assign(value)

    # -- one replica's step --
    def _replica_step(self, images, indices, phase):
        observed = tf.gather(self.observed_matrix, indices)
        variables = list(self.student.trainable_variables)
        extra = {}
        with tf.GradientTape() as tape:
            if self.method == "adagc":
                # Teacher A's agreement with the observed positives is the early-learning signal (step 3).
                teacher_a = tf.sigmoid(self.teachers[0](images, training=False))
                extra["agreed"], extra["agreement_pairs"] = ranking_agreement(teacher_a, observed)
                if phase == "gc":
                    # Step 2: pseudo label = mean of both teachers' sigmoid outputs, never differentiated.
                    teacher_b = tf.sigmoid(self.teachers[1](images, training=False))
                    pseudo_labels = tf.stop_gradient(0.5 * (teacher_a + teacher_b))
            if self.method == "adagc" and phase == "gc":
                loss_matrix = self._gradient_calibration_loss(images, observed, pseudo_labels)
                regulariser = 0.0
                logits = None
            else:
                logits = self.student(images, training=True)
                loss_matrix, regulariser = self._method_loss(logits, observed, indices, phase, extra)
            per_example = tf.reduce_mean(loss_matrix, axis=1)
            loss = tf.nn.compute_average_loss(per_example) + regulariser / self.strategy.num_replicas_in_sync
            if self.estimator_logits is not None:
                variables.append(self.estimator_logits)
        gradients = tape.gradient(loss, variables)
        if self.estimator_logits is not None:
            self.optimizer.apply_gradients(zip(gradients[:-1], variables[:-1]))
            self.estimator_optimizer.apply_gradients([(gradients[-1], self.estimator_logits)])
        else:
            self.optimizer.apply_gradients(zip(gradients, variables))
        probabilities = tf.sigmoid(logits) if logits is not None else tf.zeros_like(observed)
        return loss, probabilities, indices, extra

    def _method_loss(self, logits, observed, indices, phase, extra):
        args, method = self.args, self.method
        if method == "full":
            return loss_full(logits, tf.gather(self.full_matrix, indices))
        if method in ("an", "adagc"):
            return loss_an(logits, observed)
        if method == "an_ls":
            return loss_an_ls(logits, observed, args.label_smoothing)
        if method == "wan":
            return loss_wan(logits, observed)
        if method == "epr":
            return loss_epr(logits, observed, args.expected_num_positives)
        if method == "role":
            return loss_role(
                logits, observed, tf.gather(self.estimator_logits, indices), args.expected_num_positives
            )
        if method == "em":
            return loss_em(logits, observed, args.em_alpha)
        if method == "em_apl":
            return loss_em_apl(logits, observed, args.em_alpha, args.apl_beta)
        loss_matrix, selected = loss_large_loss(logits, observed, self.clean_rate, method)
        extra["corrected"] = tf.cast(selected, tf.float32)
        return loss_matrix, 0.0

    def _gradient_calibration_loss(self, images, observed, pseudo_labels):
        """AdaGC step 4-5: calibrated loss, with mixup of images and calibrated targets."""
        args = self.args
        if args.mixup_alpha <= 0:
            return loss_gradient_calibration(
                self.student(images, training=True), observed, pseudo_labels, args.gc_mode
            )
        seed = tf.stack([tf.cast(args.seed, tf.int64), self.step_counter])
        gamma_a = tf.random.stateless_gamma((), seed, alpha=args.mixup_alpha)
        gamma_b = tf.random.stateless_gamma((), seed + 1, alpha=args.mixup_alpha)
        lam = gamma_a / (gamma_a + gamma_b + 1e-12)
        permutation = tf.argsort(tf.random.stateless_uniform((tf.shape(images)[0],), seed + 2))
        mixed = lam * images + (1 - lam) * tf.gather(images, permutation)
        logits = self.student(mixed, training=True)
        # BCE is linear in its target, so this equals the loss against the mixed calibrated targets.
        return lam * loss_gradient_calibration(logits, observed, pseudo_labels, args.gc_mode) + (
            1 - lam
        ) * loss_gradient_calibration(
            logits, tf.gather(observed, permutation), tf.gather(pseudo_labels, permutation), args.gc_mode
        )

    def _distributed_step(self, images, indices, phase):
        loss, probabilities, indices, extra = self.strategy.run(
            self._replica_step, args=(images, indices, phase)
        )
        total_loss = self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        sums = {
            key: self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
            for key, value in extra.items()
            if key != "corrected"
        }
        all_indices = tf.concat(self.strategy.experimental_local_results(indices), axis=0)
        all_probabilities = tf.concat(self.strategy.experimental_local_results(probabilities), axis=0)
        if self.method == "ll_cp":
            corrected = tf.concat(self.strategy.experimental_local_results(extra["corrected"]), axis=0)
            # LL-Cp: corrected labels become observed positives for the rest of training.
            self.observed_matrix.scatter_max(tf.IndexedSlices(corrected, all_indices))
        if self.method == "adagc":
            # Mean-teacher decay ramp (Tarvainen & Valpola) so that short runs still get a useful teacher.
            step = tf.cast(self.step_counter, tf.float32)
            decay = tf.minimum(self.args.teacher_a_decay, (1.0 + step) / (10.0 + step))
            for teacher_weight, student_weight in zip(self.teachers[0].weights, self.student.weights):
                teacher_weight.assign(decay * teacher_weight + (1.0 - decay) * student_weight)
        self.step_counter.assign_add(1)
        return total_loss, all_probabilities, all_indices, sums

    def train_epoch(self, dataset, phase, epoch):
        # LL (Kim et al.): no modification in epoch 1, then delta_rel percent more of the labels per epoch.
        self.clean_rate.assign(max(0.0, 1.0 - (epoch - 1) * self.args.delta_rel / 100.0))
        distributed = self.strategy.experimental_distribute_dataset(dataset)
        if phase not in self._steps:
            # One graph per phase for full and partial batches (the signature leaves the batch size open);
            # no tensor-dependent Python control flow, so autograph is skipped (it costs seconds).
            self._steps[phase] = tf.function(
                lambda images, indices: self._distributed_step(images, indices, phase),
                input_signature=list(distributed.element_spec),
                autograph=False,
            )
        step = self._steps[phase]
        losses, agreed, positives = [], 0.0, 0.0
        for images, indices in distributed:
            loss, probabilities, batch_indices, sums = step(images, indices)
            losses.append(float(loss))
            self.train_predictions[batch_indices.numpy()] = probabilities.numpy()
            agreed += float(sums.get("agreed", 0.0))
            positives += float(sums.get("agreement_pairs", 0.0))
        return float(np.mean(losses)), (agreed / positives if positives else float("nan"))

    def end_epoch(self, epoch, phase, original_observed):
        """Per-epoch updates: teacher B EMA (AdaGC), rejection schedule (LL), APL pseudo labels (EM+APL)."""
        args = self.args
        if self.method == "adagc":
            decay = min(args.teacher_b_decay, (1.0 + epoch) / (10.0 + epoch))
            for teacher_weight, student_weight in zip(self.teachers[1].weights, self.student.weights):
                teacher_weight.assign(decay * teacher_weight + (1.0 - decay) * student_weight)
        if self.method == "em_apl":
            self.observed_matrix.assign(
                apl_pseudo_labels(original_observed, self.train_predictions, args.apl_theta)
            )


def apl_pseudo_labels(original_observed, predictions, theta):
    """EM+APL (reconstructed): per class, the top-theta share of unobserved entries by prediction get -p."""
    observed = original_observed.astype(np.float32).copy()
    for column in range(observed.shape[1]):
        unobserved = np.flatnonzero(original_observed[:, column] == 0)
        count = int(math.floor(theta * unobserved.size))
        if count:
            chosen = unobserved[np.argsort(-predictions[unobserved, column], kind="stable")[:count]]
            observed[chosen, column] = -np.clip(predictions[chosen, column], 1e-6, 1.0)
    return observed


def role_initial_estimates(observed, seed):
    """ROLE estimator init (Cole et al.): observed positives at logit(0.995), others in +-logit(0.6)."""
    rng = np.random.default_rng(seed)
    bound = math.log(0.6 / 0.4)
    logits = (bound * (2 * rng.random(observed.shape) - 1)).astype(np.float32)
    logits[observed > 0] = math.log(0.995 / 0.005)
    return logits


def make_optimizer(args, learning_rate):
    if args.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=args.weight_decay)
    return keras.optimizers.Adam(learning_rate=learning_rate)


def predict_probabilities(model, dataset):
    outputs = [tf.sigmoid(model(images, training=False)).numpy() for images, _ in dataset]
    return np.concatenate(outputs, axis=0).astype(np.float64)


# ---- evaluation ----


def average_precision(labels, scores):
    """AP = mean precision at each positive's rank (ties broken by a stable sort), as sklearn computes it."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(labels, scores))


def multilabel_metrics(scores, labels, class_names, threshold=0.5):
    """mAP (macro over classes with a test positive; skipped classes reported), micro AP, F1 at threshold."""
    labels = np.asarray(labels).astype(np.int64)
    predicted = (np.asarray(scores) >= threshold).astype(np.int64)
    per_class, kept_ap, kept_f1 = [], [], []
    for c, name in enumerate(class_names):
        positives = int(labels[:, c].sum())
        true_positive = int((predicted[:, c] & labels[:, c]).sum())
        denominator = int(predicted[:, c].sum()) + positives
        f1 = 2 * true_positive / denominator if denominator else float("nan")
        ap = average_precision(labels[:, c], scores[:, c]) if positives else float("nan")
        if positives:
            kept_ap.append(ap)
            kept_f1.append(f1)
        per_class.append({"class": name, "test_positives": positives, "ap": ap, "f1": f1})
    tp = int((predicted & labels).sum())
    micro_denominator = int(predicted.sum() + labels.sum())
    return {
        "mAP": float(np.mean(kept_ap)) if kept_ap else float("nan"),
        "micro_AP": average_precision(labels.ravel(), np.asarray(scores).ravel())
        if labels.any()
        else float("nan"),
        "macro_F1": float(np.mean(kept_f1)) if kept_f1 else float("nan"),
        "micro_F1": 2 * tp / micro_denominator if micro_denominator else float("nan"),
        "classes_skipped": [row["class"] for row in per_class if row["test_positives"] == 0],
        "per_class": per_class,
    }


def save_dynamics_plot(path, log_rows, agreement, trigger_epoch, fit_params):
    """Agreement curve (with fit and trigger) and the loss / val mAP of the epochs that were kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # After a rollback the warm-up epochs past the trigger were replaced by Gradient Calibration epochs.
    kept = [
        row
        for row in log_rows
        if row["phase"] != "warmup" or not trigger_epoch or row["epoch"] <= trigger_epoch
    ]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    if agreement:
        left.plot(range(1, len(agreement) + 1), agreement, "o-", label="teacher agreement (warm-up)")
    else:
        left.plot([row["epoch"] for row in kept], [row["agreement"] for row in kept], "o-", label="agreement")
    if fit_params:
        grid = np.linspace(1, max(len(agreement), 1), 200)
        left.plot(grid, saturating_curve(grid, *fit_params), "--", label="fit a(1-exp(-b x^c))")
    epochs = [row["epoch"] for row in kept]
    if trigger_epoch:
        for axis in (left, right):
            axis.axvline(trigger_epoch, color="red", linestyle=":", label=f"trigger (epoch {trigger_epoch})")
    left.set_xlabel("epoch")
    left.set_ylabel("agreement with observed positives")
    left.legend(fontsize=8)
    right.plot(epochs, [row["train_loss"] for row in kept], "o-", label="train loss")
    right.plot(epochs, [row["val_mAP"] for row in kept], "s-", label="val mAP")
    right.set_xlabel("epoch")
    right.legend(fontsize=8)
    figure.tight_layout()
    atomic.save_figure(figure, path)
    plt.close(figure)


# ---- demo data (AID layout) ----

DEMO_SCENES = {
    "Airport": ("airplane", "pavement", "bare-soil", "grass", "cars", "buildings"),
    "Beach": ("sand", "sea", "water", "trees", "buildings"),
    "Port": ("dock", "ship", "sea", "water", "buildings", "cars", "tanks"),
    "Residential": ("buildings", "cars", "pavement", "trees", "grass", "court", "mobile-home"),
    "Farmland": ("field", "grass", "bare-soil", "trees", "chaparral", "buildings"),
}


def demo_label_pattern(label_index, size):
    """A fixed stamp per class: its own hue, and stripes of a class-specific orientation and period."""
    import cv2

    hue = np.uint8(180 * label_index / len(AID_CLASSES))
    colour = cv2.cvtColor(np.array([[[hue, 220, 230]]], np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.int32)
    y, x = np.mgrid[0:size, 0:size]
    period = 3 + label_index % 3
    texture = (((x if label_index % 2 else y) // period) % 2 == 0)[..., None]
    return np.where(texture, colour, colour // 3).astype(np.uint8)


def write_aid_demo(root, num_images, seed, image_size=64):
    """AID-multilabel layout with textured class stamps; returns the folder. Reused when complete."""
    import cv2

    root = Path(root)
    if (root / "multilabel_correct_final.csv").exists() and (
        root / "single_positive_labels_manual.csv"
    ).exists():
        return root
    rng = np.random.default_rng(seed)
    stamp = image_size // 3
    patterns = [demo_label_pattern(c, stamp) for c in range(len(AID_CLASSES))]
    names, matrix, manual = [], [], []
    for i in range(num_images):
        scene = list(DEMO_SCENES)[i % len(DEMO_SCENES)]
        candidates = [AID_CLASSES.index(c) for c in DEMO_SCENES[scene]]
        count = int(rng.integers(2, 4))
        present = rng.choice(candidates, size=count, replace=False)
        image = rng.normal(110, 12, size=(image_size, image_size, 3)).clip(0, 255).astype(np.uint8)
        areas = []
        for c in present:
            scale = int(rng.integers(stamp // 2, stamp + 1))
            top, left = rng.integers(0, image_size - scale, size=2)
            image[top : top + scale, left : left + scale] = cv2.resize(patterns[c], (scale, scale))
            areas.append(scale * scale)
        split = "images_tr" if i % 4 else "images_test"
        name = f"{scene.lower()}_{i}"
        with atomic.atomic_path(root / split / scene / f"{name}.jpg") as temporary:
            cv2.imwrite(str(temporary), image[..., ::-1])
        labels = np.zeros(len(AID_CLASSES), np.uint8)
        labels[present] = 1
        chosen = np.zeros_like(labels)
        chosen[present[int(np.argmax(areas))]] = 1
        names.append(name)
        matrix.append(labels)
        manual.append(chosen)
    write_label_csv(
        root / "single_positive_labels_manual.csv",
        [n for i, n in enumerate(names) if i % 4],
        [m for i, m in enumerate(manual) if i % 4],
        AID_CLASSES,
    )
    write_label_csv(root / "multilabel_correct_final.csv", names, matrix, AID_CLASSES)
    return root


def write_benv2_demo(root, num_patches, seed):
    """A tiny reBEN-layout copy: LMDB of safetensors band dicts + metadata.parquet + class_fractions.csv."""
    import lmdb
    import pandas as pd
    from safetensors.numpy import save as save_safetensors

    root = Path(root)
    if (root / "metadata.parquet").exists():
        return root
    rng = np.random.default_rng(seed)
    rows, fractions = [], []
    (root / "lmdb").mkdir(parents=True, exist_ok=True)
    environment = lmdb.open(str(root / "lmdb"), map_size=1 << 30)
    with environment.begin(write=True) as transaction:
        for i in range(num_patches):
            present = rng.choice(len(BEN_CLASSES), size=int(rng.integers(1, 4)), replace=False)
            fraction = np.zeros(len(BEN_CLASSES))
            fraction[present] = rng.dirichlet(np.ones(len(present)))
            bands = {}
            for band, size in S2_BAND_SIZES.items():
                level = 300 + 400 * np.sin(np.arange(len(BEN_CLASSES)) + len(band)) @ fraction + 500
                bands[band] = (rng.normal(level, 50, size=(size, size))).clip(0, 65535).astype(np.uint16)
            patch_id = f"S2A_MSIL2A_DEMO_{i:05d}"
            transaction.put(patch_id.encode(), save_safetensors(bands))
            split = ("train", "train", "train", "validation", "test")[i % 5]
            rows.append(
                {
                    "patch_id": patch_id,
                    "labels": [BEN_CLASSES[c] for c in sorted(present)],
                    "split": split,
                    "country": "Demo",
                    "contains_seasonal_snow": False,
                    "contains_cloud_or_shadow": False,
                }
            )
            fractions.append([patch_id] + list(fraction))
    environment.close()
    pd.DataFrame(fractions, columns=["patch_id"] + list(BEN_CLASSES)).to_csv(
        root / "class_fractions.csv", index=False
    )
    with atomic.atomic_path(root / "metadata.parquet") as temporary:
        pd.DataFrame(rows).to_parquet(temporary)
    return root


# ---- the run ----


def resolve_defaults(args):
    """Demo sizes and dataset-dependent defaults (only where the user set nothing)."""
    explicit = set(getattr(args, "explicit_args", []))
    if args.demo:
        demo_defaults = {
            "backbone": "small_cnn",
            "image_size": 48,
            "epochs": 10,
            "batch_size": 16,
            "learning_rate": 3e-3,
            "teacher_a_decay": 0.99,
            "rollback_window": 2,
            "expected_num_positives": 3.5,
        }
        for key, value in demo_defaults.items():
            if key not in explicit and not (args.config and getattr(args, key) != get_default(key)):
                setattr(args, key, value)
        if "data_dir" not in explicit:
            args.data_dir = str(Path(args.results_dir) / "demo_data" / SCRIPT_STEM / args.dataset)
    if args.image_size is None:
        args.image_size = 224 if args.dataset == "aid" else 120
    if args.method in ("epr", "role"):
        require(
            args.expected_num_positives is not None,
            "--expected_num_positives",
            "not set",
            "the mean number of positives per image (needed by EPR and ROLE)",
        )
    require(
        args.epochs >= 1 and args.batch_size >= 1,
        "--epochs/--batch_size",
        "must be positive",
        "integers >= 1",
    )
    require(0 <= args.val_fraction < 1, "--val_fraction", f"{args.val_fraction}", "a share in [0, 1)")
    if args.run_name is None:
        if args.config:
            args.run_name = Path(args.config).stem
        elif args.demo:
            args.run_name = f"demo_{args.method}" + ("" if args.dataset == "aid" else f"_{args.dataset}")
        else:
            args.run_name = f"{args.method}_{args.dataset}_{args.single_positive}"
    return args


def get_default(key):
    return get_args_parser().get_default(key)


def load_data(args):
    if args.demo:
        if args.dataset == "aid":
            write_aid_demo(args.data_dir, args.demo_images, seed=12345)
        else:
            write_benv2_demo(args.data_dir, args.demo_images, seed=12345)
    return load_aid(args) if args.dataset == "aid" else load_benv2(args)


def evaluate_and_write(run_dir, model, test_dataset, test_full, class_names, prefix=""):
    scores = predict_probabilities(model, test_dataset)
    metrics = multilabel_metrics(scores, test_full, class_names)
    atomic.write_csv(
        run_dir / f"{prefix}per_class.csv", metrics["per_class"], ("class", "test_positives", "ap", "f1")
    )
    return metrics


def summary_line(metrics):
    trigger = metrics.get("trigger_epoch")
    return (
        f"test mAP {metrics['mAP']:.4f} | micro AP {metrics['micro_AP']:.4f} "
        f"| macro F1 {metrics['macro_F1']:.4f} "
        f"| micro F1 {metrics['micro_F1']:.4f} | method {metrics['method']}"
        + (f" | trigger epoch {trigger}" if metrics["method"] == "adagc" else "")
    )


def run_training(args, data, build_model, run_dir, train_dataset_fn, val_dataset, test_dataset, strategy):
    """The epoch loop shared by every method; writes log.csv, checkpoints, best_model.keras, metrics.json."""
    train, val = data["train"], data["val"]
    trainer = SpmlTrainer(args, strategy, build_model, train["observed"], train["full"])
    checkpoint_dir = run_dir / "checkpoints"
    state_path = run_dir / "train_state.json"
    state = {
        "epoch": 0,
        "phase": "warmup" if args.method == "adagc" else "train",
        "trigger_epoch": None,
        "trigger_detected_at": None,
        "trigger_how": None,
        "fit_params": None,
        "best_val_mAP": -1.0,
        "best_epoch": None,
        "log": [],
        "agreement": [],
    }
    if args.resume and state_path.exists():
        import json

        state = json.loads(state_path.read_text())
        trainer.load_state(checkpoint_dir / f"epoch_{state['epoch']:03d}.npz")
        print(f"resumed from epoch {state['epoch']} ({state['phase']})")
    val_labels = val["full"] if args.selection_labels == "full" else val["observed"]
    epoch = state["epoch"]
    while epoch < args.epochs:
        epoch += 1
        phase = "gc" if state["phase"] == "gc" else "warmup"
        started = time.perf_counter()
        train_loss, agreement = trainer.train_epoch(train_dataset_fn(epoch), phase, epoch)
        trainer.end_epoch(epoch, phase, train["observed"])
        val_scores = predict_probabilities(trainer.student, val_dataset) if len(val["sources"]) else None
        val_map = (
            multilabel_metrics(val_scores, val_labels, data["class_names"])["mAP"]
            if val_scores is not None
            else float("nan")
        )
        row = {
            "epoch": epoch,
            "phase": state["phase"],
            "train_loss": train_loss,
            "agreement": agreement,
            "val_mAP": val_map,
            "seconds": round(time.perf_counter() - started, 2),
        }
        state["log"].append(row)
        print(
            f"epoch {epoch:3d} [{state['phase']}] loss {train_loss:.4f} agreement {agreement:.4f} "
            f"val mAP {val_map:.4f} "
            f"({row['seconds']:.1f} s)",
            flush=True,
        )
        improved = not np.isfinite(val_map) or val_map > state["best_val_mAP"]
        if improved:
            state["best_val_mAP"] = val_map if np.isfinite(val_map) else -1.0
            state["best_epoch"] = epoch
            state["best_phase"] = state["phase"]
            atomic.save_keras(trainer.student, run_dir / "best_model.keras")
        trainer.save_state(checkpoint_dir / f"epoch_{epoch:03d}.npz")

        if args.method == "adagc" and state["phase"] == "warmup":
            state["agreement"].append(agreement)
            if args.gc_start_epoch > 0:
                detected, how, params = (epoch if epoch >= args.gc_start_epoch else None), "fixed", None
            else:
                detected, how, params = detect_early_learning_end(
                    state["agreement"], args.trigger_ratio, args.trigger_min_epochs, args.trigger_patience
                )
            if detected is not None:
                # Roll back to the detected epoch (the oldest kept checkpoint if it is further back).
                kept = sorted(int(p.stem.split("_")[1]) for p in checkpoint_dir.glob("epoch_*.npz"))
                target = max(min(detected, epoch), kept[0])
                trainer.load_state(checkpoint_dir / f"epoch_{target:03d}.npz")
                state.update(
                    phase="gc",
                    trigger_epoch=target,
                    trigger_detected_at=epoch,
                    trigger_how=how,
                    fit_params=params,
                )
                print(
                    f"early learning ended at epoch {detected} (fit: {how}, checked at epoch {epoch}); "
                    f"Gradient Calibration starts after epoch {target}",
                    flush=True,
                )
                epoch = target
        state["epoch"] = epoch
        keep = args.rollback_window if state["phase"] == "warmup" else 0
        for old in sorted(checkpoint_dir.glob("epoch_*.npz")):
            if int(old.stem.split("_")[1]) < epoch - keep or int(old.stem.split("_")[1]) > epoch:
                old.unlink()
        atomic.write_csv(
            run_dir / "log.csv",
            state["log"],
            ("epoch", "phase", "train_loss", "agreement", "val_mAP", "seconds"),
        )
        atomic.write_json(state_path, state)
    return state


@cli_entry
def main(args):
    parser = get_args_parser()
    args = resolve_defaults(apply_config(args, parser))
    runs.seed_everything(args.seed, args.deterministic)
    runs.print_args(args)
    run_dir = Path(args.results_dir) / SCRIPT_STEM / args.run_name
    if args.test_only:
        return test_only(args, run_dir)

    # ---- data ----
    data = load_data(args)
    loader = make_loader(data, args.image_size)
    train, val, test = data["train"], data["val"], data["test"]
    print(
        f"classes {len(data['class_names'])} | train {len(train['sources'])} | val {len(val['sources'])} "
        f"| test {len(test['sources'])} | steps/epoch {math.ceil(len(train['sources']) / args.batch_size)}"
    )
    run_dir = runs.prepare_run_dir(args.results_dir, SCRIPT_STEM, args.run_name, args.overwrite, args.resume)
    band_mean, band_variance = band_statistics(train["sources"], loader)
    input_shape = (args.image_size, args.image_size, len(band_mean))
    runs.write_config(
        run_dir,
        args,
        class_order=list(data["class_names"]),
        band_mean=band_mean,
        band_variance=band_variance,
        num_train=len(train["sources"]),
        num_val=len(val["sources"]),
        num_test=len(test["sources"]),
    )
    print("weights: " + (args.weights or "none (random initialisation)"))

    # ---- model ----
    strategy = runs.make_strategy(args.strategy)

    def build_model():
        return build_classifier(
            args.backbone, input_shape, len(data["class_names"]), band_mean, band_variance, args.weights
        )

    # ---- train ----
    train_dataset_fn = TrainBatches(
        train["sources"], loader, args.batch_size, args.seed, args.augment
    ).for_epoch

    val_dataset = make_dataset(val["sources"], loader, args.batch_size)
    test_dataset = make_dataset(test["sources"], loader, args.batch_size)
    try:
        state = run_training(
            args, data, build_model, run_dir, train_dataset_fn, val_dataset, test_dataset, strategy
        )
    except (tf.errors.OpError, ValueError) as error:
        if LMDB_ERROR_MARK in str(error):
            raise lmdb_input_error(str(error))
        raise

    # ---- evaluate ----
    best_model = keras.models.load_model(run_dir / "best_model.keras")
    metrics = evaluate_and_write(run_dir, best_model, test_dataset, test["full"], data["class_names"])
    metrics.update(
        method=args.method,
        dataset=args.dataset,
        single_positive=args.single_positive,
        best_epoch=state["best_epoch"],
        best_phase=state.get("best_phase"),
        best_val_mAP=state["best_val_mAP"],
        trigger_epoch=state["trigger_epoch"],
        trigger_detected_at=state["trigger_detected_at"],
        trigger_how=state["trigger_how"],
        epochs=args.epochs,
    )
    save_dynamics_plot(
        run_dir / "training_dynamics.png",
        state["log"],
        state["agreement"],
        state["trigger_epoch"],
        state["fit_params"],
    )
    atomic.write_json(run_dir / "metrics.json", metrics)
    print(summary_line(metrics))
    return metrics


def test_only(args, run_dir):
    """Re-evaluate best_model.keras with the data settings saved in the run's config.json."""
    import json

    config_path = require_file(run_dir / "config.json", "a finished run folder (train it first)")
    model_path = require_file(run_dir / "best_model.keras", "the run's best_model.keras")
    saved = json.loads(config_path.read_text())["args"]
    for key in (
        "dataset",
        "data_dir",
        "single_positive",
        "lmdb_path",
        "metadata",
        "bands",
        "drop_snow_cloud",
        "image_size",
        "batch_size",
        "val_fraction",
        "seed",
        "class_fractions",
    ):
        setattr(args, key, saved.get(key, getattr(args, key)))
    args.demo = False
    data = load_aid(args) if args.dataset == "aid" else load_benv2(args)
    test_dataset = make_dataset(data["test"]["sources"], make_loader(data, args.image_size), args.batch_size)
    model = keras.models.load_model(model_path)
    metrics = evaluate_and_write(
        run_dir, model, test_dataset, data["test"]["full"], data["class_names"], prefix="test_only_"
    )
    saved_metrics_path = run_dir / "metrics.json"
    if saved_metrics_path.exists():
        saved_metrics = json.loads(saved_metrics_path.read_text())
        for key in ("method", "trigger_epoch"):
            metrics[key] = saved_metrics.get(key)
        same = all(
            json.loads(atomic.to_json(metrics[k])) == saved_metrics.get(k)
            for k in ("mAP", "micro_AP", "macro_F1", "micro_F1", "per_class")
        )
        metrics["matches_saved_metrics"] = bool(same)
        print("test metrics " + ("match" if same else "DIFFER from") + f" {saved_metrics_path}")
    metrics.setdefault("method", saved.get("method"))
    atomic.write_json(run_dir / "test_only_metrics.json", metrics)
    print(summary_line(metrics))
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
