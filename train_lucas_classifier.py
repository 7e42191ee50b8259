"""LUCAS land cover under extreme class imbalance: weighted CE vs focal loss, identity vs MLP decoder.

Source study: the TerraMind geospatial foundation model as a frozen-backbone probe on LUCAS 2018
points in Italy (Politecnico di Milano, "Geospatial Foundation Models" project; no arXiv paper):
1,994 chips of 224 x 224 px, 6 bands [B4, B3, B2, B8, B11, B12] (Harmonized Landsat-Sentinel, 2018
median), 10 land-cover classes from 511 down to 20 chips. How do class-weighted cross-entropy and
focal loss, and an identity vs an MLP decoder, trade overall (micro) against macro accuracy? This
script reproduces the study's trade-off table (OA, macro accuracy, macro F1 per loss x decoder,
mean +- std over seeds), per-class accuracies and confusion matrices.

The study's pieces are all here, top to bottom: the identity and MLP decoders (TerraTorch's decoder
and classification head), the class weights, the weighted cross-entropy, the study's one-vs-rest
focal loss (segmentation_models_pytorch) and Lin et al.'s softmax form, the macro accuracy that
selects the checkpoint, and the trade-off tables. TerraMind is a PyTorch model, so the backbone here
is any Keras backbone with its input adapted to 6 bands (`--backbone`, optional local `--weights`),
or precomputed foundation-model embeddings (`--embeddings`, the study's frozen probe on tokens from
extract_terramind_embeddings.py).

Commands:
    python train_lucas_classifier.py --data_root lucas_chips --loss wce --decoder identity
    python train_lucas_classifier.py --labels_csv lucas_chips/chips_LC_class.csv \\
        --embeddings terramind_embeddings.npy --grid --seeds 5
    python train_lucas_classifier.py --demo --grid --seeds 5

Runtime: the demo (498 synthetic 32 px chips in the study's class proportions, simplecnn, 4
configurations x 5 seeds x 30 epochs) takes about 2 minutes of CPU time (5 minutes of wall time on
a 2-core machine shared with other jobs); a frozen backbone sees the chips once and only the heads
train. On a CPU the per-token MLP decoder on the 7 x 7 x 2048 features of ResNet50 at 224 px is the
slow part (use a GPU or `--embeddings` there); the cached tokens take N x tokens x features x 4
bytes (about 800 MB for 1,994 chips through ResNet50 at 224 px) on disk and in memory.

The demo should print, as its last line (per-class tables and plots are in the run folder):
    summary (val, 5 seeds): wce/identity OA 0.636+-0.040 macc 0.588+-0.051 mF1 0.475+-0.051; wce/mlp
    OA 0.734+-0.029 macc 0.765+-0.072 mF1 0.677+-0.084; focal/identity OA 0.614+-0.033 macc
    0.342+-0.103 mF1 0.318+-0.112; focal/mlp OA 0.742+-0.035 macc 0.642+-0.049 mF1 0.635+-0.057
(paired_val.md holds the wce - focal differences per decoder over seeds with their 95 % intervals.)
The focal loss is the study's (TerraTorch's loss="focal": segmentation_models_pytorch
FocalLoss(mode="multiclass", normalized=True), summed over classes as smp 0.4.0 / 0.5.0 do, the
versions terratorch 1.0.1 to 1.1.1 pin; `--focal_reduction mean` is smp 0.6.0's mean); `--focal_form
lin` is Lin et al.'s softmax form.
Study reference (val set, frozen TerraMind-base): weighted CE + identity macro acc 0.402, OA 0.451,
macro F1 0.339; MLP decoder within 0.5 pt; focal loss macro acc 0.306-0.314, OA 0.536-0.541.
"""

import argparse
import contextlib
import json
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

from common import cli, precision, tensorboard

BACKBONES = ["resnet50", "resnet101", "efficientnetv2b0", "mobilenetv3small", "convnexttiny", "simplecnn"]


