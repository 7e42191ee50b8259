"""ARAS400k land-cover segmentation: SegFormer all-MLP decoder on an EfficientNet encoder, Dice loss.

Paper: U. M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language
Models" (ARAS400k; arXiv 2603.09625). The paper trains segmentation models on 256 x 256 Sentinel-2
RGB patches labelled with 7 ESA WorldCover classes and compares the feature distributions of real
and synthetic images. This script reproduces the SegFormer row of the poster's test-split table
(real data only: macro F1 77.09, IoU 65.26, precision 78.10, recall 76.33, in %) and the
feature-distribution analysis (t-SNE, UMAP, silhouette scores; reference `segformer_vis.py`).

Input: `<root>/{train,val,test}/{images,masks}/*.png`, an RGB image and a mask of the same name whose
pixels are the ARAS400k class colours (see `PALETTE`); `dataset_creator.py` writes this layout.

Commands:
    python segmentation_train.py --data_root ARAS400k --encoder efficientnetb7
    python segmentation_train.py --data_root ARAS400k --weights efficientnetb7_notop.h5
    python segmentation_train.py --data_root ARAS400k --resume            # continue a stopped run
    python segmentation_train.py --analyze real/images synthetic/images --model \
        results/segmentation_train/<run>/best_model.keras
    python segmentation_train.py --demo      # tiny synthetic patches, efficientnetb0, ~1 min on a CPU

Runtime: the demo takes about a minute on a laptop CPU. The paper setting (EfficientNet-B7, 256 px,
20 epochs over ~80k training patches) needs a GPU: use `--mixed_precision` there, and
`--strategy mirrored` for several GPUs.

Outputs in `results/segmentation_train/<run_name>/`: config.json, log.csv (per epoch),
state.json + checkpoint_epochNNN.npz (for --resume), best.weights.h5 and best_model.keras (best
validation macro-F1), metrics.json and per_class.csv (test split),
confusion_matrix.png, curves.png, predictions.zip (colour-coded test predictions) and examples.png
(image | truth | prediction). The last line printed is the test summary, e.g.
    test: macro_f1 77.09 | macro_iou 65.26 | macro_precision 78.10 | macro_recall 76.33 | ...

Metric policy (common/metrics.py): metrics come from one confusion matrix accumulated batch by batch;
a class absent from both truth and prediction has NaN precision/recall/F1/IoU (null in
metrics.json) and is left out of the macro means; a class present in only one of them scores 0.
"""

import argparse
import json
import os
import re
import struct
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from common.metrics import ConfusionMatrix
from common import atomic, cli, runs
from common.errors import InputError, cli_entry, require, require_dir, require_file

CLASS_NAMES = ["Tree", "Shrubland", "Grassland", "Cropland", "Built-up", "Bare/sparse", "Water"]
# ARAS400k mask colours, one per class index (the dataset creator's palette).
PALETTE = np.array([(0, 100, 0), (255, 182, 193), (154, 205, 50), (255, 215, 0), (139, 69, 19),
                    (211, 211, 211), (0, 0, 255)], dtype=np.uint8)
NUM_CLASSES = len(CLASS_NAMES)
# Label of pixels whose colour is not in the palette under `--unknown_colour ignore`.
IGNORE_INDEX = 255
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
ENCODERS = [f"efficientnetb{size}" for size in range(8)]
# The poster's test-split numbers for SegFormer (real data only), in %.
PAPER_TEST = {"macro_f1": 77.09, "macro_iou": 65.26, "macro_precision": 78.10, "macro_recall": 76.33}
SPLITS = ("train", "val", "test")
PAPER_DEFAULTS = {"epochs": 20, "batch_size": 24, "image_size": 256, "encoder": "efficientnetb7"}
DEMO_DEFAULTS = {"epochs": 8, "batch_size": 8, "image_size": 64, "encoder": "efficientnetb0",
                 "bn_momentum": 0.9}


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Train a SegFormer (EfficientNet encoder) on ARAS400k patches with Dice loss, "
                    "evaluate the test split, or compare feature distributions (--analyze).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_root", default=None,
                        help="Dataset root holding {train,val,test}/{images,masks}/*.png "
                             "(dataset_creator.py output or the released ARAS400k).")
    parser.add_argument("--encoder", default=None, choices=ENCODERS,
                        help="EfficientNet encoder size; the paper uses efficientnetb7 (the default; "
                             "--demo uses efficientnetb0).")
    parser.add_argument("--weights", default=None,
                        help="Local Keras EfficientNet notop .h5 weights for the encoder (e.g. "
                             "ImageNet). Nothing is downloaded; without it the encoder starts random.")
    parser.add_argument("--image_size", type=int, default=None,
                        help="Patch side in pixels (256 in the paper; 64 with --demo); every image "
                             "and mask must have this size; a multiple of 32.")
    parser.add_argument("--decoder_width", type=int, default=256,
                        help="Channels of the SegFormer all-MLP decoder (smp default 256).")
    parser.add_argument("--bn_momentum", type=float, default=None,
                        help="Batch-norm running-average momentum; unset keeps EfficientNet's 0.99 "
                             "(as the reference). --demo uses 0.9: its few dozen steps cannot settle "
                             "0.99 averages, so evaluation-mode outputs would lag training.")
    parser.add_argument("--loss", default="dice", choices=["dice", "dice_ce"],
                        help="Multiclass Dice from logits (the paper), or Dice + cross-entropy.")
    parser.add_argument("--epochs", type=int, default=None,
                        help="Maximum epochs (20 in the paper; 8 with --demo).")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="Global batch size, split across replicas (24 in the paper; 8 with --demo).")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW learning rate.")
    parser.add_argument("--weight_decay", type=float, default=1e-2,
                        help="AdamW decoupled weight decay (PyTorch's AdamW default, as in the reference).")
    parser.add_argument("--clipnorm", type=float, default=1.0,
                        help="Clip the global gradient norm to this value (torch clip_grad_norm_).")
    parser.add_argument("--lr_patience", type=int, default=3,
                        help="ReduceLROnPlateau patience in epochs on validation macro-F1.")
    parser.add_argument("--lr_factor", type=float, default=0.1, help="ReduceLROnPlateau factor.")
    parser.add_argument("--early_stopping_patience", type=int, default=5,
                        help="Stop after this many epochs without a better validation macro-F1.")
    parser.add_argument("--unknown_colour", default="error", choices=["error", "ignore"],
                        help="A mask colour outside the palette stops with an error naming the file, "
                             "or (ignore) is excluded from loss and metrics. Never silently class 0.")
    parser.add_argument("--num_examples", type=int, default=6,
                        help="Test samples shown in examples.png.")
    parser.add_argument("--strategy", default="default", choices=["default", "mirrored", "multiworker"],
                        help="tf.distribute strategy (mirrored: all local GPUs).")
    parser.add_argument("--mixed_precision", action="store_true",
                        help="mixed_float16 compute with float32 logits and loss (GPU only; ignored "
                             "with a note on a CPU).")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="Threads for the mask check before training.")
    parser.add_argument("--analyze", nargs="+", default=None, metavar="DIR",
                        help="Feature-distribution analysis instead of training: pool the encoder's "
                             "last stage over images of each folder, write t-SNE/UMAP plots and "
                             "silhouette scores.")
    parser.add_argument("--model", default=None,
                        help="With --analyze: a trained best_model.keras whose encoder is analysed.")
    parser.add_argument("--analyze_samples", type=int, default=1000,
                        help="With --analyze: at most this many images per folder (seeded subsample).")
    parser.add_argument("--analyze_embeddings", nargs="+", default=["tsne", "umap"], choices=["tsne", "umap"],
                        help="With --analyze: 2-D embeddings to compute (UMAP's first run compiles "
                             "numba code, about half a minute of CPU).")
    parser.add_argument("--demo", action="store_true",
                        help="Generate a small synthetic patch dataset under "
                             "<results_dir>/demo_data/segmentation_train/ and train efficientnetb0 on it.")
    parser.add_argument("--demo_images", type=int, default=48,
                        help="With --demo: training patches to generate (validation and test get a "
                             "third each); lower it for a faster smoke test.")
    cli.add_run_arguments(parser)
    return parser


