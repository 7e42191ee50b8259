"""ARAS400k land-cover segmentation: SegFormer all-MLP decoder on an EfficientNet encoder, Dice loss.

Paper: U. M. Caglar, A. Temizel, "Grounding Synthetic Data Generation With Vision and Language
Models" (ARAS400k; arXiv 2603.09625): SegFormer on 256 px Sentinel-2 RGB patches with 7 WorldCover
classes, trained on real, synthetic or real + synthetic patches (`--train_splits`; the poster's
test macro F1 77.09 / 75.10 / 77.80). Feature distributions: `segformer_vis.py`.
Input: `<root>/{train,val,test}/{images,masks}/*.png` (dataset_creator.py), plus `synth/` and
`train/generated/` (generative_trainer_unet_spade_gan.py) for the synthetic training sets.

Commands (the demo: tiny synthetic patches, efficientnetb0, about a minute on a CPU):
    python segmentation_train.py --data_root ARAS400k --weights efficientnetb7_notop.h5
    python segmentation_train.py --data_root ARAS400k --train_splits train generated
    python segmentation_train.py --data_root ARAS400k --resume            # continue a stopped run
    python segmentation_train.py --demo
The paper setting (EfficientNet-B7, 20 epochs over ~80k patches) needs a GPU (`--mixed_precision`).

Outputs in `results/segmentation_train/<run_name>/` (docs/aras400k.md, "segmentation_train.py"):
config.json, log.csv, state.json + checkpoint_epochNNN.npz, best.weights.h5, best_model.keras,
metrics.json, per_class.csv, confusion_matrix.png, curves.png, predictions.zip, examples.png. The
demo (48 synthetic 64 px patches, efficientnetb0, 8 epochs; 62 s of CPU time measured) prints (the
figures depend on the CPU)
    test: macro_f1 93.87 | macro_iou 88.63 | macro_precision 93.99 | macro_recall 93.82 | accuracy 94.11
    (%; best epoch 7 of 8, val macro_f1 92.33)

Metric policy (common/metrics.py): metrics come from one confusion matrix accumulated batch by batch;
a class absent from both truth and prediction has NaN precision/recall/F1/IoU (null in
metrics.json) and is left out of the macro means; a class present in only one of them scores 0.
"""

import os
import sys
import time
import zipfile
from pathlib import Path

from common import cli, precision, tensorboard

ENCODERS = [f"efficientnetb{size}" for size in range(8)]