def get_args_parser():
    parser = cli.Parser(description="LUCAS land cover: weighted CE vs focal loss, identity vs MLP decoder.")
    add = parser.add_argument_group("data").add_argument
    add("--data_root", default=None, help="Folder of <STR18>/<Point_ID>.tif 6-band chips + labels CSV.")
    add("--labels_csv", default=None, help="Point_ID, STR18 CSV; default <data_root>/chips_LC_class.csv.")
    add(
        "--embeddings",
        default=None,
        help="Precomputed embeddings .npy, one row per labels-CSV row in CSV order, shaped (N, D), "
        "(N, tokens, D) or (N, h, w, D); replaces the backbone (frozen probe).",
    )
    add(
        "--image_size",
        type=int,
        default=None,
        help="Resize chips to this size; default: the chips' own size (224 for LUCAS).",
    )
    add(
        "--val_fraction",
        type=float,
        default=0.2,
        help="Stratified validation share of all chips (study: 0.2 -> 1,595 / 399).",
    )
    add(
        "--test_fraction",
        type=float,
        default=0.0,
        help="Stratified held-out test share. The study used the validation set both for checkpoint "
        "selection and as its test set (0 reproduces that; its numbers are optimistic); > 0 reports an "
        "untouched test set as well.",
    )
    add("--split_seed", type=int, default=42, help="random_state of the stratified split (study: 42).")
    add = parser.add_argument_group("model").add_argument
    add("--backbone", default="resnet50", choices=BACKBONES, help="Keras backbone with 6 input bands.")
    add(
        "--weights",
        default=None,
        help="Local backbone weights (.weights.h5 / .h5) for 6 or 3 input channels; 3-channel RGB "
        "weights are adapted to the 6 bands. Default: random initialisation.",
    )
    add(
        "--freeze_backbone",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Frozen probe as in the study: features are computed once and only the head trains; "
        "--no-freeze_backbone fine-tunes end to end from the chips.",
    )
    add(
        "--decoder",
        default="identity",
        choices=["identity", "mlp"],
        help="identity: Dropout -> Dense(C) per token, mean over tokens; mlp: Dense(embed) ReLU per "
        "token first (TerraTorch IdentityDecoder / MLPDecoder + ClassificationHead).",
    )
    add("--mlp_dim", type=int, default=None, help="Hidden width of the mlp decoder; default embedding size.")
    add("--head_dropout", type=float, default=0.1, help="Dropout before the last Dense (study: 0.1).")
    add = parser.add_argument_group("loss").add_argument
    add(
        "--loss",
        default="wce",
        choices=["wce", "focal", "ce"],
        help="wce: class-weighted cross-entropy; focal: the focal loss of --focal_form; ce: unweighted.",
    )
    add(
        "--class_weights",
        default="balanced",
        choices=["balanced", "sqrt"],
        help="balanced: N / (C n_c) from the training split (sklearn); sqrt: its square root.",
    )
    add("--focal_gamma", type=float, default=2.0, help="Focal loss focusing parameter gamma.")
    add(
        "--focal_form",
        default="smp",
        choices=["smp", "lin"],
        help="smp: the study's (one-vs-rest sigmoid terms, normalised, no class weights); lin: Lin et "
        "al.'s softmax focal loss.",
    )
    add(
        "--focal_reduction",
        default="sum",
        choices=["sum", "mean"],
        help="smp form only, how its per-class terms combine: sum over classes as in "
        "segmentation_models_pytorch 0.4.0 and 0.5.0 (the study's: terratorch 1.0.1 to 1.1 pin smp<=0.4, "
        "1.1.1 pins ==0.5.0); mean over classes as in segmentation_models_pytorch 0.6.0 (1/C of the sum, "
        "same gradient direction).",
    )
    add(
        "--focal_weighting",
        default="alpha",
        choices=["alpha", "none"],
        help="lin form only: alpha uses the class weights as the focal alpha; none drops them.",
    )
    train = parser.add_argument_group("training")
    add = train.add_argument
    add("--grid", action="store_true", help="Run all four configurations {wce, focal} x {identity, mlp}.")
    add(
        "--seeds",
        type=int,
        default=1,
        help="Number of seeds (seed, seed+1, ...); single-seed differences are noise.",
    )
    add("--epochs", type=int, default=100, help="Training epochs (study: 100).")
    add("--batch_size", type=int, default=8, help="Global batch size (study: 8).")
    add("--learning_rate", type=float, default=1e-4, help="AdamW learning rate (study: 1e-4).")
    add("--weight_decay", type=float, default=0.05, help="AdamW decoupled weight decay (study: 0.05).")
    # The study trains with PyTorch Lightning's torch.optim.AdamW (betas 0.9, 0.999, epsilon 1e-8).
    cli.add_optimizer_convention_argument(train)
    monitors = ["val_macro_accuracy", "val_loss"]
    add(
        "--monitor",
        default=monitors[0],
        choices=monitors,
        help="Checkpoint selection: the best epoch on the validation set (study: val macro accuracy).",
    )
    # The study trained in mixed float16 on its GPU: auto asks for it on GPUs that run float16 fast.
    precision.add_argument(train, default="auto")
    parser.renamed("--precision", "--mixed_precision")
    cli.add_strategy_argument(train)
    cli.add_demo_argument(train, "in the study's class proportions (about 25 s per seed on a CPU).")
    add("--demo_scale", type=float, default=0.25, help="Demo chips per class = study counts x this (>= 5).")
    cli.add_run_arguments(parser)
    tensorboard.add_argument(parser)
    # A demo's few short epochs would barely move the head at the study's learning rate.
    parser.demo_defaults(epochs=30, learning_rate=1e-3, backbone="simplecnn")
    return parser


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from common import atomic, checkpoints, fused_bn, optimizers, pipelines, plots, reports, runs
from common.errors import InputError, cli_entry, require, require_file, require_finite
from common.lucas import demo_chips, lucas_chips
from common.metrics import ConfusionMatrix

SCRIPT_STEM = "train_lucas_classifier"
CLASS_NAMES = lucas_chips.CLASS_NAMES
GRID = [("wce", "identity"), ("wce", "mlp"), ("focal", "identity"), ("focal", "mlp")]
HEADLINE_KEYS = ["overall_accuracy", "macro_accuracy", "macro_f1", "macro_precision"]
# Keras ResNets were trained on caffe-style BGR input: their first kernel's channels are B, G, R.
BGR_BACKBONES = {"resnet50", "resnet101"}
# Input files and folders, recorded relative to the run folder: a results tree moved with its inputs resumes.
INPUT_PATHS = ("data_root", "labels_csv", "embeddings", "weights")
# The arguments that change every configuration's numbers; a resumed run must keep them. Loss,
# decoder, seeds and epochs only choose which <loss>_<decoder>/seed<k> results exist (or extend them).
RESUME_SETTINGS = (
    # data and split
    "data_root",
    "labels_csv",
    "embeddings",
    "image_size",
    "val_fraction",
    "test_fraction",
    "split_seed",
    # model
    "backbone",
    "weights",
    "freeze_backbone",
    "mlp_dim",
    "head_dropout",
    # loss
    "class_weights",
    "focal_gamma",
    "focal_form",
    "focal_reduction",
    "focal_weighting",
    # training
    "batch_size",
    "learning_rate",
    "weight_decay",
    "optimizer_convention",
    "monitor",
    "mixed_precision",
    "demo_scale",
)


# ---- backbones for the 6-band chips ----


def simple_cnn(input_shape):
    """Three strided Conv-BN-ReLU blocks: a small CPU-friendly backbone for demos and tests."""
    inputs = keras.Input(input_shape)
    x = inputs
    for width in (32, 64, 128):
        x = layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    return keras.Model(inputs, x, name="simplecnn")


def backbone_constructor(name):
    """The Keras application for `--backbone` (ImageNet preprocessing layers off: inputs are 6 bands)."""
    applications = keras.applications
    return {
        "resnet50": applications.ResNet50,
        "resnet101": applications.ResNet101,
        "efficientnetv2b0": lambda **kw: applications.EfficientNetV2B0(include_preprocessing=False, **kw),
        "mobilenetv3small": lambda **kw: applications.MobileNetV3Small(include_preprocessing=False, **kw),
        "convnexttiny": lambda **kw: applications.ConvNeXtTiny(include_preprocessing=False, **kw),
        "simplecnn": lambda input_shape, **kw: simple_cnn(input_shape),
    }[name]


def adapt_first_kernel(kernel, bands, bgr):
    """RGB kernel `(kh, kw, 3, out)` -> `(kh, kw, bands, out)` (docs/lucas.md, differences: RGB weights).

    B4, B3, B2 get the R, G, B filters, the extra bands their mean, and everything is scaled by
    3 / bands to keep the activation scale.
    """
    rgb = kernel[:, :, ::-1] if bgr else kernel
    extra = np.repeat(rgb.mean(axis=2, keepdims=True), bands - 3, axis=2)
    return np.concatenate([rgb, extra], axis=2) * (3.0 / bands)


