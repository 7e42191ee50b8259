"""LUCAS land cover under extreme class imbalance: weighted CE vs focal loss, identity vs MLP decoder.

Source study: fine-tuning the TerraMind geospatial foundation model as a frozen-backbone probe on
LUCAS 2018 points in Italy (Politecnico di Milano, "Geospatial Foundation Models" project; no arXiv
paper). 1,994 chips of 224 x 224 px, 6 bands [B4, B3, B2, B8, B11, B12] (Harmonized Landsat-Sentinel,
2018 median), 10 land-cover classes from 511 down to 20 chips. The question: under this imbalance,
how do class-weighted cross-entropy and focal loss, and an identity vs an MLP decoder, trade overall
(micro) accuracy against macro accuracy? This script reproduces the study's trade-off table (OA,
macro accuracy, macro F1 per loss x decoder, mean +- std over seeds), per-class accuracies and
confusion matrices.

TerraMind is a PyTorch model, so the backbone here is any Keras backbone with its input adapted to 6
bands (`--backbone`, optional local `--weights`), or precomputed foundation-model embeddings
(`--embeddings`, the study's frozen probe on features extracted elsewhere).

Commands:
    python train_lucas_classifier.py --data_root lucas_chips --loss wce --decoder identity
    python train_lucas_classifier.py --data_root lucas_chips --grid --seeds 5
    python train_lucas_classifier.py --labels_csv lucas_chips/chips_LC_class.csv \\
        --embeddings terramind_embeddings.npy --grid --seeds 5
    python train_lucas_classifier.py --demo --grid --seeds 2

Runtime: the demo (243 synthetic 32 px chips, simplecnn backbone, 4 configurations x 2 seeds x 30
epochs) needs about 47 s of CPU time, about a minute on a laptop. With a frozen backbone the chips
pass through it once (features are cached in the run folder) and only the heads train; on a CPU the
per-token MLP decoder on 7 x 7 x 2048 ResNet50 features is the slow part (a GPU is advised there).

The demo should print, as its last line (per-class tables and plots are in the run folder):
    summary (val, 2 seeds): wce/identity OA 0.633+-0.058 macc 0.509+-0.094 mF1 0.406+-0.130; wce/mlp
    OA 0.755+-0.058 macc 0.706+-0.136 mF1 0.663+-0.168; focal/identity OA 0.571+-0.000 macc
    0.606+-0.052 mF1 0.433+-0.036; focal/mlp OA 0.745+-0.014 macc 0.702+-0.059 mF1 0.668+-0.089
Study reference (val set, frozen TerraMind-base): weighted CE + identity macro acc 0.402, OA 0.451,
macro F1 0.339; MLP decoder within 0.5 pt; focal loss macro acc 0.306-0.314, OA 0.536-0.541.
"""

import argparse
import csv
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
import keras
from keras import layers, ops

from common.metrics import ConfusionMatrix
from common.raster import open_geotiff, read_window, write_geotiff
from common import atomic, cli, runs
from common.errors import InputError, cli_entry, require, require_dir, require_file, require_finite

SCRIPT_STEM = "train_lucas_classifier"
LABELS_CSV_NAME = "chips_LC_class.csv"
BAND_NAMES = ["B4", "B3", "B2", "B8", "B11", "B12"]  # R, G, B, broad NIR, SWIR1, SWIR2
# LUCAS 2018 STR18 codes 1..10 map to class indices 0..9.
CLASS_NAMES = ["Arable lands", "Permanent crops", "Grass", "Wooded areas", "Shrubs",
               "Bare/low vegetation", "Artificial", "Inland water", "Transitional/coastal water",
               "Not interpretable"]