# ---- masks: exact colour decoding ----

PALETTE_CODES = (PALETTE[:, 0].astype(np.int64) << 16) | (PALETTE[:, 1].astype(np.int64) << 8) | PALETTE[:, 2]


def colours_to_labels(mask_rgb):
    """Map an (H, W, 3) RGB mask to class indices by exact colour; unknown colours -> IGNORE_INDEX."""
    mask_rgb = np.asarray(mask_rgb, dtype=np.int64)
    codes = (mask_rgb[..., 0] << 16) | (mask_rgb[..., 1] << 8) | mask_rgb[..., 2]
    order = np.argsort(PALETTE_CODES)
    position = np.clip(np.searchsorted(PALETTE_CODES[order], codes), 0, NUM_CLASSES - 1)
    known = PALETTE_CODES[order][position] == codes
    return np.where(known, order[position], IGNORE_INDEX).astype(np.uint8)


def labels_to_colours(labels):
    """Colour-code class indices with the palette (IGNORE_INDEX -> black)."""
    labels = np.asarray(labels)
    colours = np.zeros(labels.shape + (3,), dtype=np.uint8)
    known = labels < NUM_CLASSES
    colours[known] = PALETTE[labels[known]]
    return colours


def decode_mask_tf(mask_rgb):
    """tf.data twin of `colours_to_labels` (same exact-colour rule, unknown -> IGNORE_INDEX)."""
    import tensorflow as tf

    mask_rgb = tf.cast(mask_rgb, tf.int32)
    codes = mask_rgb[..., 0] * 65536 + mask_rgb[..., 1] * 256 + mask_rgb[..., 2]
    matches = tf.equal(codes[..., None], tf.constant(PALETTE_CODES, dtype=tf.int32))
    labels = tf.where(tf.reduce_any(matches, axis=-1), tf.argmax(matches, axis=-1, output_type=tf.int32),
                      IGNORE_INDEX)
    return tf.cast(labels, tf.uint8)


# ---- data: listing, validation, tf.data pipelines ----

def png_size(path):
    """(width, height) from a PNG header, without decoding the image."""
    with open(path, "rb") as file:
        header = file.read(24)
    require(len(header) == 24 and header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR",
            path, "is not a PNG file", "a PNG image")
    return struct.unpack(">II", header[16:24])


def list_split(data_root, split, image_size):
    """Sorted (image, mask) path pairs of one split; every image needs a mask of the same size."""
    image_dir = require_dir(Path(data_root) / split / "images", f"a folder of PNG patches ({split}/images)")
    mask_dir = require_dir(Path(data_root) / split / "masks", f"a folder of PNG masks ({split}/masks)")
    images = {path.name: path for path in image_dir.glob("*.png")}
    masks = {path.name: path for path in mask_dir.glob("*.png")}
    require(images, image_dir, "holds no .png images (empty split)", "at least one patch per split")
    without_mask = sorted(set(images) - set(masks))
    if without_mask:
        raise InputError(images[without_mask[0]], f"has no mask ({len(without_mask)} images lack one)",
                         f"a mask of the same name in {mask_dir}")
    without_image = sorted(set(masks) - set(images))
    if without_image:
        raise InputError(masks[without_image[0]], f"has no image ({len(without_image)} masks lack one)",
                         f"an image of the same name in {image_dir}")
    pairs = [(images[name], masks[name]) for name in sorted(images)]
    for image_path, mask_path in pairs:
        image_shape = png_size(image_path)
        require(image_shape == (image_size, image_size), image_path,
                f"is {image_shape[0]}x{image_shape[1]} pixels", f"{image_size}x{image_size} (--image_size)")
        mask_shape = png_size(mask_path)
        require(mask_shape == image_shape, mask_path, f"is {mask_shape[0]}x{mask_shape[1]} pixels",
                f"the size of its image, {image_shape[0]}x{image_shape[1]}")
    return pairs