def load_weights_strictly(model, path):
    """model.load_weights, where a partial load (Keras only warns and keeps fresh weights) also fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(path)
    skipped = [str(warning.message) for warning in caught if "Skipping" in str(warning.message)]
    if skipped:
        raise ValueError(skipped[0])


def build_backbone(name, image_size, weights=None):
    """Keras backbone with 6 input bands, optionally initialised from local 6- or 3-channel weights.

    Its batch-norm layers run through TensorFlow's fused kernel (`common.fused_bn`).
    """
    backbone = _backbone_with_weights(name, image_size, weights)
    fused_bn.fuse(backbone)
    return backbone


def _backbone_with_weights(name, image_size, weights):
    """The backbone of `build_backbone` before fusing: random, 6-band weights, or RGB weights adapted."""
    constructor = backbone_constructor(name)
    bands = len(lucas_chips.BAND_NAMES)
    with warnings.catch_warnings():
        # Keras notes that ImageNet models expect 1 or 3 channels: 6 bands is the point here.
        warnings.filterwarnings("ignore", message="This model usually expects 1 or 3 input channels")
        backbone = constructor(include_top=False, weights=None, input_shape=(image_size, image_size, bands))
    if not weights:
        print(f"backbone {name}: random initialisation (no --weights given)")
        return backbone
    weights = require_file(weights, f"a Keras weights file for {name}")
    try:
        load_weights_strictly(backbone, weights)
        print(f"backbone {name}: loaded 6-band weights from {weights}")
        return backbone
    except (ValueError, OSError, KeyError):
        pass
    rgb_backbone = constructor(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    try:
        load_weights_strictly(rgb_backbone, weights)
    except (ValueError, OSError, KeyError) as error:
        problem = f"does not fit {name} with 6 or 3 input channels ({str(error).splitlines()[0][:120]})"
        raise InputError(weights, problem, f"weights saved from Keras {name}") from None
    adapted = False
    for source, target in zip(rgb_backbone.layers, backbone.layers, strict=True):
        values = source.get_weights()
        if values and not adapted and values[0].ndim == 4 and values[0].shape[2] == 3:
            values[0] = adapt_first_kernel(values[0], bands, name in BGR_BACKBONES)
            adapted = True
        target.set_weights(values)
    print(f"backbone {name}: RGB weights from {weights} adapted to {bands} bands")
    return backbone


# ---- the study's model: backbone tokens -> identity or MLP decoder -> classification head ----


def build_feature_extractor(args, inputs):
    """Raw reflectance -> train-split normalisation -> backbone -> tokens `(h * w, features)`.

    `inputs` holds the chips' `image_size` and the train split's `band_mean` and `band_variance`.
    """
    size = inputs.image_size
    chips = keras.Input((size, size, len(lucas_chips.BAND_NAMES)), name="chip")
    mean, variance = inputs.band_mean, inputs.band_variance
    x = layers.Normalization(mean=mean, variance=variance, name="band_normalisation")(chips)
    backbone = build_backbone(args.backbone, size, args.weights)
    backbone.trainable = not args.freeze_backbone
    x = backbone(x, training=False if args.freeze_backbone else None)
    tokens = layers.Reshape((-1, x.shape[-1]), name="tokens")(x)
    return keras.Model(chips, tokens, name="feature_extractor")


def build_head(token_shape, num_classes, decoder, mlp_dim, dropout):
    """TerraTorch decoder + ClassificationHead: per-token [Dense(embed) ReLU] -> Dropout -> Dense(C).

    Then the mean over tokens (linear_after_pool=False), so identity = mean pool -> Dense(C) at
    inference (test_decoders_follow_terratorch_token_order).
    """
    inputs = keras.Input(token_shape, name="tokens")
    x = inputs
    if decoder == "mlp":
        x = layers.Dense(mlp_dim or token_shape[-1], activation="relu", name="mlp_decoder")(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(num_classes, name="classifier")(x)
    logits = layers.GlobalAveragePooling1D(dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=f"{decoder}_head")


# ---- the study's losses: class weights, weighted cross-entropy, focal loss ----


def class_weights_from_counts(train_labels, num_classes, kind="balanced"):
    """sklearn 'balanced' class weights w_c = N / (C n_c) over the classes present in training.

    'sqrt' softens them to sqrt(N / (C n_c)) (the study's soft variant). Classes absent from the
    training split get weight 0.
    """
    counts = np.bincount(np.asarray(train_labels), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return np.sqrt(weights) if kind == "sqrt" else weights


@keras.saving.register_keras_serializable(package="rsrepro")
class SoftmaxFocalLoss(keras.losses.Loss):
    """Softmax focal loss (Lin et al., ICCV 2017, Eq. 5) from logits: `--focal_form lin`, and the CE losses.

    FL_i = -alpha_{y_i} (1 - p_{y_i})^gamma log p_{y_i}. gamma = 0 with alpha = class weights is
    weighted cross-entropy, with alpha = None plain cross-entropy. `weighted_mean` divides by
    sum_i alpha_{y_i} instead of the batch size, which is PyTorch's CrossEntropyLoss(weight=w)
    reduction used by the study for weighted CE.
    """

    def __init__(self, class_weights=None, gamma=2.0, weighted_mean=False, name="focal_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        self.gamma = float(gamma)
        self.weighted_mean = bool(weighted_mean)

    def call(self, y_true, y_pred):
        log_probabilities = ops.log_softmax(ops.cast(y_pred, "float32"), axis=-1)
        # One-hot selection: cheaper to trace than gathers, and the same numbers.
        one_hot = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), ops.shape(y_pred)[-1])
        log_p_true = ops.sum(one_hot * log_probabilities, axis=-1)
        loss = -log_p_true
        if self.gamma:
            loss = ops.power(1.0 - ops.exp(log_p_true), self.gamma) * loss
        if self.class_weights is not None:
            alpha = ops.sum(one_hot * ops.convert_to_tensor(self.class_weights, "float32"), axis=-1)
            loss = alpha * loss
            if self.weighted_mean:
                # The base class averages over the batch; rescale so the result is sum(a l) / sum(a).
                loss = loss * ops.cast(ops.shape(alpha)[0], "float32") / ops.maximum(ops.sum(alpha), 1e-12)
        return loss

    def get_config(self):
        config = super().get_config() | {"class_weights": self.class_weights, "gamma": self.gamma}
        return config | {"weighted_mean": self.weighted_mean}


@keras.saving.register_keras_serializable(package="rsrepro")
class OneVsRestFocalLoss(keras.losses.Loss):
    """The study's focal loss: segmentation_models_pytorch FocalLoss(mode="multiclass", normalized=True).

    TerraTorch's classification task builds it for loss="focal": for each class c a one-vs-rest
    sigmoid focal term f_ic l_ic with l_ic = BCE(z_ic, [y_i = c]) and f_ic = (1 - exp(-l_ic))^gamma;
    `normalized` (Ren et al., arXiv 1909.07829) divides it by max(sum_i f_ic, 1e-6) over the batch;
    the mean over the batch is summed over classes (`class_reduction="sum"`, smp 0.4.0 and 0.5.0, the
    versions terratorch 1.0.1 to 1.1.1 install) or averaged over them ("mean", smp 0.6.0). No class
    weights (alpha None). The gradient flows through the normaliser as in PyTorch
    (test_one_vs_rest_focal_loss_equals_its_transcription).
    """

    def __init__(
        self, gamma=2.0, normalized=True, class_reduction="sum", name="one_vs_rest_focal_loss", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        if class_reduction not in ("sum", "mean"):
            raise ValueError(f"class_reduction must be 'sum' or 'mean', got {class_reduction!r}")
        self.gamma, self.normalized, self.class_reduction = float(gamma), bool(normalized), class_reduction

    def call(self, y_true, y_pred):
        logits = ops.cast(y_pred, "float32")
        targets = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), ops.shape(y_pred)[-1])
        # Binary cross-entropy from logits per sample and class; softplus keeps its gradient exact at 0.
        bce = ops.softplus(logits) - logits * targets
        focal_factor = ops.power(1.0 - ops.exp(-bce), self.gamma)
        loss = focal_factor * bce
        if self.normalized:
            loss = loss / ops.maximum(ops.sum(focal_factor, axis=0, keepdims=True), 1e-6)
        # Per sample, summed (or averaged) over classes: the base class's batch mean then equals
        # sum_c mean_i (or mean_c mean_i), smp's per-class batch means combined over classes.
        if self.class_reduction == "mean":
            return ops.mean(loss, axis=-1)
        return ops.sum(loss, axis=-1)

    def get_config(self):
        config = super().get_config() | {"gamma": self.gamma, "normalized": self.normalized}
        return config | {"class_reduction": self.class_reduction}


def make_loss(loss_name, class_weights, args):
    """`--loss`: wce (study: weighted CE, PyTorch reduction), focal (study's smp form or Lin's) or CE."""
    if loss_name == "wce":
        return SoftmaxFocalLoss(class_weights, gamma=0.0, weighted_mean=True, name="weighted_ce")
    if loss_name == "focal" and args.focal_form == "smp":
        return OneVsRestFocalLoss(
            gamma=args.focal_gamma, normalized=True, class_reduction=args.focal_reduction
        )
    if loss_name == "focal":
        alpha = class_weights if args.focal_weighting == "alpha" else None
        return SoftmaxFocalLoss(alpha, gamma=args.focal_gamma, name="focal_loss")
    return SoftmaxFocalLoss(None, gamma=0.0, name="cross_entropy")


# ---- the study's metrics: overall and macro accuracy, macro F1 / precision, per class ----


def classification_metrics(truth, prediction):
    """OA, macro accuracy (balanced accuracy), macro F1 / precision, per-class values, confusion counts."""
    confusion = ConfusionMatrix(len(CLASS_NAMES)).update(truth, prediction)
    values = confusion.metrics(CLASS_NAMES)
    support = confusion.counts.sum(axis=1)
    rows = values["per_class"]
    recall = np.array([row["recall"] for row in rows])
    # Per class, the study's accuracy is the recall.
    kept = ("class", "support", "precision", "f1")
    per_class = [{key: row[key] for key in kept} | {"accuracy": row["recall"]} for row in rows]
    return {
        "overall_accuracy": values["accuracy"],
        # Balanced accuracy: a class absent from the truth has no recall and is not averaged.
        "macro_accuracy": float(np.mean(recall[support > 0])),
        "macro_f1": values["macro_f1"],
        "macro_precision": values["macro_precision"],
        "per_class": per_class,
        "confusion_matrix": confusion.counts.tolist(),
    }


@keras.saving.register_keras_serializable(package="rsrepro")
class MacroAccuracy(keras.metrics.Metric):
    """Streaming macro accuracy (= balanced accuracy = mean recall over classes present in the truth).

    The in-graph twin of `classification_metrics`' macro accuracy, for `--monitor val_macro_accuracy`;
    test_macro_accuracy_equals_sklearn_balanced_accuracy proves both equal to sklearn's.
    """

    def __init__(self, num_classes, name="macro_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        shape = (self.num_classes, self.num_classes)
        self.counts = self.add_variable(shape=shape, initializer="zeros", name="counts", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        prediction = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        pairs = ops.bincount(truth * self.num_classes + prediction, minlength=self.num_classes**2)
        self.counts.assign_add(ops.cast(ops.reshape(pairs, (self.num_classes, self.num_classes)), "float32"))

    def result(self):
        support = ops.sum(self.counts, axis=1)
        recall = ops.diagonal(self.counts) / ops.maximum(support, 1.0)
        present = ops.cast(support > 0, "float32")
        return ops.sum(recall * present) / ops.maximum(ops.sum(present), 1.0)

    def reset_state(self):
        self.counts.assign(ops.zeros_like(self.counts))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


# ---- data: labels, chips or embeddings, the stratified split ----


def as_tokens(embeddings: np.ndarray) -> np.ndarray:
    """`(N, D)` -> `(N, 1, D)`; `(N, T, D)` stays; `(N, h, w, D)` -> `(N, h*w, D)`."""
    return embeddings.reshape(len(embeddings), -1, embeddings.shape[-1])


def read_embeddings(path, labels_csv, count: int) -> np.ndarray:
    """Precomputed embeddings, one row per labels-CSV row in CSV order, as float32 tokens `(N, T, D)`.

    Args:
        path: a `.npy` array shaped `(N, D)`, `(N, T, D)` or `(N, h, w, D)`.
        labels_csv: the labels CSV (named in errors).
        count: its number of rows.
    """
    path = require_file(path, "a .npy array of embeddings")
    try:
        embeddings = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise InputError(path, f"cannot be read ({error})", "a numeric .npy array") from None
    require(
        embeddings.ndim in (2, 3, 4) and np.issubdtype(embeddings.dtype, np.number),
        path,
        f"has shape {embeddings.shape} and dtype {embeddings.dtype}",
        "numeric (N, D), (N, T, D) or (N, h, w, D)",
    )
    problem = f"has {len(embeddings)} rows but {labels_csv} has {count}"
    require(len(embeddings) == count, path, problem, "one row per CSV row, in CSV order")
    require_finite(embeddings, path, "embeddings")
    return as_tokens(embeddings.astype(np.float32))


def stratified_split(labels, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified train/val(/test) index split (sklearn, random_state=seed), every class in every split.

    With test_fraction 0 this is exactly the study's train_test_split(test_size=0.2, stratify=y,
    random_state=42). sklearn can leave a small class out of a split by rounding; then one chip of
    it moves over from the split holding most of that class (never triggers at LUCAS counts).

    Returns:
        {"train", "val"[, "test"]: sorted indices}, a partition of `range(len(labels))`.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    indices = np.arange(len(labels))
    splits = {}
    rest = indices
    if test_fraction > 0:
        rest, splits["test"] = train_test_split(
            indices, test_size=test_fraction, stratify=labels, random_state=seed
        )
    splits["train"], splits["val"] = train_test_split(
        rest, test_size=val_fraction / (1.0 - test_fraction), stratify=labels[rest], random_state=seed
    )
    names = list(splits)
    for label in np.unique(labels):
        for name in names:
            if np.any(labels[splits[name]] == label):
                continue
            donor = max(names, key=lambda other: int(np.sum(labels[splits[other]] == label)))
            if np.sum(labels[splits[donor]] == label) < 2:
                continue
            moved = splits[donor][labels[splits[donor]] == label][-1]
            splits[donor] = splits[donor][splits[donor] != moved]
            splits[name] = np.append(splits[name], moved)
    return {name: np.sort(split) for name, split in splits.items()}


def prepare_inputs(args):
    """Labels, chips (or embeddings), the stratified split, class weights and train-split band statistics."""
    expected = "--data_root <chips folder>, --embeddings with --labels_csv, or --demo"
    require(args.data_root or (args.embeddings and args.labels_csv), "--data_root", "no data given", expected)
    labels_csv = args.labels_csv or Path(args.data_root) / lucas_chips.LABELS_CSV_NAME
    point_ids, labels = lucas_chips.read_labels(labels_csv)
    inputs = SimpleNamespace(point_ids=point_ids, labels=labels, reader=None, image_size=None, band_mean=None)
    if args.embeddings:
        inputs.embeddings = read_embeddings(args.embeddings, labels_csv, len(labels))
    else:
        paths, sizes = lucas_chips.locate_chips(args.data_root, labels_csv, point_ids, labels)
        inputs.reader, inputs.embeddings = lucas_chips.ChipReader(paths), None
        inputs.image_size = lucas_chips.chip_size(sizes, args.image_size, args.data_root)
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    for index in np.flatnonzero((counts > 0) & (counts < 2 + (args.test_fraction > 0))):
        problem = f"class STR18 {index + 1} ({CLASS_NAMES[index]}) has {counts[index]} chip(s)"
        raise InputError(labels_csv, problem, "at least one chip per split for a stratified split")
    splits = stratified_split(labels, args.val_fraction, args.test_fraction, args.split_seed)
    inputs.splits, train_labels = splits, labels[splits["train"]]
    inputs.train_counts = np.bincount(train_labels, minlength=len(CLASS_NAMES))
    inputs.class_weights = class_weights_from_counts(train_labels, len(CLASS_NAMES), args.class_weights)
    print(f"chips: {len(labels)}; " + ", ".join(f"{name} {len(split)}" for name, split in splits.items()))
    print("train counts per class: " + ", ".join(f"{n}" for n in inputs.train_counts))
    print(f"class weights ({args.class_weights}): " + ", ".join(f"{w:.3f}" for w in inputs.class_weights))
    if inputs.reader is not None:
        # Normalisation from the TRAIN chips only (the study used all chips: a leak).
        with inputs.reader.surface():
            chips = inputs.reader.dataset(splits["train"], inputs.image_size, 32).as_numpy_iterator()
            inputs.band_mean, inputs.band_variance = pipelines.band_statistics(chips)
        means = zip(lucas_chips.BAND_NAMES, inputs.band_mean, strict=True)
        print("train band mean: " + ", ".join(f"{band} {mean:.4f}" for band, mean in means))
        # Every other chip and the weights are read once now, so that a bad file ends the run before
        # its folder is written.
        inputs.reader.check_readable(np.concatenate([splits[name] for name in splits if name != "train"]))
        if args.weights:
            _backbone_with_weights(args.backbone, inputs.image_size, args.weights)
    return inputs


# ---- the run: its folder, then one configuration at a time (train, keep the best epoch, score it) ----


def prepare_run(args, inputs, configs, seeds):
    """The run folder (refused when it holds results of other settings), splits.json and config.json."""
    source = f"emb-{Path(args.embeddings).stem}" if args.embeddings else args.backbone
    source += "" if args.embeddings else ("-frozen" if args.freeze_backbone else "-finetune")
    name = "_".join([source, "grid" if args.grid else f"{args.loss}-{args.decoder}"] + ["demo"] * args.demo)
    run_name = args.run_name or name
    run_dir = runs.prepare_run_dir(args.results_dir, SCRIPT_STEM, run_name, args.overwrite, args.resume)
    # Finished configurations are kept on re-runs, so they must come from the same settings. Input
    # paths count relative to the run folder, so a results tree moved with its inputs still resumes.
    settings = runs.settings_of(args, RESUME_SETTINGS, run_dir, INPUT_PATHS)
    what = "the results in this run folder"
    runs.check_same_settings(run_dir / "config.json", settings, args.overwrite, what, section="args")
    splits = {name: [inputs.point_ids[i] for i in split] for name, split in inputs.splits.items()}
    atomic.write_json(run_dir / "splits.json", splits)
    policy = precision.apply(args.mixed_precision)
    derived = {"precision": policy, "image_size": inputs.image_size, "class_names": CLASS_NAMES}
    derived |= {"split_sizes": {name: len(split) for name, split in splits.items()}}
    derived |= {"train_class_counts": inputs.train_counts, "class_weights": inputs.class_weights}
    derived |= {"configs": [f"{loss}/{decoder}" for loss, decoder in configs], "seeds": seeds}
    if inputs.reader is not None:
        derived |= {"band_mean": inputs.band_mean, "band_std": np.sqrt(inputs.band_variance)}
    derived["input_paths"] = "data_root, labels_csv, embeddings and weights are relative to the run folder"
    runs.write_config(run_dir, argparse.Namespace(**(vars(args) | settings)), **derived)
    return run_dir


class RunCheckpoint(keras.callbacks.Callback):
    """Track the best epoch (by --monitor); save at most once per `save_interval` seconds and at the end.

    Saving by time, not by epoch: a head's epoch takes milliseconds and its checkpoint longer, while a
    fine-tuning epoch takes minutes; either way a crash loses at most `save_interval` seconds. A save
    writes the best weights (held in memory until then) to checkpoint_best.keras, then log.csv, then the
    resumable state via `checkpoints.save` (checkpoint_last.npz, state.json last) for a clean resume.
    """

    def __init__(self, folder, monitor, rows, best, print_every, save_interval=60.0, scalars=None):
        super().__init__()
        self.folder, self.monitor, self.rows, self.best = folder, monitor, rows, best
        # Every epoch's row also goes to TensorBoard at once (log.csv is written with the checkpoint).
        self.scalars = scalars or tensorboard.ScalarLog(folder, enabled=False)
        self.maximise = monitor.endswith("accuracy")
        self.print_every, self.save_interval = print_every, save_interval
        self.best_weights, self.last_save = None, time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, **{key: float(value) for key, value in (logs or {}).items()}}
        self.rows.append(row)
        self.scalars.write(epoch + 1, row)
        value = row[self.monitor]
        if self.best is None or (value > self.best if self.maximise else value < self.best):
            self.best, self.best_weights = value, [np.array(weight) for weight in self.model.get_weights()]
        if (epoch + 1) % self.print_every == 0 or epoch == 0:
            print(f"  epoch {epoch + 1}: " + " ".join(f"{key} {row[key]:.4f}" for key in list(row)[1:]))
        if time.monotonic() - self.last_save < self.save_interval and epoch + 1 != self.params.get("epochs"):
            return
        if self.best_weights is not None:
            current_weights = self.model.get_weights()
            self.model.set_weights(self.best_weights)
            atomic.save_keras(self.model, self.folder / "checkpoint_best.keras")
            self.model.set_weights(current_weights)
            self.best_weights = None
        atomic.write_csv(self.folder / "log.csv", self.rows, list(row))
        state = {"epoch": epoch + 1, "best": self.best, "history": self.rows}
        checkpoints.save(self.folder, "checkpoint_last", checkpoints.model_arrays(self.model), state)
        self.last_save = time.monotonic()


def predict_logits(model, inputs, batch_size=256):
    """Logits for an in-memory array (one compiled step over batches, traced once) or a dataset."""
    if isinstance(inputs, np.ndarray):
        step = tf.function(lambda batch: model(batch, training=False), reduce_retracing=True)
        batches = [inputs[start : start + batch_size] for start in range(0, len(inputs), batch_size)]
        return np.concatenate([step(batch).numpy() for batch in batches])
    return model.predict(inputs, verbose=0)


def train_and_evaluate(folder, build_model, data, loss, args, strategy, **compile_options):
    """Train one configuration (resuming from its checkpoint) and score its best validation epoch.

    The best epoch is the study's checkpoint selection; returns {split: metrics} on `data.evaluate`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    resumed = checkpoints.load(folder) if args.resume else None
    metrics = [
        keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
        MacroAccuracy(len(CLASS_NAMES)),
    ]
    with strategy.scope():
        model = build_model()
        # torch.optim.AdamW's update (epsilon after the bias correction) unless --optimizer_convention keras.
        convention, decay = args.optimizer_convention, args.weight_decay
        optimizer = optimizers.make_optimizer(
            "adamw", args.learning_rate, convention=convention, weight_decay=decay
        )
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, **compile_options)
        rows, best, start_epoch = [], None, 0
        if resumed is not None:
            state, arrays = resumed
            model.optimizer.build(model.trainable_variables)
            checkpoints.restore_model(model, arrays, folder / f"{state['checkpoint']}.npz")
            start_epoch, best = int(state["epoch"]), state["best"]
            rows = state["history"][:start_epoch]
            print(f"  resuming from epoch {start_epoch}")
    if start_epoch < args.epochs:
        scalars = tensorboard.ScalarLog(folder, enabled=not args.no_tensorboard)
        checkpoint = RunCheckpoint(
            folder, args.monitor, rows, best, max(1, args.epochs // 5), scalars=scalars
        )
        fit = {"epochs": args.epochs, "initial_epoch": start_epoch, "callbacks": [checkpoint], "verbose": 0}
        model.fit(data.train, validation_data=data.val, shuffle=False, **fit)
    best_model = keras.saving.load_model(folder / "checkpoint_best.keras")
    return {
        split: classification_metrics(labels, np.argmax(predict_logits(best_model, inputs), -1))
        for split, (inputs, labels) in data.evaluate.items()
    }


def frozen_features(args, inputs, seed, run_dir, strategy):
    """The tokens the heads train on: embeddings, cached frozen-backbone features, or None (fine-tune).

    Frozen probe: the backbone never changes and nothing is augmented, so its features are computed
    once per backbone instead of once per epoch as in the study's toolkit; the head sees the same
    numbers (test_head_on_cached_tokens_equals_the_end_to_end_model; the bench
    bench_lucas_frozen_features measures the speed-up).
    """
    if inputs.reader is None or not args.freeze_backbone:
        return inputs.embeddings
    tag = "pretrained" if args.weights else f"seed{seed}"
    cache = run_dir / f"features_{tag}.npy"
    if cache.is_file():
        tokens = np.load(cache)
    else:
        runs.seed_everything(seed, args.deterministic)
        with strategy.scope():
            extractor = build_feature_extractor(args, inputs)
        every_chip = np.arange(len(inputs.labels))
        chips = inputs.reader.dataset(every_chip, inputs.image_size, max(32, args.batch_size))
        with inputs.reader.surface():
            tokens = extractor.predict(chips, verbose=0).astype(np.float32)
        atomic.save_keras(extractor, run_dir / f"feature_extractor_{tag}.keras")
        atomic.save_npy(cache, tokens)
    print(f"seed {seed}: features {tokens.shape[1:]} per chip ({cache.name})")
    return tokens


def training_data(args, inputs, tokens, seed):
    """Train (shuffled with `seed` by tf.data each epoch) and val datasets, and {split: (inputs, labels)}.

    Over the tokens for a head (frozen probe, embeddings), else read from the chips (fine-tuning).
    """
    labels, splits, size = inputs.labels, inputs.splits, inputs.image_size

    def dataset(indices, shuffle):
        if tokens is None:
            return inputs.reader.dataset(indices, size, args.batch_size, labels, seed if shuffle else None)
        data = tf.data.Dataset.from_tensor_slices((tokens[indices], labels[indices]))
        data = data.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True) if shuffle else data
        # A new iterator each epoch: without autotune no pass ends waiting (bench/pass_end_idle.py).
        return pipelines.without_autotune(data.batch(args.batch_size).prefetch(tf.data.AUTOTUNE))

    evaluated = [name for name in ("val", "test") if name in splits]
    if tokens is None:
        evaluate = {name: (dataset(splits[name], False), labels[splits[name]]) for name in evaluated}
    else:
        evaluate = {name: (tokens[splits[name]], labels[splits[name]]) for name in evaluated}
    train, val = dataset(splits["train"], True), dataset(splits["val"], False)
    return SimpleNamespace(train=train, val=val, evaluate=evaluate)