STUDY_CHIP_COUNTS = [511, 178, 205, 704, 126, 57, 125, 43, 20, 25]
GRID = [("wce", "identity"), ("wce", "mlp"), ("focal", "identity"), ("focal", "mlp")]
# Keras ResNets were trained on caffe-style BGR input: their first kernel's channels are B, G, R.
BGR_BACKBONES = {"resnet50", "resnet101"}


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="LUCAS land cover: weighted CE vs focal loss, identity vs MLP decoder, frozen probe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data_root", default=None,
                      help="Folder with <class_id>/<Point_ID>.tif 6-band chips and chips_LC_class.csv.")
    data.add_argument("--labels_csv", default=None,
                      help="Labels CSV (Point_ID, STR18); default <data_root>/chips_LC_class.csv.")
    data.add_argument("--embeddings", default=None,
                      help="Precomputed embeddings .npy, one row per labels-CSV row in CSV order, shaped "
                           "(N, D), (N, tokens, D) or (N, h, w, D); replaces the backbone (frozen probe).")
    data.add_argument("--image_size", type=int, default=None,
                      help="Resize chips to this size; default: the chips' own size (224 for LUCAS).")
    data.add_argument("--val_fraction", type=float, default=0.2,
                      help="Stratified validation share of all chips (study: 0.2 -> 1,595 / 399).")
    data.add_argument("--test_fraction", type=float, default=0.0,
                      help="Stratified held-out test share. The study used the validation set both for "
                           "checkpoint selection and as its test set (0.0 reproduces that; its numbers "
                           "are optimistic); > 0 reports an untouched test set as well.")
    data.add_argument("--split_seed", type=int, default=42, help="random_state of the split (study: 42).")
    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default=None,
                       choices=["resnet50", "resnet101", "efficientnetv2b0", "mobilenetv3small",
                                "convnexttiny", "simplecnn"],
                       help="Keras backbone with 6 input bands; default resnet50 (simplecnn, a 3-layer CNN "
                            "for quick runs, with --demo).")
    model.add_argument("--weights", default=None,
                       help="Local backbone weights (.weights.h5 / .h5) for 6 or 3 input channels; 3-channel "
                            "RGB weights are adapted to the 6 bands. Default: random initialisation.")
    model.add_argument("--freeze_backbone", action=argparse.BooleanOptionalAction, default=True,
                       help="Frozen probe as in the study: features are computed once and only the head "
                            "trains. --no-freeze_backbone fine-tunes end to end from the chips.")
    model.add_argument("--decoder", default="identity", choices=["identity", "mlp"],
                       help="identity: Dropout -> Dense(C) per token, mean over tokens; mlp: Dense(embed) "
                            "ReLU per token first (TerraTorch IdentityDecoder / MLPDecoder + head).")
    model.add_argument("--mlp_dim", type=int, default=None,
                       help="Hidden width of the mlp decoder; default: the embedding dimension.")
    model.add_argument("--head_dropout", type=float, default=0.1, help="Dropout before the last Dense.")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--loss", default="wce", choices=["wce", "focal", "ce"],
                      help="wce: class-weighted cross-entropy; focal: softmax focal loss; ce: unweighted.")
    loss.add_argument("--class_weights", default="balanced", choices=["balanced", "sqrt"],
                      help="balanced: N / (C n_c) from the training split (sklearn); sqrt: its square root.")
    loss.add_argument("--focal_gamma", type=float, default=2.0, help="Focal loss focusing parameter.")
    loss.add_argument("--focal_weighting", default="alpha", choices=["alpha", "none"],
                      help="alpha: class weights as the focal alpha; none: drop them, as the study's "
                           "toolkit silently did.")
    train = parser.add_argument_group("training")
    train.add_argument("--grid", action="store_true",
                       help="Run all four configurations {wce, focal} x {identity, mlp}.")
    train.add_argument("--seeds", type=int, default=1,
                       help="Number of seeds (seed, seed+1, ...); single-seed differences are noise.")
    train.add_argument("--epochs", type=int, default=None,
                       help="Training epochs; default 100 as in the study (30 with --demo).")
    train.add_argument("--batch_size", type=int, default=8, help="Global batch size (study: 8).")
    train.add_argument("--learning_rate", type=float, default=None,
                       help="AdamW learning rate; default 1e-4 as in the study (1e-3 with --demo, whose "
                            "few short epochs would otherwise barely move the head).")
    train.add_argument("--weight_decay", type=float, default=0.05, help="AdamW decoupled weight decay.")
    train.add_argument("--monitor", default="val_loss", choices=["val_loss", "val_macro_accuracy"],
                       help="Checkpoint selection on the validation set (study: val loss).")
    train.add_argument("--precision", default="auto", choices=["auto", "mixed16", "float32"],
                       help="auto: mixed float16 on GPUs with compute capability >= 7, else float32.")
    train.add_argument("--strategy", default="default", choices=["default", "mirrored", "multiworker"],
                       help="tf.distribute strategy for several GPUs or machines.")
    train.add_argument("--demo", action="store_true",
                       help="Generate small seeded 6-band chips with the study's imbalance under "
                            "<results_dir>/demo_data/ and run on them (simplecnn, 30 epochs, learning "
                            "rate 1e-3).")
    train.add_argument("--demo_scale", type=float, default=0.12,
                       help="Demo chip counts = study counts x this (at least 5 per class).")
    cli.add_run_arguments(parser)
    return parser


# ---- data ----

def make_demo_data(root, scale, chip_size=32, seed=0):
    """Write synthetic LUCAS-like chips: per-class spectra with mixing, texture and noise."""
    root = Path(root)
    if (root / LABELS_CSV_NAME).is_file():
        return root
    # Rough reflectance signatures in [B4, B3, B2, B8, B11, B12]; neighbours overlap on purpose.
    spectra = np.array([[.08, .09, .06, .30, .25, .15], [.07, .08, .05, .27, .22, .13],
                        [.06, .08, .05, .32, .24, .12], [.03, .05, .03, .30, .15, .07],
                        [.05, .07, .04, .24, .20, .11], [.15, .14, .12, .22, .30, .25],
                        [.12, .11, .10, .18, .20, .18], [.03, .04, .05, .02, .01, .01],
                        [.04, .06, .07, .04, .02, .01], [.30, .30, .32, .35, .28, .24]], np.float32)
    rng = np.random.default_rng(seed)
    rows, point_id = [], 100000
    yy, xx = np.mgrid[0:chip_size, 0:chip_size] / chip_size
    for class_index, count in enumerate(STUDY_CHIP_COUNTS):
        for _ in range(max(5, round(count * scale))):
            # Land-cover mixing: each chip is partly another class, which makes minorities hard.
            other = rng.integers(len(spectra))
            mixing = rng.uniform(0.0, 0.5)
            spectrum = (1 - mixing) * spectra[class_index] + mixing * spectra[other]
            phase, frequency = rng.uniform(0, 2 * np.pi), rng.uniform(2, 8)
            texture = 0.15 * np.sin(2 * np.pi * frequency * (xx + (class_index % 3) * yy) + phase)
            chip = spectrum[:, None, None] * (1 + texture[None] + rng.normal(0, 0.25, (6, chip_size,
                                                                                       chip_size)))
            point_id += 1
            write_geotiff(root / str(class_index + 1) / f"{point_id}.tif", chip.astype(np.float32))
            rows.append({"Point_ID": point_id, "STR18": class_index + 1})
    atomic.write_csv(root / LABELS_CSV_NAME, rows, ["Point_ID", "STR18"])
    return root


