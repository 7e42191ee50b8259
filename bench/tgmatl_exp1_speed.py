"""Cost per head-epoch of TG-MATL experiment 1: the stacked engine vs one Keras model.fit per head.

Both train the paper's ProjectionHead with the same losses, batch size, Adam and best-validation
checkpointing on the demo data (N=240, 63 training / 9 validation samples per fold).

(a) ours: all 96 heads (3 embeddings x 4 methods x 8 folds) with igarss_exp1's engine, run for two
    epoch counts so that the start-up (tracing, XLA compilation) and the steady cost per epoch are
    separated; (b) baseline: one `model.fit(..., validation_data, ModelCheckpoint(save_best_only))`
    per head, a few heads for a few epochs (steady-state epochs only, which favours the baseline).

    python -m bench.tgmatl_exp1_speed            # about 5 minutes on 2 cores

The last line is `speedup_vs_per_model_fit: <x>` (baseline seconds per head-epoch / ours).
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
    started = time.perf_counter()
    igarss_exp1.train_jobs(jobs, data, task_scores, args, record=lambda job, result: None)
    return time.perf_counter() - started


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.started)


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
    return float(np.mean(steady))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short_epochs", type=int, default=100)
    parser.add_argument("--long_epochs", type=int, default=600)
    parser.add_argument("--baseline_epochs", type=int, default=12)
    parser.add_argument("--baseline_heads_per_method", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    return parser


def main():
    args = get_args_parser().parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data_path, embeddings_dir = awir.make_demo_data(Path(folder) / "demo", seed=0)
        data = awir.load_awir(data_path, embeddings_dir, awir.EMBEDDING_NAMES, Path(folder) / "results", 0.7)
    task_scores = igarss_exp1.fold_task_scores(data, 0)

    short = our_seconds(data, task_scores, args.short_epochs, args.workers)
    long = our_seconds(data, task_scores, args.long_epochs, args.workers)
    per_epoch_all_heads = (long - short) / (args.long_epochs - args.short_epochs)
    startup = max(short - per_epoch_all_heads * args.short_epochs, 0.0)
    ours = per_epoch_all_heads / FULL_HEADS
    ours_full = startup + per_epoch_all_heads * FULL_EPOCHS
    print(
        f"ours: {short:.1f}s for {args.short_epochs} epochs, {long:.1f}s for {args.long_epochs} epochs of "
        f"{FULL_HEADS} heads ({args.workers} workers): {1e3 * ours:.3f} ms per head-epoch, "
        f"start-up {startup:.1f}s"
    )
    baseline = baseline_seconds_per_head_epoch(
        data, task_scores, args.baseline_epochs, args.baseline_heads_per_method
    )
    print(
        f"baseline: {1e3 * baseline:.3f} ms per head-epoch (steady-state epochs of "
        f"{4 * args.baseline_heads_per_method} model.fit runs)"
    )
    print(
        f"projected full protocol ({FULL_HEADS} heads x {FULL_EPOCHS} epochs): "
        f"ours {ours_full / 60:.1f} min, "
        f"baseline {baseline * FULL_HEADS * FULL_EPOCHS / 3600:.1f} h"
    )
    print(f"speedup_vs_per_model_fit: {baseline / ours:.1f}")


if __name__ == "__main__":
    main()