def train_configuration(args, inputs, tokens, loss_name, decoder, seed, run_dir, strategy):
    """One loss x decoder x seed: train (or keep its finished result), export the best model, score it."""
    config, folder = f"{loss_name}/{decoder}", run_dir / f"{loss_name}_{decoder}" / f"seed{seed}"
    if (folder / "metrics.json").is_file():
        earlier = json.loads((folder / "metrics.json").read_text())
        if earlier["epochs"] >= args.epochs or not args.resume:
            print(f"{config} seed {seed}: finished earlier ({earlier['epochs']} epochs), kept")
            return earlier
    print(f"{config} seed {seed}: training {args.epochs} epochs -> {folder}")
    runs.seed_everything(seed, args.deterministic)
    data = training_data(args, inputs, tokens, seed)
    head = {"num_classes": len(CLASS_NAMES), "decoder": decoder, "mlp_dim": args.mlp_dim}
    head["dropout"] = args.head_dropout

    def build_model():
        if tokens is not None:
            return build_head(tokens.shape[1:], **head)
        extractor = build_feature_extractor(args, inputs)
        return keras.Model(extractor.input, build_head(extractor.output.shape[1:], **head)(extractor.output))

    # A head's step takes microseconds: run 16 steps per call and skip XLA compile time.
    options = {"steps_per_execution": 16, "jit_compile": False} if tokens is not None else {}
    loss = make_loss(loss_name, inputs.class_weights, args)
    # A chip read failure inside tf.data comes back as its one-line InputError.
    with inputs.reader.surface() if inputs.reader is not None else contextlib.nullcontext():
        result = train_and_evaluate(folder, build_model, data, loss, args, strategy, **options)
    # The exported model is the selected checkpoint itself (a copy, not a second serialisation).
    exported = folder / ("head.keras" if tokens is not None else "model.keras")
    atomic.write_bytes(exported, (folder / "checkpoint_best.keras").read_bytes())
    result.update(config=config, seed=seed, epochs=args.epochs)
    atomic.write_json(folder / "metrics.json", result)
    scores = f"OA {result['val']['overall_accuracy']:.3f} macro acc {result['val']['macro_accuracy']:.3f}"
    print(f"  {config} seed {seed} val: {scores} macro F1 {result['val']['macro_f1']:.3f}")
    return result