def read_labels(labels_csv):
    """Read Point_ID, STR18 rows; return point ids (str) and class indices 0..9."""
    labels_csv = require_file(labels_csv, "a labels CSV with columns Point_ID, STR18")
    try:
        table = pd.read_csv(labels_csv, dtype={"Point_ID": str})
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise InputError(labels_csv, f"cannot be read as CSV ({str(error).splitlines()[0][:100]})",
                         "a CSV with columns Point_ID, STR18") from None
    missing = [column for column in ("Point_ID", "STR18") if column not in table.columns]
    require(not missing, labels_csv, f"has no column {', '.join(missing)}", "columns Point_ID, STR18")
    require(len(table) > 0, labels_csv, "has no rows", "one row per chip")
    codes = pd.to_numeric(table["STR18"], errors="coerce")
    bad = (~codes.isin(range(1, len(CLASS_NAMES) + 1))).to_numpy()
    require(not bad.any(), labels_csv,
            f"row {int(np.argmax(bad)) + 2} has STR18 {table['STR18'].iloc[int(np.argmax(bad))]!r}",
            f"an integer 1..{len(CLASS_NAMES)}")
    duplicated = table["Point_ID"].duplicated().to_numpy()
    require(not duplicated.any(), labels_csv,
            f"Point_ID {table['Point_ID'].iloc[int(np.argmax(duplicated))]} appears twice", "unique ids")
    return table["Point_ID"].str.strip().tolist(), codes.to_numpy().astype(np.int64) - 1


def locate_chips(data_root, labels_csv, point_ids, labels):
    """Map every CSV row to <root>/<STR18>/<Point_ID>.tif and check each chip's header (6 bands)."""
    root = require_dir(data_root, "a folder of <class_id>/<Point_ID>.tif chips")
    paths = []
    for point_id, label in zip(point_ids, labels):
        path = root / str(label + 1) / f"{point_id}.tif"
        if not path.is_file():
            class_rows = int(np.sum(labels == label))
            if not path.parent.is_dir():
                raise InputError(path.parent, f"no chip folder for class STR18 {label + 1} "
                                 f"({CLASS_NAMES[label]}) although {labels_csv} lists {class_rows} "
                                 "chips of it", f"<data_root>/{label + 1}/<Point_ID>.tif for each row")
            elsewhere = sorted(root.glob(f"*/{point_id}.tif"))
            hint = f" (found in {elsewhere[0].parent.name}/ instead)" if elsewhere else ""
            raise InputError(path, f"chip of Point_ID {point_id} (STR18 {label + 1}) listed in "
                             f"{labels_csv} not found{hint}", "one chip per CSV row in its class folder")
        paths.append(path)
    sizes = set()
    for path in paths:
        with open_geotiff(path, expected_bands=len(BAND_NAMES)) as dataset:
            require(np.issubdtype(np.dtype(dataset.dtypes[0]), np.number), path,
                    f"has dtype {dataset.dtypes[0]}", "numeric reflectance")
            sizes.add((dataset.height, dataset.width))
    listed = {str(path) for path in paths}
    unlisted = sum(1 for path in root.glob("*/*.tif") if str(path) not in listed)
    if unlisted:
        print(f"note: {unlisted} chips under {root} are not in {labels_csv} and are ignored")
    return paths, sizes


class ChipReader:
    """Reads chip i as (H, W, 6) float32 inside tf.data; keeps the first InputError to report cleanly."""

    def __init__(self, paths):
        self.paths = [str(path) for path in paths]
        self.error = None

    def read(self, index):
        path = self.paths[int(index)]
        try:
            from rasterio.windows import Window

            with open_geotiff(path, expected_bands=len(BAND_NAMES)) as dataset:
                chip = read_window(dataset, Window(0, 0, dataset.width, dataset.height), path=path)
            require_finite(chip, path, "chip values")
        except InputError as error:
            self.error = self.error or error
            raise
        return np.ascontiguousarray(np.transpose(chip, (1, 2, 0)), dtype=np.float32)

    def dataset(self, indices, image_size, batch_size, labels=None, shuffle_seed=None):
        """Batched chips (and labels); parallel reads, resize only when the size differs, prefetch."""
        indices = np.asarray(indices, dtype=np.int64)
        data = tf.data.Dataset.from_tensor_slices(indices)
        if shuffle_seed is not None:
            data = data.shuffle(len(indices), seed=shuffle_seed, reshuffle_each_iteration=True)

        def load(index):
            chip = tf.numpy_function(self.read, [index], tf.float32, stateful=False)
            chip.set_shape([None, None, len(BAND_NAMES)])
            return tf.image.resize(chip, (image_size, image_size), antialias=True) if image_size else chip

        data = data.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if labels is not None:
            data = tf.data.Dataset.zip((data, tf.data.Dataset.from_tensor_slices(labels[indices])))
        return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    def run(self, function):
        """Call `function`; a chip read failure inside tf.data comes back as the reader's InputError."""
        try:
            return function()
        except (tf.errors.OpError, InputError):
            if self.error is not None:
                raise self.error from None
            raise