def get_args_parser():
    parser = cli.Parser(
        description="Train a SegFormer (EfficientNet encoder) on ARAS400k patches with Dice loss and "
        "evaluate the test split."
    )
    add = parser.add_argument
    add("--data_root", default="", help="Dataset root holding {train,val,test}/{images,masks}/*.png.")
    splits = (
        "Training sets, combined: train (train/images), synth (synth/images, the StyleGAN3 set), "
        "generated (train/generated, the SPADE GAN's images of the train masks), or any <name> with "
        'name/{images,masks}; e.g. --train_splits train generated (or "train generated").'
    )
    add("--train_splits", nargs="+", default=["train"], help=splits)
    add("--encoder", default="efficientnetb7", choices=ENCODERS, help="EfficientNet encoder size.")
    add("--weights", default="", help="Local Keras EfficientNet notop .h5 weights (none: random start).")
    add("--image_size", type=int, default=256, help="Patch side in pixels; a multiple of 32.")
    add("--decoder_width", type=int, default=256, help="Channels of the SegFormer all-MLP decoder (smp).")
    # The demo's few dozen steps cannot settle 0.99 running averages, so it uses 0.9.
    add("--bn_momentum", type=float, default=0.99, help="Encoder batch-norm momentum (EfficientNet's).")
    add("--loss", default="dice", choices=["dice", "dice_ce"], help="Multiclass Dice from logits (+ CE).")
    add("--epochs", type=int, default=20, help="Maximum epochs.")
    add("--batch_size", type=int, default=24, help="Global batch size, split across replicas.")
    add("--learning_rate", type=float, default=1e-3, help="AdamW learning rate.")
    add("--weight_decay", type=float, default=1e-2, help="AdamW decoupled weight decay (PyTorch's default).")
    add("--epsilon", type=float, default=1e-8, help="AdamW epsilon (torch.optim.AdamW's default).")
    cli.add_optimizer_convention_argument(parser)
    add("--clipnorm", type=float, default=1.0, help="Clip the global gradient norm (torch clip_grad_norm_).")
    add("--lr_patience", type=int, default=3, help="ReduceLROnPlateau patience in epochs on val macro-F1.")
    add("--lr_factor", type=float, default=0.1, help="ReduceLROnPlateau factor.")
    add("--early_stopping_patience", type=int, default=5, help="Stop after this many epochs without gain.")
    unknown = "A mask colour outside the palette is an error, or (ignore) left out of loss and metrics."
    add("--unknown_colour", default="error", choices=["error", "ignore"], help=unknown)
    add("--num_examples", type=int, default=6, help="Test samples shown in examples.png.")
    cli.add_strategy_argument(parser)
    precision.add_argument(parser)
    add("--threads", type=int, default=min(16, os.cpu_count() or 1), help="Threads for the mask check.")
    cli.add_demo_argument(parser, "and train efficientnetb0 on it (about a minute on a CPU).")
    add("--demo_images", type=int, default=48, help="With --demo: training patches (val and test a third).")
    cli.add_run_arguments(parser)
    tensorboard.add_argument(parser)
    parser.demo_defaults(epochs=8, batch_size=8, image_size=64, encoder="efficientnetb0", bn_momentum=0.9)
    return parser


# --help answers here, before TensorFlow loads.
cli.answer_help_early(get_args_parser, __name__)

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import cv2
import keras
import numpy as np
import tensorflow as tf
from keras import layers

from common import atomic, checkpoints, metrics, optimizers, plots, runs
from common.aras400k import classes, demo_data, efficientnet, patches
from common.errors import cli_entry, require, require_dir, require_in_range

CLASS_NAMES, NUM_CLASSES, IGNORE_INDEX = classes.CLASS_NAMES, classes.NUM_CLASSES, classes.IGNORE_INDEX
# The poster's test-split numbers for SegFormer (real data only), in %.
PAPER_TEST = {"macro_f1": 77.09, "macro_iou": 65.26, "macro_precision": 78.10, "macro_recall": 76.33}
# The arguments that change what a checkpoint holds: --resume refuses a run made with others.
RESUME_SETTINGS = (
    "encoder",
    "image_size",
    "decoder_width",
    "loss",
    "batch_size",
    "seed",
    "unknown_colour",
    "bn_momentum",
    "mixed_precision",
    "train_splits",
    "optimizer_convention",
)
# Larger values are typing mistakes, refused before anything is written.
MAX_EPOCHS, MAX_IMAGE_SIZE, MAX_DECODER_WIDTH = 10_000, 8192, 4096
MAX_THREADS, MAX_DEMO_IMAGES, MAX_BATCH = 1024, 1_000_000, 1 << 20


# ---- the paper's pieces: augmentation, model, loss, schedule ----


def augment_pair(image, mask, seed):
    """Paired train augmentation (the reference's albumentations pipeline), stateless so runs re-create.

    Flips (p=0.5 each) and a random multiple of 90 degrees (p=0.5) move image and mask together;
    brightness/contrast +-0.2 (p=0.3) changes the image only: image * alpha + beta * 255.
    """
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


def require_image_size(image_size):
    """The encoder halves the input five times: the patch side must be a multiple of 32."""
    inside = image_size % 32 == 0 and 32 <= image_size <= MAX_IMAGE_SIZE
    require(inside, "--image_size", f"is {image_size}", f"a multiple of 32 from 32 to {MAX_IMAGE_SIZE}")


