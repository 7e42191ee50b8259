"""Idle time at the end of tf.data passes: a new iterator per epoch with autotune on, and with it off.

Each epoch iterates a fresh iterator over an in-memory, parallel-mapped, prefetched dataset (the shape
of the SPML and LUCAS input pipelines) with a fixed sleep standing in for the training step, then
deletes the iterator, as a training loop or `fit` does at a pass end. `ours` is the pipeline with
autotune off (`pipelines.without_autotune`, as the SPML and LUCAS scripts run it), the peer the same
pipeline with autotune on; passes alternate between them (`bench.measure`, one thread: the steps
sleep). Printed per mode: the passes that ended more than 0.5 s after their last step, the total
idle seconds, then the table and last the ratio of pass time (wall) autotune on / off.

    python -m bench.pass_end_idle                # about 3.5 minutes; the wait is intermittent
    python -m bench.pass_end_idle --epochs 20
"""

import argparse
import time

import common.startup  # noqa: F401  (loads TensorFlow quietly, so before it)

import numpy as np
import tensorflow as tf

from bench import measure
from common import pipelines


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    measure.add_arguments(parser, rounds=None)
    parser.set_defaults(threads="1")
    parser.add_argument("--epochs", type=int, default=8, help="Passes per mode (the timed rounds).")
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


def one_pass(dataset, step_seconds, idles):
    """Iterate a fresh iterator over `dataset`, sleeping `step_seconds` per batch; append the seconds
    between the last step and the pass's end to `idles`."""
    last = time.perf_counter()
    iterator = iter(dataset)
    for _batch in iterator:
        time.sleep(step_seconds)
        last = time.perf_counter()
    del iterator, _batch
    idles.append(time.perf_counter() - last)


def measure_rows(options, threads):
    modes = {"ours": False, "autotune on": True}  # ours: autotune off, as the scripts run it
    datasets = {name: make_dataset(16 * options.steps, autotune) for name, autotune in modes.items()}
    idles = {name: [] for name in modes}
    contenders = {
        name: (lambda name=name: one_pass(datasets[name], options.step_seconds, idles[name]))
        for name in modes
    }
    samples = measure.alternate(contenders, options.epochs, warmup=0)
    for name, values in idles.items():
        stalled = [f"{epoch}: {idle:.2f} s" for epoch, idle in enumerate(values) if idle > 0.5]
        total = sum(sample.wall for sample in samples[name])
        print(
            f"{name:12s} {total:6.1f} s in {options.epochs} passes, idle {sum(values):5.2f} s; "
            f"stalls {stalled}"
        )
    return measure.rows_for("pass", samples, options.steps, threads, "steps")


def main(options):
    note = "ours: autotune off; the ratio is of wall time (the steps sleep, CPU time says nothing here)"
    return measure.run(options, measure_rows, "bench.pass_end_idle", basis="wall", notes=[note])


if __name__ == "__main__":
    main(get_args_parser().parse_args())
