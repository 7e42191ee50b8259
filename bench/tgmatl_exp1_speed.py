"""Cost per head-epoch of TG-MATL experiment 1: the stacked engine vs one Keras model.fit per head.

Both train the paper's ProjectionHead with the same losses, batch size, Adam and best-validation
checkpointing on the demo data (N=240, 63 training / 9 validation samples per fold).

(a) ours: all 96 heads (3 embeddings x 4 methods x 8 folds) with igarss_exp1's engine, run for two
    epoch counts so that the start-up (tracing, XLA compilation) and the steady cost per epoch are
    separated; (b) baseline: one `model.fit(..., validation_data, ModelCheckpoint(save_best_only))`
    per head, a few heads for a few epochs (steady-state epochs only, which favours the baseline).

Wall and CPU time and the load are recorded by `bench.measure` (the baseline runs on `--threads`
TensorFlow threads, ours on `--workers` single-threaded worker processes, whose CPU time counts once
they finish).

    python -m bench.tgmatl_exp1_speed            # about 5 minutes on 2 cores
    python -m bench.tgmatl_exp1_speed --short_epochs 2 --long_epochs 4 --baseline_epochs 3

The last line is the ratio ours / baseline per head-epoch (> 1: ours is faster).
"""

import argparse
import tempfile
import time
from pathlib import Path

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import keras
import numpy as np
import tensorflow as tf

import igarss_exp1
from bench import measure
from common.tgmatl import awir

FULL_HEADS, FULL_EPOCHS = 96, 5000


def our_seconds(data, task_scores, epochs, workers):
    args = igarss_exp1.get_args_parser().parse_args(["--epochs", str(epochs), "--workers", str(workers)])
    heads = {
        name: [
            {"method": method, "fold": fold, "key": 1000 * e + 100 * m + fold}
            for m, method in enumerate(igarss_exp1.METHODS)
            for fold in range(1, 9)
        ]
        for e, name in enumerate(awir.EMBEDDING_NAMES)
    }
    jobs = igarss_exp1.split_into_jobs(heads, data["embeddings"], workers)
    return measure.timed(
        lambda: igarss_exp1.train_jobs(jobs, data, task_scores, args, record=lambda *_: None)
    )


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = (time.perf_counter(), measure.cpu_seconds())

    def on_epoch_end(self, epoch, logs=None):
        wall, cpu = time.perf_counter() - self.started[0], measure.cpu_seconds() - self.started[1]
        self.times.append(measure.Sample(wall, cpu, *measure.load_and_steal()))


def baseline_seconds_per_head_epoch(data, task_scores, epochs, heads_per_method):
    """Plain Keras: one compiled ProjectionHead and one model.fit per head, like the reference code."""
    args = igarss_exp1.get_args_parser().parse_args([])
    steady = []
    embedding = data["embeddings"]["dinov2"]
    for method in igarss_exp1.METHODS:
        for fold in range(1, heads_per_method + 1):
            train, val = data["folds"][fold - 1]

            def loss(y_true, y_pred, method=method):
                batch = {
                    "class_label": tf.cast(y_true[None, :, 0], tf.int32),
                    "box_cluster": tf.cast(y_true[None, :, 1], tf.int32),
                    "task_score": tf.cast(y_true[None, :, 2], tf.float64),
                }
                valid = tf.ones_like(batch["class_label"], tf.bool)
                return igarss_exp1.method_loss(
                    method,
                    y_pred[None],
                    batch,
                    valid,
                    args,
                    np.array([args.top_percent]),
                    np.array([args.random_percent]),
                )[0]

            def targets(indices, fold=fold):
                return np.stack(
                    [
                        data["class_label"][indices],
                        data["box_cluster"][indices],
                        task_scores[fold - 1][indices],
                    ],
                    axis=1,
                ).astype(np.float32)

            model = igarss_exp1.build_projection_head(embedding.shape[1])
            model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=loss)
            timer = EpochTimer()
            with tempfile.TemporaryDirectory() as folder:
                checkpoint = keras.callbacks.ModelCheckpoint(
                    str(Path(folder) / "best.weights.h5"), save_best_only=True, save_weights_only=True
                )
                model.fit(
                    embedding[train],
                    targets(train),
                    batch_size=32,
                    epochs=epochs,
                    shuffle=True,
                    validation_data=(embedding[val], targets(val)),
                    callbacks=[timer, checkpoint],
                    verbose=0,
                )
            steady.extend(timer.times[1:])
    return steady


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short_epochs", type=int, default=100)
    parser.add_argument("--long_epochs", type=int, default=600)
    parser.add_argument("--baseline_epochs", type=int, default=12)
    parser.add_argument("--baseline_heads_per_method", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    measure.add_arguments(parser, rounds=None)
    parser.set_defaults(threads="1")
    return parser


def measure_rows(args, threads):
    with tempfile.TemporaryDirectory() as folder:
        data_path, embeddings_dir = awir.make_demo_data(Path(folder) / "demo", seed=0)
        data = awir.load_awir(data_path, embeddings_dir, awir.EMBEDDING_NAMES, Path(folder) / "results", 0.7)
    task_scores = igarss_exp1.fold_task_scores(data, 0)

    short = our_seconds(data, task_scores, args.short_epochs, args.workers)
    long = our_seconds(data, task_scores, args.long_epochs, args.workers)
    epochs = args.long_epochs - args.short_epochs
    steady = measure.Sample(long.wall - short.wall, long.cpu - short.cpu, long.load, long.steal)
    steady_items = FULL_HEADS * epochs
    if steady.wall <= 0 or steady.cpu <= 0:
        # Too few epochs for the difference to rise above the noise of the start-up: count the long
        # run whole, start-up included, which overstates our cost per head-epoch.
        print(
            f"ours: {args.long_epochs - args.short_epochs} extra epochs did not separate the steady cost "
            "from the start-up; the long run is counted whole (start-up included)"
        )
        steady, steady_items, epochs = long, FULL_HEADS * args.long_epochs, args.long_epochs
    per_epoch_all_heads = steady.wall / epochs
    startup = max(short.wall - per_epoch_all_heads * args.short_epochs, 0.0)
    ours_full = startup + per_epoch_all_heads * FULL_EPOCHS
    print(
        f"ours: {short.wall:.1f}s for {args.short_epochs} epochs, {long.wall:.1f}s for {args.long_epochs} "
        f"epochs of {FULL_HEADS} heads ({args.workers} workers): "
        f"{1e3 * per_epoch_all_heads / FULL_HEADS:.3f} ms per head-epoch, start-up {startup:.1f}s"
    )
    baseline = baseline_seconds_per_head_epoch(
        data, task_scores, args.baseline_epochs, args.baseline_heads_per_method
    )
    baseline_wall = float(np.median([sample.wall for sample in baseline]))
    print(
        f"baseline: {1e3 * baseline_wall:.3f} ms per head-epoch (steady-state epochs of "
        f"{4 * args.baseline_heads_per_method} model.fit runs)"
    )
    print(
        f"projected full protocol ({FULL_HEADS} heads x {FULL_EPOCHS} epochs): "
        f"ours {ours_full / 60:.1f} min, "
        f"baseline {baseline_wall * FULL_HEADS * FULL_EPOCHS / 3600:.1f} h"
    )
    return [
        measure.Row("TG-MATL exp1 heads", "ours", threads, steady_items, "head-epochs", [steady]),
        measure.Row("TG-MATL exp1 heads", "model.fit per head", threads, 1, "head-epochs", baseline),
    ]


def main(args):
    return measure.run(args, measure_rows, "bench.tgmatl_exp1_speed")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