# ---- results: mean +- std over seeds, paired comparisons, tables, plots ----

# The study's comparison: weighted CE vs focal loss with each decoder, on the same seeds.
PAIRED_CONFIGS = [("wce/identity", "focal/identity"), ("wce/mlp", "focal/mlp")]
PAIRED_METRICS = {"overall_accuracy": "OA", "macro_accuracy": "macro acc", "macro_f1": "macro F1"}
PAIRED_COLUMNS = ["comparison", "metric", "n", "mean_difference", "interval_95", "wins", "wilcoxon_p", "sure"]


def paired_comparisons(results, split):
    """wCE vs focal per decoder over seeds: markdown cells and CSV rows of `common.reports.paired_rows`.

    Seed k of one configuration is paired with seed k of the other (same split, same features); the
    difference is wce - focal, so a positive mean favours weighted CE. Each row carries the per-seed
    differences, their mean with a 95 % t interval, the win count and a Wilcoxon p (n >= 5); "sure" is
    "yes" only where the interval excludes 0, the only case where one loss may be called better.
    """
    pairs = [pair for pair in PAIRED_CONFIGS if all(config in results for config in pair)]
    values = {
        config: {name: [result[split][key] for result in per_seed] for key, name in PAIRED_METRICS.items()}
        for config, per_seed in results.items()
    }
    cells = reports.paired_rows(values, pairs, list(PAIRED_METRICS.values()), digits=3)
    compared = [(first, second, metric) for first, second in pairs for metric in PAIRED_METRICS.values()]
    rows = []
    for cell, (first, second, metric) in zip(cells, compared, strict=True):
        differences = np.subtract(values[first][metric], values[second][metric])
        cell.append(" ".join(f"{difference:+.3f}" for difference in differences))
        row = dict(zip(PAIRED_COLUMNS, cell[: len(PAIRED_COLUMNS)], strict=True))
        rows.append(row | {"per_seed_differences": [round(float(value), 4) for value in differences]})
    return cells, rows