def scan_mask(mask_path):
    """Decode one mask: class pixel counts (index 7 = unknown colour) and the first unknown pixel."""
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 3 or mask.shape[2] not in (3, 4):
        problem = "cannot be decoded" if mask is None else "is not an RGB image"
        raise InputError(mask_path, problem, "an RGB mask coloured with the ARAS400k palette")
    rgb = cv2.cvtColor(mask[..., :3], cv2.COLOR_BGR2RGB)
    labels = colours_to_labels(rgb)
    counts = np.bincount(np.minimum(labels, NUM_CLASSES).ravel(), minlength=NUM_CLASSES + 1)
    first_unknown = None
    if counts[NUM_CLASSES]:
        row, col = (int(v) for v in np.argwhere(labels == IGNORE_INDEX)[0])
        first_unknown = (row, col, tuple(int(v) for v in rgb[row, col]))
    return counts, first_unknown


def check_masks(pairs, unknown_colour, workers):
    """Decode every mask once before training (so a bad colour never stops a run mid-way).

    Returns class pixel counts with unknown-colour pixels last. Under `--unknown_colour error` the
    first mask with a colour outside the palette is an InputError naming the colour and its place.
    """
    totals = np.zeros(NUM_CLASSES + 1, dtype=np.int64)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for (_, mask_path), (counts, first_unknown) in zip(pairs, pool.map(scan_mask, [m for _, m in pairs])):
            if first_unknown and unknown_colour == "error":
                row, col, colour = first_unknown
                raise InputError(mask_path, f"has {counts[NUM_CLASSES]} pixels of colour {colour} (first at "
                                 f"row {row}, col {col}) that is not an ARAS400k class colour",
                                 "only the 7 palette colours, or --unknown_colour ignore")
            totals += counts
    return totals


def load_pair(image_path, mask_path, image_size):
    """Read one PNG pair inside tf.data: float32 RGB in [0, 255] and uint8 class indices."""
    import tensorflow as tf

    image = tf.io.decode_png(tf.io.read_file(image_path), channels=3)
    mask = decode_mask_tf(tf.io.decode_png(tf.io.read_file(mask_path), channels=3))
    image = tf.ensure_shape(tf.cast(image, tf.float32), (image_size, image_size, 3))
    return image, tf.ensure_shape(mask, (image_size, image_size))


def augment_pair(image, mask, seed):
    """Paired train augmentation (reference albumentations pipeline), stateless so runs re-create.

    Flips (p=0.5 each) and a random multiple of 90 degrees (p=0.5) move image and mask together;
    brightness/contrast +-0.2 (p=0.3) changes the image only: image * alpha + beta * 255.
    """
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, num=7)
    # Stacking the mask as a fourth channel makes every geometric op act on both identically.
    stacked = tf.concat([image, tf.cast(mask, tf.float32)[..., None]], axis=-1)
    coin = [tf.random.stateless_uniform([], seed=seeds[i]) for i in range(3)]
    stacked = tf.where(coin[0] < 0.5, tf.reverse(stacked, axis=[1]), stacked)
    stacked = tf.where(coin[1] < 0.5, tf.reverse(stacked, axis=[0]), stacked)
    quarter_turns = tf.random.stateless_uniform([], seed=seeds[3], minval=0, maxval=4, dtype=tf.int32)
    stacked = tf.cond(coin[2] < 0.5, lambda: tf.image.rot90(stacked, quarter_turns), lambda: stacked)
    image, mask = stacked[..., :3], tf.cast(stacked[..., 3], tf.uint8)
    alpha = 1.0 + tf.random.stateless_uniform([], seed=seeds[4], minval=-0.2, maxval=0.2)
    beta = 255.0 * tf.random.stateless_uniform([], seed=seeds[5], minval=-0.2, maxval=0.2)
    adjusted = tf.clip_by_value(image * alpha + beta, 0.0, 255.0)
    image = tf.where(tf.random.stateless_uniform([], seed=seeds[6]) < 0.3, adjusted, image)
    return image, mask


def make_train_dataset(pairs, image_size, batch_size, seed, first_epoch, last_epoch):
    """Shuffled, augmented batches for epochs first_epoch..last_epoch-1.

    Order and augmentation are functions of (seed, epoch, index) only, so a resumed run sees exactly
    the batches an uninterrupted one would.
    """
    import tensorflow as tf

    image_paths = tf.constant([str(image) for image, _ in pairs])
    mask_paths = tf.constant([str(mask) for _, mask in pairs])
    count = len(pairs)

    def load_augmented(index, epoch):
        image, mask = load_pair(tf.gather(image_paths, index), tf.gather(mask_paths, index), image_size)
        return augment_pair(image, mask, tf.stack([tf.constant(seed, tf.int64), epoch * count + index]))

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64),
                                                         seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return (tf.data.Dataset.from_tensor_slices(order)
                .map(lambda index: load_augmented(index, epoch), num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch_size))

    return (tf.data.Dataset.range(first_epoch, last_epoch).flat_map(epoch_batches)
            .prefetch(tf.data.AUTOTUNE))