def stratified_split(labels, val_fraction, test_fraction, seed):
    """Stratified train/val(/test) index split (sklearn, random_state=seed), every class in every split.

    With test_fraction 0 this is exactly the study's train_test_split(test_size=0.2, stratify=y,
    random_state=42). sklearn can leave a small class out of a split by rounding; then one chip of
    it moves over from the split holding most of that class (never triggers at LUCAS counts).
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    indices = np.arange(len(labels))
    splits = {}
    rest = indices
    if test_fraction > 0:
        rest, splits["test"] = train_test_split(indices, test_size=test_fraction, stratify=labels,
                                                random_state=seed)
    splits["train"], splits["val"] = train_test_split(
        rest, test_size=val_fraction / (1.0 - test_fraction), stratify=labels[rest], random_state=seed)
    names = list(splits)
    for label in np.unique(labels):
        for name in names:
            if not np.any(labels[splits[name]] == label):
                donor = max(names, key=lambda other: int(np.sum(labels[splits[other]] == label)))
                if np.sum(labels[splits[donor]] == label) < 2:
                    continue
                moved = splits[donor][labels[splits[donor]] == label][-1]
                splits[donor] = splits[donor][splits[donor] != moved]
                splits[name] = np.append(splits[name], moved)
    return {name: np.sort(split) for name, split in splits.items()}


def band_statistics(reader, train_indices, image_size, batch_size):
    """Per-band mean and variance over the TRAIN chips only (the study used all chips: a leak)."""
    total, total_squares, count = np.zeros(len(BAND_NAMES)), np.zeros(len(BAND_NAMES)), 0

    def accumulate():
        nonlocal total, total_squares, count
        for chips in reader.dataset(train_indices, image_size, batch_size).as_numpy_iterator():
            pixels = chips.reshape(-1, chips.shape[-1]).astype(np.float64)
            total += pixels.sum(axis=0)
            total_squares += (pixels ** 2).sum(axis=0)
            count += len(pixels)

    reader.run(accumulate)
    mean = total / count
    return mean, np.maximum(total_squares / count - mean ** 2, 1e-12)


# ---- model ----

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
    applications = keras.applications
    return {
        "resnet50": applications.ResNet50, "resnet101": applications.ResNet101,
        "efficientnetv2b0": lambda **kw: applications.EfficientNetV2B0(include_preprocessing=False, **kw),
        "mobilenetv3small": lambda **kw: applications.MobileNetV3Small(include_preprocessing=False, **kw),
        "convnexttiny": lambda **kw: applications.ConvNeXtTiny(include_preprocessing=False, **kw),
        "simplecnn": lambda input_shape, **kw: simple_cnn(input_shape),
    }[name]


def adapt_first_kernel(kernel, bands, bgr):
    """RGB kernel (kh, kw, 3, out) -> (kh, kw, bands, out): B4, B3, B2 get the R, G, B filters, the
    extra bands their mean, and everything is scaled by 3 / bands to keep the activation scale."""
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
    """Keras backbone with 6 input bands, optionally initialised from local 6- or 3-channel weights."""
    constructor = backbone_constructor(name)
    with warnings.catch_warnings():
        # Keras notes that ImageNet models expect 1 or 3 channels: 6 bands is the point here.
        warnings.filterwarnings("ignore", message="This model usually expects 1 or 3 input channels")
        backbone = constructor(include_top=False, weights=None,
                               input_shape=(image_size, image_size, len(BAND_NAMES)))
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
        raise InputError(weights, f"does not fit {name} with 6 or 3 input channels "
                         f"({str(error).splitlines()[0][:120]})",
                         f"weights saved from Keras {name}") from None
    adapted = False
    for source, target in zip(rgb_backbone.layers, backbone.layers):
        values = source.get_weights()
        if values and not adapted and values[0].ndim == 4 and values[0].shape[2] == 3:
            values[0] = adapt_first_kernel(values[0], len(BAND_NAMES), name in BGR_BACKBONES)
            adapted = True
        target.set_weights(values)
    print(f"backbone {name}: RGB weights from {weights} adapted to {len(BAND_NAMES)} bands")
    return backbone


def build_feature_extractor(args, image_size, band_mean, band_variance):
    """Raw reflectance -> train-split normalisation -> backbone -> tokens (h * w, features)."""
    inputs = keras.Input((image_size, image_size, len(BAND_NAMES)), name="chip")
    x = layers.Normalization(mean=band_mean, variance=band_variance, name="band_normalisation")(inputs)
    backbone = build_backbone(args.backbone, image_size, args.weights)
    backbone.trainable = not args.freeze_backbone
    x = backbone(x, training=False if args.freeze_backbone else None)
    tokens = layers.Reshape((-1, x.shape[-1]), name="tokens")(x)
    return keras.Model(inputs, tokens, name="feature_extractor")


def build_head(token_shape, num_classes, decoder, mlp_dim, dropout):
    """TerraTorch decoder + ClassificationHead: per-token [Dense(embed) ReLU] -> Dropout -> Dense(C),
    then the mean over tokens (linear_after_pool=False). Identity = mean pool -> Dense(C) at inference."""
    inputs = keras.Input(token_shape, name="tokens")
    x = inputs
    if decoder == "mlp":
        x = layers.Dense(mlp_dim or token_shape[-1], activation="relu", name="mlp_decoder")(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(num_classes, name="classifier")(x)
    logits = layers.GlobalAveragePooling1D(dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=f"{decoder}_head")


def as_tokens(embeddings):
    """(N, D) -> (N, 1, D); (N, T, D) stays; (N, h, w, D) -> (N, h*w, D)."""
    return embeddings.reshape(len(embeddings), -1, embeddings.shape[-1])


# ---- losses and metrics ----

def class_weights_from_counts(train_labels, num_classes, kind="balanced"):
    """sklearn 'balanced': w_c = N / (C n_c) over the classes present in the training split;
    'sqrt' softens it to sqrt(N / (C n_c)). Classes absent from training get weight 0."""
    counts = np.bincount(np.asarray(train_labels), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return np.sqrt(weights) if kind == "sqrt" else weights


@keras.saving.register_keras_serializable(package="rsrepro")
class SoftmaxFocalLoss(keras.losses.Loss):
    """Softmax focal loss (Lin et al., ICCV 2017, Eq. 5): FL_i = -alpha_{y_i} (1 - p_{y_i})^gamma log p_{y_i}
    from logits. gamma = 0 with alpha = class weights is weighted cross-entropy, with alpha = None plain
    cross-entropy. `weighted_mean` divides by sum_i alpha_{y_i} instead of the batch size, which is
    PyTorch's CrossEntropyLoss(weight=w) reduction used by the study for weighted CE."""

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
        return {**super().get_config(), "class_weights": self.class_weights, "gamma": self.gamma,
                "weighted_mean": self.weighted_mean}