def summarise(results, split):
    """mean +- sample std (ddof=1) over seeds of each configuration's headline and per-class metrics."""
    summary = {}
    for config, per_seed in results.items():
        entry = summary[config] = {"seeds": len(per_seed)}
        for key in HEADLINE_KEYS:
            mean, std = reports.mean_std([result[split][key] for result in per_seed], ddof=1)
            entry |= {f"{key}_mean": mean, f"{key}_std": std}
        # A class absent from the split has NaN accuracy in every seed: its mean and std stay NaN.
        per_class = np.array([[row["accuracy"] for row in result[split]["per_class"]] for result in per_seed])
        stats = [reports.mean_std(accuracy, ddof=1) for accuracy in per_class.T]
        entry["per_class_accuracy_mean"] = [mean for mean, _ in stats]
        entry["per_class_accuracy_std"] = [std if np.isfinite(mean) else np.nan for mean, std in stats]
        confusion = np.sum([result[split]["confusion_matrix"] for result in per_seed], axis=0)
        entry["confusion_matrix_sum"] = confusion.tolist()
    return summary


def summary_line(summary, split):
    """The run's last line (also in metrics.json): OA, macro accuracy and macro F1 per configuration."""
    parts = [
        f"{config} OA {v['overall_accuracy_mean']:.3f}+-{v['overall_accuracy_std']:.3f} "
        f"macc {v['macro_accuracy_mean']:.3f}+-{v['macro_accuracy_std']:.3f} "
        f"mF1 {v['macro_f1_mean']:.3f}+-{v['macro_f1_std']:.3f}"
        for config, v in summary.items()
    ]
    seeds = next(iter(summary.values()))["seeds"]
    return f"summary ({split}, {seeds} seed{'s' if seeds > 1 else ''}): " + "; ".join(parts)