def make_eval_dataset(pairs, image_size, batch_size):
    import tensorflow as tf

    paths = tf.data.Dataset.from_tensor_slices(([str(i) for i, _ in pairs], [str(m) for _, m in pairs]))
    return (paths.map(lambda image, mask: load_pair(image, mask, image_size),
                      num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


# ---- model: SegFormer all-MLP decoder on EfficientNet ----

def encoder_pyramid(model, image_size):
    """The last EfficientNet block output at each stride 4, 8, 16, 32 (smp's encoder stages)."""
    block_outputs = {}
    for layer in model.layers:
        match = re.match(r"^(block\d+[a-z])_", layer.name)
        if match:
            # Layers come in graph order, so the last one seen of a block is its output.
            block_outputs[match.group(1)] = layer.output
    by_stride = {image_size // output.shape[1]: output for output in block_outputs.values()}
    return [by_stride[stride] for stride in (4, 8, 16, 32)]


def build_encoder(encoder_name, image_size, weights=None):
    import keras

    builder = getattr(keras.applications, f"EfficientNetB{encoder_name[-1]}")
    encoder = builder(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    # The encoder scales inputs by 1/255 then applies its Normalization layer; give that layer the
    # ImageNet mean/std (the smp encoder's preprocessing). A weights file brings its own statistics.
    normalization = next(layer for layer in encoder.layers if isinstance(layer, keras.layers.Normalization))
    normalization.adapt_mean.assign(IMAGENET_MEAN)
    normalization.adapt_variance.assign(IMAGENET_STD ** 2)
    normalization.finalize_state()
    if weights:
        require_file(weights, f"a Keras {encoder_name} notop .h5 weights file")
        try:
            encoder.load_weights(weights)
        except (ValueError, OSError) as error:
            raise InputError(weights, f"cannot be loaded into {encoder_name} ({str(error).splitlines()[0][:100]})",
                             f"Keras {encoder_name} weights saved with include_top=False") from None
    return encoder


def build_segformer(encoder_name, image_size, decoder_width=256, num_classes=NUM_CLASSES, weights=None):
    """SegFormer head (Xie et al. 2021, Eq. 1-4) on the encoder's 4 stages, as smp's Segformer.

    Each stage is projected by a per-pixel linear layer to `decoder_width`, upsampled to stride 4,
    concatenated, fused by 1x1 conv + BN + ReLU, classified by a 1x1 conv and upsampled to the input.
    Logits are float32 even under mixed precision, so softmax and Dice stay accurate.
    """
    import keras
    from keras import layers

    require(image_size % 32 == 0 and image_size >= 32, "--image_size", f"is {image_size}",
            "a multiple of 32 (the encoder's output stride)")
    encoder = build_encoder(encoder_name, image_size, weights)
    projected = []
    for stride, feature in zip((4, 8, 16, 32), encoder_pyramid(encoder, image_size)):
        x = layers.Conv2D(decoder_width, 1, name=f"decoder_linear_stride{stride}")(feature)
        if stride > 4:
            x = layers.UpSampling2D(stride // 4, interpolation="bilinear",
                                    name=f"decoder_upsample_stride{stride}")(x)
        projected.append(x)
    x = layers.Concatenate(name="decoder_concat")(projected[::-1])
    x = layers.Conv2D(decoder_width, 1, use_bias=False, name="decoder_fuse_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="decoder_fuse_bn")(x)
    x = layers.ReLU(name="decoder_fuse_relu")(x)
    x = layers.Conv2D(num_classes, 1, name="decoder_classifier")(x)
    x = layers.UpSampling2D(4, interpolation="bilinear", name="decoder_upsample_output")(x)
    logits = layers.Activation("linear", dtype="float32", name="logits")(x)
    return keras.Model(encoder.input, logits, name=f"segformer_{encoder_name}")


def make_dice_loss(num_classes=NUM_CLASSES, cross_entropy=False):
    import keras
    import tensorflow as tf

    class MulticlassDiceLoss(keras.losses.Loss):
        """smp DiceLoss(mode="multiclass", from_logits=True), optionally + cross-entropy.

        Over the whole batch, per class c: dice_c = 2 sum(p_c * y_c) / max(sum(p_c + y_c), eps) with
        p = softmax(logits); loss = mean_c (1 - dice_c) * [class c occurs in the batch's truth].
        Pixels labelled IGNORE_INDEX are dropped from both sums (and from the cross-entropy).
        """

        def __init__(self, num_classes=NUM_CLASSES, cross_entropy=False, eps=1e-7, **kwargs):
            kwargs.setdefault("name", "dice_ce_loss" if cross_entropy else "dice_loss")
            super().__init__(**kwargs)
            self.num_classes, self.cross_entropy, self.eps = num_classes, cross_entropy, eps

        def call(self, y_true, y_pred):
            logits = tf.cast(y_pred, tf.float32)
            labels = tf.cast(tf.reshape(y_true, tf.shape(logits)[:-1]), tf.int32)
            valid = tf.cast(labels != IGNORE_INDEX, tf.float32)[..., None]
            safe_labels = tf.where(labels == IGNORE_INDEX, 0, labels)
            probabilities = tf.nn.softmax(logits, axis=-1) * valid
            truth = tf.one_hot(safe_labels, self.num_classes) * valid
            axes = tf.range(tf.rank(truth) - 1)
            intersection = tf.reduce_sum(probabilities * truth, axis=axes)
            cardinality = tf.reduce_sum(probabilities + truth, axis=axes)
            dice = 2.0 * intersection / tf.maximum(cardinality, self.eps)
            present = tf.cast(tf.reduce_sum(truth, axis=axes) > 0, tf.float32)
            loss = tf.reduce_mean((1.0 - dice) * present)
            if self.cross_entropy:
                pixel_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(safe_labels, logits)
                loss += tf.reduce_sum(pixel_loss * valid[..., 0]) / tf.maximum(tf.reduce_sum(valid), 1.0)
            return loss

        def get_config(self):
            return {**super().get_config(), "num_classes": self.num_classes,
                    "cross_entropy": self.cross_entropy, "eps": self.eps}

    return MulticlassDiceLoss(num_classes, cross_entropy)


def custom_objects():
    """Classes needed to reload a saved model with its compiled loss."""
    return {"MulticlassDiceLoss": type(make_dice_loss())}


# ---- evaluation: streaming confusion matrix ----

def make_predict_step(model, strategy, loss_fn):
    """Compiled step: per-batch summed loss, predicted labels and truth, gathered over replicas."""
    import tensorflow as tf

    def replica_step(images, masks):
        logits = model(images, training=False)
        count = tf.cast(tf.shape(images)[0], tf.float32)
        return loss_fn.call(masks, logits) * count, count, tf.cast(tf.argmax(logits, axis=-1), tf.uint8)

    @tf.function(reduce_retracing=True)
    def step(batch):
        images, masks = batch
        loss_sum, count, labels = strategy.run(replica_step, args=(images, masks))
        reduce = tf.distribute.ReduceOp.SUM
        return (strategy.reduce(reduce, loss_sum, axis=None), strategy.reduce(reduce, count, axis=None),
                strategy.gather(labels, axis=0), strategy.gather(masks, axis=0))

    return step


def evaluate(step, strategy, dataset, on_batch=None):
    """Stream a split through the model: mean loss and a ConfusionMatrix (no pixel kept in memory)."""
    confusion = ConfusionMatrix(NUM_CLASSES, ignore_index=IGNORE_INDEX)
    loss_total, sample_total = 0.0, 0.0
    for batch in strategy.experimental_distribute_dataset(dataset):
        loss_sum, count, predicted, truth = (value.numpy() for value in step(batch))
        confusion.update(truth, predicted)
        loss_total, sample_total = loss_total + float(loss_sum), sample_total + float(count)
        if on_batch is not None:
            on_batch(predicted, truth)
    return loss_total / max(sample_total, 1.0), confusion


def finite_or_none(value):
    return None if value is None or not np.isfinite(value) else float(value)


def json_metrics(metrics):
    """Metrics with NaN (class absent from truth and prediction) written as JSON null."""
    result = {key: finite_or_none(value) for key, value in metrics.items() if key != "per_class"}
    result["per_class"] = [{key: (finite_or_none(value) if isinstance(value, float) else value)
                            for key, value in row.items()} for row in metrics["per_class"]]
    return result


# ---- training schedule: the paper's plateau rule, early stopping and checkpoints ----

def make_schedule_callback(args, run_dir, step, strategy, val_dataset, state):
    import keras

    class PaperSchedule(keras.callbacks.Callback):
        """After each epoch: validation macro-F1 from the streaming confusion matrix, then
        ReduceLROnPlateau (mode max, PyTorch semantics: threshold 1e-4 relative, reduce once more than
        `lr_patience` epochs failed to improve), early stopping after `early_stopping_patience`
        epochs without a better macro-F1, best.weights.h5 on improvement, and a resumable
        checkpoint + state.json + log.csv (all written atomically)."""

        def on_epoch_end(self, epoch, logs=None):
            started = time.time()
            val_loss, confusion = evaluate(step, strategy, val_dataset)
            val = confusion.metrics(CLASS_NAMES)
            macro_f1 = val["macro_f1"] if np.isfinite(val["macro_f1"]) else -1.0
            learning_rate = float(np.asarray(self.model.optimizer.learning_rate))
            record = {"epoch": epoch + 1, "loss": float(logs.get("loss", float("nan"))), "val_loss": val_loss,
                      "val_macro_f1": val["macro_f1"], "val_macro_iou": val["macro_iou"],
                      "val_accuracy": val["accuracy"], "learning_rate": learning_rate,
                      "seconds": time.time() - state.pop("epoch_started", started)}
            if macro_f1 > state["best_val_macro_f1"]:
                state.update(best_val_macro_f1=macro_f1, best_epoch=epoch + 1, epochs_without_improvement=0)
                atomic_save_weights(self.model, run_dir / "best.weights.h5")
            else:
                state["epochs_without_improvement"] += 1
            if macro_f1 > state["plateau_best"] * (1.0 + 1e-4):
                state.update(plateau_best=macro_f1, plateau_bad_epochs=0)
            else:
                state["plateau_bad_epochs"] += 1
            print(f"epoch {epoch + 1}/{args.epochs}: loss {record['loss']:.4f} val_loss {val_loss:.4f} "
                  f"val_macro_f1 {val['macro_f1']:.4f} val_macro_iou {val['macro_iou']:.4f} "
                  f"lr {learning_rate:.2e}", flush=True)
            if state["plateau_bad_epochs"] > args.lr_patience:
                self.model.optimizer.learning_rate.assign(learning_rate * args.lr_factor)
                state["plateau_bad_epochs"] = 0
                print(f"epoch {epoch + 1}: no macro-F1 gain for {args.lr_patience + 1} epochs, "
                      f"learning rate -> {learning_rate * args.lr_factor:.2e}")
            if state["epochs_without_improvement"] >= args.early_stopping_patience:
                self.model.stop_training = True
                state["stopped_early"] = True
                print(f"epoch {epoch + 1}: early stopping, best macro-F1 at epoch {state['best_epoch']}")
            state["history"].append(record)
            state["epochs_done"] = epoch + 1
            save_checkpoint(self.model, run_dir, state)

        def on_epoch_begin(self, epoch, logs=None):
            state["epoch_started"] = time.time()

    return PaperSchedule()


def atomic_save_weights(model, path):
    """model.save_weights through a temporary name (Keras requires the .weights.h5 ending, which
    common.runs.atomic_path does not keep)."""
    temporary = path.with_name(f".{path.name[:-len('.weights.h5')]}.tmp.weights.h5")
    try:
        model.save_weights(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def save_checkpoint(model, run_dir, state):
    """Model + optimizer to a new file, then state.json pointing at it, then drop the older file:
    an interruption at any moment leaves state.json naming a complete checkpoint."""
    checkpoint = run_dir / f"checkpoint_epoch{state['epochs_done']:03d}.npz"
    # Plain arrays (model variables, then optimizer slots, step count and learning rate) in one
    # uncompressed .npz: a fraction of the time of a .keras archive, and no pickle.
    # model.variables (not .weights) includes the dropout seed-generator states, so a resumed run
    # draws the same dropout masks as an uninterrupted one.
    arrays = {f"model_{i:04d}": np.asarray(v) for i, v in enumerate(model.variables)}
    arrays.update({f"optimizer_{i:04d}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)})
    with atomic.atomic_path(checkpoint) as temporary, open(temporary, "wb") as file:
        np.savez(file, **arrays)
    previous = state.get("checkpoint")
    state["checkpoint"] = checkpoint.name
    atomic.write_json(run_dir / "state.json", {k: v for k, v in state.items() if k != "epoch_started"})
    if previous and previous != checkpoint.name and (run_dir / previous).exists():
        (run_dir / previous).unlink()
    fields = list(state["history"][0])
    atomic.write_csv(run_dir / "log.csv", state["history"], fields)


def load_checkpoint(model, path):
    """Restore what save_checkpoint wrote into a model built and compiled with the same arguments."""
    with np.load(require_file(path, "the checkpoint named in state.json"), allow_pickle=False) as stored:
        for prefix, variables in (("model", model.variables), ("optimizer", model.optimizer.variables)):
            names = sorted(key for key in stored.files if key.startswith(prefix + "_"))
            require(len(names) == len(variables), path, f"holds {len(names)} {prefix} arrays",
                    f"{len(variables)}, as the model of this run's config.json")
            for name, variable in zip(names, variables):
                require(tuple(stored[name].shape) == tuple(variable.shape), path,
                        f"{name} has shape {stored[name].shape}", f"{tuple(variable.shape)}")
                variable.assign(stored[name])


# ---- plots and prediction files ----

def plot_confusion(counts, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with np.errstate(invalid="ignore", divide="ignore"):
        recall = counts / counts.sum(axis=1, keepdims=True)
    figure, axis = plt.subplots(figsize=(7, 6))
    image = axis.imshow(np.nan_to_num(recall), cmap="Blues", vmin=0, vmax=1)
    for row in range(NUM_CLASSES):
        for col in range(NUM_CLASSES):
            if np.isfinite(recall[row, col]):
                axis.text(col, row, f"{recall[row, col]:.2f}", ha="center", va="center", fontsize=8,
                          color="white" if recall[row, col] > 0.5 else "black")
    axis.set_xticks(range(NUM_CLASSES), CLASS_NAMES, rotation=45, ha="right")
    axis.set_yticks(range(NUM_CLASSES), CLASS_NAMES)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true (rows sum to 1)")
    axis.set_title("Test confusion matrix (pixels)")
    figure.colorbar(image)
    atomic.save_figure(figure, path)
    plt.close(figure)


def plot_curves(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(epochs, [row["loss"] for row in history], label="train")
    axes[0].plot(epochs, [row["val_loss"] for row in history], label="validation")
    axes[0].set_title("Loss")
    axes[1].plot(epochs, [row["val_macro_f1"] for row in history], label="macro F1")
    axes[1].plot(epochs, [row["val_macro_iou"] for row in history], label="macro IoU")
    axes[1].set_title("Validation metrics")
    axes[2].semilogy(epochs, [row["learning_rate"] for row in history])
    axes[2].set_title("Learning rate")
    for axis in axes:
        axis.set_xlabel("epoch")
    axes[0].legend()
    axes[1].legend()
    atomic.save_figure(figure, path)
    plt.close(figure)


def plot_examples(pairs, predictions, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    figure, axes = plt.subplots(len(predictions), 3, figsize=(9, 3 * len(predictions)), squeeze=False)
    for row, ((image_path, mask_path), predicted) in enumerate(zip(pairs, predictions)):
        image = cv2.cvtColor(cv2.imread(str(image_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        truth = cv2.cvtColor(cv2.imread(str(mask_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        for col, (panel, title) in enumerate([(image, image_path.name), (truth, "truth"),
                                              (labels_to_colours(predicted), "prediction")]):
            axes[row, col].imshow(panel)
            axes[row, col].set_title(title, fontsize=8)
            axes[row, col].axis("off")
    figure.legend(handles=[Patch(color=PALETTE[i] / 255, label=name) for i, name in enumerate(CLASS_NAMES)],
                  loc="lower center", ncol=4)
    atomic.save_figure(figure, path)
    plt.close(figure)


# ---- demo data ----

# Demo appearance of each class (mean RGB); shapes of each class are drawn on a background class.
DEMO_COLOURS = np.array([(40, 90, 40), (150, 120, 110), (120, 170, 70), (200, 180, 90), (120, 100, 90),
                         (190, 185, 175), (30, 60, 140)], dtype=np.float32)


def make_demo_dataset(root, image_size, train_images, seed):
    """Write a seeded synthetic dataset in the real layout: shapes of known classes on a background.

    Each class has its own mean colour plus texture noise, so a model can learn it; masks use the
    ARAS400k palette. Re-used when it already exists with the same parameters.
    """
    root = Path(root)
    recipe = {"image_size": image_size, "train_images": train_images, "seed": seed, "version": 1}
    if (root / "demo.json").exists() and json.loads((root / "demo.json").read_text()) == recipe:
        return root
    rng = np.random.default_rng(seed)
    counts = {"train": train_images, "val": max(4, train_images // 3), "test": max(4, train_images // 3)}
    rows, cols = np.mgrid[0:image_size, 0:image_size]
    for split, count in counts.items():
        for folder in ("images", "masks"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for stale in (root / split / folder).glob("*.png"):
                stale.unlink()
        for index in range(count):
            labels = np.full((image_size, image_size), rng.integers(NUM_CLASSES), dtype=np.uint8)
            for _ in range(rng.integers(2, 5)):
                centre = rng.uniform(0, image_size, 2)
                radii = rng.uniform(image_size / 8, image_size / 3, 2)
                if rng.random() < 0.5:
                    inside = (np.abs(rows - centre[0]) < radii[0]) & (np.abs(cols - centre[1]) < radii[1])
                else:
                    inside = ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 < 1
                labels[inside] = rng.integers(NUM_CLASSES)
            image = DEMO_COLOURS[labels] + rng.normal(0, 18, (image_size, image_size, 3))
            image = np.clip(cv2.GaussianBlur(image, (3, 3), 0), 0, 255).astype(np.uint8)
            name = f"demo_{split}_{index:04d}.png"
            cv2.imwrite(str(root / split / "images" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(root / split / "masks" / name), cv2.cvtColor(labels_to_colours(labels),
                                                                         cv2.COLOR_RGB2BGR))
    atomic.write_json(root / "demo.json", recipe)
    return root


# ---- feature-distribution analysis (reference segformer_vis.py) ----

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def read_rgb(path, image_size):
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    require(image is not None, path, "cannot be decoded as an image", "a PNG, JPEG or TIFF RGB image")
    if image.shape[:2] != (image_size, image_size):
        image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32)


def run_analysis(args):
    """Pool the encoder's last stage per image, standardise, embed with t-SNE and UMAP, and score how
    separable the folders are with silhouette scores (overall and per pair of folders)."""
    import keras
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    require(len(args.analyze) >= 2, "--analyze", f"got {len(args.analyze)} folder",
            "two or more image folders to compare")
    folders = [require_dir(folder, "a folder of images") for folder in args.analyze]
    labels = [folder.parent.name if folder.name == "images" else folder.name for folder in folders]
    run_name = args.run_name or "analyze_" + "_vs_".join(labels)[:80]
    runs.print_args(args)

    # ---- data ----
    rng = np.random.default_rng(args.seed)
    samples = []
    for folder, label in zip(folders, labels):
        files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        require(files, folder, "holds no images", "PNG, JPEG or TIFF images")
        chosen = sorted(rng.choice(len(files), size=min(args.analyze_samples, len(files)), replace=False))
        samples += [(files[index], label) for index in chosen]
        print(f"{label}: {len(chosen)} of {len(files)} images from {folder}")

    # ---- model ----
    if args.model:
        model = keras.models.load_model(require_file(args.model, "a best_model.keras file"),
                                        custom_objects=custom_objects(), compile=False)
        image_size = model.input_shape[1]
    else:
        print(f"note: no --model given: analysing an untrained {args.encoder} encoder"
              + (f" with weights {args.weights}" if args.weights else " (random initialisation)"))
        image_size = args.image_size
        model = build_encoder(args.encoder, image_size, args.weights)
    last_stage = encoder_pyramid(model, image_size)[-1]
    extractor = keras.Model(model.input, keras.layers.GlobalAveragePooling2D()(last_stage))
    run_dir = runs.prepare_run_dir(args.results_dir, "segmentation_train", run_name, args.overwrite,
                              args.resume, finished_marker="silhouette.json")
    runs.write_config(run_dir, args, image_size=image_size, samples=len(samples))

    # ---- features ----
    features = []
    for start in range(0, len(samples), args.batch_size):
        batch = np.stack([read_rgb(path, image_size) for path, _ in samples[start:start + args.batch_size]])
        features.append(np.asarray(extractor.predict_on_batch(batch), dtype=np.float64))
    features = StandardScaler().fit_transform(np.concatenate(features))
    folder_of = np.array([labels.index(label) for _, label in samples])

    # ---- embed and score ----
    count = len(samples)
    embeddings = {}
    if "tsne" in args.analyze_embeddings:
        embeddings["tsne"] = TSNE(n_components=2, perplexity=float(min(30.0, max(2.0, (count - 1) / 3))),
                                  init="pca", random_state=args.seed).fit_transform(features)
    if "umap" in args.analyze_embeddings:
        import umap

        embeddings["umap"] = umap.UMAP(n_neighbors=min(15, count - 1),
                                       random_state=args.seed).fit_transform(features)
    spaces = {"features": features, **embeddings}

    def silhouette(points, members):
        return float(silhouette_score(points[members], folder_of[members], random_state=args.seed))

    everyone = np.ones(count, dtype=bool)
    scores = {"overall": {space: silhouette(points, everyone) for space, points in spaces.items()},
              "pairwise": {}, "images_per_folder": {label: int((folder_of == i).sum())
                                                    for i, label in enumerate(labels)}}
    for first in range(len(labels)):
        for second in range(first + 1, len(labels)):
            members = np.isin(folder_of, [first, second])
            scores["pairwise"][f"{labels[first]} vs {labels[second]}"] = {
                space: silhouette(points, members) for space, points in spaces.items()}

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, points in embeddings.items():
        figure, axis = plt.subplots(figsize=(6, 5))
        for index, label in enumerate(labels):
            axis.scatter(*points[folder_of == index].T, s=6, alpha=0.7, label=label)
        axis.set_title(f"{name.upper()} of pooled encoder features (silhouette "
                       f"{scores['overall'][name]:.3f})")
        axis.legend()
        atomic.save_figure(figure, run_dir / f"{name}.png")
        plt.close(figure)
    rows = [{"file": str(path), "folder": label} for path, label in samples]
    for name, points in embeddings.items():
        for row, point in zip(rows, points):
            row.update({f"{name}_x": float(point[0]), f"{name}_y": float(point[1])})
    atomic.write_csv(run_dir / "embedding.csv", rows, list(rows[0]))
    names = {"features": "standardised features", "tsne": "t-SNE", "umap": "UMAP"}
    summary = ("silhouette: " + " | ".join(f"{names[space]} {score:.4f}" for space, score in
                                           scores["overall"].items()) + f" over {count} images")
    scores["summary"] = summary
    atomic.write_json(run_dir / "silhouette.json", scores)
    print(f"wrote {run_dir}")
    print(summary)
    return scores


# ---- main ----

@cli_entry
def main(args):
    for key, value in (DEMO_DEFAULTS if args.demo else PAPER_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.analyze:
        runs.seed_everything(args.seed, args.deterministic)
        return run_analysis(args)
    if args.demo:
        args.data_root = str(Path(args.results_dir) / "demo_data" / "segmentation_train")
        make_demo_dataset(args.data_root, args.image_size, args.demo_images, args.seed)
    require(args.data_root, "--data_root", "is missing", "the dataset root, or --demo")
    require(args.image_size % 32 == 0 and args.image_size >= 32, "--image_size", f"is {args.image_size}",
            "a multiple of 32 (the encoder's output stride)")
    runs.print_args(args)
    run_name = args.run_name or ("demo" if args.demo else
                                 f"{args.encoder}_{args.loss}_{args.image_size}px_seed{args.seed}")
    run_path = Path(args.results_dir) / "segmentation_train" / run_name
    if ((run_path / "state.json").exists() and not (run_path / "metrics.json").exists()
            and not (args.resume or args.overwrite)):
        raise InputError(run_path, "an interrupted run with this name exists",
                         "--resume to continue it, --overwrite to restart it, or another --run_name")

    # ---- data ----
    pairs = {split: list_split(require_dir(args.data_root, "the dataset root folder"), split, args.image_size)
             for split in SPLITS}
    pixel_counts = {split: check_masks(pairs[split], args.unknown_colour, args.workers) for split in SPLITS}
    for split in SPLITS:
        counts = pixel_counts[split]
        fractions = " ".join(f"{name} {100 * c / max(counts.sum(), 1):.1f}%"
                             for name, c in zip(CLASS_NAMES, counts))
        print(f"{split}: {len(pairs[split])} patches | {fractions} | unknown colour "
              f"{int(counts[NUM_CLASSES])} px (ignored)")
    steps_per_epoch = -(-len(pairs["train"]) // args.batch_size)
    run_dir = runs.prepare_run_dir(args.results_dir, "segmentation_train", run_name, args.overwrite, args.resume)
    state = {"epochs_done": 0, "best_val_macro_f1": -2.0, "best_epoch": 0, "epochs_without_improvement": 0,
             "plateau_best": -2.0, "plateau_bad_epochs": 0, "stopped_early": False, "history": []}
    resuming = args.resume and (run_dir / "state.json").exists()
    if resuming:
        state = json.loads((run_dir / "state.json").read_text())
        previous = json.loads((run_dir / "config.json").read_text())["args"]
        for key in ("encoder", "image_size", "decoder_width", "loss", "batch_size", "seed", "unknown_colour",
                    "bn_momentum", "mixed_precision"):
            require(previous[key] == getattr(args, key), run_dir / "config.json",
                    f"the run was made with --{key} {previous[key]}", f"--{key} {previous[key]} to resume it")
        print(f"resuming {run_dir} after epoch {state['epochs_done']} ({state['checkpoint']})")
    else:
        runs.write_config(run_dir, args, steps_per_epoch=steps_per_epoch, class_names=CLASS_NAMES,
                     palette=PALETTE.tolist(), patches={s: len(pairs[s]) for s in SPLITS},
                     class_pixels={s: pixel_counts[s][:NUM_CLASSES] for s in SPLITS},
                     unknown_colour_pixels={s: int(pixel_counts[s][NUM_CLASSES]) for s in SPLITS})

    # ---- model ----
    # Seeding imports TensorFlow, so it follows the input checks (which use no randomness): a bad
    # input is reported in a second, not after TensorFlow's start-up.
    runs.seed_everything(args.seed, args.deterministic)
    import keras
    import tensorflow as tf

    if args.mixed_precision:
        if tf.config.list_physical_devices("GPU"):
            keras.mixed_precision.set_global_policy("mixed_float16")
            print("mixed precision: mixed_float16 compute, float32 logits and loss")
        else:
            print("note: --mixed_precision needs a GPU (float16 is slower on a CPU); training in float32")
    strategy = runs.make_strategy(args.strategy)
    with strategy.scope():
        loss_fn = make_dice_loss(cross_entropy=args.loss == "dice_ce")
        model = build_segformer(args.encoder, args.image_size, args.decoder_width,
                                weights=None if resuming else args.weights)
        if args.bn_momentum is not None:
            for layer in model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = args.bn_momentum
        optimizer = keras.optimizers.AdamW(learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                                           global_clipnorm=args.clipnorm)
        # XLA compilation of the EfficientNet backward pass takes minutes on a CPU and gains little
        # there; on GPUs Keras decides ("auto").
        model.compile(optimizer=optimizer, loss=loss_fn,
                      jit_compile="auto" if tf.config.list_physical_devices("GPU") else False)
        # Creating the optimizer slots now lets the train step be traced once instead of twice.
        model.optimizer.build(model.trainable_variables)
        if resuming:
            load_checkpoint(model, run_dir / state["checkpoint"])
    if not args.weights and not resuming:
        print(f"note: {args.encoder} starts from random initialisation (no --weights file given)")
    print(f"model: {model.name}, {model.count_params():,} parameters, {strategy.num_replicas_in_sync} "
          f"replica(s), global batch {args.batch_size}, {steps_per_epoch} steps per epoch")
    step = make_predict_step(model, strategy, loss_fn)
    val_dataset = make_eval_dataset(pairs["val"], args.image_size, args.batch_size)

    # ---- train ----
    if not state["stopped_early"] and state["epochs_done"] < args.epochs:
        train_dataset = make_train_dataset(pairs["train"], args.image_size, args.batch_size, args.seed,
                                           state["epochs_done"], args.epochs)
        callback = make_schedule_callback(args, run_dir, step, strategy, val_dataset, state)
        model.fit(train_dataset, epochs=args.epochs, initial_epoch=state["epochs_done"],
                  steps_per_epoch=steps_per_epoch, callbacks=[callback], verbose=1 if sys.stdout.isatty() else 0)

    # ---- evaluate ----
    model.load_weights(run_dir / "best.weights.h5")
    atomic.save_keras(model, run_dir / "best_model.keras")
    test_pairs, example_predictions, position = pairs["test"], [], 0
    # Test predictions are encoded and zipped batch by batch, never all held in memory.
    with (atomic.atomic_path(run_dir / "predictions.zip") as temporary,
          zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive):
        def write_predictions(predicted, truth):
            nonlocal position
            for labels in predicted:
                _, png = cv2.imencode(".png", cv2.cvtColor(labels_to_colours(labels), cv2.COLOR_RGB2BGR))
                archive.writestr(test_pairs[position][0].name, png.tobytes())
                if len(example_predictions) < args.num_examples:
                    example_predictions.append(labels)
                position += 1

        test_loss, confusion = evaluate(step, strategy, make_eval_dataset(test_pairs, args.image_size,
                                                                          args.batch_size),
                                        on_batch=write_predictions)
    test = confusion.metrics(CLASS_NAMES)
    atomic.write_csv(run_dir / "per_class.csv", test["per_class"], list(test["per_class"][0]))
    plot_confusion(confusion.counts, run_dir / "confusion_matrix.png")
    plot_curves(state["history"], run_dir / "curves.png")
    plot_examples(test_pairs[:len(example_predictions)], example_predictions, run_dir / "examples.png")
    summary = (f"test: macro_f1 {100 * test['macro_f1']:.2f} | macro_iou {100 * test['macro_iou']:.2f} | "
               f"macro_precision {100 * test['macro_precision']:.2f} | macro_recall "
               f"{100 * test['macro_recall']:.2f} | accuracy {100 * test['accuracy']:.2f} (%; best epoch "
               f"{state['best_epoch']} of {state['epochs_done']}, val macro_f1 "
               f"{100 * state['best_val_macro_f1']:.2f})")
    metrics = {"test": json_metrics(test), "test_loss": test_loss, "confusion_matrix": confusion.counts,
               "best_epoch": state["best_epoch"], "best_val_macro_f1": state["best_val_macro_f1"],
               "epochs_trained": state["epochs_done"], "stopped_early": state["stopped_early"],
               "first_epoch_val_macro_f1": finite_or_none(state["history"][0]["val_macro_f1"]),
               "paper_test_percent": PAPER_TEST, "summary": summary,
               "nan_policy": "a class absent from both truth and prediction has null precision, recall, "
                             "F1 and IoU and is left out of the macro means"}
    atomic.write_json(run_dir / "metrics.json", metrics)
    print(f"wrote {run_dir}")
    print(summary)
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
