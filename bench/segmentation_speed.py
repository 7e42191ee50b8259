"""Speed of segmentation_train.py's data path and metrics, each against a baseline in the same run.

1. Streaming metrics: ConfusionMatrix.update over label batches, then the metrics, against sklearn
   (precision_recall_fscore_support + jaccard_score + accuracy_score) on the flattened pixels.
2. Training throughput (images/s) of efficientnetb0 + SegFormer at 256 px fed by our tf.data
   pipeline (PNG decode, exact colour decoding, paired augmentation, prefetch) against the same
   model fed the same images from in-memory numpy arrays. The last line is the ratio
   pipeline / in-memory: 1.0 means the input pipeline costs nothing.

    python -m bench.segmentation_speed                  # a few minutes on a laptop CPU
    python -m bench.segmentation_speed --images 96 --steps 12 --batch_size 24   # on a GPU
"""

import argparse
import tempfile
import time
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np

import segmentation_train as st
from common.aras400k import classes, demo_data, patches
from common.metrics import ConfusionMatrix


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="Training patches written as PNG pairs.")
    parser.add_argument("--image_size", type=int, default=256, help="Patch side (256 in the paper).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="Timed training steps per data source.")
    parser.add_argument(
        "--metric_batches",
        type=int,
        default=16,
        help="Label batches (batch_size x image_size^2 pixels each) for the metrics bench.",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser


def bench_metrics(args):
    from sklearn.metrics import accuracy_score, jaccard_score, precision_recall_fscore_support

    rng = np.random.default_rng(args.seed)
    shape = (args.batch_size, args.image_size, args.image_size)
    batches = [
        (
            rng.integers(0, classes.NUM_CLASSES, shape, dtype=np.uint8),
            rng.integers(0, classes.NUM_CLASSES, shape, dtype=np.uint8),
        )
        for _ in range(args.metric_batches)
    ]
    pixels = args.metric_batches * np.prod(shape)

    started = time.perf_counter()
    confusion = ConfusionMatrix(classes.NUM_CLASSES, ignore_index=classes.IGNORE_INDEX)
    for truth, predicted in batches:
        confusion.update(truth, predicted)
    ours = confusion.metrics(classes.CLASS_NAMES)
    ours_seconds = time.perf_counter() - started

    started = time.perf_counter()
    truth = np.concatenate([t.ravel() for t, _ in batches])
    predicted = np.concatenate([p.ravel() for _, p in batches])
    _, _, f1, _ = precision_recall_fscore_support(truth, predicted, average="macro", zero_division=0)
    jaccard_score(truth, predicted, average="macro")
    accuracy_score(truth, predicted)
    sklearn_seconds = time.perf_counter() - started
    assert abs(f1 - ours["macro_f1"]) < 1e-9
    print(
        f"metrics over {pixels / 1e6:.1f} M pixels: streaming {pixels / ours_seconds / 1e6:.1f} Mpx/s "
        f"({ours_seconds:.2f} s), sklearn on flattened pixels {pixels / sklearn_seconds / 1e6:.1f} Mpx/s "
        f"({sklearn_seconds:.2f} s)"
    )
    print(f"streaming / sklearn throughput ratio: {sklearn_seconds / ours_seconds:.2f}")


def timed_fit(model, data, steps, batch_size=None):
    """Seconds per training step over `steps` steps, after one untimed warm-up epoch."""
    model.fit(data, epochs=1, steps_per_epoch=2, batch_size=batch_size, verbose=0)
    started = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, batch_size=batch_size, verbose=0)
    return (time.perf_counter() - started) / steps


def bench_training(args):
    import keras
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as folder:
        root = demo_data.write_demo_patches(Path(folder) / "data", args.image_size, args.images, args.seed)
        pairs = patches.list_split(root, "train", args.image_size)
        model = st.build_segformer("efficientnetb0", args.image_size)
        model.compile(
            optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-2, global_clipnorm=1.0),
            loss=st.MulticlassDiceLoss(),
            jit_compile="auto" if tf.config.list_physical_devices("GPU") else False,
        )
        model.optimizer.build(model.trainable_variables)

        # Our pipeline, over enough epochs for warm-up plus the timed steps.
        epochs_needed = 2 + -(-(args.steps + 2) * args.batch_size // len(pairs))
        pipeline = patches.train_batches(
            pairs, args.image_size, args.batch_size, args.seed, 0, epochs_needed, st.augment_pair
        )
        pipeline_step = timed_fit(model, pipeline, args.steps)

        # The same images decoded once into memory, repeated, no decoding or augmentation per step.
        images, masks = [], []
        for image, mask in patches.eval_batches(pairs, args.image_size, args.batch_size).unbatch():
            images.append(image.numpy())
            masks.append(mask.numpy())
        in_memory = (
            tf.data.Dataset.from_tensor_slices((np.stack(images), np.stack(masks)))
            .repeat()
            .batch(args.batch_size)
        )
        memory_step = timed_fit(model, in_memory, args.steps)

    pipeline_rate, memory_rate = args.batch_size / pipeline_step, args.batch_size / memory_step
    print(
        f"training efficientnetb0 at {args.image_size} px, batch {args.batch_size}: tf.data pipeline "
        f"{pipeline_rate:.1f} images/s ({pipeline_step:.2f} s/step), in-memory numpy "
        f"{memory_rate:.1f} images/s ({memory_step:.2f} s/step)"
    )
    print(f"pipeline / in-memory throughput ratio: {pipeline_rate / memory_rate:.3f}")


def main(args):
    bench_metrics(args)
    bench_training(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