def write_tables(run_dir, summary, split):
    """summary_<split>.csv / .md (the trade-off table) and per_class_<split>.csv."""
    columns = [f"{key}_{stat}" for key in HEADLINE_KEYS for stat in ("mean", "std")]
    header = [f"config ({split}, mean +- std over seeds)", "OA", "macro acc", "macro F1", "macro precision"]
    rows, cells, per_class = [], [], []
    for config, v in summary.items():
        rows.append({"config": config, "split": split, "seeds": v["seeds"]})
        rows[-1] |= {column: round(v[column], 4) for column in columns}
        means = [reports.format_mean_std(v[f"{k}_mean"], v[f"{k}_std"], 3) for k in HEADLINE_KEYS]
        cells.append([config, *means])
        accuracies = zip(CLASS_NAMES, v["per_class_accuracy_mean"], v["per_class_accuracy_std"], strict=True)
        for name, mean, std in accuracies:
            per_class.append({"config": config, "class": name, "accuracy_mean": round(mean, 4)})
            per_class[-1]["accuracy_std"] = round(std, 4)
    markdown = reports.markdown_table(header, cells)
    reports.write_table(run_dir / f"summary_{split}", rows, list(rows[0]), markdown)
    atomic.write_csv(run_dir / f"per_class_{split}.csv", per_class, list(per_class[0]))