def make_loss(loss_name, class_weights, args):
    if loss_name == "wce":
        return SoftmaxFocalLoss(class_weights, gamma=0.0, weighted_mean=True, name="weighted_ce")
    if loss_name == "focal":
        alpha = class_weights if args.focal_weighting == "alpha" else None
        return SoftmaxFocalLoss(alpha, gamma=args.focal_gamma, name="focal_loss")
    return SoftmaxFocalLoss(None, gamma=0.0, name="cross_entropy")


@keras.saving.register_keras_serializable(package="rsrepro")
class MacroAccuracy(keras.metrics.Metric):
    """Streaming macro accuracy (= balanced accuracy = mean recall over classes present in the truth)."""

    def __init__(self, num_classes, name="macro_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.counts = self.add_variable(shape=(self.num_classes, self.num_classes), initializer="zeros",
                                        name="counts", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        prediction = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        pairs = ops.bincount(truth * self.num_classes + prediction, minlength=self.num_classes ** 2)
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


def classification_metrics(truth, prediction, num_classes=len(CLASS_NAMES)):
    """OA, macro accuracy (balanced accuracy), macro F1 / precision, per-class values, confusion counts."""
    confusion = ConfusionMatrix(num_classes).update(truth, prediction)
    values = confusion.metrics(CLASS_NAMES[:num_classes])
    support = confusion.counts.sum(axis=1)
    recall = np.array([row["recall"] for row in values["per_class"]])
    return {
        "overall_accuracy": values["accuracy"],
        # Balanced accuracy: a class absent from the truth has no recall and is not averaged.
        "macro_accuracy": float(np.mean(recall[support > 0])),
        "macro_f1": values["macro_f1"],
        "macro_precision": values["macro_precision"],
        "per_class": [{"class": row["class"], "support": row["support"], "accuracy": row["recall"],
                       "precision": row["precision"], "f1": row["f1"]} for row in values["per_class"]],
        "confusion_matrix": confusion.counts.tolist(),
    }


# ---- training ----

class RunCheckpoint(keras.callbacks.Callback):
    """Track the best epoch (by --monitor); at most once per `save_interval` seconds, and after the
    last epoch, atomically save the best and the last model, the log and the state.

    Saving by time, not by epoch: a head's epoch takes milliseconds and its checkpoint longer, while
    a fine-tuning epoch takes minutes; either way a crash loses at most `save_interval` seconds. The
    best weights wait in memory until the next save. state.json is written last, so a resumed run
    restarts from complete files.
    """

    def __init__(self, folder, monitor, rows, best, print_every, save_interval=60.0):
        super().__init__()
        self.folder, self.monitor, self.rows, self.best = Path(folder), monitor, rows, best
        self.maximise = monitor.endswith("accuracy")
        self.print_every, self.save_interval = print_every, save_interval
        self.best_weights = None
        self.last_save = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, **{key: float(value) for key, value in (logs or {}).items()}}
        self.rows.append(row)
        value = row[self.monitor]
        if self.best is None or (value > self.best if self.maximise else value < self.best):
            self.best = value
            self.best_weights = [np.array(weight) for weight in self.model.get_weights()]
        if (epoch + 1) % self.print_every == 0 or epoch == 0:
            print(f"  epoch {epoch + 1}: " + " ".join(f"{key} {value:.4f}" for key, value in row.items()
                                                        if key != "epoch"))
        if time.monotonic() - self.last_save < self.save_interval and epoch + 1 != self.params.get("epochs"):
            return
        if self.best_weights is not None:
            current_weights = self.model.get_weights()
            self.model.set_weights(self.best_weights)
            atomic.save_keras(self.model, self.folder / "checkpoint_best.keras")
            self.model.set_weights(current_weights)
            self.best_weights = None
        atomic.save_keras(self.model, self.folder / "checkpoint_last.keras")
        atomic.write_csv(self.folder / "log.csv", self.rows, list(row))
        atomic.write_json(self.folder / "state.json", {"epoch": epoch + 1, "best": self.best})
        self.last_save = time.monotonic()


def predict_logits(model, inputs, batch_size=256):
    """Logits for an in-memory array (batched direct calls: no per-model predict tracing) or a dataset."""
    if isinstance(inputs, np.ndarray):
        return np.concatenate([np.asarray(model(inputs[start:start + batch_size], training=False))
                               for start in range(0, len(inputs), batch_size)])
    return model.predict(inputs, verbose=0)


