"""Idle time at the end of tf.data passes: a new iterator per epoch with autotune on, and with it off.

Each epoch iterates a fresh iterator over an in-memory, parallel-mapped, prefetched dataset (the shape
of the SPML and LUCAS input pipelines) with a fixed sleep standing in for the training step, then
deletes the iterator, as a training loop or `fit` does at a pass end. Printed per mode: the epochs that
ended more than 0.5 s after their last step, the total idle seconds, and last the ratio of total pass
time autotune on / off.

    python -m bench.pass_end_idle                # about 3.5 minutes; the wait is intermittent
    python -m bench.pass_end_idle --epochs 20
"""

import argparse
import time

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np
import tensorflow as tf

from common import pipelines


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="Passes per mode.")
    parser.add_argument("--steps", type=int, default=12, help="Batches per pass.")
    parser.add_argument("--step_seconds", type=float, default=1.0, help="Sleep standing in for a train step.")
    return parser


def make_dataset(count, autotune):
    images = tf.constant(np.random.default_rng(0).normal(size=(count, 32, 32, 3)).astype(np.float32))
    dataset = tf.data.Dataset.range(count).map(
        lambda index: (tf.gather(images, index) * 2.0, index), num_parallel_calls=tf.data.AUTOTUNE
    )
    dataset = dataset.batch(16).prefetch(tf.data.AUTOTUNE)
    return dataset if autotune else pipelines.without_autotune(dataset)


def passes(dataset, epochs, step_seconds):
    """(seconds per pass, idle seconds between the last step and the pass's end) for each epoch."""
    totals, idles = [], []
    for _ in range(epochs):
        start = last = time.perf_counter()
        iterator = iter(dataset)
        for _batch in iterator:
            time.sleep(step_seconds)
            last = time.perf_counter()
        del iterator, _batch
        end = time.perf_counter()
        totals.append(end - start)
        idles.append(end - last)
    return np.array(totals), np.array(idles)


def main(options):
    results = {}
    for mode in ("autotune on", "autotune off"):
        dataset = make_dataset(16 * options.steps, mode == "autotune on")
        totals, idles = passes(dataset, options.epochs, options.step_seconds)
        stalled = [f"{epoch}: {idle:.2f} s" for epoch, idle in enumerate(idles) if idle > 0.5]
        print(
            f"{mode:12s} {totals.sum():6.1f} s in {options.epochs} passes, "
            f"idle {idles.sum():5.2f} s; stalls {stalled}"
        )
        results[mode] = totals.sum()
    print(f"pass time autotune on / off: {results['autotune on'] / results['autotune off']:.2f}x")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