def plot_results(run_dir, summary, split):
    """Per-class accuracy bars of every configuration and one confusion matrix per configuration."""
    figure, axis = plots.pyplot().subplots(figsize=(11, 4))
    bars = {name: (v["per_class_accuracy_mean"], v["per_class_accuracy_std"]) for name, v in summary.items()}
    plots.grouped_bars(axis, CLASS_NAMES, bars)
    axis.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=30, ha="right")
    axis.set(ylabel=f"per-class accuracy ({split})", ylim=(0, 1))
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plots.save(figure, run_dir / f"per_class_accuracy_{split}.png")
    for config, v in summary.items():
        title = f"{config} ({split}, summed over {v['seeds']} seeds, row-normalised)"
        path = run_dir / f"confusion_{config.replace('/', '_')}_{split}.png"
        plots.confusion_matrix(v["confusion_matrix_sum"], CLASS_NAMES, path, title, "counts", fontsize=7)


def write_paired(run_dir, results, split):
    """paired_<split>.md / .csv when two or more seeds pair up a grid's configurations; their rows."""
    cells, rows = paired_comparisons(results, split)
    if not cells or cells[0][2] < 2:
        return []
    header = [f"{reports.PAIRED_HEADER[0]} ({split}, wce - focal)", *reports.PAIRED_HEADER[1:]]
    markdown = reports.markdown_table([*header, "per-seed differences"], cells)
    reports.write_table(run_dir / f"paired_{split}", rows, list(rows[0]), markdown)
    return rows


def report(run_dir, results, eval_splits):
    """Tables and plots per evaluated split; metrics.json (marks the run finished); the summary line."""
    summaries = {split: summarise(results, split) for split in eval_splits}
    paired = {}
    for split, summary in summaries.items():
        write_tables(run_dir, summary, split)
        plot_results(run_dir, summary, split)
        paired[split] = write_paired(run_dir, results, split)
    headline = "test" if "test" in summaries else "val"
    line = summary_line(summaries[headline], headline)
    print((run_dir / f"summary_{headline}.md").read_text(), end="")
    if paired[headline]:
        print((run_dir / f"paired_{headline}.md").read_text(), end="")
        print(
            "note: seed k of wce is paired with seed k of focal; 'sure' = the 95 % interval of the mean "
            "difference excludes 0, the only rows that say which loss is better"
        )
    if headline == "val":
        print(
            "note: the validation set also selected the checkpoint, so these numbers are optimistic "
            "(as in the study); --test_fraction adds an untouched test set"
        )
    metrics = {"headline_split": headline, "summary_line": line, "summary": summaries, "paired": paired}
    atomic.write_json(run_dir / "metrics.json", metrics | {"class_names": CLASS_NAMES})
    print(line)
    return summaries


def check_arguments(args):
    """Fractions, counts and sizes a user can get wrong, refused before anything is read or written."""
    val, test = args.val_fraction, args.test_fraction
    valid = 0 < val < 1 and 0 <= test < 1 and val + test < 1
    expected = "fractions in (0, 1) summing to below 1"
    require(valid, "--val_fraction/--test_fraction", f"{val}/{test}", expected)
    counts = {
        "--seeds": (args.seeds, 1000),
        "--epochs": (args.epochs, 10**6),
        "--batch_size": (args.batch_size, 2**20),
    }
    counts |= {"--image_size": (args.image_size or 1, 4096), "--mlp_dim": (args.mlp_dim or 1, 2**16)}
    for flag, (value, largest) in counts.items():
        require(1 <= value <= largest, flag, f"{value}", f"an integer from 1 to {largest}")
    # NumPy and sklearn take seeds below 2^32; every seed of --seeds must be one.
    seeds_valid = args.seed >= 0 and args.seed + args.seeds <= 2**32
    require(seeds_valid, "--seed", f"{args.seed} (with --seeds {args.seeds})", "seeds in 0 .. 2^32 - 1")
    require(0 <= args.split_seed < 2**32, "--split_seed", f"{args.split_seed}", "0 .. 2^32 - 1")
    require(0 <= args.head_dropout < 1, "--head_dropout", f"{args.head_dropout}", "a rate in [0, 1)")
    require(0 <= args.focal_gamma <= 100, "--focal_gamma", f"{args.focal_gamma}", "0 .. 100")
    require(0 < args.learning_rate <= 10, "--learning_rate", f"{args.learning_rate}", "in (0, 10]")
    # Decoupled decay scales every weight by (1 - lr wd) per step: at 1 or more it flips or zeroes them.
    decay = args.learning_rate * args.weight_decay
    require(0 <= decay < 1, "--weight_decay", f"{args.weight_decay}", "0 <= learning_rate x weight_decay < 1")
    require(0 < args.demo_scale <= 10, "--demo_scale", f"{args.demo_scale}", "in (0, 10]")


@cli_entry
def main(args):
    check_arguments(args)
    runs.seed_everything(args.seed, args.deterministic)
    if args.demo:
        args.data_root = str(
            demo_chips.write_demo_chips(cli.demo_data_dir(args, SCRIPT_STEM), args.demo_scale)
        )
    runs.print_args(args)
    configs = GRID if args.grid else [(args.loss, args.decoder)]
    seeds = [args.seed + offset for offset in range(args.seeds)]

    # ---- data ----
    inputs = prepare_inputs(args)
    run_dir = prepare_run(args, inputs, configs, seeds)
    strategy = runs.make_strategy(args.strategy)

    # ---- train ----
    results = {f"{loss}/{decoder}": [] for loss, decoder in configs}
    for seed in seeds:
        tokens = frozen_features(args, inputs, seed, run_dir, strategy)
        for loss, decoder in configs:
            result = train_configuration(args, inputs, tokens, loss, decoder, seed, run_dir, strategy)
            results[f"{loss}/{decoder}"].append(result)

    # ---- evaluate ----
    return report(run_dir, results, [name for name in ("val", "test") if name in inputs.splits])


if __name__ == "__main__":
    main(get_args_parser().parse_args())