def train_and_evaluate(folder, build_model, train_data, val_data, eval_inputs, class_weights, loss_name,
                       args, strategy, steps_per_execution=1, jit_compile="auto"):
    """Train one configuration (resuming from its checkpoint), restore the best epoch on validation
    (the study's checkpoint selection) and return {split: metrics} for eval_inputs = {split: (inputs,
    labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / "state.json"
    rows, best, start_epoch = [], None, 0
    with strategy.scope():
        if args.resume and state_path.is_file() and (folder / "checkpoint_last.keras").is_file():
            state = json.loads(state_path.read_text())
            start_epoch, best = int(state["epoch"]), state["best"]
            with open(folder / "log.csv", newline="") as file:
                rows = [{key: int(value) if key == "epoch" else float(value) for key, value in row.items()}
                        for row in csv.DictReader(file)]
            rows = rows[:start_epoch]
            model = keras.saving.load_model(folder / "checkpoint_last.keras")
            print(f"  resuming from epoch {start_epoch}")
        else:
            model = build_model()
            model.compile(optimizer=keras.optimizers.AdamW(args.learning_rate,
                                                           weight_decay=args.weight_decay),
                          loss=make_loss(loss_name, class_weights, args),
                          metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                                   MacroAccuracy(len(CLASS_NAMES))],
                          steps_per_execution=steps_per_execution, jit_compile=jit_compile)
    if start_epoch < args.epochs:
        checkpoint = RunCheckpoint(folder, args.monitor, rows, best, max(1, args.epochs // 5))
        model.fit(train_data, validation_data=val_data, epochs=args.epochs, initial_epoch=start_epoch,
                  callbacks=[checkpoint], shuffle=False, verbose=0)
    best_model = keras.saving.load_model(folder / "checkpoint_best.keras")
    results = {}
    for split, (inputs, labels) in eval_inputs.items():
        results[split] = classification_metrics(labels, np.argmax(predict_logits(best_model, inputs), -1))
    return results


# ---- evaluate ----

def summarise(results, split):
    """mean +- sample std (ddof=1) over seeds of each configuration's headline metrics."""
    keys = ["overall_accuracy", "macro_accuracy", "macro_f1", "macro_precision"]
    summary = {}
    for config, per_seed in results.items():
        values = {key: np.array([seed_result[split][key] for seed_result in per_seed]) for key in keys}
        # Classes absent from the evaluated split have NaN accuracy; they stay NaN (no warning).
        per_class = np.array([[row["accuracy"] for row in seed_result[split]["per_class"]]
                              for seed_result in per_seed])
        seen = ~np.isnan(per_class)
        per_class_mean = np.where(seen.any(axis=0), np.nansum(per_class, axis=0) / np.maximum(seen.sum(0), 1),
                                  np.nan)
        std = (lambda array: float(np.std(array, ddof=1)) if len(array) > 1 else 0.0)
        summary[config] = {
            **{f"{key}_mean": float(values[key].mean()) for key in keys},
            **{f"{key}_std": std(values[key]) for key in keys},
            "per_class_accuracy_mean": per_class_mean.tolist(),
            "per_class_accuracy_std": (np.std(per_class, axis=0, ddof=1) if len(per_seed) > 1
                                       else np.where(seen.any(axis=0), 0.0, np.nan)).tolist(),
            "confusion_matrix_sum": np.sum([r[split]["confusion_matrix"] for r in per_seed], axis=0).tolist(),
            "seeds": len(per_seed),
        }
    return summary


def write_tables(run_dir, summary, split):
    keys = ["overall_accuracy", "macro_accuracy", "macro_f1", "macro_precision"]
    rows = [{"config": config, "split": split, "seeds": values["seeds"],
             **{f"{key}_{stat}": round(values[f"{key}_{stat}"], 4) for key in keys
                for stat in ("mean", "std")}} for config, values in summary.items()]
    atomic.write_csv(run_dir / f"summary_{split}.csv", rows, list(rows[0]))
    lines = [f"| config ({split}, mean +- std over seeds) | OA | macro acc | macro F1 | macro precision |",
             "|---|---|---|---|---|"]
    for config, values in summary.items():
        cells = [f"{values[f'{key}_mean']:.3f} +- {values[f'{key}_std']:.3f}" for key in keys]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    atomic.write_text(run_dir / f"summary_{split}.md", "\n".join(lines) + "\n")
    per_class_rows = [{"config": config, "class": name,
                       "accuracy_mean": round(values["per_class_accuracy_mean"][i], 4),
                       "accuracy_std": round(values["per_class_accuracy_std"][i], 4)}
                      for config, values in summary.items() for i, name in enumerate(CLASS_NAMES)]
    atomic.write_csv(run_dir / f"per_class_{split}.csv", per_class_rows, list(per_class_rows[0]))


def plot_results(run_dir, summary, split):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(summary)
    for i, (config, values) in enumerate(summary.items()):
        axis.bar(np.arange(len(CLASS_NAMES)) + i * width, values["per_class_accuracy_mean"], width,
                 yerr=values["per_class_accuracy_std"], label=config, capsize=2)
    axis.set_xticks(np.arange(len(CLASS_NAMES)) + 0.4 - width / 2, CLASS_NAMES, rotation=30, ha="right")
    axis.set_ylabel(f"per-class accuracy ({split})")
    axis.set_ylim(0, 1)
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    atomic.save_figure(figure, run_dir / f"per_class_accuracy_{split}.png")
    plt.close(figure)
    for config, values in summary.items():
        counts = np.array(values["confusion_matrix_sum"], dtype=np.float64)
        normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        figure, axis = plt.subplots(figsize=(7, 6))
        image = axis.imshow(normalised, vmin=0, vmax=1, cmap="Blues")
        for (row, col), count in np.ndenumerate(counts):
            axis.text(col, row, int(count), ha="center", va="center", fontsize=7,
                      color="white" if normalised[row, col] > 0.5 else "black")
        axis.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right", fontsize=7)
        axis.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES, fontsize=7)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(f"{config} ({split}, summed over {values['seeds']} seeds, row-normalised)")
        figure.colorbar(image)
        atomic.save_figure(figure, run_dir / f"confusion_{config.replace('/', '_')}_{split}.png")
        plt.close(figure)