def build_segformer(encoder_name, image_size, decoder_width=256, num_classes=NUM_CLASSES, weights=""):
    """SegFormer head (Xie et al. 2021, Eq. 1-4) on the encoder's 5 stages, as smp's Segformer.

    segmentation_models_pytorch (which the paper used) fuses all 5 EfficientNet stages, strides 2-32:
    each is projected by a per-pixel linear layer to `decoder_width` and resized bilinearly to
    stride 4 (the stride-2 stage is halved: PyTorch's bilinear x0.5 without antialiasing is a 2x2
    mean), concatenated deepest first (5 x 256 = 1280 channels), fused by 1x1 conv + BN + ReLU,
    classified by a 1x1 conv and upsampled x4. Logits are float32 even under mixed precision.
    """
    require_image_size(image_size)
    encoder = efficientnet.build_encoder(encoder_name, image_size, weights)
    logits = segformer_decoder(efficientnet.encoder_pyramid(encoder, image_size), decoder_width, num_classes)
    return keras.Model(encoder.input, logits, name=f"segformer_{encoder_name}")


def segformer_decoder(features, decoder_width=256, num_classes=NUM_CLASSES):
    """The all-MLP decoder and head on the 5 stage outputs (strides 2, 4, 8, 16, 32), to logits."""
    projected = []
    for stride, feature in zip(efficientnet.ENCODER_STRIDES, features, strict=True):
        x = layers.Conv2D(decoder_width, 1, name=f"decoder_linear_stride{stride}")(feature)
        if stride == 2:
            x = layers.AveragePooling2D(2, name="decoder_downsample_stride2")(x)
        elif stride > 4:
            x = layers.UpSampling2D(
                stride // 4, interpolation="bilinear", name=f"decoder_upsample_stride{stride}"
            )(x)
        projected.append(x)
    x = layers.Concatenate(name="decoder_concat")(projected[::-1])
    x = layers.Conv2D(decoder_width, 1, use_bias=False, name="decoder_fuse_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="decoder_fuse_bn")(x)
    x = layers.ReLU(name="decoder_fuse_relu")(x)
    x = layers.Conv2D(num_classes, 1, name="decoder_classifier")(x)
    x = layers.UpSampling2D(4, interpolation="bilinear", name="decoder_upsample_output")(x)
    return layers.Activation("linear", dtype="float32", name="logits")(x)


@keras.saving.register_keras_serializable(package="aras400k")
class MulticlassDiceLoss(keras.losses.Loss):
    """The paper's loss: smp DiceLoss(mode="multiclass", from_logits=True), optionally + cross-entropy.

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

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Keras divides a loss by the number of replicas only when it reduces per-sample values (and
        # multiplies the reported loss back); this loss is one number per batch, so divide it here.
        loss = super().__call__(y_true, y_pred, sample_weight)
        return loss / tf.cast(tf.distribute.get_strategy().num_replicas_in_sync, loss.dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "cross_entropy": self.cross_entropy,
            "eps": self.eps,
        }


class PaperSchedule(keras.callbacks.Callback):
    """The reference's schedule on validation macro-F1, written out so that it resumes exactly.

    After each epoch: validation macro-F1 from the streaming confusion matrix, then ReduceLROnPlateau
    (mode max, PyTorch semantics: threshold 1e-4 relative, reduce once more than `lr_patience` epochs
    failed to improve), early stopping after `early_stopping_patience` epochs without a better
    macro-F1, best.weights.h5 on improvement, and a checkpoint + state.json + log.csv.
    """

    def __init__(self, args, run_dir, step, strategy, val_dataset, state):
        super().__init__()
        self.args, self.run_dir, self.step, self.strategy = args, run_dir, step, strategy
        self.val_dataset, self.state, self.epoch_started = val_dataset, state, time.time()
        self.scalars = tensorboard.ScalarLog(run_dir, enabled=not args.no_tensorboard)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        args, state = self.args, self.state
        val_loss, confusion = evaluate(self.step, self.strategy, self.val_dataset)
        val = confusion.metrics(CLASS_NAMES)
        macro_f1 = val["macro_f1"] if np.isfinite(val["macro_f1"]) else -1.0
        learning_rate = float(np.asarray(self.model.optimizer.learning_rate))
        record = {
            "epoch": epoch + 1,
            "loss": float(logs.get("loss", float("nan"))),
            "val_loss": val_loss,
            "val_macro_f1": val["macro_f1"],
            "val_macro_iou": val["macro_iou"],
            "val_accuracy": val["accuracy"],
            "learning_rate": learning_rate,
            "seconds": time.time() - self.epoch_started,
        }
        if macro_f1 > state["best_val_macro_f1"]:
            state.update(best_val_macro_f1=macro_f1, best_epoch=epoch + 1, epochs_without_improvement=0)
            atomic.save_weights(self.model, self.run_dir / "best.weights.h5")
        else:
            state["epochs_without_improvement"] += 1
        if macro_f1 > state["plateau_best"] * (1.0 + 1e-4):
            state.update(plateau_best=macro_f1, plateau_bad_epochs=0)
        else:
            state["plateau_bad_epochs"] += 1
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {record['loss']:.4f} val_loss {val_loss:.4f} "
            f"val_macro_f1 {val['macro_f1']:.4f} val_macro_iou {val['macro_iou']:.4f} lr {learning_rate:.2e}",
            flush=True,
        )
        if state["plateau_bad_epochs"] > args.lr_patience:
            self.model.optimizer.learning_rate.assign(learning_rate * args.lr_factor)
            state["plateau_bad_epochs"] = 0
            print(
                f"epoch {epoch + 1}: no macro-F1 gain for {args.lr_patience + 1} epochs, "
                f"learning rate -> {learning_rate * args.lr_factor:.2e}"
            )
        if state["epochs_without_improvement"] >= args.early_stopping_patience:
            self.model.stop_training = True
            state["stopped_early"] = True
            print(f"epoch {epoch + 1}: early stopping, best macro-F1 at epoch {state['best_epoch']}")
        state["history"].append(record)
        state["epochs_done"] = epoch + 1
        save_checkpoint(self.model, self.run_dir, state)
        self.scalars.write(epoch + 1, record)


# ---- evaluation: streaming confusion matrix ----


def make_predict_step(model, strategy, loss_fn):
    """Compiled step: per-batch summed loss, predicted labels and truth, gathered over replicas."""

    def replica_step(images, masks):
        logits = model(images, training=False)
        count = tf.cast(tf.shape(images)[0], tf.float32)
        # Multi-worker all-gather takes no uint8: labels travel as int32, handed back as uint8.
        labels = tf.cast(tf.argmax(logits, axis=-1), tf.int32)
        return loss_fn.call(masks, logits) * count, count, labels, tf.cast(masks, tf.int32)

    @tf.function(reduce_retracing=True)
    def step(batch):
        images, masks = batch
        loss_sum, count, labels, truth = strategy.run(replica_step, args=(images, masks))
        reduce = tf.distribute.ReduceOp.SUM
        return (
            strategy.reduce(reduce, loss_sum, axis=None),
            strategy.reduce(reduce, count, axis=None),
            tf.cast(strategy.gather(labels, axis=0), tf.uint8),
            tf.cast(strategy.gather(truth, axis=0), tf.uint8),
        )

    return step


def evaluate(step, strategy, dataset, on_batch=None):
    """Stream a split through the model: mean loss and a ConfusionMatrix (no pixel kept in memory)."""
    confusion = metrics.ConfusionMatrix(NUM_CLASSES, ignore_index=IGNORE_INDEX)
    loss_total, sample_total = 0.0, 0.0
    for batch in strategy.experimental_distribute_dataset(dataset):
        loss_sum, count, predicted, truth = (value.numpy() for value in step(batch))
        confusion.update(truth, predicted)
        loss_total, sample_total = loss_total + float(loss_sum), sample_total + float(count)
        if on_batch is not None:
            on_batch(predicted, truth)
    return loss_total / max(sample_total, 1.0), confusion


def evaluate_test(step, strategy, pairs, args, path):
    """Evaluate the test split, writing colour-coded predictions to `path` (a zip) batch by batch.

    Returns (mean loss, ConfusionMatrix, the first `--num_examples` predicted label maps).
    """
    examples, names = [], iter([image.name for image, _ in pairs])
    with (
        atomic.atomic_path(path) as temporary,
        zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive,
    ):

        def write_predictions(predicted, truth):
            for labels in predicted:
                colours = cv2.cvtColor(classes.labels_to_colours(labels), cv2.COLOR_RGB2BGR)
                archive.writestr(next(names), cv2.imencode(".png", colours)[1].tobytes())
                if len(examples) < args.num_examples:
                    examples.append(labels)

        dataset = patches.eval_batches(pairs, args.image_size, args.batch_size)
        loss, confusion = evaluate(step, strategy, dataset, on_batch=write_predictions)
    return loss, confusion, examples


# ---- checkpoints and figures ----


def save_checkpoint(model, run_dir, state):
    """Model + optimizer arrays (dropout seed states included), then state.json, then log.csv.

    `model.variables` (not `.weights`) holds the dropout seed-generator states, so a resumed run
    draws the same dropout masks as an uninterrupted one.
    """
    checkpoints.save(
        run_dir, f"checkpoint_epoch{state['epochs_done']:03d}", checkpoints.model_arrays(model), state
    )
    atomic.write_csv(run_dir / "log.csv", state["history"], list(state["history"][0]))


def load_checkpoint(model, run_dir):
    """Restore what save_checkpoint wrote into a model built and compiled with the same arguments."""
    state, arrays = checkpoints.load(run_dir)
    checkpoints.restore_model(model, arrays, run_dir / f"{state['checkpoint']}.npz")
    return state


def plot_examples(pairs, predictions, path) -> None:
    """One row per test patch: image | truth mask | predicted mask, with the palette as legend."""
    from matplotlib.patches import Patch

    plt = plots.pyplot()
    figure, axes = plt.subplots(len(predictions), 3, figsize=(9, 3 * len(predictions)), squeeze=False)
    for row, ((image_path, mask_path), predicted) in enumerate(zip(pairs, predictions, strict=True)):
        image = cv2.cvtColor(cv2.imread(str(image_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        truth = cv2.cvtColor(cv2.imread(str(mask_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        panels = [
            (image, image_path.name),
            (truth, "truth"),
            (classes.labels_to_colours(predicted), "prediction"),
        ]
        for col, (panel, title) in enumerate(panels):
            axes[row, col].imshow(panel)
            axes[row, col].set_title(title, fontsize=8)
            axes[row, col].axis("off")
    legend = [Patch(color=classes.PALETTE[i] / 255, label=name) for i, name in enumerate(CLASS_NAMES)]
    figure.legend(handles=legend, loc="lower center", ncol=4)
    plots.save(figure, path)


def plot_curves(history, path):
    epochs = [row["epoch"] for row in history]

    def series(key):
        return epochs, [row[key] for row in history]

    panels = {
        "Loss": {"train": series("loss"), "validation": series("val_loss")},
        "Validation metrics": {"macro F1": series("val_macro_f1"), "macro IoU": series("val_macro_iou")},
        "Learning rate": {"learning rate": series("learning_rate")},
    }
    plots.curves(path, panels, log_panels=("Learning rate",))


# ---- main's steps ----


def train_split_names(values):
    """--train_splits as a list of names: "train synth" and train synth mean the same."""
    names = [name for value in values for name in str(value).split()]
    require(names and len(set(names)) == len(names), "--train_splits", f"is {values}", "distinct names")
    return names


def list_training_set(root, name, image_size) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of one training set; "generated" pairs train/generated with train/masks."""
    root = Path(root)
    if name != "generated":
        return patches.list_split(root, name, image_size)
    folder = require_dir(root / "train" / "generated", "the images of generative_trainer_unet_spade_gan.py")
    pairs = []
    for _, mask in patches.list_split(root, "train", image_size):
        image = folder / mask.name
        require(image.is_file(), image, "is missing", f"one generated image per mask of {mask.parent}")
        size = patches.png_size(image)
        expected = f"{image_size}x{image_size}, the size of its mask"
        require(size == (image_size, image_size), image, f"is {size[0]}x{size[1]}", expected)
        pairs.append((image, mask))
    return pairs


def read_splits(args):
    """Every split's (image, mask) pairs and class pixel counts, all masks checked before training.

    The training pairs are those of every --train_splits set, concatenated (the reference's
    ConcatDataset of real and synthetic sets).
    """
    root = require_dir(args.data_root, "the dataset root folder")
    pairs = {split: patches.list_split(root, split, args.image_size) for split in ("val", "test")}
    pairs["train"] = [
        pair for name in args.train_splits for pair in list_training_set(root, name, args.image_size)
    ]
    pixel_counts = {}
    for split in patches.SPLITS:
        counts = pixel_counts[split] = patches.check_masks(pairs[split], args.unknown_colour, args.threads)
        fractions = " ".join(
            f"{name} {100 * c / max(counts.sum(), 1):.1f}%"
            for name, c in zip(CLASS_NAMES, counts, strict=False)
        )
        label = f"train ({' + '.join(args.train_splits)})" if split == "train" else split
        print(
            f"{label}: {len(pairs[split])} patches | {fractions} | unknown colour "
            f"{int(counts[NUM_CLASSES])} px (ignored)"
        )
    return pairs, pixel_counts


def check_arguments(args):
    """Every argument a user can get wrong, checked before anything (demo data included) is written."""
    require_image_size(args.image_size)
    require(
        0 < args.decoder_width <= MAX_DECODER_WIDTH,
        "--decoder_width",
        f"is {args.decoder_width}",
        f"1 to {MAX_DECODER_WIDTH} channels",
    )
    require(0 <= args.bn_momentum <= 1, "--bn_momentum", f"is {args.bn_momentum}", "a number in [0, 1]")
    require(1 <= args.epochs <= MAX_EPOCHS, "--epochs", f"is {args.epochs}", f"1 to {MAX_EPOCHS}")
    # A batch of 10**12 patches kept tf.data busy for minutes without one step: refused, like absurd epochs.
    require_in_range(args, "batch_size", 1, MAX_BATCH)
    positive = (
        ("--learning_rate", args.learning_rate),
        ("--epsilon", args.epsilon),
        ("--clipnorm", args.clipnorm),
        ("--num_examples", args.num_examples),
    )
    for flag, value in positive:
        require(value > 0, flag, f"is {value}", "a positive number")
    require_in_range(args, "threads", 1, MAX_THREADS)
    require_in_range(args, "demo_images", 1, MAX_DEMO_IMAGES)
    for flag, value in (("--weight_decay", args.weight_decay), ("--lr_patience", args.lr_patience)):
        require(value >= 0, flag, f"is {value}", "zero or a positive number")
    require(
        args.early_stopping_patience >= 1,
        "--early_stopping_patience",
        f"is {args.early_stopping_patience}",
        "a positive number of epochs",
    )
    require(0 < args.lr_factor <= 1, "--lr_factor", f"is {args.lr_factor}", "a number in (0, 1]")
    require(0 <= args.seed < 2**32, "--seed", f"is {args.seed}", "0 to 2**32 - 1")
    require(
        not Path(args.results_dir).exists() or Path(args.results_dir).is_dir(),
        args.results_dir,
        "is not a folder",
        "a folder for the results (--results_dir)",
    )


def open_run(args, run_name, pairs, pixel_counts):
    """The run folder and its schedule state: fresh, or that of the checkpoint --resume continues."""
    run_dir = runs.prepare_run_dir(
        args.results_dir, "segmentation_train", run_name, args.overwrite, args.resume
    )
    if args.resume and (run_dir / checkpoints.STATE_FILE).exists():
        runs.check_same_settings(
            run_dir / "config.json",
            runs.settings_of(args, RESUME_SETTINGS),
            what="the checkpoints of this run",
            section="args",
            hint="the same arguments to resume it, --overwrite to start over, or another --run_name",
        )
        return run_dir, True
    runs.write_config(
        run_dir,
        args,
        steps_per_epoch=-(-len(pairs["train"]) // args.batch_size),
        class_names=CLASS_NAMES,
        palette=classes.PALETTE.tolist(),
        patches={s: len(pairs[s]) for s in patches.SPLITS},
        class_pixels={s: pixel_counts[s][:NUM_CLASSES] for s in patches.SPLITS},
        unknown_colour_pixels={s: int(pixel_counts[s][NUM_CLASSES]) for s in patches.SPLITS},
    )
    return run_dir, False


def compile_as_trained(model, args, loss_fn):
    """Compile `model` as this script trains it: AdamW with `args`' settings, `loss_fn`, no XLA on CPUs."""
    # The reference's torch.optim.AdamW (eps 1e-8 after the bias correction, decoupled decay);
    # --optimizer_convention keras gives keras.optimizers.AdamW's rule with the same values.
    optimizer = optimizers.make_optimizer(
        "adamw",
        args.learning_rate,
        convention=args.optimizer_convention,
        weight_decay=args.weight_decay,
        epsilon=args.epsilon,
        global_clipnorm=args.clipnorm,
    )
    # XLA compilation of the EfficientNet backward pass takes minutes on a CPU and gains little
    # there; on GPUs Keras decides ("auto").
    jit_compile = "auto" if tf.config.list_physical_devices("GPU") else False
    model.compile(optimizer=optimizer, loss=loss_fn, jit_compile=jit_compile)
    # Creating the optimizer slots now lets the train step be traced once instead of twice.
    model.optimizer.build(model.trainable_variables)


def build_model(args, strategy, resuming):
    """The compiled SegFormer, its loss, and (when resuming) the restored checkpoint's state."""
    state = {
        "epochs_done": 0,
        "best_val_macro_f1": -2.0,
        "best_epoch": 0,
        "epochs_without_improvement": 0,
        "plateau_best": -2.0,
        "plateau_bad_epochs": 0,
        "stopped_early": False,
        "history": [],
    }
    precision.apply(args.mixed_precision)
    with strategy.scope():
        loss_fn = MulticlassDiceLoss(cross_entropy=args.loss == "dice_ce")
        weights = "" if resuming else args.weights
        model = build_segformer(args.encoder, args.image_size, args.decoder_width, weights=weights)
        # --bn_momentum is the encoder's; the decoder's fuse BN keeps smp's 0.9.
        for layer in model.layers:
            if isinstance(layer, layers.BatchNormalization) and not layer.name.startswith("decoder_"):
                layer.momentum = args.bn_momentum
        compile_as_trained(model, args, loss_fn)
    return model, loss_fn, state


def test_summary(test, state):
    return (
        f"test: macro_f1 {100 * test['macro_f1']:.2f} | macro_iou {100 * test['macro_iou']:.2f} | "
        f"macro_precision {100 * test['macro_precision']:.2f} | macro_recall "
        f"{100 * test['macro_recall']:.2f} | accuracy {100 * test['accuracy']:.2f} (%; best epoch "
        f"{state['best_epoch']} of {state['epochs_done']}, val macro_f1 "
        f"{100 * state['best_val_macro_f1']:.2f})"
    )


def write_test_outputs(run_dir, state, test_loss, confusion, examples, test_pairs):
    """metrics.json, per_class.csv and the three figures; returns what metrics.json holds."""
    test = confusion.metrics(CLASS_NAMES)
    atomic.write_csv(run_dir / "per_class.csv", test["per_class"], list(test["per_class"][0]))
    plots.confusion_matrix(
        confusion.counts, CLASS_NAMES, run_dir / "confusion_matrix.png", "Test confusion matrix (pixels)"
    )
    plot_curves(state["history"], run_dir / "curves.png")
    plot_examples(test_pairs[: len(examples)], examples, run_dir / "examples.png")
    results = {
        "test": metrics.json_safe(test),
        "test_loss": test_loss,
        "confusion_matrix": confusion.counts,
        "best_epoch": state["best_epoch"],
        "best_val_macro_f1": state["best_val_macro_f1"],
        "epochs_trained": state["epochs_done"],
        "stopped_early": state["stopped_early"],
        "first_epoch_val_macro_f1": metrics.finite_or_none(state["history"][0]["val_macro_f1"]),
        "train_splits": state.get("train_splits", ["train"]),
        "paper_test_percent": PAPER_TEST,
        "summary": test_summary(test, state),
        "nan_policy": "a class absent from both truth and prediction has null precision, recall, "
        "F1 and IoU and is left out of the macro means",
    }
    atomic.write_json(run_dir / "metrics.json", results)
    return results


@cli_entry
def main(args):
    # MultiWorkerMirroredStrategy must exist before the first TensorFlow op; only its chief keeps files.
    strategy = runs.make_strategy(args.strategy)
    args.results_dir = runs.chief_results_dir(strategy, args.results_dir)
    check_arguments(args)
    if args.demo:
        args.data_root = str(cli.demo_data_dir(args, "segmentation_train"))
        demo_data.write_demo_patches(args.data_root, args.image_size, args.demo_images, args.seed)
    require(args.data_root, "--data_root", "is missing", "the dataset root, or --demo")
    args.train_splits = train_split_names(args.train_splits)
    runs.print_args(args)
    sets = "+".join(args.train_splits)
    run_name = args.run_name or (
        ("demo" if sets == "train" else f"demo_{sets}")
        if args.demo
        else f"{args.encoder}_{args.loss}_{args.image_size}px_{sets}_seed{args.seed}"
    )

    # ---- data ----
    pairs, pixel_counts = read_splits(args)
    steps_per_epoch = -(-len(pairs["train"]) // args.batch_size)

    # ---- model ----
    runs.seed_everything(args.seed, args.deterministic)
    run_path = Path(args.results_dir) / "segmentation_train" / run_name
    # Built before the run folder is made, so that a bad --weights file leaves nothing behind.
    model, loss_fn, state = build_model(
        args, strategy, args.resume and (run_path / checkpoints.STATE_FILE).exists()
    )
    run_dir, resuming = open_run(args, run_name, pairs, pixel_counts)
    if resuming:
        state = load_checkpoint(model, run_dir)
        print(f"resuming {run_dir} after epoch {state['epochs_done']} ({state['checkpoint']})")
    elif not args.weights:
        print(f"note: {args.encoder} starts from random initialisation (no --weights file given)")
    state["train_splits"] = args.train_splits
    print(
        f"model: {model.name}, {model.count_params():,} parameters, {strategy.num_replicas_in_sync} "
        f"replica(s), global batch {args.batch_size}, {steps_per_epoch} steps per epoch"
    )
    step = make_predict_step(model, strategy, loss_fn)
    val_dataset = patches.eval_batches(pairs["val"], args.image_size, args.batch_size)

    # ---- train ----
    if not state["stopped_early"] and state["epochs_done"] < args.epochs:
        train_dataset = patches.train_batches(
            pairs["train"],
            args.image_size,
            args.batch_size,
            args.seed,
            state["epochs_done"],
            args.epochs,
            augment_pair,
        )
        schedule = PaperSchedule(args, run_dir, step, strategy, val_dataset, state)
        model.fit(
            train_dataset,
            epochs=args.epochs,
            initial_epoch=state["epochs_done"],
            steps_per_epoch=steps_per_epoch,
            callbacks=[schedule],
            verbose=1 if sys.stdout.isatty() else 0,
        )

    # ---- evaluate ----
    model.load_weights(run_dir / "best.weights.h5")
    atomic.save_keras(model, run_dir / "best_model.keras")
    test_loss, confusion, examples = evaluate_test(
        step, strategy, pairs["test"], args, run_dir / "predictions.zip"
    )
    results = write_test_outputs(run_dir, state, test_loss, confusion, examples, pairs["test"])
    print(f"wrote {run_dir}")
    print(results["summary"])
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