def summary_line(summary, split):
    parts = [f"{config} OA {v['overall_accuracy_mean']:.3f}+-{v['overall_accuracy_std']:.3f} "
             f"macc {v['macro_accuracy_mean']:.3f}+-{v['macro_accuracy_std']:.3f} "
             f"mF1 {v['macro_f1_mean']:.3f}+-{v['macro_f1_std']:.3f}" for config, v in summary.items()]
    seeds = next(iter(summary.values()))["seeds"]
    return f"summary ({split}, {seeds} seed{'s' if seeds > 1 else ''}): " + "; ".join(parts)


@cli_entry
def main(args):
    runs.seed_everything(args.seed, args.deterministic)
    if args.epochs is None:
        args.epochs = 30 if args.demo else 100
    if args.learning_rate is None:
        args.learning_rate = 1e-3 if args.demo else 1e-4
    if args.backbone is None:
        args.backbone = "simplecnn" if args.demo else "resnet50"
    if args.demo:
        args.data_root = str(make_demo_data(Path(args.results_dir) / "demo_data" / SCRIPT_STEM,
                                            args.demo_scale))
    runs.print_args(args)
    require(0 < args.val_fraction < 1 and 0 <= args.test_fraction < 1
            and args.val_fraction + args.test_fraction < 1, "--val_fraction/--test_fraction",
            f"{args.val_fraction}/{args.test_fraction}", "fractions in (0, 1) summing to below 1")
    require(args.seeds >= 1 and args.epochs >= 1 and args.batch_size >= 1, "--seeds/--epochs/--batch_size",
            "must be positive", "integers >= 1")
    configs = GRID if args.grid else [(args.loss, args.decoder)]
    seeds = [args.seed + offset for offset in range(args.seeds)]

    # ---- data ----
    if args.embeddings:
        labels_csv = args.labels_csv or (Path(args.data_root) / LABELS_CSV_NAME if args.data_root else None)
        require(labels_csv is not None, "--labels_csv", "missing", "the labels CSV for --embeddings")
    else:
        require(args.data_root is not None, "--data_root", "no data given",
                "--data_root <chips folder>, --embeddings with --labels_csv, or --demo")
        labels_csv = args.labels_csv or Path(args.data_root) / LABELS_CSV_NAME
    point_ids, labels = read_labels(labels_csv)
    reader, image_size, embeddings = None, None, None
    if args.embeddings:
        embeddings_path = require_file(args.embeddings, "a .npy array of embeddings")
        try:
            embeddings = np.load(embeddings_path, allow_pickle=False)
        except ValueError as error:
            raise InputError(embeddings_path, f"cannot be read ({error})", "a numeric .npy array") from None
        require(embeddings.ndim in (2, 3, 4) and np.issubdtype(embeddings.dtype, np.number),
                embeddings_path, f"has shape {embeddings.shape} and dtype {embeddings.dtype}",
                "numeric (N, D), (N, T, D) or (N, h, w, D)")
        require(len(embeddings) == len(labels), embeddings_path, f"has {len(embeddings)} rows but "
                f"{labels_csv} has {len(labels)}", "one row per CSV row, in CSV order")
        require_finite(embeddings, embeddings_path, "embeddings")
        embeddings = as_tokens(embeddings.astype(np.float32))
    else:
        paths, sizes = locate_chips(args.data_root, labels_csv, point_ids, labels)
        reader = ChipReader(paths)
        if args.image_size is None:
            require(len(sizes) == 1, args.data_root, f"has chips of sizes {sorted(sizes)}",
                    "one chip size, or --image_size to resize all chips")
            image_size = next(iter(sizes))[0]
            require(next(iter(sizes))[0] == next(iter(sizes))[1], args.data_root, "has non-square chips",
                    "square chips, or --image_size")
        image_size = args.image_size or image_size
    class_counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    for index in np.flatnonzero((class_counts > 0) & (class_counts < 2 + (args.test_fraction > 0))):
        raise InputError(labels_csv, f"class STR18 {index + 1} ({CLASS_NAMES[index]}) has "
                         f"{class_counts[index]} chip(s)",
                         "at least one chip per split for a stratified split")
    splits = stratified_split(labels, args.val_fraction, args.test_fraction, args.split_seed)
    train_counts = np.bincount(labels[splits["train"]], minlength=len(CLASS_NAMES))
    class_weights = class_weights_from_counts(labels[splits["train"]], len(CLASS_NAMES), args.class_weights)
    print(f"chips: {len(labels)}; " + ", ".join(f"{name} {len(split)}" for name, split in splits.items()))
    print("train counts per class: " + ", ".join(f"{n}" for n in train_counts))
    print("class weights (" + args.class_weights + "): " + ", ".join(f"{w:.3f}" for w in class_weights))

    band_mean = band_variance = None
    if reader is not None:
        band_mean, band_variance = band_statistics(reader, splits["train"], image_size, 32)
        print("train band mean: " + ", ".join(f"{b} {m:.4f}" for b, m in zip(BAND_NAMES, band_mean)))

    run_name = args.run_name or "_".join([
        f"emb-{Path(args.embeddings).stem}" if args.embeddings
        else f"{args.backbone}-{'frozen' if args.freeze_backbone else 'finetune'}",
        "grid" if args.grid else f"{args.loss}-{args.decoder}"] + (["demo"] if args.demo else []))
    run_dir = runs.prepare_run_dir(args.results_dir, SCRIPT_STEM, run_name, args.overwrite, args.resume)
    atomic.write_json(run_dir / "splits.json", {name: [point_ids[i] for i in split]
                                                for name, split in splits.items()})
    precision = args.precision
    if precision == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0)) \
            if gpus else (0, 0)
        precision = "mixed16" if capability >= (7, 0) else "float32"
    keras.mixed_precision.set_global_policy("mixed_float16" if precision == "mixed16" else "float32")
    strategy = runs.make_strategy(args.strategy)
    derived = {"precision": precision, "image_size": image_size,
               "class_names": CLASS_NAMES, "split_sizes": {k: len(v) for k, v in splits.items()},
               "train_class_counts": train_counts.tolist(), "class_weights": class_weights.tolist(),
               "configs": [f"{loss}/{decoder}" for loss, decoder in configs], "seeds": seeds}
    if reader is not None:
        derived.update(band_mean=band_mean.tolist(), band_std=np.sqrt(band_variance).tolist())
    runs.write_config(run_dir, args, **derived)
    eval_splits = [name for name in ("val", "test") if name in splits]
    # Chip read failures inside tf.data surface as the reader's one-line InputError.
    run_guarded = reader.run if reader is not None else (lambda function: function())

    # ---- train ----
    results = {f"{loss}/{decoder}": [] for loss, decoder in configs}
    for seed in seeds:
        tokens = embeddings
        if reader is not None and args.freeze_backbone:
            # Frozen probe: the backbone never changes and nothing is augmented, so its features are
            # computed once per backbone instead of once per epoch; the head sees the same numbers.
            tag = "pretrained" if args.weights else f"seed{seed}"
            cache = run_dir / f"features_{tag}.npy"
            if cache.is_file():
                tokens = np.load(cache)
            else:
                runs.seed_everything(seed, args.deterministic)
                with strategy.scope():
                    extractor = build_feature_extractor(args, image_size, band_mean, band_variance)
                all_chips = reader.dataset(np.arange(len(labels)), image_size, max(32, args.batch_size))
                tokens = reader.run(lambda: extractor.predict(all_chips, verbose=0)).astype(np.float32)
                atomic.save_keras(extractor, run_dir / f"feature_extractor_{tag}.keras")
                atomic.save_npy(cache, tokens)
            print(f"seed {seed}: features {tokens.shape[1:]} per chip ({cache.name})")
        for loss_name, decoder in configs:
            config = f"{loss_name}/{decoder}"
            folder = run_dir / f"{loss_name}_{decoder}" / f"seed{seed}"
            finished = folder / "metrics.json"
            if finished.is_file():
                earlier = json.loads(finished.read_text())
                if earlier["epochs"] >= args.epochs or not args.resume:
                    results[config].append(earlier)
                    print(f"{config} seed {seed}: finished earlier ({earlier['epochs']} epochs), kept")
                    continue
            print(f"{config} seed {seed}: training {args.epochs} epochs -> {folder}")
            runs.seed_everything(seed, args.deterministic)
            if tokens is not None:
                def make_data(indices, shuffle):
                    data = tf.data.Dataset.from_tensor_slices((tokens[indices], labels[indices]))
                    if shuffle:
                        data = data.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
                    return data.batch(args.batch_size).prefetch(tf.data.AUTOTUNE)

                def build_model():
                    return build_head(tokens.shape[1:], len(CLASS_NAMES), decoder, args.mlp_dim,
                                      args.head_dropout)
                eval_inputs = {name: (tokens[splits[name]], labels[splits[name]]) for name in eval_splits}
                # A head's step takes microseconds: run 16 steps per call and skip XLA compile time.
                options = {"steps_per_execution": 16, "jit_compile": False}
            else:
                def make_data(indices, shuffle):
                    return reader.dataset(indices, image_size, args.batch_size, labels,
                                          seed if shuffle else None)

                def build_model():
                    extractor = build_feature_extractor(args, image_size, band_mean, band_variance)
                    head = build_head(extractor.output.shape[1:], len(CLASS_NAMES), decoder, args.mlp_dim,
                                      args.head_dropout)
                    return keras.Model(extractor.input, head(extractor.output), name="lucas_classifier")
                eval_inputs = {name: (make_data(splits[name], False), labels[splits[name]])
                               for name in eval_splits}
                options = {}
            seed_result = run_guarded(lambda: train_and_evaluate(
                folder, build_model, make_data(splits["train"], True), make_data(splits["val"], False),
                eval_inputs, class_weights, loss_name, args, strategy, **options))
            # The exported model is the selected checkpoint itself (a copy, not a second serialisation).
            atomic.write_bytes(folder / ("head.keras" if tokens is not None else "model.keras"),
                               (folder / "checkpoint_best.keras").read_bytes())
            seed_result.update(config=config, seed=seed, epochs=args.epochs)
            atomic.write_json(finished, seed_result)
            results[config].append(seed_result)
            print(f"  {config} seed {seed} val: OA {seed_result['val']['overall_accuracy']:.3f} "
                  f"macro acc {seed_result['val']['macro_accuracy']:.3f} "
                  f"macro F1 {seed_result['val']['macro_f1']:.3f}")

    # ---- evaluate ----
    summaries = {}
    for split in eval_splits:
        summaries[split] = summarise(results, split)
        write_tables(run_dir, summaries[split], split)
        plot_results(run_dir, summaries[split], split)
    headline_split = "test" if "test" in summaries else "val"
    line = summary_line(summaries[headline_split], headline_split)
    print((run_dir / f"summary_{headline_split}.md").read_text(), end="")
    if headline_split == "val":
        print("note: the validation set also selected the checkpoint, so these numbers are optimistic "
              "(as in the study); --test_fraction adds an untouched test set")
    atomic.write_json(run_dir / "metrics.json", {"headline_split": headline_split, "summary_line": line,
                                                 "summary": summaries, "class_names": CLASS_NAMES})
    print(line)
    return summaries


if __name__ == "__main__":
    main(get_args_parser().parse_args())
